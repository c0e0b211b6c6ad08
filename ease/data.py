"""Corpora, tokenisers and batching.

Corpora by name or path:
  synthetic        the embedded default: generated in code, deterministic, with a known
                   difficulty for every token (ground truth for early-exit analysis)
  tinyshakespeare  character level (char-rnn / nanoGPT), split 90/5/5
  wikitext-2       word level, as released (Merity et al. 2016)
  a path           a text file (split 90/5/5) or a folder with train/valid/test.txt
Named corpora are looked up in data_dir, then $EASE_DATA_DIR, then the repo's data/;
if absent they are downloaded when the network allows.
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path, write_json

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"

SOURCES = {
    "tinyshakespeare": {
        "input.txt": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    },
    "wikitext-2": {
        f"{split}.txt": "https://raw.githubusercontent.com/pytorch/examples/main/"
        f"word_language_model/data/wikitext-2/{split}.txt"
        for split in ("train", "valid", "test")
    },
}


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """Fix torch's CPU thread count: float sums depend on it, and nbval compares outputs."""
    torch.set_num_threads(num_threads)


# -- tokenisers --------------------------------------------------------------------------

class Tokenizer:
    """A fixed vocabulary; id 0 is the unknown token."""

    kind = ""
    unk = ""

    def __init__(self, tokens: list[str]):
        if not tokens or tokens[0] != self.unk:
            tokens = [self.unk, *(t for t in tokens if t != self.unk)]
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def split(self, text: str) -> list[str]:
        raise NotImplementedError

    def join(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index.get(t, 0) for t in self.split(text)], dtype=torch.long)

    def decode(self, ids) -> str:
        return self.join(self.id_to_token(ids))

    def id_to_token(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    @classmethod
    def from_text(cls, text: str) -> Tokenizer:
        return cls(sorted(set(cls.split(cls, text))))

    def save(self, path: str | Path) -> None:
        write_json(path, {"kind": self.kind, "tokens": self.tokens})

    @staticmethod
    def load(path: str | Path) -> Tokenizer:
        data = json.loads(Path(path).read_text())
        kinds = {cls.kind: cls for cls in (CharTokenizer, WordTokenizer)}
        if data.get("kind") not in kinds:
            raise ValueError(f"{path}: unknown tokenizer kind {data.get('kind')!r}")
        return kinds[data["kind"]](data["tokens"])


class CharTokenizer(Tokenizer):
    kind, unk = "char", "\ufffd"

    def split(self, text):
        return list(text)

    def join(self, tokens):
        return "".join(tokens)


class WordTokenizer(Tokenizer):
    """Whitespace words; a line break becomes <eos>, as in WikiText language modelling."""

    kind, unk = "word", "<unk>"

    def split(self, text):
        return [w for line in text.splitlines() for w in (*line.split(), "<eos>") if line.strip()]

    def join(self, tokens):
        return " ".join(tokens).replace(" <eos> ", "\n").replace(" <eos>", "\n")


# -- corpora -----------------------------------------------------------------------------

@dataclass
class Corpus:
    name: str
    tokenizer: Tokenizer
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    # Per split, per token: how hard it is to predict from what comes before (synthetic only).
    difficulty: dict[str, np.ndarray] | None = None
    difficulty_names: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)

    def summary(self) -> str:
        return (f"{self.name}: vocab {self.vocab_size} ({self.tokenizer.kind}-level), tokens "
                f"train {len(self.train):,} / val {len(self.val):,} / test {len(self.test):,}")


def load_corpus(name_or_path: str | os.PathLike = "synthetic", data_dir: str | Path | None = None,
                tokenizer: str | None = None, *, train_from_valid: bool = False,
                download: bool = True, **synthetic_options) -> Corpus:
    """Load a corpus by name ("synthetic", "tinyshakespeare", "wikitext-2") or by path.

    train_from_valid (wikitext-2 only): when the train split is not available, train on
    valid.txt and split test.txt in halves for validation and test. Results then are not
    comparable with published WikiText-2 numbers; the corpus name says so.
    """
    name = str(name_or_path)
    if name == "synthetic":
        return synthetic_corpus(**synthetic_options)
    if synthetic_options:
        raise TypeError(f"options {sorted(synthetic_options)} only apply to the synthetic corpus")
    if name == "tinyshakespeare":
        folder = _find_or_download(name, data_dir, ["input.txt"], download)
        return _split_text_file(folder / "input.txt", "tinyshakespeare", tokenizer or "char")
    if name == "wikitext-2":
        return _load_wikitext2(data_dir, tokenizer or "word", train_from_valid, download)
    path = Path(name).expanduser()
    if path.is_file():
        return _split_text_file(path, path.stem, tokenizer or "char")
    if path.is_dir():
        if all((path / f"{s}.txt").exists() for s in ("train", "valid", "test")):
            return _from_splits(path, path.name, tokenizer or "word")
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .txt files")
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
        return _split_text(text, path.name, tokenizer or "char")
    raise FileNotFoundError(
        f"no corpus {name!r}: not a known name (synthetic, tinyshakespeare, wikitext-2) "
        "and no such file or folder"
    )


def data_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where named corpora are looked for, in order."""
    dirs = [Path(data_dir)] if data_dir else []
    if os.environ.get("EASE_DATA_DIR"):
        dirs.append(Path(os.environ["EASE_DATA_DIR"]))
    dirs.append(REPO_DATA_DIR)
    return dirs


def _find_or_download(name: str, data_dir, files: list[str], download: bool) -> Path:
    dirs = data_dirs(data_dir)
    for base in dirs:
        if all((base / name / f).exists() for f in files):
            return base / name
    target = dirs[0] / name
    where = ", ".join(str(d / name) for d in dirs)
    if not download:
        raise FileNotFoundError(f"corpus {name!r} not found; put {files} in one of: {where}")
    try:
        for f in files:
            with urllib.request.urlopen(SOURCES[name][f], timeout=20) as response:
                payload = response.read()
            with atomic_path(target / f) as tmp:
                tmp.write_bytes(payload)
    except (urllib.error.URLError, OSError) as error:
        raise FileNotFoundError(
            f"corpus {name!r} is not on this machine and could not be downloaded ({error}). "
            f"Put {files} in one of: {where} (or set EASE_DATA_DIR)."
        ) from None
    return target


def _load_wikitext2(data_dir, tokenizer, train_from_valid, download) -> Corpus:
    try:
        folder = _find_or_download("wikitext-2", data_dir, ["train.txt", "valid.txt", "test.txt"],
                                   download)
        return _from_splits(folder, "wikitext-2", tokenizer)
    except FileNotFoundError as missing:
        if not train_from_valid:
            raise FileNotFoundError(
                f"{missing}\nWith only valid.txt and test.txt, pass train_from_valid=True."
            ) from None
    folder = _find_or_download("wikitext-2", data_dir, ["valid.txt", "test.txt"], download=False)
    valid = (folder / "valid.txt").read_text(encoding="utf-8")
    test_lines = (folder / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(test_lines) // 2
    return _build("wikitext-2 (train=valid)", tokenizer, valid,
                  "".join(test_lines[:half]), "".join(test_lines[half:]))


def _from_splits(folder: Path, name: str, tokenizer: str) -> Corpus:
    read = lambda split: (folder / f"{split}.txt").read_text(encoding="utf-8")  # noqa: E731
    return _build(name, tokenizer, read("train"), read("valid"), read("test"))


def _split_text_file(path: Path, name: str, tokenizer: str) -> Corpus:
    return _split_text(path.read_text(encoding="utf-8"), name, tokenizer)


def _split_text(text: str, name: str, tokenizer: str) -> Corpus:
    return _build(name, tokenizer, *_text_splits(text, name))


def _text_splits(text: str, name: str) -> tuple[str, str, str]:
    """train / val / test as the first 90%, the next 5% and the last 5% of the text."""
    if not text.strip():
        raise ValueError(f"corpus {name!r} is empty")
    a, b = int(len(text) * 0.9), int(len(text) * 0.95)
    return text[:a], text[a:b], text[b:]


def load_text(name_or_path: str | os.PathLike, split: str = "test",
              data_dir: str | Path | None = None, download: bool = True) -> str:
    """The raw text of one split of a real corpus, split as load_corpus splits it: for
    models that bring their own tokeniser (Hugging Face LLMs)."""
    splits = ("train", "val", "test")
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; choose from {splits}")
    name = str(name_or_path)
    if name == "wikitext-2":
        filename = {"val": "valid"}.get(split, split) + ".txt"
        folder = _find_or_download(name, data_dir, [filename], download)
        return (folder / filename).read_text(encoding="utf-8")
    if name == "tinyshakespeare":
        path = _find_or_download(name, data_dir, ["input.txt"], download) / "input.txt"
    elif name == "synthetic":
        raise ValueError("the synthetic corpus has no raw text; use load_corpus('synthetic')")
    else:
        path = Path(name).expanduser()
        if path.is_dir() and (path / "train.txt").exists():
            return (path / ({"val": "valid"}.get(split, split) + ".txt")).read_text("utf-8")
        if not path.is_file():
            raise FileNotFoundError(f"no corpus {name!r}: not a known name and no such file")
    return _text_splits(path.read_text(encoding="utf-8"), name)[splits.index(split)]


def _build(name, tokenizer_kind, train, val, test) -> Corpus:
    kinds = {"char": CharTokenizer, "word": WordTokenizer}
    if tokenizer_kind not in kinds:
        raise ValueError(f"unknown tokenizer {tokenizer_kind!r}; choose char or word")
    tok = kinds[tokenizer_kind].from_text(train)
    return Corpus(name, tok, tok.encode(train), tok.encode(val), tok.encode(test))


# -- the synthetic corpus ----------------------------------------------------------------

DIFFICULTY_NAMES = ["last token", "last two tokens", "long range", "unpredictable"]
LAST_TOKEN, LAST_TWO, LONG_RANGE, UNPREDICTABLE = range(4)


def _syllables(consonants: str, vowels: str, suffix: str = "") -> list[str]:
    return [c + v + suffix for c in consonants for v in vowels]


class SyntheticLanguage:
    """A language of three kinds of segment, each ended by ".":

    chain:  a word from a fixed chain, then its successors to the chain's end; each next
            word follows from the last word alone.
    pair:   two free words, then words given by a table of the last two words.
    copy:   m free words, "|", and the same m words again: only context m+1 tokens back
            predicts them.
    The first word of a segment is free (unpredictable). Every token gets the label of
    what its prediction needs (DIFFICULTY_NAMES).
    """

    def __init__(self, seed: int = 0, num_chains: int = 4, chain_length: int = 5,
                 num_pair_words: int = 8, num_copy_words: int = 16, max_copy: int = 10):
        rng = np.random.default_rng(seed)
        self.chain_words = _syllables("bdgkmnprst", "aeiou")[: num_chains * chain_length]
        self.pair_words = _syllables("lvz", "aeiou", "n")[:num_pair_words]
        self.copy_words = _syllables("fhjwy", "aeiou", "x")[:num_copy_words]
        self.vocab = [".", "|", *self.chain_words, *self.pair_words, *self.copy_words]
        self.id = {w: i + 1 for i, w in enumerate(self.vocab)}  # id 0 is <unk>
        order = rng.permutation(len(self.chain_words))
        self.chains = [order[i:i + chain_length] for i in range(0, len(order), chain_length)]
        self.max_copy = max_copy
        self.pair_table = self._terminating_pair_table(rng, num_pair_words)

    @staticmethod
    def _terminating_pair_table(rng, n: int, end_prob: float = 0.2, max_len: int = 12):
        """table[a, b] = next pair word, or -1 for "."; loops are cut so segments end."""
        table = np.where(rng.random((n, n)) < end_prob, -1, rng.integers(0, n, (n, n)))
        for a in range(n):
            for b in range(n):
                seen, (x, y) = set(), (a, b)
                while table[x, y] >= 0:
                    if (x, y) in seen or len(seen) >= max_len:
                        table[x, y] = -1
                        break
                    seen.add((x, y))
                    x, y = y, table[x, y]
        return table

    def generate(self, num_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and their difficulty labels."""
        rng = np.random.default_rng(seed)
        ids, labels = [], []

        def emit(word, label):
            ids.append(self.id[word])
            labels.append(label)

        pair_varies = [len(set(self.pair_table[:, b])) > 1 for b in range(len(self.pair_words))]
        while len(ids) < num_tokens:
            kind = rng.choice(3, p=[0.4, 0.3, 0.3])
            if kind == 0:
                chain = self.chains[rng.integers(len(self.chains))]
                emit(self.chain_words[chain[0]], UNPREDICTABLE)
                for word in chain[1:]:
                    emit(self.chain_words[word], LAST_TOKEN)
                emit(".", LAST_TOKEN)
            elif kind == 1:
                a, b = rng.integers(len(self.pair_words), size=2)
                emit(self.pair_words[a], UNPREDICTABLE)
                emit(self.pair_words[b], UNPREDICTABLE)
                while True:
                    nxt = self.pair_table[a, b]
                    label = LAST_TWO if pair_varies[b] else LAST_TOKEN
                    if nxt < 0:
                        emit(".", label)
                        break
                    emit(self.pair_words[nxt], label)
                    a, b = b, nxt
            else:
                words = rng.integers(len(self.copy_words), size=rng.integers(2, self.max_copy + 1))
                for w in words:
                    emit(self.copy_words[w], UNPREDICTABLE)
                emit("|", UNPREDICTABLE)
                for w in words:
                    emit(self.copy_words[w], LONG_RANGE)
                emit(".", LONG_RANGE)
        return np.array(ids[:num_tokens]), np.array(labels[:num_tokens], dtype=np.int8)


def synthetic_corpus(train_tokens: int = 200_000, val_tokens: int = 20_000,
                     test_tokens: int = 20_000, seed: int = 0) -> Corpus:
    """The embedded default corpus: no download, the same tokens for the same seed."""
    language = SyntheticLanguage(seed)
    splits, difficulty = {}, {}
    for offset, (split, size) in enumerate(
            (("train", train_tokens), ("val", val_tokens), ("test", test_tokens)), start=1):
        ids, labels = language.generate(size, seed=seed * 1000 + offset)
        splits[split] = torch.from_numpy(ids).long()
        difficulty[split] = labels
    tokenizer = WordTokenizer(language.vocab)
    return Corpus("synthetic", tokenizer, **splits, difficulty=difficulty,
                  difficulty_names=list(DIFFICULTY_NAMES))


# -- batching ----------------------------------------------------------------------------

class TokenBatches:
    """(x, y) LongTensor batches of seq_len windows from one token stream.

    shuffle=False: consecutive non-overlapping windows in order (for evaluation; `aligned`
    maps per-token arrays such as difficulty onto the targets in the same order).
    shuffle=True: random windows, reproducible from (seed, epoch); set_epoch() reshuffles.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, batch_size: int, shuffle: bool = False,
                 seed: int = 0, num_batches: int | None = None):
        ids = torch.as_tensor(ids, dtype=torch.long)
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if len(ids) < seq_len + 1:
            raise ValueError(f"{len(ids)} tokens are too few for one window of seq_len={seq_len}")
        self.ids, self.seq_len, self.batch_size = ids, seq_len, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.num_windows = (len(ids) - 1) // seq_len
        # One epoch covers the stream once; in order, the last batch may be short.
        if shuffle:
            full = max(1, self.num_windows // batch_size)
        else:
            full = -(-self.num_windows // batch_size)
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches = {num_batches} must be >= 1")
        if num_batches is None:
            num_batches = full
        self.num_batches = num_batches if shuffle else min(num_batches, full)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _starts(self) -> torch.Tensor:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            high = len(self.ids) - self.seq_len
            count = self.num_batches * self.batch_size
            return torch.randint(0, high, (count,), generator=generator)
        count = min(self.num_windows, self.num_batches * self.batch_size)
        return torch.arange(count) * self.seq_len

    def __iter__(self):
        starts = self._starts()
        offsets = torch.arange(self.seq_len + 1)
        for i in range(0, len(starts), self.batch_size):
            windows = self.ids[starts[i:i + self.batch_size, None] + offsets]
            yield windows[:, :-1], windows[:, 1:]

    def aligned(self, values) -> np.ndarray:
        """Per-token `values` (aligned with ids) for the targets, in iteration order."""
        if self.shuffle:
            raise ValueError("aligned() needs shuffle=False: shuffled batches change every epoch")
        values = np.asarray(values)
        starts = self._starts().numpy()
        index = (starts[:, None] + 1 + np.arange(self.seq_len)).reshape(-1)
        return values[index]
