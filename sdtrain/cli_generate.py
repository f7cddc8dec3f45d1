"""`sdtrain generate`: continue a prompt with a trained model, streaming the text."""

from __future__ import annotations

import os
import sys

import click
from rich.markup import escape

from sdtrain.cli_options import err_console


@click.command()
@click.argument("source", metavar="CHECKPOINT_OR_HF_DIR")
@click.option("--prompt", default="\n", show_default="a newline", help="The text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens to generate (fewer where the prompt and they would pass the model's seq_len).")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.8, show_default=True,
              help="Softmax temperature; 0 is greedy decoding.")
@click.option("--top-k", type=click.IntRange(min=0), default=200, show_default=True,
              help="Draw from the K most likely tokens only; 0 is all of them.")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=1337, show_default=True,
              help="The sampling generator's seed: the same seed gives the same text.")
@click.option("--tokenizer", help="The tokenizer.json to use instead of the one the run's recipe names (default: bytes).")
def generate(source, prompt, max_new_tokens, temperature, top_k, seed, tokenizer) -> None:
    """Continue --prompt with the model of a run's checkpoint (a run directory or its
    checkpoints/step_<N>) or of a Hugging Face folder (one model.init_from reads), streaming the
    text as it is decoded; one process, KV cache, stops at the model's seq_len."""
    from sdtrain.generate.load import load_for_generation
    from sdtrain.generate.text import Generation

    loaded = load_for_generation(source, tokenizer)
    generation = Generation(loaded.model, loaded.vocab, prompt, max_new_tokens, temperature, top_k, seed)
    err_console.print(escape(loaded.description), highlight=False, soft_wrap=True)
    try:
        for piece in generation.pieces():
            sys.stdout.write(piece)
            sys.stdout.flush()  # each token as it comes: the point of streaming
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `sdtrain generate ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return
    err_console.print(escape(generation.summary()), highlight=False, soft_wrap=True)
