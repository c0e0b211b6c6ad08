"""The two models: causality, exits, configuration checks and checkpoints."""

import json

import pytest
import torch
from conftest import SEQ_LEN, VOCAB, tiny_model

from ease import DeepSupervisionTransformer, ModelConfig, StandardTransformer, TransformerLM


def tokens(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_future_tokens_never_change_earlier_logits(model_kind):
    model = tiny_model(model_kind).eval()
    x = tokens()
    for changed in (0, 5, SEQ_LEN - 1):
        edited = x.clone()
        edited[:, changed] = (edited[:, changed] + 1) % VOCAB
        pairs = zip(model.forward_all_layers(x), model.forward_all_layers(edited), strict=True)
        for layer, (before, after) in enumerate(pairs, start=1):
            assert torch.equal(before[:, :changed], after[:, :changed]), (layer, changed)
            # The edited position itself does see the change.
            assert not torch.allclose(before[:, changed], after[:, changed]), (layer, changed)


@torch.no_grad()
def test_exit_views_agree(model_kind):
    model = tiny_model(model_kind).eval()
    x = tokens()
    all_layers = model.forward_all_layers(x)
    assert len(all_layers) == 3 and all_layers[0].shape == (2, SEQ_LEN, VOCAB)
    torch.testing.assert_close(model(x), all_layers[-1])
    exits = model.forward_exits(x, [2, 1])
    assert sorted(exits) == [1, 2]
    for layer, logits in exits.items():
        torch.testing.assert_close(logits, all_layers[layer - 1])


def test_exit_layers_per_model():
    assert tiny_model("standard").exit_layers == (3,)
    assert tiny_model("deep").exit_layers == (1, 2, 3)


@pytest.mark.parametrize("bad", [0, 4, -1, 2.0])
def test_forward_exits_rejects_bad_layers(bad):
    with pytest.raises(ValueError, match=f"layer {bad!r} is out of range.*1..3"):
        tiny_model().forward_exits(tokens(), [1, bad])


def test_forward_rejects_float_tokens():
    with pytest.raises(TypeError, match="torch.float32"):
        tiny_model()(tokens().float())


def test_model_config_validation():
    with pytest.raises(ValueError, match="vocab_size .* got 0"):
        ModelConfig(vocab_size=0)
    with pytest.raises(ValueError, match="num_layers .* got 2.5"):
        ModelConfig(vocab_size=10, num_layers=2.5)
    with pytest.raises(ValueError, match="give vocab_size"):
        DeepSupervisionTransformer()
    with pytest.raises(ValueError, match="separate_exit_norms"):
        tiny_model("standard", separate_exit_norms=True)


def test_tied_head_and_separate_exit_norms():
    tied = tiny_model("deep")
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert tied.exit_norms is None and tied.exit_norm(1) is tied.norm
    untied = tiny_model("deep", tie_embeddings=False)
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * 16
    separate = tiny_model("deep", separate_exit_norms=True)
    assert len(separate.exit_norms) == 2
    assert separate.exit_norm(1) is separate.exit_norms[0]
    assert separate.exit_norm(3) is separate.norm
    assert separate.num_parameters() == tied.num_parameters() + 2 * 16


def test_same_seed_same_weights(model_kind):
    a, b = tiny_model(model_kind, seed=3), tiny_model(model_kind, seed=3)
    c = tiny_model(model_kind, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


CHECKPOINT_CASES = [
    ("standard", {}),
    ("standard", {"tie_embeddings": False}),
    ("deep", {}),
    ("deep", {"separate_exit_norms": True}),
    ("deep", {"tie_embeddings": False, "separate_exit_norms": True}),
]


@pytest.mark.parametrize(("kind", "options"), CHECKPOINT_CASES)
def test_save_and_load_give_identical_logits(tmp_path, monkeypatch, kind, options):
    model = tiny_model(kind, **options)
    with torch.no_grad():  # the norms start at 1; make sure their values are really loaded
        for param in model.parameters():
            if param.ndim == 1:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json",
                                                                      "model.safetensors"]
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == \
        type(model).__name__

    def no_pickle(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = type(model).from_pretrained(tmp_path / "saved")
    generic = TransformerLM.from_pretrained(tmp_path / "saved")
    assert type(generic) is type(model) and loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.tok_embeddings.weight) == model.config.tie_embeddings
    x = tokens()
    with torch.no_grad():
        for ours, theirs in zip(model.forward_all_layers(x), loaded.forward_all_layers(x),
                                strict=True):
            assert torch.equal(ours, theirs)


def test_from_pretrained_refuses_the_wrong_class(tmp_path):
    tiny_model("deep").save_pretrained(tmp_path / "deep")
    with pytest.raises(ValueError, match="holds a DeepSupervisionTransformer, not a "
                                         "StandardTransformer"):
        StandardTransformer.from_pretrained(tmp_path / "deep")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DeepSupervisionTransformer.from_pretrained(tmp_path / "nothing")


def test_save_pretrained_overwrites_in_place(tmp_path):
    tiny_model("deep", seed=1).save_pretrained(tmp_path / "m")
    second = tiny_model("deep", seed=2)
    second.save_pretrained(tmp_path / "m")
    loaded = DeepSupervisionTransformer.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.tok_embeddings.weight, second.tok_embeddings.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
