"""Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CausalSelfAttention
from .ffn import SwiGLU
from .norm import RMSNorm


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = CausalSelfAttention(dim, num_heads)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = SwiGLU(dim, ffn_hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, kv = self.attn(self.attn_norm(x), cos, sin, past_kv, attn_mask)
        x = x + attn_out
        return x + self.ffn(self.ffn_norm(x)), kv
