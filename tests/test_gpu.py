"""On a CUDA device: a tiny training run on cuda/NCCL, the chunked loss against the plain one
on the GPU, bf16 autocast, and the peak probe. Skipped where no CUDA device is visible
(`make bench-gpu` is the side-by-side speed check)."""

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import losses, sdtrain
from sdtrain.model import GPT, GPTConfig
from sdtrain.model.chunked_loss import chunked_cross_entropy
from sdtrain.train.peak import measure_peak_flops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = GPTConfig(n_layers=2, d_model=64, n_heads=4, seq_len=64, vocab_size=512)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_tiny_training_run_on_cuda_and_nccl(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe({"train": {"precision": "bf16"}, "launch": {"backend": "nccl"}})
    result = sdtrain("launch", recipe, "--run-dir", run_dir, "--nproc-per-node", 1, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backend nccl" in result.stdout
    trained = losses(run_dir)
    assert all(math.isfinite(loss) for loss in trained) and trained[-1] < trained[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peak_mem_gib"][0] > 0  # the CUDA allocator's peak: it ran on the GPU


@pytest.mark.parametrize("chunk", [7, 100])  # neither divides the 3 x 64 tokens
def test_chunked_loss_equals_the_plain_one_on_cuda(chunk):
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 512, (3, 64), device="cuda"), torch.randint(0, 512, (3, 64), device="cuda")
    results = {}
    for tokens in (0, chunk):
        with torch.device("cuda"):
            model = GPT(CFG, seed=5, loss_chunk_tokens=tokens)
        loss = model.loss(model(idx), targets)
        loss.backward()
        results[tokens] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (plain_loss, plain_grads), (loss, grads) = results[0], results[chunk]
    assert abs(loss - plain_loss) <= 1e-5 * plain_loss
    for name, grad in plain_grads.items():
        assert relative_error(grads[name], grad) <= 1e-4, name


def test_bf16_autocast_runs_and_tracks_the_plain_path():
    torch.manual_seed(1)
    hidden = torch.randn(200, 64, device="cuda", requires_grad=True)
    weight = torch.randn(512, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 512, (200,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = F.linear(hidden, weight)
        assert logits.dtype == torch.bfloat16
        plain = F.cross_entropy(logits.float(), targets)
        chunked = chunked_cross_entropy(hidden, weight, targets, 64)
    assert abs(chunked.item() - plain.item()) <= 1e-3 * plain.item()
    grads = torch.autograd.grad(plain, (hidden, weight))
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    for ours, theirs in zip(chunked_grads, grads):
        assert ours.dtype == torch.float32 and relative_error(ours, theirs) <= 2e-2
    with torch.device("cuda"):
        model = GPT(CFG, loss_chunk_tokens=64)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(model(targets.view(2, 100)[:, :64]), targets.view(2, 100)[:, 1:65])
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_peak_probe_on_cuda():
    start = time.perf_counter()
    peak = measure_peak_flops("cuda")
    assert time.perf_counter() - start < 10
    assert peak.dtype == "bf16" and math.isfinite(peak.flops) and peak.flops > 1e12
