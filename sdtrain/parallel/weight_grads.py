"""The split backward of a zero-bubble schedule (Qi et al. 2023): a chunk's backward first
computes only the gradient of its input, which the previous stage is waiting for (B); the
gradients of its weights come later (W), in time the stage would otherwise sit idle.

Every Linear and LayerNorm of the model records its input and output in forward. B asks
autograd for the gradients of the chunk's input and of those outputs only: autograd then
skips every weight-gradient product. W computes the weight gradients from the recorded
inputs and output gradients, with the same products autograd would have used, and adds them
to `.grad`; nothing is computed twice. The embeddings (on the first chunk, which has no input
to send back) and the head (its gradient is made with the loss) keep the plain backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

DEFERRED = (nn.Linear, nn.LayerNorm)


class DeferredWeightGrads:
    def __init__(self, model: nn.Module, skip: tuple[nn.Module, ...] = ()):
        self.records: list | None = None  # (module, input, output) of the forward being recorded
        for module in model.modules():
            if isinstance(module, DEFERRED) and module not in skip:
                module.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        if self.records is not None and torch.is_grad_enabled():
            self.records.append((module, args[0], output))

    def start_recording(self) -> None:
        self.records = []

    def stop_recording(self) -> list:
        records, self.records = self.records, None
        return records

    @staticmethod
    def input_grads(records: list, output: torch.Tensor, grad: torch.Tensor | None, inputs: list[torch.Tensor]):
        """B: the gradients of `inputs` (the chunk's input, any weight that keeps the plain
        backward), and what W needs: (module, input, output gradient) per recorded module."""
        outputs = [out for _, _, out in records]
        grads = torch.autograd.grad(output, [*inputs, *outputs], grad_outputs=grad, allow_unused=True)
        pending = [(module, inp.detach(), g) for (module, inp, _), g in zip(records, grads[len(inputs):])]
        return list(grads[: len(inputs)]), pending

    @staticmethod
    def weight_grads(pending: list) -> list[nn.Parameter]:
        """W: accumulate the deferred weight gradients; returns the parameters touched."""
        touched = []
        with torch.no_grad():
            for module, inp, grad_out in pending:
                if grad_out is None:
                    continue
                for param, value in _grads_of(module, inp, grad_out):
                    value = value.to(param.dtype)
                    if param.grad is None:
                        param.grad = value
                    else:
                        param.grad += value
                    touched.append(param)
        return touched


def _grads_of(module: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor):
    g = grad_out.reshape(-1, grad_out.size(-1))
    if isinstance(module, nn.Linear):
        x = inp.reshape(-1, inp.size(-1)).to(g.dtype)
        yield module.weight, g.t() @ x
        if module.bias is not None:
            yield module.bias, g.sum(0)
        return
    normalized = F.layer_norm(inp, module.normalized_shape, eps=module.eps).reshape(-1, inp.size(-1))
    if module.weight is not None:
        yield module.weight, (g * normalized.to(g.dtype)).sum(0)
    if module.bias is not None:
        yield module.bias, g.sum(0)
