"""Learn-then-Test thresholds: p-values, fixed-sequence testing and the risk guarantee."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ease import calibration
from ease.evaluation import LayerOutputs

VOCAB = 10
EXPONENTS = (2.0, 1.0, 2 / 3)  # exit j agrees with the last layer with probability s**a_j
FINAL_RIGHT = 0.7


def synthetic_outputs(n: int, seed: int) -> LayerOutputs:
    """Exits at layers 1-3 of 4 with scores s ~ U(0, 1), independent across exits; exit j
    agrees with the last layer with probability s**a_j, and the last layer is right with
    probability 0.7, independently. Tokens are i.i.d., so LTT's assumption holds exactly."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, len(EXPONENTS), generator=g)
    final = torch.randint(VOCAB, (n,), generator=g)
    agree = torch.rand(n, len(EXPONENTS), generator=g) < scores ** torch.tensor(EXPONENTS)
    other = (final[:, None] + torch.randint(1, VOCAB, (n, len(EXPONENTS)), generator=g)) % VOCAB
    pred = torch.cat([torch.where(agree, final[:, None], other), final[:, None]], dim=1)
    right = torch.rand(n, generator=g) < FINAL_RIGHT
    target = torch.where(right, final, (final + 1) % VOCAB)
    return LayerOutputs(nll=torch.zeros(n, 4), pred=pred, max_prob=torch.zeros(n, 4),
                        scores=torch.cat([scores, torch.ones(n, 1)], dim=1), target=target,
                        exit_layers=[1, 2, 3, 4], criterion="synthetic")


def true_risk(threshold: float, risk: str) -> float:
    """The population risk of synthetic_outputs at `threshold`: a token leaves at exit j
    with probability t**(j-1) (1-t) and then disagrees with probability
    1 - E[s**a | s >= t] = 1 - (1 - t**(a+1)) / ((a+1)(1-t))."""
    t = threshold
    if t <= 0:
        return 0.0
    disagree = sum(t ** j * ((1 - t) - (1 - t ** (a + 1)) / (a + 1))
                   for j, a in enumerate(EXPONENTS))
    return disagree * (FINAL_RIGHT if risk == "performance" else 1.0)


def test_true_risk_matches_a_large_sample():
    outputs = synthetic_outputs(200_000, seed=1)
    for threshold in (0.3, 0.8):
        for risk in calibration.RISKS:
            sample = calibration.empirical_risk(outputs, [threshold], risk)[0]
            assert sample == pytest.approx(true_risk(threshold, risk), abs=0.005)


# -- p-values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, p", [(0, 10, 0.1), (3, 10, 0.1), (5, 40, 0.2), (39, 40, 0.5),
                                     (40, 40, 0.5), (-1, 5, 0.5)])
def test_binomial_p_value_is_the_exact_lower_tail(k, n, p):
    exact = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(0, k + 1))
    assert calibration.binomial_p_value(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_hoeffding_bentkus_by_hand_and_more_conservative_than_binomial():
    # No losses in 100 tokens, delta 0.1: Hoeffding gives 0.9**100, Bentkus e * 0.9**100.
    assert calibration.hoeffding_bentkus_p_value(0, 100, 0.1) == pytest.approx(0.9 ** 100)
    assert calibration.hoeffding_bentkus_p_value(10, 100, 0.1) == 1.0  # risk = delta
    for losses in range(0, 60, 3):
        binomial = calibration.binomial_p_value(losses, 500, 0.1)
        hb = calibration.hoeffding_bentkus_p_value(losses, 500, 0.1)
        assert binomial <= hb * (1 + 1e-9) and hb <= 1.0


# -- token losses and fixed-sequence testing ---------------------------------------------------

def hand_outputs() -> LayerOutputs:
    """Exits after layers 1 and 2 of 3. Token 0 leaves at layer 2 and disagrees when the
    threshold is in (0.5, 0.9]; below 0.5 it leaves at layer 1 and agrees."""
    return LayerOutputs(
        nll=torch.zeros(3, 3), max_prob=torch.zeros(3, 3),
        pred=torch.tensor([[5, 4, 5], [2, 2, 2], [3, 3, 1]]),
        scores=torch.tensor([[0.5, 0.9, 1.0], [0.1, 0.2, 1.0], [0.95, 0.1, 1.0]]),
        target=torch.tensor([5, 0, 1]), exit_layers=[1, 2, 3], criterion="max_prob")


def test_token_losses_by_hand():
    outputs = hand_outputs()
    thresholds = [1.0, 0.9, 0.4, 0.05]
    consistency = calibration.token_losses(outputs, thresholds, "consistency")
    assert consistency.tolist() == [[False, True, False, False],
                                    [False, False, False, False],
                                    [False, True, True, True]]
    # Performance only counts tokens the last layer gets right: tokens 0 and 2.
    performance = calibration.token_losses(outputs, thresholds, "performance")
    assert performance.tolist() == [[False, True, False, False],
                                    [False, False, False, False],
                                    [False, True, True, True]]
    outputs.target[2] = 3  # now the exit is right and the last layer wrong: no loss
    assert not calibration.token_losses(outputs, thresholds, "performance")[2].any()
    with pytest.raises(ValueError, match="unknown risk 'accuracy'"):
        calibration.token_losses(outputs, thresholds, "accuracy")


def test_fixed_sequence_testing_stops_at_the_first_failure():
    # 10 copies of token 0 (risky only in (0.5, 0.9]) and 100 of token 1 (always safe).
    outputs = hand_outputs().subset(torch.tensor([0] * 10 + [1] * 100))
    assert calibration.empirical_risk(outputs, [0.95, 0.7, 0.3]).tolist() == pytest.approx(
        [0.0, 10 / 110, 0.0])
    result = calibration.calibrate_threshold(outputs, delta=0.05, epsilon=0.1,
                                             thresholds=[0.3, 0.7, 0.95])
    # 0.3 has zero risk too, but testing stopped at 0.7 and must not go on.
    assert result.certified and result.threshold == 0.95
    assert result.calibration_risk == 0.0
    assert result.p_value == pytest.approx(0.95 ** 110)
    assert result.calibration_compute_cost == 1.0
    loose = calibration.calibrate_threshold(outputs, delta=0.2, epsilon=0.1,
                                            thresholds=[0.3, 0.7, 0.95])
    assert loose.threshold == 0.3
    assert loose.calibration_compute_cost == pytest.approx((10 * 1 + 100 * 3) / 110 / 3)


def test_nothing_certified_turns_early_exit_off():
    outputs = synthetic_outputs(50, seed=0)
    result = calibration.calibrate_threshold(outputs, delta=0.01, epsilon=0.05)
    assert not result.certified and result.threshold == 0.0
    assert result.p_value > 0.05 and result.calibration_compute_cost == 1.0
    assert result.test_risk(outputs) == 0.0


@pytest.mark.parametrize("options, message", [
    ({"delta": 0.0}, "delta = 0.0 must be in"),
    ({"epsilon": 1.0}, "epsilon = 1.0 must be in"),
    ({"risk": "accuracy"}, "unknown risk 'accuracy'"),
    ({"p_value": "clt"}, "unknown p_value 'clt'"),
    ({"thresholds": [0.5, 0.0]}, "thresholds must be"),
])
def test_calibrate_threshold_rejects_bad_input(options, message):
    arguments = {"delta": 0.1, "epsilon": 0.1, **options}
    with pytest.raises(ValueError, match=message):
        calibration.calibrate_threshold(hand_outputs(), **arguments)


def test_split_outputs_is_a_reproducible_partition():
    outputs = synthetic_outputs(1000, seed=0)
    calibration_split, test_split = calibration.split_outputs(outputs, 0.3, seed=4)
    assert len(calibration_split.target) == 300 and len(test_split.target) == 700
    again, _ = calibration.split_outputs(outputs, 0.3, seed=4)
    assert torch.equal(again.scores, calibration_split.scores)
    rows = torch.cat([calibration_split.scores, test_split.scores])
    assert torch.equal(rows.sort(dim=0).values, outputs.scores.sort(dim=0).values)


# -- the guarantee ----------------------------------------------------------------------------

SPLITS = 200


def allowed_violations(epsilon: float, splits: int = SPLITS) -> int:
    """Finite-repeat slack: if each split violates with probability <= epsilon, the count
    exceeds this 99.9% quantile of Binomial(splits, epsilon) with probability < 0.001."""
    return next(c for c in range(splits + 1)
                if stats.binom.cdf(c, splits, epsilon) >= 0.999)


@pytest.mark.parametrize("risk, p_value", [("consistency", "binomial"),
                                           ("performance", "hoeffding_bentkus")])
def test_risk_is_controlled_over_random_splits(risk, p_value):
    delta, epsilon, n_calibration = 0.1, 0.1, 1000
    pool = synthetic_outputs(100_000, seed=2)
    n_test = len(pool.target) - n_calibration
    # The test split is large but finite: its risk may exceed the true risk by sampling
    # noise. Allow 3 of its standard deviations (exceeded with probability ~0.0013).
    test_slack = 3 * math.sqrt(delta * (1 - delta) / n_test)
    grid = calibration.default_threshold_grid()
    naive_risk = np.array([true_risk(t, risk) for t in grid])
    true_violations = test_violations = naive_violations = 0
    chosen = []
    for split in range(SPLITS):
        cal, test = calibration.split_outputs(pool, n_calibration / len(pool.target), split)
        result = calibration.calibrate_threshold(cal, delta, epsilon, risk, p_value=p_value)
        chosen.append(result.threshold)
        true_violations += true_risk(result.threshold, risk) > delta
        test_violations += result.test_risk(test) > delta + test_slack
        # The naive rule: the lowest threshold of the same sequence whose calibration
        # risk is <= delta. Without a p-value it overshoots about half the time.
        within = calibration.empirical_risk(cal, grid, risk) <= delta
        stop = int(np.argmin(within)) if not within.all() else len(grid)
        naive_violations += stop > 0 and naive_risk[stop - 1] > delta
    allowed = allowed_violations(epsilon)
    assert true_violations <= allowed and test_violations <= allowed
    assert naive_violations > allowed  # the check has the power to catch a bad rule
    assert np.median(chosen) < 0.9  # and the calibrated thresholds do exit early
