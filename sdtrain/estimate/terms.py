"""An estimate is a list of terms, each alive during some phases of a training step.

The peak is not the sum of every term: activations are gone by the optimizer step, whose
temporaries do not exist during backward. So each term names its phase, and the peak is
what is always held plus the heaviest phase. One function per term (state.py,
activations.py, buffers.py, process.py) makes each a line here and in `--json`; a new
strategy (experts, say) adds its own terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALWAYS, STEP_FB, STEP_OPT = "always", "forward/backward", "optimizer step"
PHASES = (STEP_FB, STEP_OPT)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    phase: str = ALWAYS
    detail: str = ""  # how it was counted, for the table and --json

    def as_dict(self) -> dict:
        return {"name": self.name, "bytes": round(self.bytes), "phase": self.phase, "detail": self.detail}


@dataclass
class Estimate:
    """One rank's memory: its terms, and what they add up to at the peak."""

    terms: list[Term]
    where: str = ""  # which rank(s) this is, e.g. "every rank" or "pipeline stage 0"
    notes: list[str] = field(default_factory=list)
    # Bytes tensor parallelism moves per step on this rank, per collective kind (each counted
    # at its whole tensor), and what that puts on its links: empty and 0 without TP.
    tp_bytes: dict[str, int] = field(default_factory=dict)
    tp_wire_bytes: int = 0

    def phase_bytes(self, phase: str) -> float:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def total(self) -> float:
        """The peak: what is always held, plus the heaviest phase."""
        return self.phase_bytes(ALWAYS) + self.phase_bytes(self.peak_phase)

    def at_peak(self) -> list[Term]:
        """The terms alive at the peak, largest first."""
        live = [t for t in self.terms if t.phase in (ALWAYS, self.peak_phase)]
        return sorted(live, key=lambda t: -t.bytes)

    def largest(self, count: int = 3) -> list[Term]:
        return self.at_peak()[:count]

    def as_dict(self) -> dict:
        return {
            "where": self.where,
            "total_bytes": round(self.total),
            "peak_phase": self.peak_phase,
            "dominant": self.largest(1)[0].name,
            "terms": [t.as_dict() for t in self.terms],
            "notes": self.notes,
            "tp_bytes_per_step": self.tp_bytes,
            "tp_wire_bytes_per_step": self.tp_wire_bytes,
        }


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"
