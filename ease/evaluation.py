"""Evaluate every exit of a model in one pass, then route tokens at any threshold.

`collect_layer_outputs` runs the model once and keeps, for each target token and each
layer, the exit's loss, prediction and criterion score. Everything else (a threshold's
metrics, a whole threshold sweep, the slider in notebook 03) is cheap arithmetic on that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd
import torch
import torch.nn.functional as F

from .exits import ExitCriterion, get_criterion, route


@dataclass
class LayerOutputs:
    """Per target token (rows) and per layer (columns, layer 1 first)."""

    nll: torch.Tensor  # (N, L) cross-entropy of each layer's exit
    pred: torch.Tensor  # (N, L) argmax prediction of each layer's exit
    max_prob: torch.Tensor  # (N, L) its probability
    scores: torch.Tensor  # (N, E) criterion score at each exit layer
    target: torch.Tensor  # (N,)
    exit_layers: list[int]
    criterion: str

    @property
    def num_layers(self) -> int:
        return self.nll.shape[1]

    @property
    def correct(self) -> torch.Tensor:
        return self.pred == self.target[:, None]

    def exit_layer(self, threshold: float) -> torch.Tensor:
        return route(self.scores, self.exit_layers, threshold, self.num_layers)

    def subset(self, index) -> LayerOutputs:
        """The same outputs for the tokens `index` selects (a calibration/test split)."""
        return replace(self, nll=self.nll[index], pred=self.pred[index],
                       max_prob=self.max_prob[index], scores=self.scores[index],
                       target=self.target[index])

    def metrics(self, threshold: float) -> dict:
        """The evaluation dict at `threshold`: routed loss/ppl/acc plus per-exit metrics."""
        return self.routed_metrics(self.exit_layer(threshold), threshold)

    def routed_metrics(self, exit_layer: torch.Tensor, threshold: float | None = None) -> dict:
        """The evaluation dict for tokens leaving at `exit_layer` (N,), from a threshold or
        any other rule (an oracle's). agreement: routed prediction == last layer's."""
        rows = torch.arange(len(self.target))
        column = exit_layer - 1
        routed_nll = self.nll[rows, column].double().mean().item()
        num_layers = self.num_layers
        counts = torch.bincount(exit_layer, minlength=num_layers + 1)[1:]
        result = {
            "loss": routed_nll,
            "ppl": _ppl(routed_nll),
            "acc": self.correct[rows, column].double().mean().item(),
            "agreement": (self.pred[rows, column] == self.pred[:, -1]).double().mean().item(),
            "shallow_ratio": (exit_layer < num_layers).double().mean().item(),
            "compute_cost": exit_layer.double().mean().item() / num_layers,
            "mean_exit_layer": exit_layer.double().mean().item(),
            "exit_counts": {layer: int(counts[layer - 1]) for layer in range(1, num_layers + 1)},
            "threshold": threshold,
            "criterion": self.criterion,
            "exit_layers": list(self.exit_layers),
            "tokens": len(self.target),
        }
        for layer in range(1, num_layers + 1):
            nll = self.nll[:, layer - 1].double().mean().item()
            result[f"loss_L{layer}"] = nll
            result[f"ppl_L{layer}"] = _ppl(nll)
            result[f"acc_L{layer}"] = self.correct[:, layer - 1].double().mean().item()
        return result


    def sweep(self, thresholds) -> pd.DataFrame:
        """One row of scalar metrics per threshold: the quality-vs-compute curve."""
        rows = []
        for threshold in thresholds:
            metrics = self.metrics(float(threshold))
            rows.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return pd.DataFrame(rows)


def _ppl(nll: float) -> float:
    return math.exp(min(nll, 700.0))


@torch.no_grad()
def collect_layer_outputs(model, batches, exit_layers, criterion: str | ExitCriterion = "max_prob",
                          device: str | torch.device = "cpu",
                          temperatures: dict[int, float] | None = None) -> LayerOutputs:
    """Run `model` over `batches` once and keep every layer's per-token outputs.

    temperatures: {layer: T} divides that exit's logits by T before anything is computed
    (temperature scaling, Guo et al. 2017; see analysis.fit_temperatures); others keep 1.
    """
    criterion = get_criterion(criterion)
    temperatures = temperatures or {}
    exit_layers = sorted(exit_layers)
    was_training = model.training
    model.eval()
    parts = {key: [] for key in ("nll", "pred", "max_prob", "scores", "target")}
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            layer_nll, layer_pred, layer_prob, layer_scores = [], [], [], []
            state = criterion.init_state()
            for layer, hidden in enumerate(model.hidden_states(x), start=1):
                logits = model.exit_logits(hidden, layer).float() / temperatures.get(layer, 1.0)
                layer_nll.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                                 reduction="none"))
                prob, pred = torch.softmax(logits, dim=-1).max(dim=-1)
                layer_pred.append(pred.flatten())
                layer_prob.append(prob.flatten())
                if layer in exit_layers:
                    score, state = criterion.step(logits, hidden, state)
                    layer_scores.append(score.flatten())
            parts["nll"].append(torch.stack(layer_nll, 1).cpu())
            parts["pred"].append(torch.stack(layer_pred, 1).cpu())
            parts["max_prob"].append(torch.stack(layer_prob, 1).cpu())
            parts["scores"].append(torch.stack(layer_scores, 1).cpu())
            parts["target"].append(y.flatten().cpu())
    finally:
        model.train(was_training)
    if not parts["target"]:
        raise ValueError("evaluate got no batches: the evaluation data is empty")
    return LayerOutputs(**{key: torch.cat(value) for key, value in parts.items()},
                        exit_layers=exit_layers, criterion=criterion.name)
