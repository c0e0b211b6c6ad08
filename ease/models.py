"""The two base models. Both are pre-norm decoder-only language models (RMSNorm, RoPE
attention, SwiGLU); they differ only in where a loss, and an exit, may sit.

- StandardTransformer: one exit, after the last layer.
- DeepSupervisionTransformer: an exit after every layer (Lee et al. 2015). Every exit reads
  its layer's hidden state through the final RMSNorm and the LM head, shared by default
  (as in LayerSkip), so an early exit adds no parameters.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .generation import KVCache
from .io import atomic_path
from .modules import RMSNorm, RotaryEmbedding, TransformerBlock, swiglu_hidden_dim


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int = 64
    num_layers: int = 3
    num_heads: int = 4
    ffn_hidden_dim: int | None = None  # None: swiglu_hidden_dim(dim)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    separate_exit_norms: bool = False  # DeepSupervisionTransformer only: one RMSNorm per exit

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = swiglu_hidden_dim(self.dim)


class TransformerLM(nn.Module):
    """Backbone shared by both models. Subclasses say which layers have an exit."""

    def __init__(self, vocab_size: int | None = None, dim: int = 64, num_layers: int = 3,
                 num_heads: int = 4, *, config: ModelConfig | None = None, **options):
        super().__init__()
        if config is None:
            if vocab_size is None:
                raise ValueError("give vocab_size (or a ModelConfig as config=)")
            config = ModelConfig(vocab_size=vocab_size, dim=dim, num_layers=num_layers,
                                 num_heads=num_heads, **options)
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.rotary = RotaryEmbedding(config.dim // config.num_heads, config.max_seq_len,
                                      config.rope_theta)
        self.blocks = nn.ModuleList(
            TransformerBlock(config.dim, config.num_heads, config.ffn_hidden_dim, config.norm_eps)
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.exit_norms = self._build_exit_norms()
        self.apply(self._init_weights)
        for block in self.blocks:
            # GPT-2's scaled init: keeps the residual stream's variance flat with depth.
            for proj in (block.attn.proj, block.ffn.down):
                nn.init.normal_(proj.weight, std=0.02 / (2 * config.num_layers) ** 0.5)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    # -- structure -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """1-indexed layers that have an exit (and may carry a training loss)."""
        raise NotImplementedError

    def _build_exit_norms(self) -> nn.ModuleList | None:
        return None

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    # -- forward ---------------------------------------------------------------------
    def embed(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings; positions are unused (RoPE adds them in attention), they are
        part of ease.generation.LayerwiseDecoder for models with learned positions."""
        if x.dtype != torch.long:
            raise TypeError(f"token ids must be a LongTensor, got {x.dtype}")
        return self.tok_embeddings(x)

    def hidden_states(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Residual stream after each of layers 1..upto (default: all), each (B, T, dim)."""
        upto = self.num_layers if upto is None else upto
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = self.rotary(positions)
        h = self.embed(x)
        states = []
        for block in self.blocks[:upto]:
            h, _ = block(h, cos, sin)
            states.append(h)
        return states

    def exit_norm(self, layer: int) -> nn.Module:
        if self.exit_norms is None or layer == self.num_layers:
            return self.norm
        return self.exit_norms[layer - 1]

    def exit_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of the exit after `layer` (1-indexed) for that layer's hidden state."""
        return self.lm_head(self.exit_norm(layer)(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final-layer logits (B, T, vocab)."""
        return self.exit_logits(self.hidden_states(x)[-1], self.num_layers)

    def forward_exits(self, x: torch.Tensor, layers) -> dict[int, torch.Tensor]:
        """Logits for the given 1-indexed layers only; the backbone stops at the deepest one."""
        layers = sorted(set(layers))
        self.check_layers(layers)
        states = self.hidden_states(x, upto=layers[-1])
        return {layer: self.exit_logits(states[layer - 1], layer) for layer in layers}

    def forward_all_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One logits tensor per layer (final norm + head on each hidden state), for analysis."""
        states = self.hidden_states(x)
        return [self.exit_logits(h, layer) for layer, h in enumerate(states, start=1)]

    # -- layer-wise decoding (ease.generation.LayerwiseDecoder) ------------------------
    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def kv_fill_cost(self) -> float:
        """fill_kv relative to layer_step: the share of a block's weights it multiplies by,
        the whole qkv projection (project_kv computes the queries too)."""
        block = self.blocks[0]
        return block.attn.qkv.weight.numel() / sum(p.numel() for p in block.parameters())

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache.for_model(self, batch_size, max_len)

    def layer_step(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """Block `layer` on h (R, n, dim) at positions (R, n); stores its keys/values."""
        past_kv, mask = cache.context(layer, positions)
        h, (keys, values) = self.blocks[layer - 1](h, *self._row_rotary(positions), past_kv, mask)
        new = h.shape[1]
        cache.write(layer, positions, keys[:, :, -new:], values[:, :, -new:])
        return h

    def fill_kv(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
                cache: KVCache) -> None:
        """Store block `layer`'s keys/values for input h without running it (CALM)."""
        block = self.blocks[layer - 1]
        keys, values = block.attn.project_kv(block.attn_norm(h), *self._row_rotary(positions))
        cache.write(layer, positions, keys, values)

    def _row_rotary(self, positions: torch.Tensor):
        """RoPE angles for per-row positions (R, n), shaped to broadcast over heads;
        padding (-1) gets position 0's, its output being unused."""
        cos, sin = self.rotary(positions.clamp(min=0))
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def check_layers(self, layers) -> None:
        for layer in layers:
            if not isinstance(layer, int) or not 1 <= layer <= self.num_layers:
                raise ValueError(
                    f"layer {layer!r} is out of range: {type(self).__name__} has layers "
                    f"1..{self.num_layers} (1-indexed)"
                )

    def layer_modules(self) -> dict[int | None, list[nn.Module]]:
        """Modules per layer for per-layer learning rates; None holds the shared parts."""
        groups: dict[int | None, list[nn.Module]] = {
            None: [self.tok_embeddings, self.norm, self.lm_head]
        }
        for layer, block in enumerate(self.blocks, start=1):
            groups[layer] = [block]
            if self.exit_norms is not None and layer < self.num_layers:
                groups[layer].append(self.exit_norms[layer - 1])
        return groups

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- persistence -----------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors into `directory`, atomically."""
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            config = {"model_type": type(self).__name__, **asdict(self.config)}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            save_model(self, str(tmp / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """Load a model saved by save_pretrained. No code is executed (safetensors)."""
        directory = Path(directory)
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"no config.json in {directory}: not a saved EASE model")
        raw = json.loads((directory / "config.json").read_text())
        model_type = raw.pop("model_type", None)
        model_cls = MODEL_TYPES.get(model_type)
        if model_cls is None:
            raise ValueError(f"unknown model_type {model_type!r} in {directory / 'config.json'}")
        if cls is not TransformerLM and not issubclass(model_cls, cls):
            raise ValueError(f"{directory} holds a {model_type}, not a {cls.__name__}")
        known = {f.name for f in fields(ModelConfig)}
        model = model_cls(config=ModelConfig(**{k: v for k, v in raw.items() if k in known}))
        load_model(model, str(directory / "model.safetensors"), device=str(device))
        return model.to(device)


class StandardTransformer(TransformerLM):
    """Loss on the final layer only. forward_all_layers still gives logit-lens views."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.separate_exit_norms:
            raise ValueError("separate_exit_norms needs a DeepSupervisionTransformer")

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return (self.num_layers,)


class DeepSupervisionTransformer(TransformerLM):
    """An exit after every layer: each can carry a loss, and inference may stop at any."""

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_layers + 1))

    def _build_exit_norms(self) -> nn.ModuleList | None:
        if not self.config.separate_exit_norms:
            return None
        # The last layer keeps the shared final norm; layers 1..L-1 get their own.
        return nn.ModuleList(
            RMSNorm(self.config.dim, self.config.norm_eps)
            for _ in range(self.config.num_layers - 1)
        )


MODEL_TYPES = {cls.__name__: cls for cls in (StandardTransformer, DeepSupervisionTransformer)}


def build_model(model_type: str, **kwargs) -> TransformerLM:
    """Build a model by class name ("StandardTransformer" / "DeepSupervisionTransformer")."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose from {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type](**kwargs)
