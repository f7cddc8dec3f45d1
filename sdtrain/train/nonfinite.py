"""The step's guard: a NaN/inf loss or gradient norm, and a preemption request, decided
on every rank alike before the update.

The strategy calls the guard where it holds the global gradient norm, between clipping and
the optimizer (Strategy.update_allowed): DDP, ZeRO 1/2/3 and the pipeline's replicas
alike. That norm is the same on every rank, and a NaN or inf loss on any rank reaches it
through the gradients, so most steps need no collective of their own. Where the ranks must
agree on more (the norm is not finite; fp16, whose scaler lets inf gradients through;
on_preempt, whose request may reach the ranks at different steps), one all-reduce of a
(world size x 3) table, where each rank fills its own row (loss not finite, gradient norm
not finite, preemption requested), gives every rank the same answer and the ranks that saw it:
- train.on_nonfinite stop: every rank raises NonFiniteError naming the step, the ranks and
  what was not finite; nothing is updated, so the last checkpoint stays the latest;
- skip: the update is dropped on every rank (the gradients are zeroed, the weights and the
  optimizer stay as they were), counted in metrics.jsonl (`skipped_steps`); more than
  train.max_skipped_steps in a row stop as above.
fp16's loss scaler skips overflowing steps itself: under fp16 only the loss is checked.
Not seen without the table: a rank whose loss is inf while every gradient stays finite (the
update is then the same everywhere; metrics.jsonl shows the loss as non-finite).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sdtrain.train.faults import injected_nan
from sdtrain.train.preempt import PreemptRequest


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm under on_nonfinite stop (a restart would replay it)."""


class StepGuard:
    def __init__(self, env, policy: str, max_skipped: int, check_norm: bool, preempt: PreemptRequest):
        self.env, self.policy, self.max_skipped = env, policy, max_skipped
        self.check_norm, self.preempt = check_norm, preempt
        self.skipped = 0  # updates skipped in the whole run
        self.in_a_row = 0
        self.preempt_now = False  # every rank agreed: stop after this step
        self.step, self.loss_sum, self.checked = 0, None, True

    def begin(self, step: int, loss_sum: torch.Tensor) -> None:
        """Before the strategy's step: the loss this rank summed (step is the 0-based index)."""
        self.step, self.loss_sum, self.checked = step, loss_sum, False

    def __call__(self, norm: torch.Tensor) -> bool:
        """True: apply the update. The same answer on every rank."""
        self.checked = True
        norm_finite = math.isfinite(float(norm))  # the same answer on every rank: the norm is global
        if norm_finite and self.check_norm and not self.preempt.enabled:
            self.in_a_row = 0
            return True
        table = torch.zeros(self.env.world_size, 3, device=self.env.device)
        table[self.env.rank, 0] = float(not math.isfinite(float(self.loss_sum)))
        table[self.env.rank, 1] = float(self.check_norm and not norm_finite)
        table[self.env.rank, 2] = float(self.preempt.requested)
        if self.env.world_size > 1:
            dist.all_reduce(table)
        self.preempt_now = bool(table[:, 2].any())
        bad_loss = table[:, 0].nonzero().flatten().tolist()
        bad_norm = table[:, 1].nonzero().flatten().tolist()
        if not bad_loss and not bad_norm:
            self.in_a_row = 0
            return True
        what = "; ".join(filter(None, [
            f"loss on rank(s) {_ranks(bad_loss)}" if bad_loss else "",
            f"gradient norm ({float(norm)}) on rank(s) {_ranks(bad_norm)}" if bad_norm else "",
        ]))
        where = f"step {self.step + 1}"
        drill = injected_nan(bad_loss, self.step)
        if drill:  # planted on purpose: tuning advice would send the user after a cause that is not there
            where += f", injected by {drill} (a drill, not a divergence)"
        if self.policy == "stop":
            advice = ("Unset SDTRAIN_INJECT_NAN for a real run" if drill else
                      "Lower train.lr, raise warmup_steps or grad_clip, or set train.on_nonfinite=skip")
            raise NonFiniteError(f"non-finite {what} at {where}; train.on_nonfinite is stop: no update was made, "
                                 f"the last checkpoint stays the latest. {advice}")
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.max_skipped:
            verdict = "the drill's NaNs came faster than skip mode lets pass" if drill else "the run diverged (lower train.lr)"
            raise NonFiniteError(f"non-finite {what} at {where}: {self.in_a_row} updates skipped in a row, more than "
                                 f"train.max_skipped_steps {self.max_skipped}; {verdict}")
        print(f"rank {self.env.rank}: skipped the update of {where}: non-finite {what}", flush=True)
        return False

    def after_step(self, norm: torch.Tensor) -> None:
        """For a strategy whose step does not consult the guard: check afterwards (the
        update is made, but a stop or a preemption still happens on every rank alike)."""
        if not self.checked:
            self(norm)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))
