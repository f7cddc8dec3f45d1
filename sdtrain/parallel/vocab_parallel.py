"""The vocabulary split over the tensor-parallel ranks: the token embedding, and the tied
output head with its cross-entropy, none of which ever holds the whole vocabulary's logits.

Each rank holds vocabulary rows [start, start + V / T). The embedding looks up the ids in its
rows and gives zero for the others; the sum over ranks (an all-reduce, or a reduce-scatter
along the sequence under sequence parallelism) is the whole lookup. The head makes this
rank's V / T logits of each token, and the cross-entropy needs only three numbers per token
from the whole vocabulary: the max logit, the sum of exponentials, the target's logit, summed
(the max: maxed) over the ranks in two all-reduces of one value per token, the last two
together (Megatron-LM's `vocab_parallel_cross_entropy`). With
`chunk_tokens` the head and the loss go a chunk of tokens at a time, with each chunk's
gradients made at once, as chunked_loss.py does on one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.model.chunked_loss import take_forward_grads
from sdtrain.parallel.tp_collectives import TensorParallel, into_tp_region, out_of_tp_region


class VocabParallelEmbedding(nn.Embedding):
    """The token embedding's rows [vocab_start, vocab_start + num_embeddings) of the vocabulary."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, tp: TensorParallel):
        super().__init__(*weight.shape, device="meta")
        self.weight = nn.Parameter(weight)
        self.vocab_start, self.tp = vocab_start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        elsewhere = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return out_of_tp_region(rows.masked_fill(elsewhere.unsqueeze(-1), 0.0), self.tp)


class SequencePartPositions(nn.Embedding):
    """The (replicated) position embedding under sequence parallelism: asked for positions
    0..T-1, it gives this rank's part of them, to add to its part of the token embeddings."""

    def __init__(self, embedding: nn.Embedding, tp: TensorParallel):
        super().__init__(*embedding.weight.shape, device="meta")
        self.weight, self.tp = embedding.weight, tp

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions[self.tp.sequence_part(positions.size(0))], self.weight)


class VocabParallelHeadLoss(nn.Module):
    """HeadLoss (gpt.py) with this rank's vocabulary rows of the head: the same call, the
    same mean cross-entropy on every tp rank. The hidden states come whole to every rank
    (gathered along the sequence under sequence parallelism); the gradient each rank's rows
    give them is summed back over the ranks by that collective's backward."""

    def __init__(self, chunk_tokens: int, vocab_start: int, tp: TensorParallel):
        super().__init__()
        self.chunk_tokens, self.vocab_start, self.tp = chunk_tokens, vocab_start, tp

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = into_tp_region(hidden, self.tp).flatten(0, 1)
        return vocab_parallel_cross_entropy(hidden, weight, targets.reshape(-1), self.vocab_start, self.tp,
                                            self.chunk_tokens)


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 vocab_start: int, tp: TensorParallel, chunk_tokens: int = 0,
                                 ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, whole_weight).float(), targets) where this rank holds
    whole_weight's rows [vocab_start, vocab_start + weight.size(0)): the mean over the tokens
    whose target is not `ignore_index`, the same on every rank of `tp`.

    hidden [N, d] (whole, the same on every rank), weight [V / T, d], targets [N] (whole
    vocabulary ids). At most `chunk_tokens` tokens' logits (0: all N) at a time, each V / T wide."""
    chunk_tokens = chunk_tokens or max(hidden.size(0), 1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _VocabParallelCrossEntropy.apply(hidden, weight, targets, vocab_start, tp, chunk_tokens, ignore_index)
    loss_sum, count, _, _ = _loss_and_grads(hidden, weight, targets, vocab_start, tp, chunk_tokens, ignore_index,
                                            (False, False))
    return loss_sum / count


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, tp, chunk_tokens, ignore_index):
        loss_sum, count, grad_hidden, grad_weight = _loss_and_grads(
            hidden, weight, targets, vocab_start, tp, chunk_tokens, ignore_index, ctx.needs_input_grad[:2])
        ctx.grads = (grad_hidden, grad_weight)  # scaled in place in backward (see chunked_loss.py)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = take_forward_grads(ctx, grad_loss, "vocab_parallel_cross_entropy")
        return grad_hidden, grad_weight, None, None, None, None, None


def _loss_and_grads(hidden, weight, targets, vocab_start, tp, chunk_tokens, ignore_index, needs_grad):
    """(sum of token losses, number of counted tokens, grad of hidden, grad of weight) of the
    mean loss; the hidden gradient is this rank's rows' part (the caller's collective sums it)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    want_hidden, want_weight = needs_grad
    counted = targets != ignore_index
    count = counted.sum()
    local_targets = targets - vocab_start
    here = counted & (local_targets >= 0) & (local_targets < weight.size(0))  # target among this rank's rows
    loss_sum = torch.zeros((), device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    with torch.autocast(device, enabled=False):
        weight_c = weight.to(dtype)
        for start in range(0, hidden.size(0), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h = hidden[rows].to(dtype)
            logits = F.linear(h, weight_c).float()  # [chunk, V / T]: this rank's columns only
            target = torch.where(here[rows], local_targets[rows], 0).unsqueeze(1)
            top = tp.all_reduce(logits.max(dim=1).values, op=dist.ReduceOp.MAX)
            shifted = logits.sub_(top.unsqueeze(1))  # minus the max from here on: exp cannot overflow
            # The target's logit (on the rank holding it; zero on the others) and the sum of
            # exponentials, summed over the ranks in one call.
            target_logit = torch.where(here[rows], shifted.gather(1, target).squeeze(1), 0.0)
            exp = shifted.exp_()
            sum_exp, target_logit = tp.all_reduce(torch.stack([exp.sum(dim=1), target_logit]))
            loss_sum += ((sum_exp.log() - target_logit) * counted[rows]).sum()
            if not (want_hidden or want_weight):
                continue
            # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count, zero on ignored rows
            grad_logits = exp.div_(sum_exp.unsqueeze(1))
            grad_logits.scatter_add_(1, target, -here[rows].to(grad_logits.dtype).unsqueeze(1))
            grad_logits.mul_((counted[rows] / count).unsqueeze(1))
            grad_logits = grad_logits.to(dtype)
            if want_hidden:
                grad_hidden[rows] = grad_logits @ weight_c
            if want_weight and dtype == torch.float32:
                grad_weight.addmm_(grad_logits.t(), h)
            elif want_weight:
                grad_weight += (grad_logits.t() @ h).float()
    if want_weight:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_sum, count, grad_hidden, grad_weight

