"""Model-state memory per device under ZeRO (Rajbhandari et al., 2020, section 3 and Fig. 1).

Ψ parameters on N data-parallel devices. Mixed precision with Adam: 2Ψ bytes of bf16/fp16
weights, 2Ψ of gradients, and K = 12 bytes per parameter of optimizer state (fp32 master
weights, momentum, variance). In fp32 the weights are their own master: 4Ψ + 4Ψ + K = 8.
No torch here: `sdtrain estimate` answers instantly.
"""

from __future__ import annotations

from sdtrain.errors import UserInputError

# bytes per parameter of (weights, gradients, optimizer state)
BYTES = {"mixed": (2, 2, 12), "fp32": (4, 4, 8)}


def per_device_bytes(params: int, devices: int, precision: str = "mixed") -> dict[int, float]:
    """Model-state bytes each device holds at ZeRO stages 0-3."""
    w, g, k = BYTES[precision]
    n = devices
    return {
        0: (w + g + k) * params,
        1: (w + g) * params + k * params / n,
        2: w * params + (g + k) * params / n,
        3: (w + g + k) * params / n,
    }


def parse_count(text: str) -> int:
    """'7.5B' -> 7_500_000_000; also K, M, T suffixes and plain or scientific numbers."""
    units = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    raw = text.strip().upper()
    scale = units.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if raw[-1:] in units else raw) * scale
    except ValueError:
        raise UserInputError(f"--params {text!r} is not a count; e.g. 7.5B, 350M, 1.3e9") from None
    if value < 1:
        raise UserInputError(f"--params {text!r}: need at least one parameter")
    return int(round(value))
