"""TrainingConfig validation, plain-data round trips and the weighting presets."""

import json
import math

import pytest

from ease import (
    TrainingConfig,
    create_asymmetric_config,
    create_deep_supervision_config,
    create_layerskip_config,
    create_linear_depth_config,
    create_preset_config,
    create_standard_config,
    lr_scale_schedule,
)


@pytest.mark.parametrize(("weights", "message"), [
    ({1: -0.5, 3: 1}, r"layer_weights\[1\] = -0.5"),
    ({1: float("nan"), 3: 1}, r"layer_weights\[1\] = nan"),
    ({2: float("inf")}, r"layer_weights\[2\] = inf"),
    ({1: 0, 2: 0.0}, r"all zero"),
    ({}, r"layer_weights is empty"),
    ({0: 1.0}, r"layer 0 is invalid"),
    ({"one": 1.0}, r"layer key 'one'"),
    ({1.5: 1.0}, r"layer key 1.5"),
    ({1: 1.0, "1": 0.5}, r"layer 1 is given twice"),
    ({1: "heavy"}, r"layer_weights\[1\] = 'heavy'"),
])
def test_bad_layer_weights_are_named(weights, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(layer_weights=weights)


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf")])
def test_non_positive_lr_scales_are_named(scale):
    with pytest.raises(ValueError, match=rf"layer_lr_scales\[2\] = {scale}"):
        TrainingConfig(layer_weights={3: 1}, layer_lr_scales={1: 1.0, 2: scale})


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_threshold_outside_unit_interval_is_named(threshold):
    with pytest.raises(ValueError, match=rf"routing_threshold = {threshold} is outside \[0, 1\]"):
        TrainingConfig(layer_weights={3: 1}, routing_threshold=threshold)


@pytest.mark.parametrize("threshold", [0, 1])
def test_threshold_edges_are_allowed(threshold):
    assert TrainingConfig(layer_weights={3: 1}, routing_threshold=threshold).routing_threshold \
        == float(threshold)


def test_string_keys_and_lists_are_accepted():
    config = TrainingConfig(layer_weights={"3": 0.3, "1": "0.7"}, layer_lr_scales=[1.0, 0.5])
    assert config.layer_weights == {1: 0.7, 3: 0.3}
    assert list(config.layer_weights) == [1, 3]  # sorted by layer
    assert config.layer_lr_scales == {1: 1.0, 2: 0.5}
    assert config.lr_scale(2) == 0.5 and config.lr_scale(3) == 1.0


def test_to_dict_from_dict_round_trip_through_json():
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3},
                            layer_lr_scales={1: 1.0, 2: 0.5, 3: 0.1}, routing_threshold=0.95,
                            exit_layers=[2, 1], name="ease")
    assert TrainingConfig.from_dict(config.to_dict()) == config
    from_json = TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert from_json == config and from_json.name == "ease" and from_json.exit_layers == [1, 2]
    with pytest.raises(ValueError, match="unknown TrainingConfig keys: \\['alpha'\\]"):
        TrainingConfig.from_dict({**config.to_dict(), "alpha": 0.7})


def test_validate_names_layers_past_the_model():
    config = TrainingConfig(layer_weights={1: 0.5, 4: 0.5})
    with pytest.raises(ValueError, match="layer_weights names layer 4.*layers 1..3"):
        config.validate(3)
    config.validate(4)
    with pytest.raises(ValueError, match="exit_layers names layer 5"):
        TrainingConfig(layer_weights={1: 1}, exit_layers=[5]).validate(3)
    with pytest.raises(ValueError, match=r"layer_weights\[1\] = 0.5.*exits at layers \[3\]"):
        TrainingConfig(layer_weights={1: 0.5, 3: 0.5}).validate(3, trainable_exits=(3,))


def test_exit_layers_default_and_explicit():
    config = TrainingConfig(layer_weights={1: 0.7, 2: 0, 3: 0.3})
    assert config.weighted_layers() == [1, 3]
    assert config.resolve_exit_layers(3) == [1, 3]
    assert TrainingConfig(layer_weights={1: 1}).resolve_exit_layers(4) == [1, 4]
    explicit = TrainingConfig(layer_weights={1: 0.7, 3: 0.3}, exit_layers=[2])
    assert explicit.resolve_exit_layers(3) == [2, 3]
    with pytest.raises(ValueError, match="exit_layers is empty"):
        TrainingConfig(layer_weights={1: 1}, exit_layers=[])


def test_describe_names_the_options():
    text = TrainingConfig(layer_weights={1: 0.7, 3: 0.3}, routing_threshold=0.9,
                          name="ease").describe()
    assert "'ease'" in text and "L1=0.7, L3=0.3" in text and "max_prob >= 0.9" in text


# -- presets -----------------------------------------------------------------------------

def test_standard_preset():
    assert create_standard_config(3).layer_weights == {1: 0, 2: 0, 3: 1}


def test_deep_supervision_preset():
    assert create_deep_supervision_config(3).layer_weights == pytest.approx({1: 1 / 3, 2: 1 / 3,
                                                                             3: 1 / 3})


def test_asymmetric_preset():
    assert create_asymmetric_config(3).layer_weights == pytest.approx({1: 0.7, 2: 0, 3: 0.3})
    assert create_asymmetric_config(4, alpha=0.4).layer_weights == pytest.approx(
        {1: 0.4, 2: 0, 3: 0, 4: 0.6})
    with pytest.raises(ValueError, match="alpha = 1.5"):
        create_asymmetric_config(3, alpha=1.5)
    with pytest.raises(ValueError, match="num_layers=1"):
        create_asymmetric_config(1)


@pytest.mark.parametrize("preset", [create_linear_depth_config, create_layerskip_config])
def test_depth_presets_sum_to_one_and_increase(preset):
    weights = list(preset(6).layer_weights.values())
    assert math.fsum(weights) == pytest.approx(1.0)
    assert all(a < b for a, b in zip(weights, weights[1:], strict=False))


def test_layerskip_weights_follow_triangular_numbers():
    assert create_layerskip_config(3).layer_weights == pytest.approx({1: 0.1, 2: 0.3, 3: 0.6})
    assert create_linear_depth_config(3).layer_weights == pytest.approx({1: 1 / 6, 2: 2 / 6,
                                                                         3: 3 / 6})


def test_preset_by_name_passes_options_through():
    config = create_preset_config("asymmetric", 3, alpha=0.5, routing_threshold=0.8)
    assert config.layer_weights == {1: 0.5, 2: 0, 3: 0.5}
    assert config.routing_threshold == 0.8 and config.name == "asymmetric_0.5"
    with pytest.raises(ValueError, match="unknown preset 'skip'"):
        create_preset_config("skip", 3)


def test_lr_scale_schedules():
    assert lr_scale_schedule("uniform", 3) is None
    assert lr_scale_schedule("decreasing", 3) == {1: 1.0, 2: 0.5, 3: 0.25}
    assert lr_scale_schedule("increasing", 3, decay=0.1) == pytest.approx({1: 0.01, 2: 0.1,
                                                                           3: 1.0})
    with pytest.raises(ValueError, match="decay = 0"):
        lr_scale_schedule("decreasing", 3, decay=0)
    with pytest.raises(ValueError, match="unknown LR schedule 'cyclic'"):
        lr_scale_schedule("cyclic", 3)
