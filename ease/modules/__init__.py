"""The building blocks of both models: one module per idea."""

from .attention import CausalSelfAttention, RotaryEmbedding, apply_rotary
from .ffn import SwiGLU, swiglu_hidden_dim
from .norm import RMSNorm
from .transformer import TransformerBlock

__all__ = [
    "CausalSelfAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "apply_rotary",
    "swiglu_hidden_dim",
]
