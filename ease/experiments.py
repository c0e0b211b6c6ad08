"""Experiments: one trained configuration, cached by everything that determines it.

An Experiment names a corpus, a model size, a weighting scheme, LR scales and a seed.
run_experiment() trains it once and stores weights + history under the cache folder,
keyed by a hash of the experiment, the torch version and the source of the code that
trains it; any notebook that asks for the same experiment later gets the cached model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from .config import TrainingConfig, create_preset_config, lr_scale_schedule
from .data import Corpus, TokenBatches, load_corpus, set_seed
from .io import atomic_path
from .models import TransformerLM, build_model
from .trainer import Trainer

REPO_DIR = Path(__file__).resolve().parents[1]

# The source files whose change must invalidate cached models.
_TRAINING_SOURCES = ["models.py", "trainer.py", "data.py", "config.py", "evaluation.py",
                     "exits.py", "experiments.py", "modules/norm.py", "modules/attention.py",
                     "modules/ffn.py", "modules/transformer.py"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("EASE_CACHE_DIR", REPO_DIR / ".cache" / "models"))


@dataclass(frozen=True)
class Experiment:
    name: str
    layer_weights: dict
    layer_lr_scales: dict | None = None
    model_type: str = "DeepSupervisionTransformer"
    corpus: str = "synthetic"
    dim: int = 48
    num_layers: int = 3
    num_heads: int = 4
    seq_len: int = 64
    batch_size: int = 32
    epochs: int = 6
    steps_per_epoch: int = 25
    base_lr: float = 3e-3
    warmup_steps: int = 10
    seed: int = 0
    extra: dict = field(default_factory=dict)  # free-form tags kept in results, not in the key

    def training_config(self, **overrides) -> TrainingConfig:
        return TrainingConfig(layer_weights=self.layer_weights,
                              layer_lr_scales=self.layer_lr_scales, name=self.name, **overrides)

    def key(self) -> str:
        """Hash of what determines the trained weights (not the display name or tags)."""
        spec = {k: v for k, v in asdict(self).items() if k not in ("name", "extra")}
        config = self.training_config()
        spec["layer_weights"] = {str(k): float(v) for k, v in config.layer_weights.items()}
        scales = config.layer_lr_scales
        spec["layer_lr_scales"] = None if scales is None else {str(k): v for k, v in scales.items()}
        blob = json.dumps({"spec": spec, "torch": torch.__version__, "code": _code_hash()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@functools.cache
def _code_hash() -> str:
    digest = hashlib.sha256()
    for name in _TRAINING_SOURCES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def experiment_from_preset(preset: str, num_layers: int = 3, *, alpha: float | None = None,
                           lr_schedule: str = "uniform", lr_decay: float = 0.5,
                           name: str | None = None, **kwargs) -> Experiment:
    """An Experiment for a weighting preset (ease.config.PRESETS) and an LR schedule.

    `preset` may carry the asymmetric scheme's alpha as "asymmetric:0.7", the form the
    notebooks' parameter lists use."""
    preset, _, alpha_text = preset.partition(":")
    if alpha_text:
        if alpha is not None:
            raise ValueError(f"alpha given twice: {preset}:{alpha_text} and alpha={alpha}")
        try:
            alpha = float(alpha_text)
        except ValueError:
            raise ValueError(
                f"{preset}:{alpha_text}: alpha {alpha_text!r} is not a number") from None
    options = {} if alpha is None else {"alpha": alpha}
    config = create_preset_config(preset, num_layers, **options)
    model_type = "StandardTransformer" if preset == "standard" else "DeepSupervisionTransformer"
    label = name or (config.name if lr_schedule == "uniform" else f"{config.name} / {lr_schedule}")
    return Experiment(name=label, layer_weights=config.layer_weights,
                      layer_lr_scales=lr_scale_schedule(lr_schedule, num_layers, lr_decay),
                      model_type=model_type, num_layers=num_layers,
                      extra={"preset": config.name, "lr_schedule": lr_schedule,
                             **kwargs.pop("extra", {})}, **kwargs)


@functools.lru_cache(maxsize=4)
def cached_corpus(name: str, data_dir: str | None = None) -> Corpus:
    """load_corpus, memoised: notebooks ask for the same corpus many times."""
    options = {"train_from_valid": True} if name == "wikitext-2" else {}
    return load_corpus(name, data_dir, **options)


@dataclass
class ExperimentResult:
    experiment: Experiment
    model: TransformerLM
    history: pd.DataFrame
    from_cache: bool

    def trainer(self, device: str = "cpu", **config_overrides) -> Trainer:
        return Trainer(self.experiment.training_config(**config_overrides),
                       self.model.config.vocab_size, device=device, progress=False)


def batches(experiment: Experiment, corpus: Corpus, split: str,
            max_batches: int | None = None) -> TokenBatches:
    """The experiment's batches of a split: shuffled windows for train, in order otherwise."""
    if split == "train":
        return TokenBatches(corpus.train, experiment.seq_len, experiment.batch_size, shuffle=True,
                            seed=experiment.seed, num_batches=experiment.steps_per_epoch)
    return TokenBatches(corpus.split(split), experiment.seq_len, experiment.batch_size,
                        num_batches=max_batches)


def run_experiment(experiment: Experiment, *, corpus: Corpus | None = None,
                   data_dir: str | None = None, cache_dir: str | Path | None = None,
                   device: str = "cpu", val_batches: int | None = 8) -> ExperimentResult:
    """Train `experiment`, or load it from the cache if it was trained before."""
    corpus = corpus or cached_corpus(experiment.corpus, data_dir)
    folder = Path(cache_dir or default_cache_dir()) / experiment.key()
    if (folder / "history.parquet").exists():
        model = TransformerLM.from_pretrained(folder / "model", device=device)
        history = pd.read_parquet(folder / "history.parquet")
        return ExperimentResult(experiment, model, history, from_cache=True)
    set_seed(experiment.seed)
    model = build_model(experiment.model_type, vocab_size=corpus.vocab_size, dim=experiment.dim,
                        num_layers=experiment.num_layers, num_heads=experiment.num_heads,
                        max_seq_len=max(experiment.seq_len, 256))
    trainer = Trainer(experiment.training_config(), corpus.vocab_size, device=device,
                      progress=False)
    history = trainer.fit(model, batches(experiment, corpus, "train"),
                          batches(experiment, corpus, "val", val_batches),
                          epochs=experiment.epochs, base_lr=experiment.base_lr,
                          warmup_steps=experiment.warmup_steps)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp / "model")
        history.to_parquet(tmp / "history.parquet")
        (tmp / "experiment.json").write_text(json.dumps(asdict(experiment), indent=2, default=str))
    return ExperimentResult(experiment, model, history, False)


def run_grid(experiments, seeds, **kwargs) -> list[ExperimentResult]:
    """Every experiment at every seed."""
    return [run_experiment(replace(e, seed=s), **kwargs) for e in experiments for s in seeds]
