"""Calibrated early-exit thresholds with a risk guarantee: Learn then Test (Angelopoulos
et al. 2021), as CALM (Schuster et al. 2022) uses it for confident adaptive decoding.

A token's loss at threshold t is 1 when routing at t hurts it:
  risk="consistency": the exit's prediction differs from the full model's;
  risk="performance": the exit's prediction is wrong where the full model's is right.
On a calibration split, thresholds are tested from the most conservative one downwards
(fixed-sequence testing) against H0: "the risk at t exceeds delta", each with a valid
p-value; testing stops at the first H0 not rejected at level epsilon, and the lowest
rejected threshold (the most early exits) is returned. Then, with probability at least
1 - epsilon over the calibration data, the risk of the returned threshold is <= delta.
The thresholds must be fixed before seeing the calibration data, and the guarantee is for
tokens exchangeable with the calibration tokens: a random token-level split of one
held-out text gives that; new text is only covered as far as it resembles the old.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .evaluation import LayerOutputs
from .exits import route

RISKS = ("consistency", "performance")
P_VALUES = ("binomial", "hoeffding_bentkus")


def token_losses(outputs: LayerOutputs, thresholds, risk: str = "consistency") -> torch.Tensor:
    """(N, K) 0/1 loss of every token at each of K thresholds (see the module docstring)."""
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; choose from {RISKS}")
    thresholds = torch.from_numpy(np.ascontiguousarray(thresholds, dtype=np.float64).reshape(-1))
    exit_layer = route(outputs.scores, outputs.exit_layers, thresholds, outputs.num_layers)
    routed = outputs.pred.gather(1, exit_layer - 1)
    final = outputs.pred[:, -1:]
    if risk == "consistency":
        return routed != final
    target = outputs.target[:, None]
    return (routed != target) & (final == target)


def empirical_risk(outputs: LayerOutputs, thresholds, risk: str = "consistency",
                   chunk_size: int = 65536) -> np.ndarray:
    """Mean loss over the tokens of `outputs` at each threshold, (K,)."""
    return _loss_counts(outputs, thresholds, risk, chunk_size) / max(1, len(outputs.target))


def _loss_counts(outputs, thresholds, risk, chunk_size) -> np.ndarray:
    total = np.zeros(len(np.atleast_1d(thresholds)), dtype=np.int64)
    for start in range(0, len(outputs.target), chunk_size):
        chunk = outputs.subset(slice(start, start + chunk_size))
        total += token_losses(chunk, thresholds, risk).sum(dim=0).numpy()
    return total


# -- p-values for H0: risk > delta -----------------------------------------------------------

def binomial_p_value(losses: int, n: int, delta: float) -> float:
    """Exact p-value for 0/1 losses: P(Binomial(n, delta) <= losses). Under H0 the loss
    count is stochastically larger than Binomial(n, delta), so this is valid."""
    return float(stats.binom.cdf(losses, n, delta))


def hoeffding_bentkus_p_value(losses: float, n: int, delta: float) -> float:
    """LTT's Hoeffding-Bentkus p-value for losses in [0, 1] (Angelopoulos et al. 2021,
    after Bates et al. 2021): the smaller of
      Hoeffding: exp(-n h(min(R, delta), delta)), h(a, b) = a log(a/b) + (1-a) log((1-a)/(1-b)),
      Bentkus:   e * P(Binomial(n, delta) <= ceil(n R)),
    with R = losses / n. Valid for any bounded loss, so looser than binomial_p_value."""
    risk = min(losses / n, delta)
    hoeffding = math.exp(-n * _bernoulli_kl(risk, delta))
    bentkus = math.e * float(stats.binom.cdf(math.ceil(losses), n, delta))
    return min(1.0, hoeffding, bentkus)


def _bernoulli_kl(a: float, b: float) -> float:
    return ((a * math.log(a / b) if a > 0 else 0.0)
            + ((1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else 0.0))


P_VALUE_FUNCTIONS = {"binomial": binomial_p_value,
                     "hoeffding_bentkus": hoeffding_bentkus_p_value}


# -- Learn then Test -------------------------------------------------------------------------

def default_threshold_grid(count: int = 100) -> np.ndarray:
    """1, 1 - 1/count, ..., 1/count: fixed in advance, most conservative first."""
    return np.round(np.linspace(1.0, 0.0, count + 1)[:-1], 12)  # 0.01, not 0.010000000000000009


@dataclass
class CalibratedThreshold:
    """The outcome of calibrate_threshold. threshold 0.0 (early exit off, as everywhere in
    EASE) when not even the most conservative threshold could be certified."""

    threshold: float
    certified: bool
    delta: float
    epsilon: float
    risk: str
    p_value_method: str
    calibration_risk: float  # empirical risk of `threshold` on the calibration split
    p_value: float  # of `threshold`; if nothing was certified, of the first one tested
    calibration_compute_cost: float  # mean exit layer / num_layers on the calibration split
    tokens: int

    def test_risk(self, outputs: LayerOutputs) -> float:
        """Empirical risk of the chosen threshold on other tokens (a test split)."""
        return float(empirical_risk(outputs, [self.threshold], self.risk)[0])


def calibrate_threshold(outputs: LayerOutputs, delta: float, epsilon: float,
                        risk: str = "consistency", thresholds=None,
                        p_value: str = "binomial") -> CalibratedThreshold:
    """The lowest threshold of a fixed-sequence test (from `thresholds`, tried from the
    largest down; default default_threshold_grid()) whose risk is certified <= delta at
    level epsilon on the calibration tokens in `outputs`.

    p_value="binomial" is exact for our 0/1 losses; "hoeffding_bentkus" is LTT's general
    p-value for bounded losses, valid here too but more conservative.
    """
    for name, value in (("delta", delta), ("epsilon", epsilon)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} = {value} must be in (0, 1)")
    if p_value not in P_VALUE_FUNCTIONS:
        raise ValueError(f"unknown p_value {p_value!r}; choose from {P_VALUES}")
    if risk not in RISKS:
        raise ValueError(f"unknown risk {risk!r}; choose from {RISKS}")
    grid = default_threshold_grid() if thresholds is None else np.asarray(thresholds, float)
    if grid.ndim != 1 or not len(grid) or not np.all((grid > 0) & (grid <= 1)):
        raise ValueError(f"thresholds must be a non-empty 1-D list in (0, 1], got {thresholds}")
    grid = np.unique(grid)[::-1]  # most conservative first
    n = len(outputs.target)
    if n == 0:
        raise ValueError("calibrate_threshold got no calibration tokens")
    counts = _loss_counts(outputs, grid, risk, chunk_size=65536)
    test = P_VALUE_FUNCTIONS[p_value]
    chosen, chosen_p, first_p = None, math.nan, math.nan
    for index, losses in enumerate(counts):
        p = test(int(losses), n, delta)
        if index == 0:
            first_p = p
        if p > epsilon:
            break
        chosen, chosen_p = index, p
    threshold = 0.0 if chosen is None else float(grid[chosen])
    exit_layer = outputs.exit_layer(threshold)
    return CalibratedThreshold(
        threshold=threshold, certified=chosen is not None, delta=delta, epsilon=epsilon,
        risk=risk, p_value_method=p_value,
        calibration_risk=0.0 if chosen is None else float(counts[chosen] / n),
        p_value=first_p if chosen is None else chosen_p,
        calibration_compute_cost=exit_layer.double().mean().item() / outputs.num_layers,
        tokens=n,
    )


def split_outputs(outputs: LayerOutputs, calibration_fraction: float = 0.5,
                  seed: int = 0) -> tuple[LayerOutputs, LayerOutputs]:
    """A random token-level (calibration, test) split of `outputs`, reproducible by seed."""
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction = {calibration_fraction} must be in (0, 1)")
    n = len(outputs.target)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(round(n * calibration_fraction))
    return outputs.subset(order[:cut]), outputs.subset(order[cut:])
