"""The building blocks against hand-written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from ease.modules import (
    CausalSelfAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
    apply_rotary,
    swiglu_hidden_dim,
)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Replace every parameter (norm weights included) with random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def rope_by_hand(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0):
    """RoPE as complex multiplication: pair (x_2i, x_2i+1) times exp(i * pos * theta^(-2i/d))."""
    head_dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * freqs
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], head_dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    randomise(norm)
    x = torch.randn(2, 5, 16) * 3
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_swiglu_matches_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 32)
    x = torch.randn(2, 5, 16)
    gate = x @ ffn.gate.weight.T
    expected = (gate * torch.sigmoid(gate) * (x @ ffn.up.weight.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), expected)


def test_swiglu_hidden_dim_keeps_the_mlp_parameter_count():
    for dim in (16, 64, 384):
        hidden = swiglu_hidden_dim(dim)
        assert hidden % 16 == 0
        assert 8 * dim / 3 <= hidden < 8 * dim / 3 + 16


def test_apply_rotary_matches_complex_rotation():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, max_seq_len=32)
    positions = torch.arange(6)
    x = torch.randn(2, 3, 6, 8)
    cos, sin = rotary(positions)
    torch.testing.assert_close(apply_rotary(x, cos, sin).double(), rope_by_hand(x, positions),
                               atol=1e-5, rtol=1e-5)


def test_rope_dot_product_depends_only_on_position_difference():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(8, max_seq_len=64)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> float:
        cos, sin = rotary(torch.tensor([m, n]))
        pair = apply_rotary(torch.stack([q, k])[None, None], cos, sin)[0, 0]
        return float(pair[0] @ pair[1])

    for m, n in [(3, 1), (7, 7), (2, 9)]:
        for shift in (1, 5, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # ... and it does depend on the difference, so the check above is not vacuous.
    assert abs(score(5, 1) - score(5, 2)) > 1e-3
    # A rotation keeps the norm.
    cos, sin = rotary(torch.tensor([13]))
    assert apply_rotary(q[None, None, None], cos, sin).norm() == pytest.approx(q.norm(), rel=1e-5)


def test_rotary_rejects_odd_head_dim_and_long_positions():
    with pytest.raises(ValueError, match="head_dim=7"):
        RotaryEmbedding(7, max_seq_len=8)
    with pytest.raises(ValueError, match="position 8 .*max_seq_len=8"):
        RotaryEmbedding(4, max_seq_len=8)(torch.arange(9))


def attention_by_hand(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    batch, steps, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T).split(dim, dim=-1)
    q, k, v = (t.reshape(batch, steps, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    positions = torch.arange(steps)
    q, k = rope_by_hand(q, positions).float(), rope_by_hand(k, positions).float()
    future = torch.ones(steps, steps, dtype=torch.bool).triu(diagonal=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, steps, dim)
    return out @ attn.proj.weight.T


def test_attention_matches_manual_causal_softmax():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, num_heads=2)
    randomise(attn)
    rotary = RotaryEmbedding(8, max_seq_len=32)
    x = torch.randn(2, 7, 16)
    out, (k, v) = attn(x, *rotary(torch.arange(7)))
    torch.testing.assert_close(out, attention_by_hand(attn, x), atol=1e-4, rtol=1e-4)
    assert k.shape == v.shape == (2, 2, 7, 8)


def test_attention_with_kv_cache_matches_full_pass():
    torch.manual_seed(0)
    attn = CausalSelfAttention(16, num_heads=2)
    randomise(attn)
    rotary = RotaryEmbedding(8, max_seq_len=32)
    x = torch.randn(1, 9, 16)
    full, _ = attn(x, *rotary(torch.arange(9)))
    prefix, cache = attn(x[:, :5], *rotary(torch.arange(5)))
    chunk, cache = attn(x[:, 5:8], *rotary(torch.arange(5, 8)), past_kv=cache)
    last, _ = attn(x[:, 8:], *rotary(torch.arange(8, 9)), past_kv=cache)
    torch.testing.assert_close(torch.cat([prefix, chunk, last], dim=1), full,
                               atol=1e-5, rtol=1e-5)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="dim=10 .*num_heads=4"):
        CausalSelfAttention(10, num_heads=4)


def test_block_is_pre_norm_residual():
    torch.manual_seed(0)
    block = TransformerBlock(16, num_heads=2, ffn_hidden_dim=32)
    randomise(block)
    cos, sin = RotaryEmbedding(8, max_seq_len=32)(torch.arange(6))
    x = torch.randn(2, 6, 16)
    h = x + block.attn(block.attn_norm(x), cos, sin)[0]
    expected = h + block.ffn(block.ffn_norm(h))
    torch.testing.assert_close(block(x, cos, sin)[0], expected)
    assert F.mse_loss(expected, x) > 0  # the sub-layers do contribute
