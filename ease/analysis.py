"""What the exits know: oracle exits, threshold sweeps, overthinking, calibration and the
link to token difficulty.

Most functions are arithmetic on LayerOutputs (one model pass, see evaluation.py). Only
temperature scaling needs the model again, as it must rescale whole logit vectors.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .evaluation import LayerOutputs, collect_layer_outputs

ORACLE_TARGETS = ("final", "correct")


def routing_layers(outputs: LayerOutputs) -> list[int]:
    """The layers a token can leave at: the exit layers and the last layer."""
    return sorted({layer for layer in outputs.exit_layers if layer <= outputs.num_layers}
                  | {outputs.num_layers})


# -- oracle exits ------------------------------------------------------------------------

def oracle_exit_layer(outputs: LayerOutputs, target: str = "final") -> torch.Tensor:
    """Per token, the earliest routing layer (exit layers and the last) whose prediction
    equals the last layer's (target="final") or the true next token ("correct").

    With "correct", a token no layer gets right leaves at the first exit: nothing is
    gained by going deeper, and an oracle spends the least it can.
    """
    if target not in ORACLE_TARGETS:
        raise ValueError(f"unknown oracle target {target!r}; choose from {ORACLE_TARGETS}")
    layers = routing_layers(outputs)
    columns = torch.tensor(layers) - 1
    if target == "final":
        hits = outputs.pred[:, columns] == outputs.pred[:, -1:]
    else:
        hits = outputs.correct[:, columns]
    first_hit = hits.int().argmax(dim=1)  # 0 when nothing hits: the first exit
    return torch.tensor(layers)[first_hit]


def oracle_point(outputs: LayerOutputs, target: str = "final") -> dict:
    """The metrics dict (as LayerOutputs.metrics) with every token at its oracle exit: the
    lowest compute any router reaches at the full model's agreement ("final") or at the
    best accuracy the exits allow ("correct")."""
    return outputs.routed_metrics(oracle_exit_layer(outputs, target))


def oracle_curve(outputs: LayerOutputs, target: str = "final") -> pd.DataFrame:
    """Upper bound of quality (agreement for "final", acc for "correct") against compute.

    Row `max_layer` = l: tokens whose oracle exit is <= l leave there, the others leave
    at the first exit, where by definition they miss. No router does better: k hits cost
    at least the sum of the k smallest oracle layers, which is what this ordering pays, and
    between rows the best quality is the straight line joining them.
    """
    oracle = oracle_exit_layer(outputs, target)
    first = routing_layers(outputs)[0]
    rows = []
    for layer in routing_layers(outputs):
        exit_layer = torch.where(oracle <= layer, oracle, first)
        rows.append({"max_layer": layer, **_scalars(outputs.routed_metrics(exit_layer))})
    return pd.DataFrame(rows)


def _scalars(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


# -- threshold sweeps --------------------------------------------------------------------

SWEEP_COLUMNS = ["threshold", "acc", "ppl", "loss", "agreement", "compute_cost",
                 "shallow_ratio", "mean_exit_layer"]


def default_thresholds(outputs: LayerOutputs, count: int = 41) -> np.ndarray:
    """0 (early exit off), 1, and `count` quantiles of the early exits' scores: a grid
    that is dense where the scores are."""
    early = [column for column, layer in enumerate(outputs.exit_layers)
             if layer < outputs.num_layers]
    scores = outputs.scores[:, early].double().flatten()
    scores = scores[torch.isfinite(scores)]
    quantiles = np.quantile(scores.numpy(), np.linspace(0, 1, count)) if len(scores) else []
    return np.unique(np.clip(np.r_[0.0, quantiles, 1.0], 0.0, 1.0))


def threshold_sweep(outputs: LayerOutputs, thresholds=None) -> pd.DataFrame:
    """One row per threshold of the criterion in `outputs`: threshold, acc, ppl, loss,
    agreement (routed prediction == last layer's), compute_cost, shallow_ratio and
    mean_exit_layer. Default thresholds: default_thresholds(outputs)."""
    if thresholds is None:
        thresholds = default_thresholds(outputs)
    return outputs.sweep(thresholds)[SWEEP_COLUMNS]


def cheapest_compute(sweep: pd.DataFrame, level: float, quality: str = "agreement") -> float:
    """The lowest compute_cost in a threshold sweep whose `quality` is >= level (NaN if none)."""
    reached = sweep[sweep[quality] >= level]
    return float(reached["compute_cost"].min()) if len(reached) else math.nan


def pareto_front(frame: pd.DataFrame, cost: str = "compute_cost", quality: str = "acc",
                 maximize: bool = True) -> pd.DataFrame:
    """The rows no other row beats on both `cost` (lower is better) and `quality`
    (higher is better, or lower with maximize=False), sorted by cost."""
    for column in (cost, quality):
        if column not in frame.columns:
            raise ValueError(f"no column {column!r}; columns are {list(frame.columns)}")
    sign = 1.0 if maximize else -1.0
    ordered = frame.assign(_q=sign * frame[quality]).sort_values([cost, "_q"],
                                                                 ascending=[True, False])
    best_so_far = ordered["_q"].cummax().shift(fill_value=-math.inf)
    return ordered[ordered["_q"] > best_so_far].drop(columns="_q")


# -- overthinking ------------------------------------------------------------------------

def overthinking(outputs: LayerOutputs) -> pd.DataFrame:
    """Overthinking (Kaya et al. 2019, Shallow-Deep Networks) for next-token prediction.

    One row per early routing layer l (exit layers before the last), with
      acc:         accuracy of layer l's own prediction;
      wasteful:    fraction of tokens some exit at or before l predicts correctly and the
                   last layer predicts correctly too: the layers after l were wasted on
                   them (an oracle could have stopped by l at no loss);
      destructive: fraction of tokens some exit at or before l predicts correctly but the
                   last layer gets wrong: going deeper destroyed a right answer.
    wasteful + destructive is the accuracy of an oracle limited to exits up to l, and
    acc of the last layer + destructive at the deepest early exit is the accuracy of the
    oracle over all exits (oracle_point(outputs, "correct")["acc"]).
    """
    layers = routing_layers(outputs)
    columns = torch.tensor(layers) - 1
    correct = outputs.correct
    right_by = correct[:, columns].int().cummax(dim=1).values.bool()
    final_right = correct[:, -1:]
    rows = []
    for index, layer in enumerate(layers[:-1]):
        rows.append({
            "layer": layer,
            "acc": correct[:, layer - 1].double().mean().item(),
            "wasteful": (right_by[:, index:index + 1] & final_right).double().mean().item(),
            "destructive": (right_by[:, index:index + 1] & ~final_right).double().mean().item(),
        })
    return pd.DataFrame(rows, columns=["layer", "acc", "wasteful", "destructive"])


# -- calibration -------------------------------------------------------------------------

def reliability_diagram(confidence: torch.Tensor, correct: torch.Tensor,
                        num_bins: int = 15) -> pd.DataFrame:
    """Reliability-diagram data: `num_bins` equal-width confidence bins on [0, 1] with
    their mean confidence, accuracy and token count (empty bins: count 0, NaN means)."""
    if num_bins < 1:
        raise ValueError(f"num_bins = {num_bins} must be >= 1")
    confidence = torch.as_tensor(confidence).double().flatten()
    correct = torch.as_tensor(correct).double().flatten()
    if confidence.shape != correct.shape:
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} correctness flags")
    if len(confidence) and not (0 <= confidence.min() and confidence.max() <= 1):
        raise ValueError("confidences must lie in [0, 1]")
    bins = (confidence * num_bins).long().clamp(max=num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins).double()
    per_bin = lambda values: torch.bincount(bins, values, minlength=num_bins) / count
    edges = np.linspace(0, 1, num_bins + 1)
    return pd.DataFrame({"bin_lower": edges[:-1], "bin_upper": edges[1:],
                         "confidence": per_bin(confidence).numpy(),
                         "accuracy": per_bin(correct).numpy(),
                         "count": count.long().numpy()})


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor,
                               num_bins: int = 15) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017): sum over equal-width bins of
    (bin share) * |accuracy - mean confidence|."""
    bins = reliability_diagram(confidence, correct, num_bins)
    filled = bins[bins["count"] > 0]
    gap = (filled["accuracy"] - filled["confidence"]).abs()
    return float((gap * filled["count"]).sum() / max(1, bins["count"].sum()))


def calibration_by_layer(outputs: LayerOutputs, num_bins: int = 15) -> pd.DataFrame:
    """Per layer: ECE of the max probability, mean confidence, accuracy and NLL."""
    rows = []
    for layer in range(1, outputs.num_layers + 1):
        confidence, correct = outputs.max_prob[:, layer - 1], outputs.correct[:, layer - 1]
        rows.append({"layer": layer,
                     "ece": expected_calibration_error(confidence, correct, num_bins),
                     "confidence": confidence.double().mean().item(),
                     "acc": correct.double().mean().item(),
                     "nll": outputs.nll[:, layer - 1].double().mean().item()})
    return pd.DataFrame(rows)


@torch.no_grad()
def fit_temperatures(model, batches, layers=None, device: str | torch.device = "cpu",
                     chunk_size: int = 4096) -> dict[int, float]:
    """Per-exit temperature T minimising the NLL of softmax(logits / T) on held-out
    `batches` (temperature scaling, Guo et al. 2017), for `layers` (default: all).

    The NLL is convex in beta = 1/T, so a safeguarded 1-D Newton method finds the optimum
    in a few passes over the cached hidden states; T is kept within [1e-3, 1e3].
    """
    layers = sorted(set(layers or range(1, model.num_layers + 1)))
    model.check_layers(layers)
    was_training = model.training
    model.eval()
    hidden = {layer: [] for layer in layers}
    targets = []
    try:
        for x, y in batches:
            states = model.hidden_states(x.to(device), upto=layers[-1])
            for layer in layers:
                hidden[layer].append(states[layer - 1].flatten(0, 1))
            targets.append(y.to(device).flatten())
        if not targets:
            raise ValueError("fit_temperatures got no batches")
        target = torch.cat(targets)
        return {layer: 1.0 / _optimal_beta(model, layer, torch.cat(hidden[layer]), target,
                                           chunk_size)
                for layer in layers}
    finally:
        model.train(was_training)


def _optimal_beta(model, layer, hidden, target, chunk_size, low=1e-3, high=1e3) -> float:
    beta = 1.0
    for _ in range(100):
        grad, curvature = _nll_derivatives(model, layer, hidden, target, beta, chunk_size)
        # The derivative is increasing in beta: its sign says on which side the optimum is.
        if grad > 0:
            high = beta
        else:
            low = beta
        newton = beta - grad / curvature if curvature > 0 else math.nan
        step_to = newton if low < newton < high else math.sqrt(low * high)
        if abs(step_to - beta) <= 1e-7 * beta or high / low < 1 + 1e-9:
            return step_to
        beta = step_to
    return beta


def _nll_derivatives(model, layer, hidden, target, beta, chunk_size) -> tuple[float, float]:
    """First and second derivative in beta of the mean NLL of softmax(beta * logits):
    E_p[z] - z_target and Var_p[z]."""
    grad = curvature = 0.0
    for start in range(0, len(target), chunk_size):
        z = model.exit_logits(hidden[start:start + chunk_size], layer).double()
        p = torch.softmax(beta * z, dim=-1)
        mean_z = (p * z).sum(-1)
        z_target = z.gather(-1, target[start:start + chunk_size, None]).squeeze(-1)
        grad += (mean_z - z_target).sum().item()
        curvature += ((p * z * z).sum(-1) - mean_z ** 2).clamp(min=0).sum().item()
    return grad / len(target), curvature / len(target)


def temperature_scaling(model, fit_batches, eval_batches, layers=None, num_bins: int = 15,
                        device: str | torch.device = "cpu") -> pd.DataFrame:
    """Fit per-exit temperatures on `fit_batches` and report, per layer, the temperature
    and the ECE and NLL on `eval_batches` before and after scaling.

    Use the temperatures with collect_layer_outputs(..., temperatures=...) so that exit
    scores are computed from the calibrated probabilities.
    """
    layers = sorted(set(layers or range(1, model.num_layers + 1)))
    temperatures = fit_temperatures(model, fit_batches, layers, device)
    before = collect_layer_outputs(model, eval_batches, layers, device=device)
    after = collect_layer_outputs(model, eval_batches, layers, device=device,
                                  temperatures=temperatures)
    table_before = calibration_by_layer(before, num_bins).set_index("layer")
    table_after = calibration_by_layer(after, num_bins).set_index("layer")
    return pd.DataFrame({
        "temperature": pd.Series(temperatures),
        "ece_before": table_before["ece"], "ece_after": table_after["ece"],
        "nll_before": table_before["nll"], "nll_after": table_after["nll"],
    }).loc[layers].rename_axis("layer").reset_index()


# -- difficulty ----------------------------------------------------------------------------

def difficulty_breakdown(outputs: LayerOutputs, difficulty, names=None,
                         threshold: float | None = None) -> pd.DataFrame:
    """Per difficulty class (synthetic corpus: TokenBatches.aligned(corpus.difficulty[
    "val"]) with corpus.difficulty_names): token count, each layer's accuracy and the mean
    oracle exit layer ("final"); with a threshold also the share of tokens leaving at each
    routing layer, the mean exit layer and the routed accuracy."""
    difficulty = torch.as_tensor(np.asarray(difficulty)).long().flatten()
    if len(difficulty) != len(outputs.target):
        raise ValueError(f"{len(difficulty)} difficulty labels for {len(outputs.target)} tokens")
    classes = int(difficulty.max()) + 1 if len(difficulty) else 0
    names = list(names) if names is not None else [str(c) for c in range(classes)]
    if len(difficulty) and (int(difficulty.min()) < 0 or classes > len(names)):
        raise ValueError(f"difficulty labels span {int(difficulty.min())}..{classes - 1}, "
                         f"but there are {len(names)} names {names}")
    oracle = oracle_exit_layer(outputs, "final").double()
    exit_layer = None if threshold is None else outputs.exit_layer(threshold)
    rows = torch.arange(len(outputs.target))
    rows_out = []
    for label, name in enumerate(names):
        mask = difficulty == label
        row = {"difficulty": name, "tokens": int(mask.sum())}
        for layer in range(1, outputs.num_layers + 1):
            row[f"acc_L{layer}"] = _mean(outputs.correct[mask, layer - 1])
        row["oracle_exit_layer"] = _mean(oracle[mask])
        if exit_layer is not None:
            for layer in routing_layers(outputs):
                row[f"exit_share_L{layer}"] = _mean(exit_layer[mask] == layer)
            row["mean_exit_layer"] = _mean(exit_layer[mask])
            row["routed_acc"] = _mean(outputs.correct[rows[mask], exit_layer[mask] - 1])
        rows_out.append(row)
    return pd.DataFrame(rows_out).set_index("difficulty")


def _mean(values: torch.Tensor) -> float:
    return values.double().mean().item() if len(values) else math.nan
