"""Llama 3's rotary scaling (`rope_type: llama3`): the frequencies whose wavelength is longer
than the context the model was first trained on are slowed down by `factor`, the short ones
left as they are, those between interpolated smoothly. What Llama 3.1 / 3.2 checkpoints use
(factor 8 or 32, low_freq_factor 1, high_freq_factor 4, original context 8192), written as
transformers' `_compute_llama3_parameters` computes it (its attention factor is 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    @classmethod
    def of(cls, value) -> "RopeScaling | None":
        """From a recipe's section (a dict, or its pydantic model); None stays None."""
        if value is None or isinstance(value, cls):
            return value
        return cls(**(value if isinstance(value, Mapping) else value.model_dump()))

    def as_dict(self) -> dict:
        return asdict(self)


def scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    context = scaling.original_max_position_embeddings
    low_freq_wavelen = context / scaling.low_freq_factor
    high_freq_wavelen = context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * slowed / scaling.factor + smooth * slowed
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, slowed)
