"""TrainingConfig: the three EASE options, validated, and the weighting presets.

- layer_weights:    loss weight per exit, 1-indexed (deep supervision, Lee et al. 2015).
                    The loss is sum_l w_l * CE_l with no renormalisation, so weights that
                    sum to 2 double the gradient; presets sum to 1.
- layer_lr_scales:  learning-rate multiplier per layer (discriminative fine-tuning,
                    Howard & Ruder 2018); layers not listed train at 1.0.
- routing_threshold: confidence needed to leave at an early exit at inference
                    (BranchyNet, Teerapittayanon et al. 2016); 0 disables early exit.
                    exit_criterion (ease.exits.CRITERIA) says what "confidence" is, with
                    exit_criterion_params, e.g. {"patience": 3}, as its keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .exits import check_criterion_params, get_criterion


def _layer_dict(values, name: str) -> dict[int, float]:
    """Accept {1: w}, {"1": w} (JSON/YAML/papermill) and lists (layer 1 first)."""
    if values is None:
        return {}
    if isinstance(values, (list, tuple)):
        values = dict(enumerate(values, start=1))
    if not isinstance(values, dict):
        raise TypeError(f"{name} must be a dict {{layer: value}}, got {type(values).__name__}")
    out = {}
    for key, value in values.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: layer key {key!r} is not an integer") from None
        if isinstance(key, float) and key != layer:
            raise ValueError(f"{name}: layer key {key!r} is not an integer")
        if layer < 1:
            raise ValueError(f"{name}: layer {layer} is invalid, layers are 1-indexed")
        if layer in out:
            raise ValueError(f"{name}: layer {layer} is given twice")
        try:
            out[layer] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{layer}] = {value!r} is not a number") from None
    return dict(sorted(out.items()))


@dataclass
class TrainingConfig:
    layer_weights: dict[int, float]
    layer_lr_scales: dict[int, float] | None = None
    routing_threshold: float = 0.0
    exit_layers: list[int] | None = None  # None: layers with weight > 0, plus the last
    exit_criterion: str = "max_prob"
    exit_criterion_params: dict | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self):
        self.layer_weights = _layer_dict(self.layer_weights, "layer_weights")
        if not self.layer_weights:
            raise ValueError("layer_weights is empty: give at least one layer a weight")
        for layer, weight in self.layer_weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"layer_weights[{layer}] = {weight} must be finite and >= 0")
        if not any(self.layer_weights.values()):
            raise ValueError(f"layer_weights {self.layer_weights} are all zero: nothing to train")
        if self.layer_lr_scales is not None:
            self.layer_lr_scales = _layer_dict(self.layer_lr_scales, "layer_lr_scales")
            for layer, scale in self.layer_lr_scales.items():
                if not math.isfinite(scale) or scale <= 0:
                    raise ValueError(f"layer_lr_scales[{layer}] = {scale} must be finite and > 0")
        threshold = float(self.routing_threshold)
        if not 0.0 <= threshold <= 1.0:  # also rejects NaN
            raise ValueError(f"routing_threshold = {self.routing_threshold} is outside [0, 1]")
        self.routing_threshold = threshold
        if self.exit_layers is not None:
            layers = _layer_dict(dict.fromkeys(self.exit_layers, 0), "exit_layers")
            self.exit_layers = sorted(layers)
            if not self.exit_layers:
                raise ValueError("exit_layers is empty: give None for the default or >= 1 layer")
        check_criterion_params(self.exit_criterion, self.exit_criterion_params)
        if self.exit_criterion_params is not None:
            self.exit_criterion_params = dict(self.exit_criterion_params)

    # -- checks against a model ------------------------------------------------------
    def validate(self, num_layers: int, trainable_exits=None) -> None:
        """Check every layer index against a model with `num_layers` layers."""
        for name, layers in (("layer_weights", self.layer_weights),
                             ("layer_lr_scales", self.layer_lr_scales or {}),
                             ("exit_layers", self.exit_layers or [])):
            for layer in layers:
                if layer > num_layers:
                    raise ValueError(
                        f"{name} names layer {layer}, but the model has layers 1..{num_layers}"
                    )
        if trainable_exits is not None:
            for layer, weight in self.layer_weights.items():
                if weight > 0 and layer not in trainable_exits:
                    raise ValueError(
                        f"layer_weights[{layer}] = {weight}, but this model only has exits at "
                        f"layers {list(trainable_exits)}; use a DeepSupervisionTransformer"
                    )

    def weighted_layers(self) -> list[int]:
        return [layer for layer, weight in self.layer_weights.items() if weight > 0]

    def resolve_exit_layers(self, num_layers: int) -> list[int]:
        if self.exit_layers is not None:
            return sorted(set(self.exit_layers) | {num_layers})
        return sorted(set(self.weighted_layers()) | {num_layers})

    def lr_scale(self, layer: int) -> float:
        return (self.layer_lr_scales or {}).get(layer, 1.0)

    def criterion(self):
        """The ExitCriterion that exit_criterion and exit_criterion_params name."""
        return get_criterion(self.exit_criterion, **(self.exit_criterion_params or {}))

    # -- plain data ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "layer_weights": dict(self.layer_weights),
            "layer_lr_scales": None if self.layer_lr_scales is None else dict(self.layer_lr_scales),
            "routing_threshold": self.routing_threshold,
            "exit_layers": None if self.exit_layers is None else list(self.exit_layers),
            "exit_criterion": self.exit_criterion,
            "exit_criterion_params": (None if self.exit_criterion_params is None
                                      else dict(self.exit_criterion_params)),
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown TrainingConfig keys: {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        weights = ", ".join(f"L{layer}={weight:g}" for layer, weight in self.layer_weights.items())
        scales = ", ".join(f"L{layer}={s:g}" for layer, s in (self.layer_lr_scales or {}).items())
        criterion = self.exit_criterion
        if self.exit_criterion_params:
            params = ", ".join(f"{k}={v!r}" for k, v in self.exit_criterion_params.items())
            criterion = f"{criterion}({params})"
        routing = (f"exit when {criterion} >= {self.routing_threshold:g}"
                   if self.routing_threshold > 0 else "off (every token runs all layers)")
        lines = [
            f"TrainingConfig{f' {self.name!r}' if self.name else ''}",
            f"  layer weights:   {weights}   (sum {sum(self.layer_weights.values()):g})",
            f"  layer LR scales: {scales or 'uniform (1.0)'}",
            f"  early exit:      {routing}",
        ]
        if self.exit_layers is not None:
            lines.append(f"  exit layers:     {self.exit_layers}")
        return "\n".join(lines)


# -- presets -----------------------------------------------------------------------------

def _normalised(raw: dict[int, float]) -> dict[int, float]:
    total = sum(raw.values())
    return {layer: value / total for layer, value in raw.items()}


def create_standard_config(num_layers: int, **kwargs) -> TrainingConfig:
    """Loss on the last layer only: the ordinary language model."""
    weights = {layer: 0.0 for layer in range(1, num_layers + 1)}
    weights[num_layers] = 1.0
    return TrainingConfig(layer_weights=weights, name=kwargs.pop("name", "standard"), **kwargs)


def create_deep_supervision_config(num_layers: int, **kwargs) -> TrainingConfig:
    """Equal weight 1/L on every exit (deeply-supervised nets, Lee et al. 2015)."""
    weights = {layer: 1.0 / num_layers for layer in range(1, num_layers + 1)}
    return TrainingConfig(layer_weights=weights, name=kwargs.pop("name", "deep_supervision"),
                          **kwargs)


def create_asymmetric_config(num_layers: int, alpha: float = 0.7, **kwargs) -> TrainingConfig:
    """EASE's asymmetric scheme: alpha on the first exit, 1 - alpha on the last, 0 between."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha = {alpha} is outside [0, 1]")
    if num_layers < 2:
        raise ValueError(f"the asymmetric scheme needs >= 2 layers, got num_layers={num_layers}")
    weights = {layer: 0.0 for layer in range(1, num_layers + 1)}
    weights[1], weights[num_layers] = alpha, 1.0 - alpha
    return TrainingConfig(layer_weights=weights, name=kwargs.pop("name", f"asymmetric_{alpha:g}"),
                          **kwargs)


def create_linear_depth_config(num_layers: int, **kwargs) -> TrainingConfig:
    """Weight proportional to depth, w_l = l / sum(l) (PABEE, Zhou et al. 2020)."""
    weights = _normalised({layer: float(layer) for layer in range(1, num_layers + 1)})
    return TrainingConfig(layer_weights=weights, name=kwargs.pop("name", "linear_depth"), **kwargs)


def create_layerskip_config(num_layers: int, **kwargs) -> TrainingConfig:
    """LayerSkip's default "sum_l" scale, w_l proportional to 1 + 2 + ... + l
    (Elhoushi et al. 2024), without its rotational curriculum."""
    weights = _normalised({layer: layer * (layer + 1) / 2 for layer in range(1, num_layers + 1)})
    return TrainingConfig(layer_weights=weights, name=kwargs.pop("name", "layerskip"), **kwargs)


PRESETS: dict[str, Callable[..., TrainingConfig]] = {
    "standard": create_standard_config,
    "deep_supervision": create_deep_supervision_config,
    "asymmetric": create_asymmetric_config,
    "linear_depth": create_linear_depth_config,
    "layerskip": create_layerskip_config,
}


def create_preset_config(preset: str, num_layers: int, **kwargs) -> TrainingConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset](num_layers, **kwargs)


def lr_scale_schedule(kind: str, num_layers: int, decay: float = 0.5) -> dict[int, float] | None:
    """Per-layer LR scales: "uniform" (None), "decreasing" (decay**(l-1), deep layers slower)
    or "increasing" (decay**(L-l), shallow layers slower, as in ULMFiT's discriminative
    fine-tuning, Howard & Ruder 2018, which divides the rate by 2.6 per layer downwards)."""
    if kind == "uniform":
        return None
    if not 0 < decay <= 1:
        raise ValueError(f"decay = {decay} must be in (0, 1]")
    if kind == "decreasing":
        return {layer: decay ** (layer - 1) for layer in range(1, num_layers + 1)}
    if kind == "increasing":
        return {layer: decay ** (num_layers - layer) for layer in range(1, num_layers + 1)}
    raise ValueError(f"unknown LR schedule {kind!r}; choose uniform, decreasing or increasing")
