"""Tensor parallelism's bytes, as a strategy reports them: in `comm_bytes` as `tp_<kind>`,
beside the data-parallel kinds, and per step and kind in `log_metrics`' "tp_bytes" (what the
last `comm_bytes` took; an eval's collectives are taken apart, after it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdtrain.parallel.tensor_parallel import TensorParallelPlan


class TpTraffic:
    """Tensor parallelism's bytes for a strategy's `comm_bytes` (as `tp_<kind>`, apart from
    the data-parallel kinds) and, per step and kind, for `log_metrics`' "tp_bytes"."""

    def __init__(self, plan: TensorParallelPlan):
        self.plan, self.steps, self.taken = plan, 0, None

    def stepped(self) -> None:
        self.steps += 1

    def take(self) -> dict[str, int]:
        """The bytes since the last call (the layers' collectives, the partial gradients' sum)."""
        taken = dict(self.plan.tp.take_bytes())
        self.taken, self.steps = (taken, self.steps), 0
        return {f"tp_{kind}": size for kind, size in taken.items()}

    def metrics(self) -> dict:
        """What `take` took just before, per step (eval's collectives are taken apart, after)."""
        if self.taken is None:
            return {}
        (taken, steps), self.taken = self.taken, None
        return {"tp_bytes": {kind: size // max(steps, 1) for kind, size in sorted(taken.items())}}
