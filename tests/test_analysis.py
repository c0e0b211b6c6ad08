"""Analyses on LayerOutputs: oracle exits, sweeps, overthinking, calibration, difficulty."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import small_trained_model

from ease import (
    TokenBatches,
    analysis,
)
from ease.evaluation import LayerOutputs, collect_layer_outputs


def hand_outputs() -> LayerOutputs:
    """Five tokens, three layers, exits after every layer. Targets are 7 for all."""
    return LayerOutputs(
        nll=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.5, 0.5],
                          [2.0, 1.0, 0.0], [3.0, 3.0, 3.0]]),
        pred=torch.tensor([[7, 7, 7],    # right everywhere
                           [1, 7, 7],    # right from layer 2
                           [7, 1, 1],    # right at layer 1 only: overthinking destroyed it
                           [1, 2, 2],    # never right; agrees with the last layer from 2
                           [1, 1, 1]]),  # never right; agrees with the last layer from 1
        max_prob=torch.tensor([[0.9, 0.9, 0.9], [0.3, 0.8, 0.9], [0.6, 0.5, 0.4],
                               [0.2, 0.2, 0.3], [0.1, 0.1, 0.1]]),
        scores=torch.tensor([[0.9, 0.9, 0.9], [0.3, 0.8, 0.9], [0.6, 0.5, 0.4],
                             [0.2, 0.2, 0.3], [0.1, 0.1, 0.1]]),
        target=torch.full((5,), 7),
        exit_layers=[1, 2, 3],
        criterion="max_prob",
    )


def random_outputs(n=3000, num_layers=4, vocab=6, seed=0) -> LayerOutputs:
    """Predictions that improve with depth and scores loosely tied to correctness."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(vocab, (n,), generator=g)
    right = torch.rand(n, num_layers, generator=g) < torch.linspace(0.3, 0.7, num_layers)
    wrong = (target[:, None] + torch.randint(1, vocab, (n, num_layers), generator=g)) % vocab
    pred = torch.where(right, target[:, None], wrong)
    scores = (0.5 * right + 0.5 * torch.rand(n, num_layers, generator=g)).clamp(max=1)
    nll = torch.where(right, 0.5, 2.5) + torch.rand(n, num_layers, generator=g)
    return LayerOutputs(nll=nll, pred=pred, max_prob=scores, scores=scores, target=target,
                        exit_layers=list(range(1, num_layers + 1)), criterion="max_prob")


# -- oracle ------------------------------------------------------------------------------------

def test_oracle_exit_layers_by_hand():
    outputs = hand_outputs()
    assert analysis.oracle_exit_layer(outputs, "final").tolist() == [1, 2, 2, 2, 1]
    # Tokens no layer gets right leave at the first exit.
    assert analysis.oracle_exit_layer(outputs, "correct").tolist() == [1, 2, 1, 1, 1]
    point = analysis.oracle_point(outputs, "final")
    assert point["agreement"] == 1.0
    assert point["compute_cost"] == pytest.approx(8 / 5 / 3)
    assert point["loss"] == pytest.approx((1.0 + 5.0 + 0.5 + 1.0 + 3.0) / 5)
    assert analysis.oracle_point(outputs, "correct")["acc"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="unknown oracle target 'best'"):
        analysis.oracle_exit_layer(outputs, "best")


@pytest.mark.parametrize("target, quality", [("final", "agreement"), ("correct", "acc")])
def test_oracle_curve_bounds_every_threshold(target, quality):
    outputs = random_outputs()
    curve = analysis.oracle_curve(outputs, target)
    assert curve["max_layer"].tolist() == [1, 2, 3, 4]
    assert curve[quality].is_monotonic_increasing
    last = curve.iloc[-1]
    assert last[quality] == pytest.approx(analysis.oracle_point(outputs, target)[quality])
    sweep = analysis.threshold_sweep(outputs)
    bound = np.interp(sweep["compute_cost"], curve["compute_cost"], curve[quality])
    assert (sweep[quality] <= bound + 1e-12).all()
    assert (sweep[quality] < bound - 0.05).any()  # thresholds are far from the oracle


# -- sweeps ---------------------------------------------------------------------------------

def test_threshold_sweep_rows_match_metrics():
    outputs = random_outputs()
    sweep = analysis.threshold_sweep(outputs)
    assert list(sweep.columns) == analysis.SWEEP_COLUMNS
    assert sweep["threshold"].iloc[0] == 0.0 and sweep["threshold"].iloc[-1] == 1.0
    assert len(sweep) > 20
    full = sweep.iloc[0]
    assert full["compute_cost"] == 1.0 and full["agreement"] == 1.0
    assert sweep["compute_cost"].iloc[1:].is_monotonic_increasing  # higher bar, later exits
    row = sweep.iloc[10]
    metrics = outputs.metrics(row["threshold"])
    assert row["acc"] == metrics["acc"] and row["ppl"] == metrics["ppl"]
    exit_layer = outputs.exit_layer(row["threshold"])
    routed = outputs.pred[torch.arange(len(exit_layer)), exit_layer - 1]
    assert row["agreement"] == pytest.approx((routed == outputs.pred[:, -1]).double().mean())


def test_pareto_front_by_hand():
    frame = pd.DataFrame({"compute_cost": [0.5, 0.5, 0.6, 0.7, 0.8, 1.0],
                          "acc": [0.40, 0.45, 0.44, 0.50, 0.50, 0.55],
                          "ppl": [9.0, 8.0, 7.0, 7.5, 6.0, 6.5]})
    assert analysis.pareto_front(frame)["acc"].tolist() == [0.45, 0.50, 0.55]
    assert analysis.pareto_front(frame, quality="ppl", maximize=False)["ppl"].tolist() == [
        8.0, 7.0, 6.0]
    with pytest.raises(ValueError, match="no column 'agreement'"):
        analysis.pareto_front(frame, quality="agreement")


# -- overthinking ------------------------------------------------------------------------------

def test_overthinking_by_hand():
    table = analysis.overthinking(hand_outputs()).set_index("layer")
    assert table.index.tolist() == [1, 2]
    # Layer 1: tokens 0 and 2 are right; 0 stays right (wasteful), 2 ends wrong (destructive).
    assert table.loc[1, "wasteful"] == pytest.approx(1 / 5)
    assert table.loc[1, "destructive"] == pytest.approx(1 / 5)
    # By layer 2 token 1 is right too, and right at the end.
    assert table.loc[2, "wasteful"] == pytest.approx(2 / 5)
    assert table.loc[2, "destructive"] == pytest.approx(1 / 5)
    assert table.loc[2, "acc"] == pytest.approx(2 / 5)


def test_overthinking_adds_up_to_the_oracle():
    outputs = random_outputs()
    table = analysis.overthinking(outputs)
    assert table["wasteful"].is_monotonic_increasing
    assert table["destructive"].is_monotonic_increasing
    final_acc = outputs.correct[:, -1].double().mean().item()
    oracle_acc = analysis.oracle_point(outputs, "correct")["acc"]
    assert final_acc + table["destructive"].iloc[-1] == pytest.approx(oracle_acc)
    assert table["wasteful"].iloc[-1] <= final_acc


# -- calibration -------------------------------------------------------------------------------

def test_reliability_diagram_and_ece_by_hand():
    confidence = torch.tensor([0.95, 0.95, 0.15, 0.15, 1.0])
    correct = torch.tensor([1, 0, 0, 0, 1])
    bins = analysis.reliability_diagram(confidence, correct, num_bins=10)
    assert bins["count"].tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 joins the top bin
    assert bins.loc[9, "confidence"] == pytest.approx((0.95 + 0.95 + 1.0) / 3)
    assert bins.loc[9, "accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(bins.loc[0, "accuracy"])
    gap_top = abs(2 / 3 - 2.9 / 3)
    assert analysis.expected_calibration_error(confidence, correct, 10) == pytest.approx(
        3 / 5 * gap_top + 2 / 5 * 0.15)
    with pytest.raises(ValueError, match="lie in"):
        analysis.reliability_diagram(torch.tensor([1.5]), torch.tensor([1]))


def test_ece_tells_calibrated_from_overconfident():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(20_000, generator=g)
    calibrated = torch.rand(20_000, generator=g) < confidence
    overconfident = torch.rand(20_000, generator=g) < confidence ** 2
    assert analysis.expected_calibration_error(confidence, calibrated) < 0.02
    assert analysis.expected_calibration_error(confidence, overconfident) > 0.1


def test_calibration_by_layer_uses_each_layer():
    outputs = random_outputs()
    table = analysis.calibration_by_layer(outputs, num_bins=5)
    assert table["layer"].tolist() == [1, 2, 3, 4]
    for layer in (1, 4):
        assert table.loc[layer - 1, "ece"] == pytest.approx(analysis.expected_calibration_error(
            outputs.max_prob[:, layer - 1], outputs.correct[:, layer - 1], 5))


class LogitTable(torch.nn.Module):
    """A stand-in model: token id i's hidden state at its only layer is row i of `logits`,
    and the exit is the identity, so the true temperature of the data is known."""

    num_layers = 1

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def check_layers(self, layers):
        assert list(layers) == [1]

    def hidden_states(self, x, upto=None):
        return [self.logits[x]]

    def exit_logits(self, hidden, layer):
        return hidden


def test_fit_temperatures_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(40_000, 8, generator=g, dtype=torch.float64)
    for true_temperature in (0.5, 2.0):
        labels = torch.multinomial(torch.softmax(logits / true_temperature, -1), 1,
                                   generator=g).squeeze(1)
        ids = torch.arange(len(labels)).view(100, 400)
        batches = [(ids[i:i + 10], labels[ids[i:i + 10]]) for i in range(0, 100, 10)]
        fitted = analysis.fit_temperatures(LogitTable(logits), batches)
        assert fitted[1] == pytest.approx(true_temperature, rel=0.05)


# -- on a trained model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    return small_trained_model()


def test_temperature_scaling_minimises_held_out_nll(trained):
    corpus, model = trained
    fit = TokenBatches(corpus.val, 32, 16)
    table = analysis.temperature_scaling(model, fit, fit, num_bins=10)
    assert table["layer"].tolist() == [1, 2]
    assert (table["nll_after"] <= table["nll_before"] + 1e-9).all()
    assert (table["temperature"] != 1.0).all()
    temperatures = dict(zip(table["layer"], table["temperature"], strict=True))
    nll = lambda scale: collect_layer_outputs(
        model, fit, [1, 2], temperatures={k: v * scale for k, v in temperatures.items()}
    ).nll.double().mean(0)
    best = nll(1.0)
    assert (best <= nll(1.05) + 1e-7).all() and (best <= nll(1 / 1.05) + 1e-7).all()
    assert best.tolist() == pytest.approx(table["nll_after"].tolist())


def test_difficulty_breakdown_on_the_synthetic_corpus(trained):
    corpus, model = trained
    val = TokenBatches(corpus.val, 32, 16)
    outputs = collect_layer_outputs(model, val, [1, 2])
    labels = val.aligned(corpus.difficulty["val"])
    table = analysis.difficulty_breakdown(outputs, labels, corpus.difficulty_names, 0.5)
    assert table.index.tolist() == corpus.difficulty_names
    assert table["tokens"].sum() == len(outputs.target)
    easy, hard = table.loc["last token"], table.loc["unpredictable"]
    assert easy["acc_L2"] > 0.9 > 0.3 > hard["acc_L2"]
    assert easy["exit_share_L1"] > hard["exit_share_L1"]
    assert easy["exit_share_L1"] + easy["exit_share_L2"] == pytest.approx(1.0)
    mask = torch.as_tensor(labels) == 0
    assert easy["acc_L1"] == pytest.approx(outputs.correct[mask, 0].double().mean().item())
    with pytest.raises(ValueError, match="3 difficulty labels for"):
        analysis.difficulty_breakdown(outputs, labels[:3], corpus.difficulty_names)


def test_cheapest_compute_is_the_lowest_cost_reaching_the_level():
    sweep = pd.DataFrame({"compute_cost": [1.0, 0.8, 0.5, 0.4],
                          "agreement": [1.0, 0.995, 0.96, 0.90]})
    assert analysis.cheapest_compute(sweep, 0.99) == 0.8
    assert analysis.cheapest_compute(sweep, 0.95) == 0.5
    assert math.isnan(analysis.cheapest_compute(sweep, 1.01))
