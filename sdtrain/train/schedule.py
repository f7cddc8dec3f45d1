"""The learning-rate schedule: a pure function of the step, so resuming needs no state."""

from __future__ import annotations

import math


def lr_at(step: int, train) -> float:
    """Learning rate for the update that completes step `step + 1`: linear warmup, then
    cosine or linear decay to `min_lr_ratio * lr` at the last step."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    if step < train.warmup_steps:
        return peak * (step + 1) / (train.warmup_steps + 1)
    if train.decay == "constant":
        return peak
    span = max(train.steps - train.warmup_steps, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    if train.decay == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
