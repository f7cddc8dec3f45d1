"""The chunked loss (head + cross-entropy a chunk of tokens at a time) against the plain
path: the same loss and the same gradients, and a peak memory lower by at least the whole
logits it never makes."""

import pytest
import torch
import torch.nn.functional as F

from measure_chunked_loss import logits_mib, measure
from sdtrain.model import GPT, GPTConfig
from sdtrain.model.chunked_loss import chunked_cross_entropy

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab_size=97)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def plain_and_chunked(hidden, weight, targets, chunk, scale=1.0):
    """(loss, grad of hidden, grad of weight) for both paths, each backward of loss x scale."""
    results = []
    for chunked in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            loss = chunked_cross_entropy(h, w, targets, chunk)
        else:
            loss = F.cross_entropy(F.linear(h, w).float(), targets)
        (loss * scale).backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("chunk", [5, 64, 1000])  # 5 and 64 do not divide the 3 x 16 = 48 tokens
def test_model_loss_and_gradients_equal_the_plain_path(chunk):
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    plain, chunked = GPT(CFG, seed=3), GPT(CFG, seed=3, loss_chunk_tokens=chunk)
    losses = {}
    for name, model in (("plain", plain), ("chunked", chunked)):
        loss = model.loss(model(idx), targets)
        (loss / 3).backward()  # as the trainer does with accumulation: backward sees a scale
        losses[name] = loss.item()
    assert abs(losses["chunked"] - losses["plain"]) <= 1e-6 * losses["plain"]
    grads = {name: p.grad for name, p in chunked.named_parameters()}
    for name, p in plain.named_parameters():
        # tok_emb.weight is also the head: its gradient sums the embedding's and the head's
        assert relative_error(grads[name], p.grad) <= 2e-6, name


def test_gradient_of_hidden_states_and_head_weight():
    torch.manual_seed(1)
    hidden, weight, targets = torch.randn(37, 24), torch.randn(50, 24), torch.randint(0, 50, (37,))
    (loss_p, gh_p, gw_p), (loss_c, gh_c, gw_c) = plain_and_chunked(hidden, weight, targets, chunk=8, scale=0.25)
    assert abs(loss_c.item() - loss_p.item()) <= 1e-6 * loss_p.item()
    assert relative_error(gh_c, gh_p) <= 2e-6
    assert relative_error(gw_c, gw_p) <= 2e-6


def test_ignore_index_counts_only_the_other_tokens():
    torch.manual_seed(2)
    hidden, weight, targets = torch.randn(21, 16), torch.randn(30, 16), torch.randint(0, 30, (21,))
    targets[[0, 7, 8, 20]] = -100  # one of them alone in its chunk of 4 (rows 20..)
    (loss_p, gh_p, gw_p), (loss_c, gh_c, gw_c) = plain_and_chunked(hidden, weight, targets, chunk=4)
    assert abs(loss_c.item() - loss_p.item()) <= 1e-6 * loss_p.item()
    assert relative_error(gh_c, gh_p) <= 2e-6 and relative_error(gw_c, gw_p) <= 2e-6
    assert not gh_c[[0, 7, 8, 20]].any()  # an ignored token gets no gradient


def test_without_gradients_it_is_the_same_loss():
    torch.manual_seed(3)
    model = GPT(CFG, seed=3, loss_chunk_tokens=7).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        chunked = model.loss(model(idx), idx)
        model.head_loss.chunk_tokens = 0
        plain = model.loss(model(idx), idx)
    assert abs(chunked.item() - plain.item()) <= 1e-6 * plain.item()


def test_bf16_autocast_tracks_the_plain_path():
    torch.manual_seed(4)
    hidden, weight, targets = torch.randn(40, 32), torch.randn(64, 32), torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss_p, gh_p, gw_p), (loss_c, gh_c, gw_c) = plain_and_chunked(hidden, weight, targets, chunk=16)
    assert gh_c.dtype == gw_c.dtype == torch.float32  # gradients in the inputs' dtype, as autocast gives
    assert abs(loss_c.item() - loss_p.item()) <= 1e-3 * loss_p.item()
    # the plain path rounds the head's gradient to bf16 once, the chunked one once per chunk
    assert relative_error(gh_c, gh_p) <= 1e-2 and relative_error(gw_c, gw_p) <= 1e-2


def test_a_second_backward_is_refused():
    hidden = torch.randn(6, 8, requires_grad=True)
    loss = chunked_cross_entropy(hidden, torch.randn(10, 8), torch.randint(0, 10, (6,)), 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_peak_memory_is_lower_by_at_least_the_whole_logits():
    # Vocabulary 50304, T 1024, batch 1, one forward + backward, each path in a fresh process.
    # The plain path holds the fp32 logits (196 MiB here) and, in backward, their gradient
    # and softmax alongside; the chunked one holds 128 tokens' worth. Stated margin: the
    # chunked step's peak RSS is below the plain one's by at least the whole logits' size
    # (measured: about 3x that, see README).
    rows = measure(["plain", "chunked"], batch=1, chunk=128)
    plain, chunked = rows["plain"], rows["chunked"]
    assert abs(chunked["loss"] - plain["loss"]) <= 1e-6 * plain["loss"]
    saved = plain["step_peak_mib"] - chunked["step_peak_mib"]
    assert saved >= logits_mib(batch=1), (plain, chunked)
