"""Cross-entropy of the output head without the whole [tokens, vocab] logits.

The plain path makes the logits of every token at once, an fp32 copy for the softmax, and the
same again for their gradients: at vocabulary 50304 each of those is 206 MB per 1024 tokens
in fp32, the largest tensors of a GPT-2 step. Here the head and the loss go `chunk_tokens`
rows at a time, and each chunk's gradients (of the hidden states and of the head weight) are
computed at once, while its logits exist; backward only scales them by the incoming gradient.
So at most one chunk's logits are alive, and the FLOPs are the plain path's (nothing is
recomputed). Liger-Kernel's fused linear cross-entropy does the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_tokens: int, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index),
    chunk by chunk: the mean over the tokens whose target is not `ignore_index`.

    hidden [N, d], weight [V, d], targets [N]. Under autocast the matmuls run in its dtype,
    as F.linear would; the softmax is fp32 either way."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk_tokens, ignore_index)
    loss_sum, count, _, _ = _loss_and_grads(hidden, weight, targets, chunk_tokens, ignore_index, (False, False))
    return loss_sum / count


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, ignore_index):
        loss_sum, count, grad_hidden, grad_weight = _loss_and_grads(
            hidden, weight, targets, chunk_tokens, ignore_index, ctx.needs_input_grad[:2])
        # Kept as plain attributes, not saved tensors, so that backward may scale them in
        # place: a second [V, d] copy of the head's gradient is what this file avoids.
        ctx.grads = (grad_hidden, grad_weight)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = take_forward_grads(ctx, grad_loss, "chunked_cross_entropy")
        return grad_hidden, grad_weight, None, None, None


def _loss_and_grads(hidden, weight, targets, chunk_tokens, ignore_index, needs_grad):
    """(sum of token losses, number of counted tokens, grad of hidden, grad of weight), the
    gradients those of the mean loss and None where not needed."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    want_hidden, want_weight = needs_grad
    counted = targets != ignore_index
    count = counted.sum()  # a tensor: no host synchronisation inside the step
    loss_sum = torch.zeros((), device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    # fp32 accumulator: one rounding to the weight's dtype at the end, not one per chunk
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    with torch.autocast(device, enabled=False):  # the dtypes are chosen here, explicitly
        weight_c = weight.to(dtype)
        for start in range(0, hidden.size(0), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(dtype)
            logits = F.linear(h, weight_c).float()  # [chunk, V], the only vocabulary-wide tensor
            keep = counted[rows]
            target = torch.where(keep, targets[rows], 0).unsqueeze(1)  # ignored rows: any valid index
            lse = torch.logsumexp(logits, dim=1)
            loss_sum += ((lse - logits.gather(1, target).squeeze(1)) * keep).sum()
            if not (want_hidden or want_weight):
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count, zero on ignored rows
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()
            grad_logits.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad_logits.dtype))
            grad_logits.mul_((keep / count).unsqueeze(1))
            grad_logits = grad_logits.to(dtype)
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight_c
            if want_weight and dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)  # in place: no [V, d] temporary per chunk
            elif want_weight:
                grad_weight += (grad_logits.t() @ h).float()
    if want_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, count, grad_hidden, grad_weight


def take_forward_grads(ctx, grad_loss: torch.Tensor, what: str) -> tuple:
    """The gradients a loss made in its forward (ctx.grads), scaled in place by grad_loss and
    handed over once. They were made for d(mean loss); whatever came after it (dividing by the
    accumulation steps, a loss scaler) arrives here as one scalar."""
    if ctx.grads is None:
        raise RuntimeError(f"{what}: a second backward through the same loss "
                           "(its gradients were made in forward and are used up)")
    grads, ctx.grads = ctx.grads, None
    return tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
