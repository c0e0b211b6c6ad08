"""Corpora, tokenisers, batching and seeding."""

import random

import numpy as np
import pytest
import torch

import ease.data
from ease import TokenBatches, load_corpus, set_seed
from ease.data import (
    DIFFICULTY_NAMES,
    LAST_TOKEN,
    LAST_TWO,
    LONG_RANGE,
    UNPREDICTABLE,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
)


def small_synthetic(seed: int = 0):
    return load_corpus("synthetic", train_tokens=3000, val_tokens=600, test_tokens=600, seed=seed)


# -- seeding -----------------------------------------------------------------------------

def test_set_seed_covers_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    set_seed(11)
    first = draw()
    set_seed(11)
    assert draw() == first
    set_seed(12)
    assert all(a != b for a, b in zip(draw(), first, strict=True))


# -- the synthetic corpus ----------------------------------------------------------------

def test_synthetic_corpus_is_deterministic_per_seed():
    a, b, c = small_synthetic(0), small_synthetic(0), small_synthetic(1)
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split), b.split(split))
        assert np.array_equal(a.difficulty[split], b.difficulty[split])
    assert not torch.equal(a.train, c.train)
    assert not torch.equal(a.train, a.val)  # the splits are different streams
    assert (len(a.train), len(a.val), len(a.test)) == (3000, 600, 600)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        a.split("dev")


def test_synthetic_difficulty_labels_are_aligned_and_true():
    corpus = small_synthetic()
    assert corpus.difficulty_names == DIFFICULTY_NAMES
    for split in ("train", "val", "test"):
        assert corpus.difficulty[split].shape == corpus.split(split).shape
    ids, labels = corpus.train.numpy(), corpus.difficulty["train"]
    assert set(np.unique(labels)) == {LAST_TOKEN, LAST_TWO, LONG_RANGE, UNPREDICTABLE}
    assert 0 < ids.min() and ids.max() < corpus.vocab_size  # id 0 (unknown) never occurs
    # A label is the context that determines the token: check the claim on the data.
    by_last, by_last_two = {}, {}
    for i in range(2, len(ids)):
        if labels[i] == LAST_TOKEN:
            by_last.setdefault(ids[i - 1], set()).add(ids[i])
        elif labels[i] == LAST_TWO:
            by_last_two.setdefault((ids[i - 2], ids[i - 1]), set()).add(ids[i])
    assert by_last and all(len(nexts) == 1 for nexts in by_last.values())
    assert by_last_two and all(len(nexts) == 1 for nexts in by_last_two.values())
    bar, stop = corpus.tokenizer.index["|"], corpus.tokenizer.index["."]
    copies = 0
    for p in np.flatnonzero(ids == bar):
        ends = np.flatnonzero(ids[p:] == stop)
        if not ends.size:
            continue  # the stream was cut inside this segment
        m = ends[0] - 1
        if p - m < 0:
            continue
        assert np.array_equal(ids[p + 1:p + 1 + m], ids[p - m:p])
        assert (labels[p + 1:p + 2 + m] == LONG_RANGE).all()
        assert (labels[p - m:p + 1] == UNPREDICTABLE).all()
        copies += 1
    assert copies > 10


def test_load_corpus_rejects_synthetic_options_for_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(TypeError, match="train_tokens"):
        load_corpus(tmp_path / "a.txt", train_tokens=10)


# -- batching ----------------------------------------------------------------------------

def test_in_order_batches_shift_by_one():
    ids = torch.arange(100)
    batches = TokenBatches(ids, seq_len=8, batch_size=5)
    assert batches.num_windows == 12 and len(batches) == 3
    listed = list(batches)
    assert len(listed) == len(batches)
    assert [x.shape for x, _ in listed] == [(5, 8), (5, 8), (2, 8)]
    for x, y in listed:
        assert x.dtype == y.dtype == torch.long
        assert torch.equal(y, x + 1)  # on arange, the next token is the id plus one
    assert torch.equal(listed[0][0][0], ids[:8]) and torch.equal(listed[0][0][1], ids[8:16])
    assert len(TokenBatches(ids, seq_len=8, batch_size=5, num_batches=2)) == 2
    assert len(TokenBatches(ids, seq_len=8, batch_size=5, num_batches=9)) == 3


def test_shuffle_is_reproducible_per_seed_and_epoch():
    ids = torch.randint(0, 50, (500,), generator=torch.Generator().manual_seed(0))

    def epoch_batches(seed=3, epoch=0):
        batches = TokenBatches(ids, seq_len=10, batch_size=4, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        return torch.cat([torch.cat([x, y], 1) for x, y in batches])

    assert len(TokenBatches(ids, seq_len=10, batch_size=4, shuffle=True)) == 49 // 4
    assert torch.equal(epoch_batches(), epoch_batches())
    assert torch.equal(epoch_batches(epoch=2), epoch_batches(epoch=2))
    assert not torch.equal(epoch_batches(epoch=0), epoch_batches(epoch=1))
    assert not torch.equal(epoch_batches(seed=3), epoch_batches(seed=4))
    for x, y in TokenBatches(ids, seq_len=10, batch_size=4, shuffle=True):
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_aligned_maps_values_onto_targets():
    corpus = small_synthetic()
    batches = TokenBatches(corpus.val, seq_len=16, batch_size=7)
    targets = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    assert np.array_equal(batches.aligned(corpus.val.numpy()), targets)
    difficulty = batches.aligned(corpus.difficulty["val"])
    assert difficulty.shape == targets.shape
    first_target = 1  # the first window's first target is token 1 of the stream
    assert difficulty[0] == corpus.difficulty["val"][first_target]
    with pytest.raises(ValueError, match="shuffle=False"):
        TokenBatches(corpus.val, 16, 7, shuffle=True).aligned(corpus.difficulty["val"])


def test_token_batches_check_their_arguments():
    with pytest.raises(ValueError, match="5 tokens are too few .*seq_len=8"):
        TokenBatches(torch.arange(5), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="seq_len=0"):
        TokenBatches(torch.arange(50), seq_len=0, batch_size=2)
    with pytest.raises(ValueError, match="num_batches = 0"):
        TokenBatches(torch.arange(50), seq_len=4, batch_size=2, num_batches=0)


# -- tokenisers --------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "text"), [
    (CharTokenizer, "To be, or not to be:\nthat is the question.\n"),
    (WordTokenizer, "the cat sat\non the mat\n"),
])
def test_tokenizer_round_trips(tmp_path, kind, text):
    tokenizer = kind.from_text(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == torch.long and int(ids.min()) >= 1  # every token is known
    assert tokenizer.decode(ids) == text
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert type(loaded) is kind and loaded.tokens == tokenizer.tokens
    assert torch.equal(loaded.encode(text), ids)
    unknown = loaded.encode("Z" if kind is CharTokenizer else "zebra")
    assert unknown[0] == 0 and loaded.decode(unknown[:1]) == kind.unk


def test_tokenizer_load_rejects_unknown_kind(tmp_path):
    (tmp_path / "t.json").write_text('{"kind": "bpe", "tokens": []}')
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        Tokenizer.load(tmp_path / "t.json")


# -- corpora from files ------------------------------------------------------------------

def test_load_corpus_from_a_text_file(tmp_path):
    text = "".join(f"line {i} of a small corpus\n" for i in range(40))
    (tmp_path / "tiny.txt").write_text(text)
    corpus = load_corpus(tmp_path / "tiny.txt")
    assert corpus.name == "tiny" and corpus.tokenizer.kind == "char"
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == len(text)
    assert len(corpus.train) == int(len(text) * 0.9)
    assert corpus.tokenizer.decode(corpus.train) == text[:len(corpus.train)]
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="corpus 'empty' is empty"):
        load_corpus(tmp_path / "empty.txt")


def test_load_corpus_from_a_folder(tmp_path):
    splits = tmp_path / "words"
    splits.mkdir()
    for split in ("train", "valid", "test"):
        (splits / f"{split}.txt").write_text(f"a {split} b\nc d\n")
    corpus = load_corpus(splits)
    assert corpus.name == "words" and corpus.tokenizer.kind == "word"
    assert corpus.tokenizer.decode(corpus.train) == "a train b\nc d\n"
    assert corpus.tokenizer.decode(corpus.val) == "a <unk> b\nc d\n"  # "valid" is not in train
    loose = tmp_path / "loose"
    (loose / "sub").mkdir(parents=True)
    (loose / "one.txt").write_text("abc" * 20)
    (loose / "sub" / "two.txt").write_text("xyz" * 20)
    assert load_corpus(loose).tokenizer.kind == "char"
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .txt files"):
        load_corpus(tmp_path / "none")


def test_missing_corpora_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("EASE_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(ease.data, "REPO_DATA_DIR", tmp_path / "repo")
    with pytest.raises(FileNotFoundError, match="corpus 'tinyshakespeare' not found.*input.txt"):
        load_corpus("tinyshakespeare", download=False)
    with pytest.raises(FileNotFoundError, match="train_from_valid=True"):
        load_corpus("wikitext-2", download=False)
    with pytest.raises(FileNotFoundError, match="no corpus 'no-such-corpus'"):
        load_corpus("no-such-corpus")


# -- the shared corpora (skipped when this machine has none) -----------------------------

@pytest.fixture
def only_shared_data(shared_data_dir, monkeypatch):
    """Find named corpora through $EASE_DATA_DIR alone: no repo copy, no download."""
    monkeypatch.setenv("EASE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setattr(ease.data, "REPO_DATA_DIR", shared_data_dir / "no-repo-data")
    return shared_data_dir


def test_tinyshakespeare_from_data_dir(only_shared_data):
    if not (only_shared_data / "tinyshakespeare" / "input.txt").exists():
        pytest.skip(f"no tinyshakespeare/input.txt in {only_shared_data}")
    corpus = load_corpus("tinyshakespeare", download=False)
    text = (only_shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    assert corpus.tokenizer.kind == "char" and 60 < corpus.vocab_size < 70
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == len(text)
    assert corpus.tokenizer.decode(corpus.train[:40]) == text[:40]


def test_wikitext2_trains_from_valid_when_train_is_absent(only_shared_data):
    folder = only_shared_data / "wikitext-2"
    if not ((folder / "valid.txt").exists() and (folder / "test.txt").exists()):
        pytest.skip(f"no wikitext-2/valid.txt and test.txt in {only_shared_data}")
    corpus = load_corpus("wikitext-2", train_from_valid=True, download=False)
    assert corpus.tokenizer.kind == "word"
    if (folder / "train.txt").exists():
        assert corpus.name == "wikitext-2"
    else:
        assert corpus.name == "wikitext-2 (train=valid)"
        valid = (folder / "valid.txt").read_text(encoding="utf-8")
        assert len(corpus.train) == len(WordTokenizer([]).split(valid))
    assert len(corpus.train) > len(corpus.val) > 0 and len(corpus.test) > 0
    assert "<eos>" in corpus.tokenizer.index and "<unk>" == corpus.tokenizer.tokens[0]
