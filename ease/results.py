"""Results as tidy pandas DataFrames: per-exit metrics of trained experiments, paired
comparisons over seeds, and every finished run under a folder in one table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .experiments import ExperimentResult, batches, cached_corpus
from .io import atomic_path


def per_exit_rows(metrics: dict, num_layers: int, **columns) -> list[dict]:
    """Rows of (columns..., layer, loss, ppl, acc) from an evaluation dict's per-exit keys."""
    return [{**columns, "layer": layer, "loss": metrics[f"loss_L{layer}"],
             "ppl": metrics[f"ppl_L{layer}"], "acc": metrics[f"acc_L{layer}"]}
            for layer in range(1, num_layers + 1)]


def per_exit_metrics(results: list[ExperimentResult], split: str = "test",
                     max_batches: int | None = 16, threshold: float = 0.0) -> pd.DataFrame:
    """One row per (experiment, seed, layer): loss, ppl and acc of that layer's exit."""
    rows = []
    for result in results:
        experiment = result.experiment
        corpus = cached_corpus(experiment.corpus)
        metrics = result.trainer().evaluate(
            result.model, batches(experiment, corpus, split, max_batches), threshold=threshold)
        rows += per_exit_rows(metrics, experiment.num_layers, name=experiment.name,
                              seed=experiment.seed, **experiment.extra)
    return pd.DataFrame(rows)


def training_curves(results: list[ExperimentResult]) -> pd.DataFrame:
    """Long table of the per-epoch validation loss of every exit: name, seed, step, layer, loss."""
    frames = []
    for result in results:
        history = result.history
        for layer in range(1, result.experiment.num_layers + 1):
            frames.append(pd.DataFrame({
                "name": result.experiment.name, "seed": result.experiment.seed,
                "step": history["step"], "layer": layer,
                "val_loss": history[f"val_loss_L{layer}"],
            }))
    return pd.concat(frames, ignore_index=True)


def mean_and_error(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Mean, standard deviation and 95% t-interval half-width over seeds."""
    grouped = df.groupby(by, sort=False)[value]
    out = grouped.agg(mean="mean", std="std", n="count").reset_index()
    t = stats.t.ppf(0.975, np.maximum(out["n"] - 1, 1))
    out["ci95"] = np.where(out["n"] > 1, t * out["std"] / np.sqrt(out["n"]), np.nan)
    return out


def paired_comparison(df: pd.DataFrame, metric: str, a: str, b: str, layer: int) -> dict:
    """Is `a` better than `b` (lower `metric`) at `layer`? Paired over seeds, t-interval.

    Returns the mean difference a - b, its 95% interval, the number of seeds, and a
    verdict sentence computed from these numbers."""
    rows = df[df["layer"] == layer]
    pivot = rows.pivot_table(index="seed", columns="name", values=metric)
    for name in (a, b):
        if name not in pivot:
            raise ValueError(f"no results named {name!r}; have {sorted(pivot.columns)}")
    diff = (pivot[a] - pivot[b]).dropna()
    n = len(diff)
    mean = float(diff.mean())
    half = float(stats.t.ppf(0.975, n - 1) * diff.std() / np.sqrt(n)) if n > 1 else float("nan")
    lower, upper = mean - half, mean + half
    if n < 2:
        verdict = f"only {n} seed: no interval, no verdict"
    elif upper < 0:
        verdict = f"{a} has lower {metric} than {b} at layer {layer} (95% CI excludes 0)"
    elif lower > 0:
        verdict = f"{a} has higher {metric} than {b} at layer {layer} (95% CI excludes 0)"
    else:
        verdict = f"no significant {metric} difference between {a} and {b} at layer {layer}"
    return {"metric": metric, "layer": layer, "a": a, "b": b, "mean_diff": mean,
            "ci_low": lower, "ci_high": upper, "seeds": n, "verdict": verdict}


# -- runs on disk ------------------------------------------------------------------------

def write_metrics(df: pd.DataFrame, output_dir: str | Path, name: str) -> Path:
    """Save a notebook's result table as output_dir/metrics/name.parquet, atomically."""
    path = Path(output_dir) / "metrics" / f"{name}.parquet"
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def load_runs(root: str | Path) -> pd.DataFrame:
    """Every finished notebook run below `root` as one tidy DataFrame.

    A run folder counts when its manifest.json says status "ok"; each row of its metric
    tables gets the run's id, notebook and parameters as columns."""
    frames = []
    for manifest_path in sorted(Path(root).rglob("manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("status") != "ok":
            continue
        for table in sorted((manifest_path.parent / "metrics").glob("*.parquet")):
            df = pd.read_parquet(table)
            df.insert(0, "table", table.stem)
            df.insert(0, "notebook", manifest["notebook"])
            df.insert(0, "run", manifest["run"])
            for key, value in manifest.get("parameters", {}).items():
                if f"param_{key}" not in df:
                    df[f"param_{key}"] = value if np.isscalar(value) else json.dumps(value)
            frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
