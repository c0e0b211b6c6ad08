"""Exit criteria: each score by hand, shapes, routing, building from config, and the
learned exit classifier."""

import math

import pytest
import torch
from conftest import VOCAB, random_batches, small_trained_model, tiny_model

from ease import (
    TokenBatches,
    Trainer,
    TrainingConfig,
)
from ease.evaluation import collect_layer_outputs
from ease.exits import (
    CRITERIA,
    LearnedExitClassifier,
    get_criterion,
    route,
    train_exit_classifier,
)

STATELESS = ["max_prob", "margin", "entropy"]


def probs_to_logits(*rows):
    return torch.tensor(rows, dtype=torch.float).log()


def run_exits(criterion, logits_per_exit, hidden_per_exit=None):
    """Scores of consecutive exits, as evaluation and generation call them."""
    state, scores = criterion.init_state(), []
    for index, logits in enumerate(logits_per_exit):
        hidden = (torch.zeros(*logits.shape[:-1], 4) if hidden_per_exit is None
                  else hidden_per_exit[index])
        score, state = criterion.step(logits, hidden, state)
        scores.append(score)
    return scores


# -- scores by hand ------------------------------------------------------------------------

def test_confidence_scores_by_hand():
    logits = probs_to_logits([0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25])
    assert get_criterion("max_prob").step(logits, None, None)[0].tolist() == pytest.approx(
        [0.5, 1 / 3, 0.5])
    assert get_criterion("margin").step(logits, None, None)[0].tolist() == pytest.approx(
        [0.2, 0.0, 0.25], abs=1e-6)
    entropy_05_03_02 = -sum(p * math.log(p) for p in (0.5, 0.3, 0.2))
    assert get_criterion("entropy").step(logits, None, None)[0].tolist() == pytest.approx(
        [1 - entropy_05_03_02 / math.log(3), 0.0, 1 - 1.5 * math.log(2) / math.log(3)], abs=1e-6)


def test_patience_counts_consecutive_agreeing_exits():
    # Argmax per exit for three tokens: a a a a / a b b b / a b a b.
    a, b = [0.9, 0.1], [0.1, 0.9]
    exits = [probs_to_logits(a, a, a), probs_to_logits(a, b, b),
             probs_to_logits(a, b, a), probs_to_logits(a, b, b)]
    streaks = [[1, 1, 1], [2, 1, 1], [3, 2, 1], [4, 3, 1]]
    for patience in (1, 2, 3):
        scores = run_exits(get_criterion("patience", patience=patience), exits)
        expected = [[min(s, patience) / patience for s in row] for row in streaks]
        assert torch.stack(scores).tolist() == [pytest.approx(row) for row in expected]


def test_saturation_is_the_clipped_cosine_with_the_previous_exit():
    hidden = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
              torch.tensor([[1.0, 1.0], [-1.0, 0.0]]),
              torch.tensor([[2.0, 2.0], [-1.0, 0.1]])]
    logits = [torch.zeros(2, 3)] * 3
    scores = run_exits(get_criterion("saturation"), logits, hidden)
    assert scores[0].tolist() == [0.0, 0.0]  # nothing to compare with yet
    assert scores[1].tolist() == pytest.approx([1 / math.sqrt(2), 0.0])  # cos -1 clipped
    assert scores[2].tolist() == pytest.approx([1.0, 1 / math.sqrt(1.01)])


@pytest.mark.parametrize("name", sorted(set(CRITERIA) - {"learned"}))
@pytest.mark.parametrize("shape", [(3, 5), (3,)])
def test_scores_keep_the_token_shape_and_lie_in_0_1(name, shape):
    generator = torch.Generator().manual_seed(0)
    criterion = get_criterion(name)
    state = criterion.init_state()
    for _ in range(3):
        logits = 4 * torch.randn(*shape, VOCAB, generator=generator)
        score, state = criterion.step(logits, torch.randn(*shape, 8, generator=generator), state)
        assert score.shape == shape
        assert bool(((score >= 0) & (score <= 1)).all())


# -- building criteria -----------------------------------------------------------------------

def test_get_criterion_rejects_bad_names_and_params():
    with pytest.raises(ValueError, match="unknown exit criterion 'nope'"):
        get_criterion("nope")
    with pytest.raises(ValueError, match="'max_prob' does not take params"):
        get_criterion("max_prob", patience=2)
    with pytest.raises(ValueError, match="patience must be an integer >= 1, got 0"):
        get_criterion("patience", patience=0)
    with pytest.raises(ValueError, match="'learned' does not take params"):
        get_criterion("learned")


def test_config_carries_criterion_params_to_evaluation():
    config = TrainingConfig({1: 0.5, 3: 0.5}, exit_criterion="patience",
                            exit_criterion_params={"patience": 3})
    assert TrainingConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="'patience' does not take params.*'k'"):
        TrainingConfig({1: 1.0}, exit_criterion="patience", exit_criterion_params={"k": 3})
    with pytest.raises(ValueError, match="unknown exit criterion 'nope'"):
        TrainingConfig({1: 1.0}, exit_criterion="nope")
    outputs = Trainer(config, VOCAB).layer_outputs(tiny_model("deep"), random_batches(1))
    assert outputs.criterion == "patience"
    assert outputs.scores[:, 0].unique().tolist() == [pytest.approx(1 / 3)]  # streak 1


# -- routing ---------------------------------------------------------------------------------

def test_route_many_thresholds_at_once_equals_one_at_a_time():
    scores = torch.rand(50, 4, generator=torch.Generator().manual_seed(0))
    scores[3, 1] = math.nan  # a NaN never passes, later exits still may
    thresholds = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    together = route(scores, [1, 2, 4, 5], thresholds, 5)
    assert together.shape == (50, 5)
    for column, threshold in enumerate(thresholds.tolist()):
        one = route(scores, [1, 2, 4, 5], threshold, 5)
        assert torch.equal(together[:, column], one)
    nan_row = scores[3].clone()
    expected = next((layer for layer, s in zip([1, 2, 4], nan_row[:3].tolist(), strict=True)
                     if s >= 0.5), 5)
    assert route(scores, [1, 2, 4, 5], 0.5, 5)[3] == expected


# -- the learned classifier --------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    corpus, model = small_trained_model()
    return model, TokenBatches(corpus.val, 32, 16), TokenBatches(corpus.test, 32, 16)


def test_learned_classifier_separates_agreeing_exits(trained, tmp_path):
    model, fit, held_out = trained
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    classifier = train_exit_classifier(model, fit, seed=1)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # frozen
    outputs = collect_layer_outputs(model, held_out, [1, 2], classifier)
    agree = outputs.pred[:, 0] == outputs.pred[:, 1]
    score = outputs.scores[:, 0]
    assert 0 < int((~agree).sum()) and score[agree].mean() > score[~agree].mean() + 0.1
    assert bool((outputs.scores[:, 1] == 1).all())  # the last layer agrees with itself
    again = train_exit_classifier(model, fit, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(classifier.net.state_dict().values(),
                                                 again.net.state_dict().values(), strict=True))
    loaded = get_criterion("learned", path=classifier.save(tmp_path / "exit_classifier"))
    assert isinstance(loaded, LearnedExitClassifier)
    reloaded = collect_layer_outputs(model, held_out, [1, 2], loaded)
    assert torch.equal(reloaded.scores, outputs.scores)


def test_learned_classifier_refuses_extra_exits():
    classifier = LearnedExitClassifier(dim=4, exit_layers=[1], num_layers=2)
    logits, hidden = torch.zeros(3, VOCAB), torch.ones(3, 4)
    scores = run_exits(classifier, [logits, logits], [hidden, hidden])
    assert scores[0].shape == (3,) and scores[1].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="step called 3 times"):
        classifier.step(logits, hidden, 2)
    with pytest.raises(ValueError, match="must be early layers"):
        LearnedExitClassifier(dim=4, exit_layers=[2], num_layers=2)
