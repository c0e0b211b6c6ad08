"""Causal multi-head self-attention with rotary position embeddings (Su et al. 2021).

RoPE rotates each (even, odd) feature pair of queries and keys by an angle proportional
to the token's position, so the dot product q_m . k_n depends only on m - n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables; `forward(positions)` returns the rows for those positions."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got head_dim={head_dim}")
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # Buffers, not parameters: rebuilt from the config, so they stay out of checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.max_seq_len = max_seq_len

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel() and int(positions.max()) >= self.max_seq_len:
            raise ValueError(
                f"position {int(positions.max())} is past max_seq_len={self.max_seq_len}; "
                "build the model with a larger max_seq_len"
            )
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of its positions; cos/sin are (T, D/2)."""
    # (x_even + i x_odd) * (cos + i sin) in float32: one complex multiply is several times
    # faster, forward and backward, than the same rotation from strided real halves.
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated keys and values of x, shaped (B, H, T, D): what a KV cache stores."""
        _, k, v = self._split_heads(self.qkv(x))
        return apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Attend from x to (past_kv + x). Returns the output and the full (k, v) for caching.

        Without past_kv or attn_mask the mask is plain causal; with a cache, x's queries come
        after every cached key, so the caller passes attn_mask when that is not all-visible.
        """
        q, k, v = self._split_heads(self.qkv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        if attn_mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif past_kv is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = _cached_attention(q, k, v)
        batch, _, steps, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(batch, steps, -1)), (k, v)

    def _split_heads(self, qkv: torch.Tensor):
        batch, steps, _ = qkv.shape
        qkv = qkv.view(batch, steps, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # unlike qkv[i], its backward writes no zero-filled copies


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention where the last q.shape[2] keys are the queries' own positions."""
    new, total = q.shape[2], k.shape[2]
    if new == 1:
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.ones(new, total, dtype=torch.bool, device=q.device).tril(diagonal=total - new)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
