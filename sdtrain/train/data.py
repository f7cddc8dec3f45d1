"""Deterministic batches: the samples of global batch k depend only on the seed and k.

Each global batch is a list of window start positions drawn from a generator seeded by
(seed, k, split). A rank takes its contiguous slice of that list and cuts it into
micro-batches, so changing the world size (or pipeline depth, or expert-parallel size)
re-partitions the same samples rather than drawing different ones. Resuming at step k
needs nothing but k.
"""

from __future__ import annotations

import numpy as np
import torch

from sdtrain.batch import BatchPlan

TRAIN, VAL = 0, 1


class Batches:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, plan: BatchPlan, split: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed
        self.plan = plan
        self.split = split

    def global_starts(self, index: int) -> np.ndarray:
        """Start offsets of every sample in global batch `index` (all ranks together)."""
        rng = np.random.default_rng([self.seed, index, self.split])
        high = len(self.tokens) - self.seq_len - 1
        return rng.integers(0, high, size=self.plan.global_batch, dtype=np.int64)

    def micro_batches(self, index: int, dp_rank: int, device: torch.device):
        """This rank's micro-batches of global batch `index`: (inputs, targets) pairs."""
        per_rank, micro = self.plan.per_rank, self.plan.micro_batch
        starts = self.global_starts(index)[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        for i in range(self.plan.grad_accum):
            yield self._window(starts[i * micro : (i + 1) * micro], device)

    def _window(self, starts: np.ndarray, device: torch.device):
        T = self.seq_len
        rows = np.stack([np.asarray(self.tokens[s : s + T + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        if device.type == "cuda":
            rows = rows.pin_memory().to(device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]
