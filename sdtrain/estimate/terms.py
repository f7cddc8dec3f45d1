"""An estimate is a list of terms, each alive during some phases of a training step.

The peak is not the sum of every term: activations are gone by the optimizer step, whose
temporaries do not exist during backward. So each term names its phase, and the peak is
what is always held plus the heaviest phase. One function per term (state.py,
activations.py, buffers.py, process.py) makes each a line here and in `--json`; a new
strategy (experts, say) adds its own terms.

Each term also names where it lives: the device (a GPU's memory, or a CPU rank's), the host
(ZeRO-Offload's pinned memory beside a GPU; nvme offload's sub-group buffers) or the disk
(nvme offload's files). On a CPU rank device and host are the same memory, so what the fit
check compares (`total`) adds them; on a GPU it is the device's alone, the host's checked apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALWAYS, STEP_FB, STEP_OPT = "always", "forward/backward", "optimizer step"
PHASES = (STEP_FB, STEP_OPT)
DEVICE, HOST, DISK = "device", "host", "disk"


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    phase: str = ALWAYS
    detail: str = ""  # how it was counted, for the table and --json
    where: str = DEVICE  # device | host | disk

    def as_dict(self) -> dict:
        return {"name": self.name, "bytes": round(self.bytes), "phase": self.phase, "detail": self.detail,
                "where": self.where}


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
    host_is_device: bool = True  # a CPU rank: its device memory is the host's

    @property
    def counted(self) -> tuple[str, ...]:
        """Where the memory `total` counts lives: the device, and on a CPU rank the host too."""
        return (DEVICE, HOST) if self.host_is_device else (DEVICE,)

    def phase_bytes(self, phase: str, places: tuple[str, ...] | None = None) -> float:
        places = places or self.counted
        return sum(t.bytes for t in self.terms if t.phase == phase and t.where in places)

    def _peak(self, places: tuple[str, ...]) -> float:
        return self.phase_bytes(ALWAYS, places) + max(self.phase_bytes(p, places) for p in PHASES)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def total(self) -> float:
        """The peak the fit check compares: what is always held, plus the heaviest phase."""
        return self.phase_bytes(ALWAYS) + self.phase_bytes(self.peak_phase)

    @property
    def device_total(self) -> float:
        return self._peak((DEVICE,))

    @property
    def host_total(self) -> float:
        """Host memory offload holds beside the device's (on a CPU rank, within `total`)."""
        return self._peak((HOST,))

    @property
    def disk_total(self) -> float:
        """Bytes of nvme offload files this rank writes (all there for the whole run)."""
        return sum(t.bytes for t in self.terms if t.where == DISK)

    def at_peak(self) -> list[Term]:
        """The memory terms alive at the peak, largest first."""
        live = [t for t in self.terms if t.phase in (ALWAYS, self.peak_phase) and t.where in self.counted]
        return sorted(live, key=lambda t: -t.bytes)

    def largest(self, count: int = 3) -> list[Term]:
        return self.at_peak()[:count]

    def as_dict(self) -> dict:
        return {
            "where": self.where,
            "total_bytes": round(self.total),
            "device_bytes": round(self.device_total),
            "host_bytes": round(self.host_total),
            "disk_bytes": round(self.disk_total),
            "peak_phase": self.peak_phase,
            "dominant": self.largest(1)[0].name,
            "terms": [t.as_dict() for t in self.terms],
            "notes": self.notes,
            "tp_bytes_per_step": self.tp_bytes,
            "tp_wire_bytes_per_step": self.tp_wire_bytes,
        }


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"
