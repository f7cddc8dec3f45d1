"""The GPT: shapes, exact parameter count, FLOPs formula, causality, tied head."""

import pytest
import torch

from sdtrain.model import GPT, GPTConfig, count_params, flops_per_token


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_is_exact(bias):
    cfg = GPTConfig(n_layers=3, d_model=48, n_heads=4, seq_len=16, vocab_size=100, bias=bias)
    model = GPT(cfg)
    d, L, V, T = 48, 3, 100, 16
    # per block: qkv 3d²+3d, proj d²+d, fc 4d²+4d, proj 4d²+d, two LayerNorms 2d+2d (no bias: 2d)
    by_hand = V * d + T * d + L * (12 * d * d + (13 * d if bias else 2 * d)) + (2 * d if bias else d)
    assert model.num_params() == count_params(cfg) == by_hand
    assert model.num_params(include_position_embedding=False) == by_hand - T * d


def test_gpt2_small_size():
    # GPT-2 small (124M): the shape everyone knows, as a check on the count.
    cfg = GPTConfig(n_layers=12, d_model=768, n_heads=12, seq_len=1024, vocab_size=50257)
    assert count_params(cfg) == 124_439_808
    n = count_params(cfg) - 1024 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab_size=64))
    idx = torch.randint(0, 64, (3, 16))
    hidden = model(idx)
    assert hidden.shape == (3, 16, 32) and model.logits(hidden).shape == (3, 16, 64)
    loss = model.loss(hidden, idx)  # the loss is outside the forward
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5  # near uniform at init
    assert model.logits(model(idx[:, :5])).shape == (3, 5, 64)
    with pytest.raises(ValueError, match="longer than seq_len"):
        model(torch.randint(0, 64, (1, 17)))


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab_size=64)).eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model.logits(model(idx)), model.logits(model(changed))
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_output_head_is_tied_to_embedding():
    model = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, seq_len=8, vocab_size=32))
    assert model.lm_head.weight is model.tok_emb.weight
    model.loss(model(torch.randint(0, 32, (2, 8))), torch.randint(0, 32, (2, 8))).backward()
    assert model.tok_emb.weight.grad is not None


def test_first_weights_depend_only_on_seed_and_name():
    # What lets ZeRO make the weights unit by unit out of a meta-device model and still
    # start from exactly the weights a whole model gets.
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=16, vocab_size=64)
    whole = dict(GPT(cfg, seed=7).named_parameters())
    with torch.device("meta"):
        meta = GPT(cfg, seed=7)
    assert all(p.is_meta for p in meta.parameters())
    for name in reversed(list(whole)):  # any order, one at a time
        made = torch.empty_like(whole[name])
        meta.initial_value(name, made)
        assert torch.equal(made, whole[name]), name
    other = dict(GPT(cfg, seed=8).named_parameters())
    assert not torch.equal(other["blocks.0.mlp.fc.weight"], whole["blocks.0.mlp.fc.weight"])
    assert not torch.equal(whole["blocks.0.mlp.fc.weight"], whole["blocks.1.mlp.fc.weight"])
    # GPT-2's scheme: N(0, 0.02), residual projections / sqrt(2L), LayerNorms 1 and 0.
    assert abs(whole["blocks.0.mlp.fc.weight"].std().item() - 0.02) < 0.002
    assert abs(whole["blocks.0.mlp.proj.weight"].std().item() - 0.01) < 0.001
    assert torch.equal(whole["ln_f.weight"], torch.ones(32)) and not whole["ln_f.bias"].any()
