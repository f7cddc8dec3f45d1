"""`sdtrain generate` on a Hugging Face folder (GPT-2, LLaMA, Mixtral) decodes what transformers
decodes: greedy, the same tokens as transformers' own `generate` of the same folder, token for
token, and of a run's `export --format hf` as of the run's checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import sdtrain

transformers = pytest.importorskip("transformers")

from sdtrain.generate.load import load_for_generation  # noqa: E402
from sdtrain.generate.text import Generation  # noqa: E402

PROMPT = "def main("
NEW_TOKENS = 40


def varied(model):
    """Weights far from transformers' small first ones, which decode one token over and over."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=generator)
    return model.eval()


def configs():
    common = dict(vocab_size=256, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return {
        "gpt2": transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, activation_function="gelu",
                                        **common),
        "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          **common),
        "mixtral": transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                              num_local_experts=4, num_experts_per_tok=2, **common),
    }


@pytest.fixture(scope="module", params=["gpt2", "llama", "mixtral"])
def hf_folder(request, tmp_path_factory):
    config = configs()[request.param]
    model = varied(transformers.AutoModelForCausalLM.from_config(config))
    folder = tmp_path_factory.mktemp("hf") / request.param
    model.save_pretrained(folder)
    return folder


def transformers_greedy(folder, prompt_ids: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_gives_the_tokens_transformers_generate_gives(hf_folder):
    loaded = load_for_generation(str(hf_folder), device="cpu")
    generation = Generation(loaded.model, loaded.vocab, PROMPT, NEW_TOKENS, temperature=0)
    "".join(generation.pieces())
    theirs = transformers_greedy(hf_folder, list(PROMPT.encode()))
    assert generation.tokens == theirs
    assert len(set(theirs)) > 1


def test_the_cli_takes_a_hugging_face_folder(hf_folder):
    result = sdtrain("generate", hf_folder, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PROMPT) and f"{NEW_TOKENS} new tokens" in result.stderr


def test_a_folder_of_another_architecture_exits_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    result = sdtrain("generate", tmp_path)
    assert result.returncode == 2 and "model_type 'bert'" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("hf_folder", ["llama", pytest.param("gpt2", marks=pytest.mark.slow),
                                       pytest.param("mixtral", marks=pytest.mark.slow)], indirect=True)
def test_an_exported_run_decodes_in_transformers_as_sdtrain_decodes_it(hf_folder, tmp_path):
    """A real run (from the folder's weights: a tiny model trained for seconds only ever says
    spaces) -> `sdtrain export --format hf` -> transformers' greedy generate of the export gives
    the tokens `sdtrain generate` gives from the run's checkpoint."""
    from conftest import TINY, launch_run, merge

    from sdtrain.model.hf_import import hf_model_config

    model = {**hf_model_config(hf_folder), "init_from": str(hf_folder)}
    run = launch_run(tmp_path, "run", 1, merge(TINY, {"model": model, "train": {"steps": 3, "lr": 1e-4},
                                                      "checkpoint": {"at_end": True}}))
    out = tmp_path / "hf"
    result = sdtrain("export", run, out, "--format", "hf")
    assert result.returncode == 0, result.stderr
    loaded = load_for_generation(str(run), device="cpu")
    generation = Generation(loaded.model, loaded.vocab, PROMPT, NEW_TOKENS, temperature=0)
    text = "".join(generation.pieces())
    assert generation.tokens == transformers_greedy(out, list(PROMPT.encode()))
    assert len(set(generation.tokens)) > 1
    cli = sdtrain("generate", run, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS, "--temperature", "0")
    assert cli.returncode == 0 and cli.stdout == text + "\n", cli.stderr
