"""The llama architecture (model/llama.py): its forward against the spec's formulas written out
here independently, its size arithmetic, the recipe's refusals, and every strategy against
one process (DDP, ZeRO-3, a 1F1B pipeline, a checkpoint resumed in another layout)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import REPO, TINY, assert_losses_match, launch_run, merge, sdtrain
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.model.size import count_params, flops_per_token, llama_ffn_hidden
from sdtrain.train.export import load_model_weights

REL_TOL = 1e-5
STEPS = 20


# --- the forward, against the formulas --------------------------------------------------

def reference_forward(w: dict[str, torch.Tensor], ids: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """LLaMA's logits from its weights by the spec alone: RMSNorm x / sqrt(mean(x^2) + eps) * g;
    rotary angles p * theta^(-2j/hd) applied to channel pairs (j, j + hd/2); each group of
    n_heads / n_kv_heads query heads attends to one k/v head, causally, scaled by 1/sqrt(hd);
    SwiGLU proj(silu(gate x) * up x)."""
    H, Hkv, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads, cfg.norm_eps

    def rms(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * g

    T = ids.size(1)
    half = hd // 2
    freq = torch.tensor([cfg.rope_theta ** (-2 * j / hd) for j in range(half)], dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # [T, hd/2]
    cos, sin = angle.cos().float(), angle.sin().float()

    def rotate(x):  # x [B, heads, T, hd]: pair j with j + hd/2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    x = w["tok_emb.weight"][ids]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = rms(x, w[p + "ln_attn.weight"])
        B = h.size(0)
        q = (h @ w[p + "attn.q.weight"].T).view(B, T, H, hd).transpose(1, 2)
        k = (h @ w[p + "attn.k.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        v = (h @ w[p + "attn.v.weight"].T).view(B, T, Hkv, hd).transpose(1, 2)
        q, k = rotate(q), rotate(k)
        heads = []
        for head in range(H):
            kv = head // (H // Hkv)
            scores = q[:, head] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)
            heads.append(scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, kv])
        y = torch.stack(heads, dim=1).transpose(1, 2).reshape(B, T, H * hd)
        x = x + y @ w[p + "attn.proj.weight"].T
        h = rms(x, w[p + "ln_mlp.weight"])
        gate, up = h @ w[p + "mlp.gate.weight"].T, h @ w[p + "mlp.up.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.proj.weight"].T
    return rms(x, w["ln_f.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # multi-head, grouped, multi-query
def test_forward_matches_the_formulas(kv_heads):
    cfg = GPTConfig(arch="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=kv_heads, seq_len=16,
                    vocab_size=97, rope_theta=500.0, norm_eps=1e-6)
    model = GPT(cfg, seed=3)
    with torch.no_grad():  # norms start at 1: give them values, so a wrong one shows
        for name, p in model.named_parameters():
            if name.endswith("ln_attn.weight") or name.endswith("ln_mlp.weight") or name == "ln_f.weight":
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    weights = {name: p.detach() for name, p in model.named_parameters()}
    with torch.no_grad():
        ours = model.logits(model(ids))
        theirs = reference_forward(weights, ids, cfg)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_parameter_names_shapes_and_first_values():
    cfg = GPTConfig(arch="llama", n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=50)
    shapes = {name: tuple(p.shape) for name, p in GPT(cfg).named_parameters()}
    F_ = llama_ffn_hidden(64)
    assert shapes == {
        "tok_emb.weight": (50, 64), "blocks.0.ln_attn.weight": (64,), "blocks.0.attn.q.weight": (64, 64),
        "blocks.0.attn.k.weight": (32, 64), "blocks.0.attn.v.weight": (32, 64), "blocks.0.attn.proj.weight": (64, 64),
        "blocks.0.ln_mlp.weight": (64,), "blocks.0.mlp.gate.weight": (F_, 64), "blocks.0.mlp.up.weight": (F_, 64),
        "blocks.0.mlp.proj.weight": (64, F_), "ln_f.weight": (64,), "lm_head.weight": (50, 64),
    }
    model = GPT(cfg, seed=1)
    assert model.lm_head.weight is not model.tok_emb.weight  # llama's head is its own
    assert not torch.equal(model.lm_head.weight, model.tok_emb.weight)  # drawn from its own seed
    assert torch.equal(model.blocks["0"].ln_mlp.weight, torch.ones(64))
    residual = model.blocks["0"].mlp.proj.weight.std().item()
    assert residual == pytest.approx(0.02 / math.sqrt(2), rel=0.1)  # std 0.02 / sqrt(2L)
    tied = GPT(GPTConfig(arch="llama", n_layers=1, d_model=64, n_heads=4, vocab_size=50, tie_embeddings=True))
    assert tied.lm_head.weight is tied.tok_emb.weight


def test_llama_rounding_of_the_swiglu_width():
    assert llama_ffn_hidden(4096) == 11008  # LLaMA-7B's
    assert llama_ffn_hidden(2048) == 5632
    assert llama_ffn_hidden(64) == 256


@pytest.mark.parametrize("shape", [
    dict(arch="llama"), dict(arch="llama", n_kv_heads=1, tie_embeddings=True), dict(arch="llama", ffn_hidden=100),
    dict(arch="llama", n_kv_heads=2, n_layers=3), dict(arch="gpt2", tie_embeddings=False), dict(arch="gpt2"),
])
def test_closed_form_count_is_the_models(shape):
    cfg = GPTConfig(**shape)
    assert count_params(cfg) == GPT(cfg).num_params()
    lookups = cfg.vocab_size * cfg.d_model if not cfg.tie_embeddings else 0  # the untied embedding is a lookup
    positions = 0 if cfg.arch == "llama" else cfg.seq_len * cfg.d_model
    matmuls = GPT(cfg).num_params() - lookups - positions
    assert flops_per_token(cfg) == 6.0 * matmuls + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len


# --- the recipe -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.arch=llama", "model.n_kv_heads=3"], "n_kv_heads 3 does not divide n_heads 2"),
    (["model.n_kv_heads=1"], "n_kv_heads 1 with arch gpt2"),
    (["model.rope_theta=500000"], "rope_theta is a llama setting and arch is gpt2"),
    (["model.ffn_hidden=64"], "ffn_hidden is a llama setting and arch is gpt2 (use mlp_ratio)"),
    (["model.arch=llama", "model.bias=true"], "bias true with arch llama"),
    (["model.arch=llama", "model.n_heads=32"], "needs an even head size"),  # d_model 32 / 32 heads = 1
    (["model.arch=mistral"], "model.arch"),
])
def test_bad_llama_settings_exit_2(write_recipe, tmp_path, overrides, message):
    args = ["launch", write_recipe(), "--run-dir", tmp_path / "run", "--dry-run"]
    for override in overrides:
        args += ["--set", override]
    result = sdtrain(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr  # one clear line, not a traceback


def test_defaults_resolve_by_architecture(write_recipe, tmp_path):
    from sdtrain.recipe import load_recipe

    llama = load_recipe(write_recipe({"model": {"arch": "llama", "n_kv_heads": 1}})).model
    assert (llama.bias, llama.tie_embeddings, llama.rope_theta, llama.ffn_hidden, llama.norm_eps) == \
        (False, False, 10000.0, 256, 1e-5)
    gpt2 = load_recipe(write_recipe(name="gpt2.yaml")).model
    assert (gpt2.bias, gpt2.tie_embeddings, gpt2.n_kv_heads, gpt2.rope_theta, gpt2.ffn_hidden) == (True, True, None, None, None)


@pytest.mark.parametrize("recipe", ["llama-tiny.yaml", "llama-1b.yaml"])
def test_shipped_llama_recipes_plan(recipe, tmp_path):
    result = sdtrain("launch", REPO / "recipes" / recipe, "--dry-run", "--nproc-per-node", 2, "--run-dir", tmp_path / "r",
                     "--set", "launch.memory_check=warn")  # llama-1b is sized for GPUs
    assert result.returncode == 0, result.stderr
    estimate = sdtrain("estimate", REPO / "recipes" / recipe, "--gpus", 2, "--json")
    assert estimate.returncode == 0, estimate.stderr
    from sdtrain.recipe import load_recipe

    assert json.loads(estimate.stdout)["params"] == count_params(load_recipe(REPO / "recipes" / recipe).model)


# --- every strategy against one process -----------------------------------------------------

# 4 blocks of 4 query heads over 2 kv heads, micro-batches of 1: M = 8 for a 1F1B pipeline.
LLAMA = {"name": "llama", "model": {"arch": "llama", "n_layers": 4, "d_model": 32, "n_heads": 4, "n_kv_heads": 2},
         "train": {"steps": STEPS, "micro_batch_size": 1}, "checkpoint": {"at_end": True, "every": 10, "keep": 3}}


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, LLAMA), *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("llama-ref"), "single", 1)


def assert_same_run(reference, run_dir, steps=range(1, STEPS + 1)):
    assert_losses_match(reference, run_dir, REL_TOL, STEPS, steps)


def assert_same_weights(reference, run_dir):
    ours, theirs = load_model_weights(run_dir)[0], load_model_weights(reference)[0]
    assert ours.keys() == theirs.keys() and "lm_head.weight" in ours  # the untied head is a weight of its own
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=1e-5, msg=name)


@pytest.mark.parametrize("nproc, overrides", [
    (2, []),  # DDP
    (2, ["parallel.zero_stage=3", "parallel.zero.reduce_bucket_mb=0.05"]),
    (2, ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=1f1b"]),
    (2, ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=zero_bubble"]),  # RMSNorm's deferred weight grads
    pytest.param(2, ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=interleaved",
                     "parallel.pipeline.virtual_stages=2"], marks=pytest.mark.slow),
    pytest.param(2, ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=gpipe",
                     "parallel.pipeline.partition=parameters"], marks=pytest.mark.slow),
    pytest.param(2, ["parallel.zero_stage=1"], marks=pytest.mark.slow),
    pytest.param(2, ["parallel.zero_stage=2"], marks=pytest.mark.slow),
    pytest.param(4, ["parallel.pipeline.stages=2", "parallel.zero_stage=3"], marks=pytest.mark.slow),
])
def test_strategy_matches_single_process(reference, tmp_path, nproc, overrides):
    run_dir = launch(tmp_path, "run", nproc, *overrides)
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)


@pytest.mark.slow  # three launches; resharding is make test's in test_zero / test_pipeline
def test_pipeline_checkpoint_resumes_under_zero3(reference, tmp_path):
    """Saved by a 2-stage pipeline (head on stage 1, embedding on stage 0), resumed at step 10
    on two ZeRO-3 ranks: the run goes on as the single process's did."""
    saved = launch(tmp_path, "pp2", 2, "parallel.pipeline.stages=2")
    resumed = tmp_path / "resumed"
    shutil.copytree(saved, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_20")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    run_dir = launch(tmp_path, "resumed", 2, "parallel.zero_stage=3", "train.resume=auto")
    assert_same_run(reference, run_dir, steps=range(11, STEPS + 1))


def test_export_holds_the_untied_head(reference, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "llama.safetensors"
    result = sdtrain("export", reference, out)
    assert result.returncode == 0, result.stderr
    weights = load_file(out)
    assert "lm_head.weight" in weights and "pos_emb.weight" not in weights
    cfg = GPTConfig(arch="llama", n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, seq_len=32)
    model = GPT(cfg)
    model.load_state_dict(weights)  # every name and shape the model has, nothing else
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model.logits(model(ids))).all()


# --- speed beside the same model written plainly -----------------------------------------------

@pytest.mark.slow  # a bench of two rows; the ratio is measured in the README
def test_bench_puts_sdtrain_beside_a_plain_pytorch_llama(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    recipe = write_recipe({"model": LLAMA["model"]})
    result = sdtrain("bench", recipe, "--strategies", "ddp", "--peers", "plain", "--steps", 15, "--repeats", 1,
                     "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ddp", "plain-llama"} and rows["plain-llama"]["world_size"] == 2
    # one short round on a shared machine: a sanity bound (the report gives the measured ratio)
    assert 0.3 < rows["ddp"]["vs_plain-llama"] < 3.0
    gpt2 = sdtrain("bench", write_recipe(name="gpt2.yaml"), "--strategies", "ddp", "--peers", "plain", "--steps", 15,
                   "--repeats", 1, "--json", tmp_path / "gpt2.json", timeout=600)
    assert gpt2.returncode == 0 and "plain: a plain-PyTorch llama, for model.arch llama" in gpt2.stdout + gpt2.stderr


def test_deepspeed_peers_that_build_gpt2_blocks_are_skipped_for_llama_with_a_note():
    from sdtrain.bench.run import _deepspeed_peer_runs
    from sdtrain.recipe_load import load_recipe

    for peer in ("deepspeed-pipe", "deepspeed-moe"):
        notes = []
        assert not _deepspeed_peer_runs(peer, [peer], [(2, 0)], "a strategy", load_recipe(str(REPO / "recipes/llama-tiny.yaml")),
                                        notes)
        assert notes == [f"{peer}: builds gpt2 blocks only (this recipe's model.arch is llama), skipped"]
