"""Generation: KV cache, early exit per token (both K/V fills), self-speculative decoding.

Models run in float64 so that cached and uncached attention agree far below any argmax gap.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model

from ease import DeepSupervisionTransformer, Trainer, set_seed
from ease.config import create_deep_supervision_config
from ease.data import TokenBatches, synthetic_corpus
from ease.exits import get_criterion, route
from ease.generation import KVCache, generate, generate_self_speculative, tokens_by_depth

PROMPT = 6
NEW = 20


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(train_tokens=30_000, val_tokens=2_000, test_tokens=2_000)


@pytest.fixture(scope="module")
def trained(corpus):
    """A 3-layer model trained 150 steps with deep supervision: its early exits are often
    confident, so tokens really leave early (and not all at the same layer)."""
    set_seed(0)
    model = DeepSupervisionTransformer(vocab_size=corpus.vocab_size, dim=32, num_layers=3,
                                       num_heads=2, max_seq_len=64)
    trainer = Trainer(create_deep_supervision_config(3), corpus.vocab_size, progress=False)
    batches = TokenBatches(corpus.train, 32, 16, shuffle=True, num_batches=150)
    trainer.train_epoch(model, batches, trainer.create_optimizer(model, 1e-2))
    return model.double().eval()


@pytest.fixture(scope="module")
def chaotic():
    """Large random weights: peaked but unrelated predictions at every layer, so tokens
    exit at all depths and any wrong key/value changes later tokens."""
    model = tiny_model("deep", num_layers=4, max_seq_len=64).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                param.normal_(std=0.5)
    return model


@pytest.fixture(params=["trained", "chaotic"])
def exit_case(request, corpus):
    """(model, prompts of batch 3, threshold) where tokens leave at several depths."""
    if request.param == "trained":
        return request.getfixturevalue("trained"), prompts(corpus, 3), 0.9
    x = torch.randint(0, VOCAB, (3, PROMPT), generator=torch.Generator().manual_seed(2))
    return request.getfixturevalue("chaotic"), x, 0.5


def prompts(corpus, batch: int) -> torch.Tensor:
    return corpus.val[:batch * 16].view(batch, 16)[:, :PROMPT]


def greedy_without_cache(model, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: call model(x) on the whole prefix for every new token."""
    for _ in range(steps):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


def early_exit_without_cache(model, x, steps, threshold, criterion="max_prob"):
    """Early exit where every earlier position ran all layers: each step reruns the whole
    prefix and routes only the last position. Lazy recompute must match it exactly."""
    criterion = get_criterion(criterion)
    layers = []
    for _ in range(steps):
        states = [h[:, -1] for h in model.hidden_states(x)]
        logits = [model.exit_logits(h, layer) for layer, h in enumerate(states, start=1)]
        scores, state = [], criterion.init_state()
        for layer in model.exit_layers:
            score, state = criterion.step(logits[layer - 1], states[layer - 1], state)
            scores.append(score)
        exit_layer = route(torch.stack(scores, 1), model.exit_layers, threshold, model.num_layers)
        chosen = torch.stack(logits, 1)[torch.arange(len(x)), exit_layer - 1]
        x = torch.cat([x, chosen.argmax(-1, keepdim=True)], dim=1)
        layers.append(exit_layer)
    return x, torch.stack(layers, 1)


def propagate_without_cache(model, x, steps, threshold):
    """CALM's state propagation written out without a cache: from layer e_q + 1 on, a
    position q that exited at e_q keeps its exit's hidden state as its layer input, which
    is what the skipped layers' keys/values are projected from."""
    num_layers = model.num_layers
    depth = torch.full((len(x), x.shape[1] - 1), num_layers)  # the prompt runs every layer
    for _ in range(steps):
        cos, sin = model.rotary(torch.arange(x.shape[1]))
        h = model.embed(x)
        exit_layer = torch.full((len(x),), num_layers)
        logits = None
        for layer in range(1, num_layers + 1):
            out, _ = model.blocks[layer - 1](h, cos, sin)
            frozen = torch.cat([depth, exit_layer[:, None]], dim=1) < layer
            h = torch.where(frozen[..., None], h, out)
            layer_logits = model.exit_logits(h[:, -1], layer)
            if logits is None:
                logits = layer_logits.clone()
            running = exit_layer == num_layers
            logits[running] = layer_logits[running]
            if layer < num_layers and threshold > 0:
                leave = running & (layer_logits.softmax(-1).amax(-1) >= threshold)
                exit_layer[leave] = layer
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
        depth = torch.cat([depth, exit_layer[:, None]], dim=1)
    return x, depth[:, -steps:]


# -- exactness ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
def test_threshold_zero_equals_greedy_without_cache(model_kind, batch, kv_fill):
    model = tiny_model(model_kind).double().eval()
    x = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    result = generate(model, x, NEW, kv_fill=kv_fill)
    assert torch.equal(result.tokens, greedy_without_cache(model, x, NEW))
    assert (result.exit_layers == model.num_layers).all()
    assert (result.layers_computed == model.num_layers).all()


@pytest.mark.parametrize("batch", [1, 3])
def test_trained_model_threshold_zero_equals_greedy(trained, corpus, batch):
    x = prompts(corpus, batch)
    assert torch.equal(generate(trained, x, NEW).tokens, greedy_without_cache(trained, x, NEW))


def test_one_token_prompt_and_zero_new_tokens(trained, corpus):
    x = prompts(corpus, 2)[:, :1]
    assert torch.equal(generate(trained, x, 5).tokens, greedy_without_cache(trained, x, 5))
    empty = generate(trained, x, 0)
    assert torch.equal(empty.tokens, x) and empty.exit_layers.shape == (2, 0)


@pytest.mark.parametrize("criterion", ["max_prob", "patience"])
def test_recompute_equals_early_exit_without_cache(exit_case, criterion):
    model, x, threshold = exit_case
    threshold = threshold if criterion == "max_prob" else 1.0
    result = generate(model, x, NEW, threshold=threshold, criterion=criterion,
                      kv_fill="recompute")
    tokens, layers = early_exit_without_cache(model, x, NEW, threshold, criterion)
    assert torch.equal(result.tokens, tokens)
    assert torch.equal(result.exit_layers, layers)
    assert (layers < model.num_layers).any()  # the test saw real exits


@pytest.mark.parametrize("batch", [1, 3])
def test_propagate_equals_propagation_without_cache(exit_case, batch):
    model, x, threshold = exit_case
    result = generate(model, x[:batch], NEW, threshold=threshold, kv_fill="propagate")
    tokens, layers = propagate_without_cache(model, x[:batch], NEW, threshold)
    assert torch.equal(result.tokens, tokens)
    assert torch.equal(result.exit_layers, layers)
    assert (layers < model.num_layers).any()


# -- early exit --------------------------------------------------------------------------

def test_early_exit_skips_layers_and_records_them(trained, corpus):
    result = generate(trained, prompts(corpus, 1), NEW, threshold=0.9)
    layers, computed = result.exit_layers[0], result.layers_computed[0]
    assert (layers < trained.num_layers).any() and (layers >= 1).all()
    # propagate: the exit's layers plus one K/V projection per skipped layer
    expected = layers + trained.kv_fill_cost * (trained.num_layers - layers)
    assert torch.allclose(computed, expected.float())
    assert result.mean_layers_computed < trained.num_layers
    assert result.theoretical_speedup > 1


@pytest.mark.parametrize("kv_fill", ["propagate", "recompute"])
@pytest.mark.parametrize("criterion", ["max_prob", "patience"])
def test_batch_rows_exit_independently(exit_case, kv_fill, criterion):
    model, x, threshold = exit_case
    threshold = threshold if criterion == "max_prob" else 1.0
    options = dict(threshold=threshold, criterion=criterion, kv_fill=kv_fill)
    batched = generate(model, x, NEW, **options)
    # Rows of one step leave at different layers, so the per-row paths were exercised.
    assert (batched.exit_layers != batched.exit_layers[:1]).any()
    for row in range(len(x)):
        alone = generate(model, x[row:row + 1], NEW, **options)
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        assert torch.equal(alone.exit_layers[0], batched.exit_layers[row])
        assert torch.allclose(alone.layers_computed[0], batched.layers_computed[row])


def test_propagate_and_recompute_both_valid(trained, corpus):
    x = prompts(corpus, 3)
    propagate = generate(trained, x, NEW, threshold=0.9, kv_fill="propagate")
    recompute = generate(trained, x, NEW, threshold=0.9, kv_fill="recompute")
    for result in (propagate, recompute):
        assert result.new_tokens.min() >= 0 and result.new_tokens.max() < trained.config.vocab_size
        assert (result.layers_computed >= result.exit_layers).all()
    # The first token has nothing before it to differ: both see the same states.
    assert torch.equal(propagate.exit_layers[:, 0], recompute.exit_layers[:, 0])
    # Recompute later runs skipped positions through the layers they missed.
    assert recompute.layers_computed.sum() > recompute.exit_layers.sum()


def test_fill_kv_stores_what_the_layer_would():
    model = tiny_model("deep").double().eval()
    h = torch.randn(2, 1, 16, dtype=torch.float64)
    positions = torch.zeros(2, 1, dtype=torch.long)
    ran, filled = model.new_cache(2, 4), model.new_cache(2, 4)
    model.layer_step(2, h, positions, ran)
    model.fill_kv(2, h, positions, filled)
    assert torch.equal(ran.keys[1], filled.keys[1]) and torch.equal(ran.values[1], filled.values[1])


def test_cache_hides_rewritten_slots_and_padding():
    """A call's entries replace whatever their slots held, and a padding entry (-1) is
    computed but neither stored nor seen."""
    model = tiny_model("deep").double().eval()
    h = torch.randn(1, 3, 16, dtype=torch.float64)
    clean = model.new_cache(1, 8)
    out = model.layer_step(1, h, torch.tensor([[0, 1, 2]]), clean)
    stale = model.new_cache(1, 8)
    model.layer_step(1, torch.randn(1, 3, 16, dtype=torch.float64), torch.tensor([[0, 1, 2]]),
                     stale)
    model.fill_kv(1, h[:, 1:2], torch.tensor([[1]]), stale)  # only slot 1 holds the truth
    noise = torch.randn(1, 1, 16, dtype=torch.float64)
    mixed = model.layer_step(1, torch.cat([h[:, :1], noise, h[:, 2:]], 1),
                             torch.tensor([[0, -1, 2]]), stale)
    assert torch.allclose(mixed[:, [0, 2]], out[:, [0, 2]], atol=1e-12)
    assert torch.allclose(stale.keys[0], clean.keys[0], atol=1e-12)
    assert torch.allclose(stale.values[0], clean.values[0], atol=1e-12)


def test_tokens_by_depth(trained, corpus):
    result = generate(trained, prompts(corpus, 1), NEW, threshold=0.9)
    pieces = tokens_by_depth(result, corpus.tokenizer)
    assert "".join(text for text, _ in pieces) == corpus.tokenizer.decode(result.tokens[0])
    assert [layer for _, layer in pieces] == [None] * PROMPT + result.exit_layers[0].tolist()
    with pytest.raises(ValueError, match="row 1"):
        tokens_by_depth(result, corpus.tokenizer, row=1)


# -- self-speculative decoding -----------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("draft_layer, num_draft_tokens", [(1, 1), (1, 4), (2, 3)])
def test_self_speculative_equals_full_greedy(trained, corpus, batch, draft_layer,
                                             num_draft_tokens):
    x = prompts(corpus, batch)
    result = generate_self_speculative(trained, x, NEW, draft_layer=draft_layer,
                                       num_draft_tokens=num_draft_tokens)
    assert torch.equal(result.tokens, greedy_without_cache(trained, x, NEW))
    assert set(result.exit_layers.unique().tolist()) <= {draft_layer, trained.num_layers}
    assert 0 < result.acceptance_rate <= 1
    assert result.accepted == int((result.exit_layers == draft_layer).sum())
    assert 1 <= result.tokens_per_round <= num_draft_tokens


def test_self_speculative_rejects_with_a_random_model(chaotic):
    """A random draft disagrees often: rollback must still give the full output."""
    x = torch.randint(0, VOCAB, (3, PROMPT), generator=torch.Generator().manual_seed(2))
    result = generate_self_speculative(chaotic, x, 30, draft_layer=1, num_draft_tokens=4)
    assert torch.equal(result.tokens, greedy_without_cache(chaotic, x, 30))
    assert result.accepted < result.drafted


def test_eos_ends_rows(trained, corpus):
    x = prompts(corpus, 3)
    eos = int(corpus.tokenizer.index["."])
    new = greedy_without_cache(trained, x, NEW)[:, PROMPT:]
    is_eos = (new == eos).long()
    generated = is_eos.cumsum(1) - is_eos == 0  # up to and including the first eos
    assert not generated.all()
    for result in (generate(trained, x, NEW, eos_token_id=eos),
                   generate_self_speculative(trained, x, NEW, draft_layer=1, eos_token_id=eos)):
        assert torch.equal(result.new_tokens, torch.where(generated, new, eos))
        assert torch.equal(result.generated, generated)


# -- sampling and checks -----------------------------------------------------------------

def test_sampling_is_reproducible_from_the_seed(trained, corpus):
    x = prompts(corpus, 2)
    options = dict(temperature=1.5, top_k=10, top_p=0.95, threshold=0.9)
    first = generate(trained, x, NEW, seed=3, **options)
    assert torch.equal(first.tokens, generate(trained, x, NEW, seed=3, **options).tokens)
    assert not torch.equal(first.tokens, generate(trained, x, NEW, seed=4, **options).tokens)
    greedy = generate(trained, x, NEW).tokens
    assert torch.equal(generate(trained, x, NEW, temperature=1.0, top_k=1).tokens, greedy)


def test_kv_cache_view_writes_through():
    cache = KVCache(num_layers=1, batch_size=3, max_len=4)
    keys = torch.ones(1, 2, 1, 5)
    cache.select(torch.tensor([1])).write(1, torch.tensor([[2]]), keys, 2 * keys)
    assert cache.keys[0][1, :, 2].eq(1).all() and cache.keys[0][[0, 2]].eq(0).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=-0.1), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(max_new_tokens=60), "max_seq_len=64"),
    (dict(kv_fill="copy"), "kv_fill"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(exit_layers=[0]), "exit layer 0"),
])
def test_bad_inputs_raise(trained, corpus, kwargs, message):
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(trained, prompts(corpus, 1), kwargs.pop("max_new_tokens"), **kwargs)


def test_bad_prompts_and_draft_settings_raise(trained):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(trained, torch.zeros(65, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="LongTensor"):
        generate(trained, torch.zeros(4), 1)
    with pytest.raises(ValueError, match="draft_layer = 3"):
        generate_self_speculative(trained, torch.zeros(4, dtype=torch.long), 1, draft_layer=3)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        generate_self_speculative(trained, torch.zeros(4, dtype=torch.long), 1, draft_layer=1,
                                  num_draft_tokens=0)
