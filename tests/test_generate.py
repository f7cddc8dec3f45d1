"""`sdtrain generate`: sampling is deterministic for a seed, greedy decoding through the KV
cache gives the tokens that recomputing the whole sequence gives, text streams out as it is
decoded, and bad input is one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY, launch_run, merge, sdtrain

from sdtrain.generate.decode import generate_tokens
from sdtrain.generate.sampling import Sampler
from sdtrain.generate.text import Generation
from sdtrain.generate.vocab import ByteVocab, TokenizerVocab
from sdtrain.model.gpt import GPT, GPTConfig

CFG = GPTConfig(n_layers=2, d_model=64, n_heads=2, seq_len=300, vocab_size=256)
PROMPT = list(b"def main(")


LLAMA = GPTConfig(n_layers=2, d_model=64, n_heads=4, seq_len=300, vocab_size=256, arch="llama", n_kv_heads=2)


def varied(cfg: GPTConfig) -> GPT:
    """Weights far from their first small values: a freshly made GPT repeats one token forever,
    which would check little (a near tie between logits is also less likely)."""
    model = GPT(cfg, seed=3).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=generator)
    return model


@pytest.fixture(scope="module")
def model():
    return varied(CFG)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_with_the_cache_equals_recomputing_the_whole_sequence(arch):
    model = varied(CFG if arch == "gpt2" else LLAMA)
    cached = list(generate_tokens(model, PROMPT, 256, Sampler(temperature=0)))
    recomputed = list(generate_tokens(model, PROMPT, 256, Sampler(temperature=0), use_cache=False))
    assert len(cached) == 256 and cached == recomputed
    assert len(set(cached)) > 1  # a model that says one thing over and over would show little


def test_the_same_seed_gives_the_same_tokens(model):
    def draw(seed):
        return list(generate_tokens(model, PROMPT, 64, Sampler(temperature=1.0, top_k=50, seed=seed)))

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_keeps_the_k_most_likely_and_temperature_0_is_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 2.8]])
    assert Sampler(temperature=0)(logits).item() == 1
    assert Sampler(temperature=1.0, top_k=1, seed=0)(logits).item() == 1
    drawn = {Sampler(temperature=5.0, top_k=2, seed=s)(logits).item() for s in range(200)}
    assert drawn == {1, 2}
    assert Sampler(temperature=1e-30, seed=0)(logits).item() == 1  # a tiny temperature is greedy, not NaN


def test_ids_past_the_vocabulary_are_never_drawn():
    # A model may have more ids than its tokenizer (vocab_size rounded up); training never showed those.
    logits = torch.zeros(1, 300)
    logits[0, 256:] = 10.0
    assert {Sampler(temperature=1.0, seed=s, vocab_size=256)(logits).item() for s in range(50)} < set(range(256))
    assert Sampler(temperature=0, vocab_size=256)(logits).item() < 256


def test_the_byte_stream_writes_whole_characters_and_escapes_control_characters():
    stream = ByteVocab().stream()
    pieces = [stream.add(b) for b in "é\x1b[2J\n".encode()]
    assert pieces[:2] == ["", "é"]  # the first byte of é alone is no text yet
    assert "".join(pieces) + stream.finish() == "é\\x1b[2J\n"  # the escape is shown, never acted on


def byte_level_bpe():
    """A byte-level BPE tokenizer (GPT-2's kind: a character may span tokens), trained here."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def main(argv): return argv", "naïve café"] * 20, trainer=trainer)
    return tokenizer


def test_a_tokenizer_stream_decodes_as_the_tokenizer_does():
    vocab = TokenizerVocab(byte_level_bpe(), "test")
    text = "def café(argv):"
    ids = vocab.encode(text)
    stream = vocab.stream()
    assert "".join(stream.add(i) for i in ids) + stream.finish() == text


def test_decoding_stops_at_seq_len_and_says_so(model):
    generation = Generation(model, ByteVocab(), "x" * 290, max_new_tokens=50, temperature=0)
    text = "".join(generation.pieces())
    assert len(generation.tokens) == 10 and generation.stopped_at_seq_len
    assert text.startswith("x" * 290) and "stopped at the model's seq_len 300" in generation.summary()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real one-process run (4 steps) with a checkpoint at its end, seq_len 256."""
    recipe = merge(TINY, {"model": {"seq_len": 256}, "train": {"steps": 4}, "checkpoint": {"at_end": True}})
    return launch_run(tmp_path_factory.mktemp("generate"), "run", 1, recipe)


def test_the_cli_streams_text_as_it_decodes_and_a_seed_repeats_it(run_dir):
    argv = [sys.executable, "-m", "sdtrain", "generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "250",
            "--seed", "5"]
    # stdout a pipe, block-buffered as a user's would be (PYTHONUNBUFFERED would hide a missing flush)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "OMP_NUM_THREADS": "1"})
    chunks = []
    while chunk := os.read(proc.stdout.fileno(), 65536):
        chunks.append((time.perf_counter(), chunk))
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0, stderr
    # Written as decoded: many pieces spread over the decoding, not one block at exit.
    assert len(chunks) > 2 and chunks[-1][0] - chunks[0][0] > 0
    text = b"".join(c for _, c in chunks).decode()
    assert text.startswith("def ") and "250 new tokens" in stderr and "tokens/s" in stderr
    again = sdtrain("generate", run_dir, "--prompt", "def ", "--max-new-tokens", "250", "--seed", "5")
    assert again.returncode == 0 and again.stdout == text
    other = sdtrain("generate", run_dir, "--prompt", "def ", "--max-new-tokens", "250", "--seed", "6")
    assert other.returncode == 0 and other.stdout != text


def test_a_reader_that_stops_early_ends_it_quietly(run_dir):
    """`sdtrain generate ... | head -c 100`: the pipe closes under the writer; no traceback, exit 0."""
    argv = [sys.executable, "-m", "sdtrain", "generate", str(run_dir), "--max-new-tokens", "50"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the first write: every write meets a closed pipe
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 0 and "Traceback" not in stderr and "Error" not in stderr, stderr


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-k", "-3"], "--top-k"),
    (["--prompt", "x" * 256], "the prompt is 256 tokens and the model's context (model.seq_len) is 256"),
])
def test_bad_numbers_and_a_prompt_past_seq_len_exit_2(run_dir, args, message):
    result = sdtrain("generate", run_dir, *args)
    assert result.returncode == 2 and message in " ".join(result.stderr.split()) and result.stdout == ""


def test_a_bad_checkpoint_exits_2(run_dir, tmp_path):
    assert sdtrain("generate", tmp_path / "nope").returncode == 2
    broken = tmp_path / "broken"
    step = sorted((run_dir / "checkpoints").glob("step_*"))[0]
    import shutil

    shutil.copytree(step, broken)
    next(broken.glob("*.distcp")).write_bytes(b"not a checkpoint")
    result = sdtrain("generate", broken)
    assert result.returncode == 2 and "error" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_large_vocabulary_with_nothing_naming_its_tokenizer_is_refused():
    from sdtrain.errors import UserInputError
    from sdtrain.generate.load import _vocab

    with pytest.raises(UserInputError, match="--tokenizer tokenizer.json"):
        _vocab(None, 50304, "nowhere", said=False)  # a checkpoint without its run's recipe: bytes would be nonsense
    assert isinstance(_vocab(None, 50304, "the run's recipe", said=True), ByteVocab)  # the recipe said bytes
    assert isinstance(_vocab(None, 320, "nowhere", said=False), ByteVocab)  # a byte vocabulary, padded


def test_a_run_with_a_tokenizer_generates_with_it(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    byte_level_bpe().save(str(tokenizer))
    recipe = merge(TINY, {"model": {"vocab_size": 320}, "data": {"tokenizer": str(tokenizer)}, "train": {"steps": 2},
                          "checkpoint": {"at_end": True}})
    run = launch_run(tmp_path, "run", 1, recipe)
    result = sdtrain("generate", run, "--prompt", "def main(", "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def main(") and f"vocabulary {tokenizer}" in " ".join(result.stderr.split())
    result = sdtrain("generate", run, "--tokenizer", tmp_path / "gone.json")
    assert result.returncode == 2 and "does not exist" in result.stderr


@pytest.mark.slow
def test_the_kv_cache_decodes_at_least_5x_faster_at_256_new_tokens():
    from measure_generate import measure

    result = measure(new_tokens=256, repeats=2)
    print(result)
    assert result["same_tokens"]
    assert result["ratio"] >= 5, result
