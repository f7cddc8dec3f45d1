"""Routing rules, each on a hand-computed case, then equality with DeepSpeed's gating functions
(random token selection and second-expert sampling off) on random logits where it is installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from sdtrain.model.moe import BiasBalancer, capacity_for, route, router_z_loss, top_k_gating, update_balancers

DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LN3 = math.log(3.0)


def prefer(*experts: int, num_experts: int, strength: float = 4.0) -> torch.Tensor:
    """Logits in which token i clearly prefers experts[i] first (then lower indices next)."""
    logits = -torch.arange(num_experts, dtype=torch.float32).repeat(len(experts), 1) * 0.1
    for token, expert in enumerate(experts):
        logits[token, expert] = strength
    return logits


def test_capacity_formula():
    assert capacity_for(10, 4, 1, 1.0, 1) == 3  # ceil(2.5)
    assert capacity_for(10, 4, 2, 1.0, 1) == 5  # ceil(2 * 10 / 4)
    assert capacity_for(16, 4, 2, 1.25, 1) == 10  # ceil(2 * 16 / 4 * 1.25)
    assert capacity_for(4, 4, 1, 1.0, 4) == 4  # min_capacity wins
    assert route(torch.zeros(10, 4), 1, 1.0, 1, drop_tokens=True).capacity == 3


def test_slots_in_token_order_and_overflow_dropped():
    r = route(prefer(0, 0, 1, 0, 0, num_experts=2), 1, capacity_factor=1.0, min_capacity=1, drop_tokens=True)
    assert r.capacity == 3  # ceil(5 / 2)
    assert r.expert[:, 0].tolist() == [0, 0, 1, 0, 0]
    assert r.slot[:, 0].tolist() == [0, 1, 0, 2, 3]
    assert r.kept[:, 0].tolist() == [True, True, True, True, False]
    assert r.tokens_per_expert.tolist() == [4, 1]  # counted before dropping
    assert int(r.dropped) == 1
    assert float(r.weight[4, 0]) == 0.0


def test_every_first_choice_before_any_second_choice():
    # Token 0: first e0, second e1. Token 1: first e1, second e0.
    logits = torch.tensor([[2.0, 1.0, -5.0], [1.0, 2.0, -5.0]])
    r = route(logits, 2, capacity_factor=1.0, min_capacity=1, drop_tokens=True)
    assert r.expert.tolist() == [[0, 1], [1, 0]]
    # Token 0's second choice (e1) queues behind token 1's first choice of e1.
    assert r.slot.tolist() == [[0, 1], [0, 1]]
    assert r.capacity == 2 and bool(r.kept.all())


def test_top1_weight_is_the_router_probability():
    r = route(torch.tensor([[LN3, 0.0], [0.0, LN3]]), 1, 2.0, 1, drop_tokens=True)
    assert r.expert[:, 0].tolist() == [0, 1]
    torch.testing.assert_close(r.weight[:, 0], torch.tensor([0.75, 0.75]))


def test_top2_weights_renormalised_over_kept_choices():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    r = route(logits, 2, 4.0, 1, drop_tokens=True)
    torch.testing.assert_close(r.weight, torch.tensor([[0.625, 0.375]]))
    # Two experts, capacity 2: the first choices fill both, so every second choice drops
    # and each token puts weight 1 on its first choice.
    r = route(prefer(0, 0, 1, 1, num_experts=2), 2, capacity_factor=0.5, min_capacity=1, drop_tokens=True)
    assert r.capacity == 2
    assert r.kept.tolist() == [[True, False]] * 4
    torch.testing.assert_close(r.weight, torch.tensor([[1.0, 0.0]] * 4))
    assert int(r.dropped) == 4


def test_aux_loss_values():
    balanced = torch.tensor([[LN3, 0.0], [0.0, LN3]])  # mean prob (.5, .5), first choices (.5, .5)
    lopsided = torch.tensor([[LN3, 0.0], [LN3, 0.0]])  # mean prob (.75, .25), first choices (1, 0)
    assert float(route(balanced, 1, 1.0, 1, True).aux_loss) == pytest.approx(1.0)
    assert float(route(lopsided, 1, 1.0, 1, True).aux_loss) == pytest.approx(1.5)  # 2 * .75
    # Top-2 counts first choices only, though every token also sends to expert 1.
    assert float(route(lopsided, 2, 1.0, 1, True).aux_loss) == pytest.approx(1.5)
    # k = 3 of 3 experts: every expert gets a third of all choices, so E * sum(p_e / 3) = 1.
    three = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.3, 0.1]]))
    assert float(route(three, 3, 1.0, 1, True).aux_loss) == pytest.approx(1.0)


def test_router_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [0.0, LN3]])  # logsumexp: ln 2, ln 4
    assert float(router_z_loss(logits)) == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_dropless_capacity_is_the_largest_count():
    r = route(prefer(0, 0, 0, 1, num_experts=4), 1, capacity_factor=1.0, min_capacity=1, drop_tokens=False)
    assert r.capacity == 3 and int(r.dropped) == 0 and bool(r.kept.all())
    assert route(prefer(0, 0, 0, 1, num_experts=4), 1, 1.0, 1, drop_tokens=True).capacity == 1


def test_selection_bias_changes_the_choice_not_the_weight():
    logits = torch.log(torch.tensor([[0.6, 0.4]]))
    r = route(logits, 1, 2.0, 1, True, selection_bias=torch.tensor([0.0, 0.5]))
    assert r.expert.tolist() == [[1]]
    torch.testing.assert_close(r.weight, torch.tensor([[0.4]]))
    torch.testing.assert_close(r.probs, torch.tensor([[0.6, 0.4]]))


def test_gradient_reaches_logits_through_weights_and_aux_loss():
    logits = torch.randn(16, 4, requires_grad=True)
    # Renormalised top-2 weights sum to 1 per token, so weigh the second choice alone.
    (grad_w,) = torch.autograd.grad(route(logits, 2, 1.0, 1, True).weight[:, 1].sum(), logits)
    (grad_aux,) = torch.autograd.grad(route(logits, 2, 1.0, 1, True).aux_loss, logits)
    assert grad_w.abs().sum() > 0 and grad_aux.abs().sum() > 0


def test_dense_form_matches_index_form():
    torch.manual_seed(0)
    logits = torch.randn(40, 4)
    r = route(logits, 2, 0.75, 1, True)
    combine, dispatch, aux, counts = top_k_gating(logits, 2, 0.75, 1, True)
    assert combine.shape == dispatch.shape == (40, 4, r.capacity)
    assert int(dispatch.sum()) == int(r.kept.sum())
    token, choice = r.kept.nonzero(as_tuple=True)
    expert, slot = r.expert[token, choice], r.slot[token, choice]
    assert bool(dispatch[token, expert, slot].all())
    torch.testing.assert_close(combine[token, expert, slot], r.weight[token, choice])
    torch.testing.assert_close(aux, r.aux_loss)
    assert torch.equal(counts, r.tokens_per_expert)


def test_top_k_above_num_experts_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        route(torch.zeros(4, 2), 3, 1.0, 1, True)


def test_bias_balancer_nudges_toward_equal_load_and_is_checkpointed():
    balancer = BiasBalancer(4, rate=0.1)
    balancer.observe(torch.tensor([2, 1, 1, 0]))
    balancer.observe(torch.tensor([1, 0, 1, 2]))  # summed over the step: 3, 1, 2, 2 (mean 2)
    update_balancers([balancer])
    torch.testing.assert_close(balancer.bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert float(balancer.load.abs().sum()) == 0.0
    assert set(balancer.state_dict()) == {"bias"}
    # Loads are summed over ranks before the sign is taken: another rank's loads change it.
    other = BiasBalancer(2, rate=0.1)
    other.observe(torch.tensor([1, 0]))
    update_balancers([other], all_reduce_sum=lambda loads: loads.add_(torch.tensor([[0.0, 3.0]])))
    torch.testing.assert_close(other.bias, torch.tensor([0.1, -0.1]))


# ---- equality with DeepSpeed ----


def deepspeed_gating():
    if not DEEPSPEED:
        pytest.skip("deepspeed not installed (DS_BUILD_OPS=0 pip install deepspeed)")
    from deepspeed.moe import sharded_moe

    return sharded_moe


def assert_same(ours, theirs):
    combine, dispatch, aux, counts = ours
    l_aux, ds_combine, ds_dispatch, ds_counts = theirs
    assert combine.shape == ds_combine.shape
    torch.testing.assert_close(combine, ds_combine)
    assert torch.equal(dispatch, ds_dispatch)
    torch.testing.assert_close(aux, l_aux)
    assert torch.equal(counts, ds_counts)


@pytest.mark.parametrize("tokens,experts,capacity_factor,drop", [
    (64, 4, 1.0, True), (64, 8, 1.25, True), (37, 4, 0.5, True), (64, 4, 1.0, False), (50, 8, 2.0, True)])
def test_top2_equals_deepspeed(tokens, experts, capacity_factor, drop):
    ds = deepspeed_gating()
    torch.manual_seed(tokens + experts)
    logits = torch.randn(tokens, experts)
    theirs = ds.top2gating(logits.clone(), capacity_factor, 4, drop_tokens=drop, top2_2nd_expert_sampling=False)
    assert_same(top_k_gating(logits, 2, capacity_factor, 4, drop), theirs)


@pytest.mark.parametrize("drop", [True, False])
def test_top1_equals_deepspeed_when_nothing_drops(drop):
    ds = deepspeed_gating()
    torch.manual_seed(1)
    logits = torch.randn(64, 4)
    theirs = ds.top1gating(logits.clone(), 4.0, 4, drop_tokens=drop, use_rts=False)
    assert_same(top_k_gating(logits, 1, 4.0, 4, drop), theirs)


def test_top1_drops_as_many_as_deepspeed():
    # Without random token selection DeepSpeed keeps C tokens per expert through topk over
    # tied 0/1 values, whose choice among ties is unspecified; we keep the first C in token
    # order (the rule). Capacity, loss, counts and how many survive agree.
    ds = deepspeed_gating()
    torch.manual_seed(2)
    logits = torch.randn(64, 4)
    l_aux, ds_combine, ds_dispatch, ds_counts = ds.top1gating(logits.clone(), 1.0, 4, use_rts=False)
    combine, dispatch, aux, counts = top_k_gating(logits, 1, 1.0, 4, True)
    assert combine.shape == ds_combine.shape
    assert torch.equal(dispatch.sum(dim=(0, 2)), ds_dispatch.sum(dim=(0, 2)))
    torch.testing.assert_close(aux, l_aux)
    assert torch.equal(counts, ds_counts)


def test_top3_dropless_weights_and_loss_equal_deepspeed():
    # DeepSpeed's topkgating orders slots by token only; ours puts rank r before rank r+1, so
    # compare what each token sends to each expert, not where in the buffer it lands.
    ds = deepspeed_gating()
    torch.manual_seed(3)
    logits = torch.randn(48, 6)
    l_aux, ds_combine, _, ds_counts = ds.topkgating(logits.clone(), 3, 1.0, 1, drop_tokens=False)
    combine, _, aux, counts = top_k_gating(logits, 3, 1.0, 1, False)
    assert combine.shape == ds_combine.shape
    torch.testing.assert_close(combine.sum(-1), ds_combine.sum(-1))
    torch.testing.assert_close(aux, l_aux)
    assert torch.equal(counts, ds_counts)
