"""Trainer: the weighted loss, per-layer learning rates, routing, fit() and resume."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import SEQ_LEN, VOCAB, random_batches, tiny_model

from ease import DeepSupervisionTransformer, TokenBatches, Trainer, TrainingConfig, set_seed
from ease.evaluation import LayerOutputs
from ease.exits import route


def trainer_for(weights, **options) -> Trainer:
    return Trainer(TrainingConfig(layer_weights=weights, **options), vocab_size=VOCAB)


# -- the loss ----------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [{1: 1.5, 2: 0, 3: 0.5}, {1: 1.0, 2: 1.0, 3: 1.0},
                                     {2: 0.25}])
def test_loss_is_the_weighted_sum_as_given(weights):
    model = tiny_model("deep")
    x, y = random_batches(1)[0]
    loss, layer_losses = trainer_for(weights).compute_loss(model, x, y)
    by_hand = [F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
               for logits in model.forward_all_layers(x)]
    expected = sum(w * by_hand[layer - 1] for layer, w in weights.items())
    torch.testing.assert_close(loss, expected)
    assert sorted(layer_losses) == [layer for layer, w in weights.items() if w > 0]
    for layer, ce in layer_losses.items():
        torch.testing.assert_close(ce, by_hand[layer - 1])


def test_zero_weight_exits_and_deeper_blocks_are_not_run(monkeypatch):
    model = tiny_model("deep", num_layers=4)
    blocks_run, heads_run, exits_run = [], [], []
    for layer, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda *_, layer=layer: blocks_run.append(layer))
    model.lm_head.register_forward_hook(lambda *_: heads_run.append(1))
    exit_logits = model.exit_logits
    monkeypatch.setattr(model, "exit_logits",
                        lambda hidden, layer: exits_run.append(layer) or exit_logits(hidden, layer))
    x, y = random_batches(1)[0]
    trainer_for({1: 0.6, 2: 0, 3: 0.4, 4: 0}).compute_loss(model, x, y)
    assert blocks_run == [1, 2, 3]
    assert exits_run == [1, 3]
    assert len(heads_run) == 2


# -- the optimiser -----------------------------------------------------------------------

@pytest.mark.parametrize("separate_exit_norms", [False, True])
def test_one_param_group_per_layer(separate_exit_norms):
    model = tiny_model("deep", separate_exit_norms=separate_exit_norms)
    trainer = trainer_for({1: 0.7, 3: 0.3}, layer_lr_scales={1: 0.5, 2: 0.1})
    optimizer = trainer.create_optimizer(model, base_lr=2e-3, weight_decay=0.05)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert sorted(groups) == sorted(f"{name}{suffix}" for suffix in ("", "/no_decay")
                                    for name in ("shared", "layer_1", "layer_2", "layer_3"))
    expected_lr = {"shared": 2e-3, "layer_1": 1e-3, "layer_2": 2e-4, "layer_3": 2e-3}
    for name, group in groups.items():
        assert group["lr"] == pytest.approx(expected_lr[name.split("/")[0]]), name
        no_decay = name.endswith("/no_decay")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        assert all((p.ndim == 1) == no_decay for p in group["params"]), name
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) \
        == model.num_parameters()
    assert any(p is model.tok_embeddings.weight for p in groups["shared"]["params"])
    if separate_exit_norms:
        assert any(p is model.exit_norms[1].weight for p in groups["layer_2/no_decay"]["params"])


def test_create_optimizer_checks_its_inputs():
    model = tiny_model("deep")
    with pytest.raises(ValueError, match="base_lr = 0"):
        trainer_for({3: 1}).create_optimizer(model, base_lr=0)
    with pytest.raises(ValueError, match="layer_weights names layer 4.*layers 1..3"):
        trainer_for({1: 0.5, 4: 0.5}).create_optimizer(model, base_lr=1e-3)
    with pytest.raises(ValueError, match="layer_lr_scales names layer 7"):
        trainer_for({3: 1}, layer_lr_scales={7: 0.5}).create_optimizer(model, base_lr=1e-3)
    with pytest.raises(ValueError, match=r"layer_weights\[1\] = 0.5.*DeepSupervisionTransformer"):
        trainer_for({1: 0.5, 3: 0.5}).create_optimizer(tiny_model("standard"), base_lr=1e-3)


# -- input checks ------------------------------------------------------------------------

def test_trainer_checks_model_and_tokens():
    model = tiny_model("deep")
    with pytest.raises(ValueError, match="layer 0 is invalid"):
        trainer_for({0: 1.0})
    with pytest.raises(ValueError, match="names layer 4"):
        trainer_for({4: 1.0}).check_model(model)
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB}.*vocab_size=40"):
        Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=40).check_model(model)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer, got 0"):
        Trainer(TrainingConfig(layer_weights={3: 1}), vocab_size=0)
    with pytest.raises(TypeError, match="got dict"):
        Trainer({"layer_weights": {3: 1}}, vocab_size=VOCAB)
    trainer = trainer_for({3: 1})
    x, y = random_batches(1)[0]
    outside = rf"token id {VOCAB} outside the vocabulary \[0, {VOCAB}\)"
    with pytest.raises(ValueError, match=outside):
        trainer.compute_loss(model, x, torch.full_like(y, VOCAB))
    with pytest.raises(ValueError, match="batch x has token id -3"):
        trainer.compute_loss(model, torch.full_like(x, -3), y)
    with pytest.raises(TypeError, match="batch x must be a LongTensor"):
        trainer.compute_loss(model, x.int(), y)


def test_empty_data_is_refused():
    model = tiny_model("deep")
    trainer = trainer_for({3: 1})
    with pytest.raises(ValueError, match="training data is empty"):
        trainer.train_epoch(model, [], trainer.create_optimizer(model, 1e-3))
    with pytest.raises(ValueError, match="evaluation data is empty"):
        trainer.evaluate(model, [])
    with pytest.raises(ValueError, match="epochs = 0"):
        trainer.fit(model, random_batches(1), random_batches(1), epochs=0)


def test_nan_loss_names_the_step():
    model = tiny_model("deep")
    trainer = trainer_for({1: 0.5, 3: 0.5})
    optimizer = trainer.create_optimizer(model, 1e-3)
    batches = random_batches(3)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at step 1 of epoch 1"):
        trainer.train_epoch(model, batches, optimizer)


# -- routing -----------------------------------------------------------------------------

def test_route_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.1],
                           [0.2, 0.6, 0.9],
                           [0.2, 0.3, 0.99],
                           [1.0, 1.0, 1.0],
                           [0.5, 0.1, 0.1]])
    assert route(scores, [1, 2, 3], 0.5, 3).tolist() == [1, 2, 3, 1, 1]
    assert route(scores, [1, 2, 3], 0.0, 3).tolist() == [3, 3, 3, 3, 3]
    assert route(scores, [1, 2, 3], 1.0, 3).tolist() == [3, 3, 3, 1, 3]
    # Columns are the exit layers in order, whichever layers those are.
    assert route(scores[:, :2], [2, 4], 0.5, 4).tolist() == [2, 4, 4, 2, 2]
    with pytest.raises(ValueError, match="3 columns for exit layers \\[1, 3\\]"):
        route(scores, [1, 3], 0.5, 3)


def test_layer_outputs_metrics_by_hand():
    # Four tokens, three layers, exits after layers 1 and 3.
    outputs = LayerOutputs(
        nll=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.5, 0.5, 0.5], [2.0, 1.0, 0.0]]),
        pred=torch.tensor([[7, 0, 7], [0, 0, 8], [9, 9, 9], [1, 1, 6]]),
        max_prob=torch.full((4, 3), 0.5),
        scores=torch.tensor([[0.95, 0.5], [0.2, 0.5], [0.8, 0.5], [0.3, 0.5]]),
        target=torch.tensor([7, 8, 9, 6]),
        exit_layers=[1, 3],
        criterion="max_prob",
    )
    metrics = outputs.metrics(0.75)
    assert outputs.exit_layer(0.75).tolist() == [1, 3, 1, 3]
    assert metrics["loss"] == pytest.approx((1.0 + 6.0 + 0.5 + 0.0) / 4)
    assert metrics["ppl"] == pytest.approx(math.exp(7.5 / 4))
    assert metrics["acc"] == 1.0
    assert metrics["shallow_ratio"] == 0.5
    assert metrics["compute_cost"] == pytest.approx((1 + 3 + 1 + 3) / 4 / 3)
    assert metrics["exit_counts"] == {1: 2, 2: 0, 3: 2}
    assert metrics["loss_L2"] == pytest.approx(8.5 / 4) and metrics["acc_L2"] == 0.25
    assert outputs.metrics(0.0)["compute_cost"] == 1.0


def test_evaluate_threshold_zero_runs_every_layer():
    model = tiny_model("deep")
    batches = random_batches(2)
    metrics = trainer_for({1: 0.7, 3: 0.3}).evaluate(model, batches, threshold=0.0)
    assert metrics["compute_cost"] == 1.0 and metrics["shallow_ratio"] == 0.0
    assert metrics["tokens"] == 2 * 4 * SEQ_LEN
    assert metrics["exit_counts"] == {1: 0, 2: 0, 3: metrics["tokens"]}
    for layer in (1, 2, 3):
        assert {f"loss_L{layer}", f"ppl_L{layer}", f"acc_L{layer}"} <= set(metrics)
    assert metrics["loss"] == metrics["loss_L3"] and metrics["acc"] == metrics["acc_L3"]
    with torch.no_grad():
        by_hand = torch.cat([F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1),
                                             reduction="none") for x, y in batches]).mean()
    assert metrics["loss_L3"] == pytest.approx(by_hand.item(), rel=1e-5)


def test_evaluate_threshold_one_never_exits_early():
    # An untrained model's max probability is far below 1, so no token leaves early.
    metrics = trainer_for({1: 0.7, 3: 0.3}).evaluate(tiny_model("deep"), random_batches(2),
                                                     threshold=1.0)
    assert metrics["compute_cost"] == 1.0 and metrics["shallow_ratio"] == 0.0


def test_evaluate_exits_at_the_first_exit_layer_when_any_score_passes():
    model, batches = tiny_model("deep"), random_batches(2)
    tokens = 2 * 4 * SEQ_LEN
    default = trainer_for({1: 0.7, 2: 0, 3: 0.3}, routing_threshold=1e-6).evaluate(model, batches)
    assert default["exit_layers"] == [1, 3]
    assert default["exit_counts"] == {1: tokens, 2: 0, 3: 0}
    assert default["shallow_ratio"] == 1.0
    assert default["compute_cost"] == pytest.approx(1 / 3)
    assert default["loss"] == default["loss_L1"]
    explicit = trainer_for({1: 0.7, 3: 0.3}, exit_layers=[2]).evaluate(model, batches, 1e-6)
    assert explicit["exit_layers"] == [2, 3]
    assert explicit["exit_counts"] == {1: 0, 2: tokens, 3: 0}
    assert explicit["compute_cost"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="threshold = 1.5"):
        trainer_for({3: 1}).evaluate(model, batches, threshold=1.5)


def test_standard_transformer_always_runs_to_the_last_layer():
    metrics = trainer_for({3: 1}, routing_threshold=1e-6, exit_layers=[1]).evaluate(
        tiny_model("standard"), random_batches(2))
    assert metrics["exit_layers"] == [3]
    assert metrics["compute_cost"] == 1.0 and metrics["shallow_ratio"] == 0.0
    assert sum(metrics["exit_counts"].values()) == metrics["tokens"]


def test_exit_counts_sum_to_tokens_at_any_threshold():
    model = tiny_model("deep")
    trainer = trainer_for({1: 1, 2: 1, 3: 1})
    outputs = trainer.layer_outputs(model, random_batches(2))
    # Quantiles of the first exit's scores: thresholds where some tokens leave and some stay.
    quantiles = outputs.scores[:, 0].quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
    for threshold in (0.0, *quantiles, 1.0):
        metrics = outputs.metrics(threshold)
        assert sum(metrics["exit_counts"].values()) == metrics["tokens"] == 2 * 4 * SEQ_LEN
        assert 1 / 3 <= metrics["compute_cost"] <= 1.0
    assert 0 < outputs.metrics(quantiles[1])["shallow_ratio"] < 1


# -- fit: determinism and resume ---------------------------------------------------------

def fit_run(checkpoint_dir=None, on_epoch_end=None, base_lr=3e-3):
    model = tiny_model("deep", seed=7)
    corpus = torch.randint(0, VOCAB, (600,), generator=torch.Generator().manual_seed(1))
    train = TokenBatches(corpus[:500], SEQ_LEN, batch_size=4, shuffle=True, seed=5, num_batches=3)
    val = TokenBatches(corpus[500:], SEQ_LEN, batch_size=4)
    history = trainer_for({1: 0.7, 3: 0.3}, layer_lr_scales={1: 0.5}, routing_threshold=0.5).fit(
        model, train, val, epochs=3, base_lr=base_lr, warmup_steps=2,
        checkpoint_dir=checkpoint_dir, on_epoch_end=on_epoch_end)
    return model, history.drop(columns="seconds")


def assert_same_weights(a, b):
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_fit_is_deterministic_and_learns():
    first_model, first = fit_run()
    second_model, second = fit_run()
    assert_same_weights(first_model, second_model)
    pd.testing.assert_frame_equal(first, second)
    assert list(first["epoch"]) == [1, 2, 3] and list(first["step"]) == [3, 6, 9]
    assert {"train_loss_L1", "train_loss_L3", "val_ppl", "val_compute_cost",
            "val_acc_L2"} <= set(first.columns)
    assert first["train_loss"].iloc[-1] < first["train_loss"].iloc[0]


class Interrupted(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(tmp_path):
    def stop_after_first_epoch(epoch, row):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        fit_run(tmp_path, stop_after_first_epoch)
    epochs_run = []
    resumed_model, resumed = fit_run(tmp_path, lambda epoch, row: epochs_run.append(epoch))
    assert epochs_run == [2, 3]  # it did resume from the checkpoint
    straight_model, straight = fit_run()
    assert_same_weights(resumed_model, straight_model)
    pd.testing.assert_frame_equal(resumed, straight)
    epochs_run.clear()
    finished_model, finished = fit_run(tmp_path, lambda epoch, row: epochs_run.append(epoch))
    assert epochs_run == []  # a finished run only reloads its result
    assert_same_weights(finished_model, straight_model)
    pd.testing.assert_frame_equal(finished, straight)
    with pytest.raises(ValueError, match="different settings \\(base_lr\\)"):
        fit_run(tmp_path, base_lr=1e-3)


# -- the seed's usage, as in the README --------------------------------------------------

def test_readme_usage():
    set_seed(0)
    model = DeepSupervisionTransformer(vocab_size=1000, dim=64, num_layers=3)
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3},
                            layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1},
                            routing_threshold=0.95)
    trainer = Trainer(config, vocab_size=1000)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    ids = torch.randint(0, 1000, (4, 2, 17))
    batches = [(window[:, :-1], window[:, 1:]) for window in ids]
    loss = trainer.train_epoch(model, batches, optimizer)
    assert 0 < loss < 2 * math.log(1000)
    metrics = trainer.evaluate(model, batches)
    assert {"ppl", "acc", "shallow_ratio", "compute_cost"} <= set(metrics)
    assert 0 <= metrics["shallow_ratio"] <= 1 and 1 / 3 <= metrics["compute_cost"] <= 1
