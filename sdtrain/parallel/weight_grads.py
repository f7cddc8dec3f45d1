"""The split backward of a zero-bubble schedule (Qi et al. 2023): a chunk's backward first
computes only the gradient of its input, which the previous stage is waiting for (B); the
gradients of its weights come later (W), in time the stage would otherwise sit idle.

Every Linear and norm (LayerNorm, llama's RMSNorm) of the model records its input and output in forward. B asks
autograd for the gradients of the chunk's input and of those outputs only: autograd then
skips every weight-gradient product. W computes the weight gradients from the recorded
inputs and output gradients, with the same products autograd would have used, and adds them
to `.grad`; nothing is computed twice. The embeddings (on the first chunk, which has no input
to send back) and the head (its gradient is made with the loss) keep the plain backward.

Tensor parallelism's linears (tp_linear.py) have collectives around their product, so their
outside is not what the weight's gradient needs under sequence parallelism (a column-parallel
layer's input is this rank's part of the sequence, gathered inside; a row-parallel layer's
output is reduce-scattered). They report the local product's input and output instead
(`record_local`); B's autograd then makes the output gradient through the collectives'
backward, as the plain backward would, and W stays free of communication. A row-parallel
bias is added after the sum: its gradient comes from the layer's outside, recorded apart.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.parallel.tp_linear import RowParallelLinear

DEFERRED = (nn.Linear, nn.LayerNorm, nn.RMSNorm)
WHOLE, WEIGHT_ONLY, BIAS_ONLY = "whole", "weight", "bias"  # which of a module's gradients a record gives


class DeferredWeightGrads:
    def __init__(self, model: nn.Module, skip: tuple[nn.Module, ...] = ()):
        # (module, input, output, which gradients) of the forward being recorded
        self.records: list | None = None
        for module in model.modules():
            if not isinstance(module, DEFERRED) or module in skip:
                continue
            if not hasattr(module, "record_local"):
                module.register_forward_hook(self._record)
                continue
            row = isinstance(module, RowParallelLinear)
            module.record_local = self._record_row_product if row else self._record_product
            if row and module.bias is not None:
                module.register_forward_hook(self._record_bias)

    def _keep(self, module, inp, output, which: str) -> None:
        if self.records is not None and torch.is_grad_enabled():
            self.records.append((module, inp, output, which))

    def _record(self, module, args, output) -> None:
        self._keep(module, args[0], output, WHOLE)

    def _record_product(self, module, inp, output) -> None:
        self._keep(module, inp, output, WHOLE)

    def _record_row_product(self, module, inp, partial) -> None:
        self._keep(module, inp, partial, WEIGHT_ONLY)

    def _record_bias(self, module, args, output) -> None:
        self._keep(module, None, output, BIAS_ONLY)

    def start_recording(self) -> None:
        self.records = []

    def stop_recording(self) -> list:
        records, self.records = self.records, None
        return records

    @staticmethod
    def input_grads(records: list, output: torch.Tensor, grad: torch.Tensor | None, inputs: list[torch.Tensor]):
        """B: the gradients of `inputs` (the chunk's input, any weight that keeps the plain
        backward), and what W needs: (module, input, output gradient) per recorded module."""
        outputs = [out for _, _, out, _ in records]
        grads = torch.autograd.grad(output, [*inputs, *outputs], grad_outputs=grad, allow_unused=True)
        pending = [(module, None if inp is None else inp.detach(), g, which)
                   for (module, inp, _, which), g in zip(records, grads[len(inputs):])]
        return list(grads[: len(inputs)]), pending

    @staticmethod
    def weight_grads(pending: list) -> list[nn.Parameter]:
        """W: accumulate the deferred weight gradients; returns the parameters touched."""
        touched = []
        with torch.no_grad():
            for module, inp, grad_out, which in pending:
                if grad_out is None:
                    continue
                for param, value in _grads_of(module, inp, grad_out, which):
                    value = value.to(param.dtype)
                    if param.grad is None:
                        param.grad = value
                    else:
                        param.grad += value
                    touched.append(param)
        return touched


def _grads_of(module: nn.Module, inp: torch.Tensor | None, grad_out: torch.Tensor, which: str = WHOLE):
    g = grad_out.reshape(-1, grad_out.size(-1))
    if isinstance(module, nn.Linear):
        if which != BIAS_ONLY:
            x = inp.reshape(-1, inp.size(-1)).to(g.dtype)
            yield module.weight, g.t() @ x
        if module.bias is not None and which != WEIGHT_ONLY:
            yield module.bias, g.sum(0)
        return
    if isinstance(module, nn.RMSNorm):
        normalized = F.rms_norm(inp, module.normalized_shape, eps=module.eps)
    else:
        normalized = F.layer_norm(inp, module.normalized_shape, eps=module.eps)
    normalized = normalized.reshape(-1, inp.size(-1))
    if module.weight is not None:
        yield module.weight, (g * normalized.to(g.dtype)).sum(0)
    if getattr(module, "bias", None) is not None:  # an RMSNorm has none
        yield module.bias, g.sum(0)
