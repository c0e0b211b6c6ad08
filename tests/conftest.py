"""Shared fixtures: tiny models and token streams, so the whole suite runs in seconds on a CPU."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from ease import (
    DeepSupervisionTransformer,
    StandardTransformer,
    TokenBatches,
    Trainer,
    create_deep_supervision_config,
    load_corpus,
    set_seed,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50
SEQ_LEN = 12

# Progress bars only clutter pytest output; one thread keeps float sums reproducible.
os.environ["EASE_PROGRESS"] = "0"
torch.set_num_threads(1)

MODEL_CLASSES = {"standard": StandardTransformer, "deep": DeepSupervisionTransformer}


def tiny_model(kind: str = "deep", seed: int = 0, num_layers: int = 3, **options):
    """A seeded 3-layer, dim-16 model over a 50-token vocabulary."""
    set_seed(seed)
    options.setdefault("max_seq_len", 32)
    return MODEL_CLASSES[kind](vocab_size=VOCAB, dim=16, num_layers=num_layers, num_heads=2,
                               **options)


@functools.cache
def small_trained_model():
    """(corpus, model): a 2-layer dim-32 model after 60 steps of deep supervision on a small
    synthetic corpus, shared by the tests that need exits that learned something."""
    corpus = load_corpus("synthetic", train_tokens=20_000, val_tokens=4_000, test_tokens=4_000)
    set_seed(0)
    model = DeepSupervisionTransformer(vocab_size=corpus.vocab_size, dim=32, num_layers=2,
                                       num_heads=2, max_seq_len=32)
    trainer = Trainer(create_deep_supervision_config(2), corpus.vocab_size, progress=False)
    train = TokenBatches(corpus.train, 32, 16, shuffle=True, num_batches=60)
    trainer.train_epoch(model, train, trainer.create_optimizer(model, 3e-3))
    return corpus, model


def random_batches(num_batches: int = 3, batch_size: int = 4, seed: int = 0):
    """A list of (x, y) batches of random token ids, y being x shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (num_batches, batch_size, SEQ_LEN + 1), generator=generator)
    return [(window[:, :-1], window[:, 1:]) for window in ids]


@pytest.fixture(params=sorted(MODEL_CLASSES))
def model_kind(request) -> str:
    return request.param


@pytest.fixture
def shared_data_dir() -> Path:
    """$EASE_DATA_DIR, else the workspace's shared/ data beside the repo; skip when neither."""
    candidates = [os.environ.get("EASE_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("no shared data: set EASE_DATA_DIR to a folder with tinyshakespeare/, wikitext-2/")
