"""The DTensor tensor-parallel bench peer trains the same function as one process: a peer
that computed something else (rank 0 holding all of q and half of k, a head cut away) could
not stand beside sdtrain's tp rows. Two real gloo ranks; fp32; three AdamW steps."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

from conftest import spawned_rank
from sdtrain.bench.peer_common import GPTWithHead
from sdtrain.bench.peer_dtensor_tp import heads_by_rank, split_heads, tensor_parallel_plan
from sdtrain.model import GPTConfig

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=64)
LLAMA = GPTConfig(arch="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, seq_len=16,
                  vocab_size=64)
STEPS = 3


def losses(model, tp_loss: bool) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # one batch, fitted again each step: the loss must fall
    data = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=torch.Generator().manual_seed(7))
    out = []
    for _ in range(STEPS):
        with loss_parallel() if tp_loss else torch.enable_grad():
            logits = model(data[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, CFG.vocab_size), data[:, 1:].reshape(-1))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        out.append(loss.full_tensor().item() if hasattr(loss, "full_tensor") else loss.item())
    return out


def rank_main(rank: int, world: int, store: str, out: str, cfg: GPTConfig) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    with spawned_rank():
        whole = GPTWithHead(cfg, seed=3)
        split = copy.deepcopy(whole)
        if cfg.tie_embeddings:
            split.lm_head.weight = split.tok_emb.weight
        split_heads(split, world)
        parallelize_module(split, init_device_mesh("cpu", (world,)), tensor_parallel_plan(split))
        if cfg.tie_embeddings:
            split.lm_head.weight = split.tok_emb.weight
        report = {"one_process": losses(whole, False), "dtensor_tp": losses(split, True)}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(report, f)


def test_heads_by_rank_gives_each_slice_its_own_heads_of_q_k_and_v():
    rows = torch.arange(12.0)  # q = 0..3, k = 4..7, v = 8..11; two ranks of two rows each
    assert heads_by_rank(rows, 2).tolist() == [0, 1, 4, 5, 8, 9, 2, 3, 6, 7, 10, 11]


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_the_dtensor_peer_trains_the_one_process_trajectory(tmp_path, cfg):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(rank_main, args=(2, str(tmp_path / "store"), str(tmp_path / "report.json"), cfg), nprocs=2)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dtensor_tp"] == pytest.approx(report["one_process"], rel=1e-5)
    assert report["one_process"][-1] < report["one_process"][0]  # it trained: the steps moved the loss
