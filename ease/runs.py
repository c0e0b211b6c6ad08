"""Batch runs of the notebooks with papermill.

    python -m ease.runs                                   # every notebook, default parameters
    python -m ease.runs -n 01 03 -p num_layers 4 -p corpus tinyshakespeare
    python -m ease.runs --sweep sweeps/layers.yaml --jobs 2

Each (notebook, parameters) pair runs in its own folder, out/<run>/<notebook>/, holding the
executed notebook, its metrics (parquet), its figures and manifest.json (parameters,
git commit, package versions, status). A notebook executes in a hidden staging folder
that is renamed into place only on success; a failure is renamed to <notebook>.failed,
so nothing unfinished looks like a result. Figures of successful default runs are
copied to figures/. A sweep file is YAML:

    notebooks: [01_layer_weights]          # optional, default: all
    parameters: {epochs: 4}                # fixed for every run
    grid: {num_layers: [3, 4, 6], seed: [0, 1]}   # the cartesian product, one run each
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

from .experiments import REPO_DIR
from .io import write_json
from .results import load_runs

NOTEBOOK_DIR = REPO_DIR / "notebooks"
PACKAGES = ["ease", "torch", "numpy", "pandas", "matplotlib", "seaborn", "papermill",
            "ipywidgets", "transformers"]


@dataclass
class NotebookRun:
    notebook: Path
    run: str
    parameters: dict = field(default_factory=dict)
    status: str = "pending"
    error: str = ""
    folder: Path | None = None


def find_notebooks(selectors: list[str] | None = None) -> list[Path]:
    """Notebooks in notebooks/ whose name starts with one of `selectors` (all if none)."""
    notebooks = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if selectors:
        chosen = [nb for nb in notebooks if any(nb.stem.startswith(s) for s in selectors)]
        missing = [s for s in selectors if not any(nb.stem.startswith(s) for nb in notebooks)]
        if missing:
            raise SystemExit(f"no notebook matches {missing}; have {[nb.stem for nb in notebooks]}")
        return chosen
    return notebooks


def expand_sweep(sweep: dict) -> list[tuple[str, dict]]:
    """(run name, parameters) for every point of the sweep's grid."""
    unknown = set(sweep) - {"notebooks", "parameters", "grid"}
    if unknown:
        raise ValueError(f"unknown keys in sweep file: {sorted(unknown)}")
    fixed = sweep.get("parameters") or {}
    grid = sweep.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list, got {values!r}")
    points = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo, strict=True))
        name = "-".join(f"{k}={_slug(v)}" for k, v in point.items()) or "default"
        points.append((name, {**fixed, **point}))
    return points


def _slug(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text).strip("_")


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_DIR, capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def execute(job: NotebookRun, out: Path, figures_dir: Path | None) -> NotebookRun:
    """Run one notebook with papermill into out/<run>/<notebook>/ (see module doc)."""
    import papermill as pm

    run_dir = out / job.run
    final = run_dir / job.notebook.stem
    staging = run_dir / f".{job.notebook.stem}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    parameters = {**job.parameters, "output_dir": str(staging),
                  "figures_dir": str(staging / "figures")}
    manifest = {"run": job.run, "notebook": job.notebook.stem, "parameters": job.parameters,
                "git_commit": git_commit(), "packages": package_versions(),
                "platform": platform.platform(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    began = time.perf_counter()
    try:
        pm.execute_notebook(str(job.notebook), str(staging / job.notebook.name),
                            parameters=parameters, cwd=str(NOTEBOOK_DIR), progress_bar=False,
                            kernel_name="python3")
        job.status = "ok"
    except pm.PapermillExecutionError as error:
        job.status = "failed"
        job.error = (f"cell {error.cell_index} (execution count {error.exec_count}): "
                     f"{error.ename}: {error.evalue}")
    except Exception as error:  # the kernel died, a parameter was refused, ...
        job.status = "failed"
        job.error = f"{type(error).__name__}: {error}"
    seconds = round(time.perf_counter() - began, 1)
    manifest.update(status=job.status, error=job.error, seconds=seconds)
    write_json(staging / "manifest.json", manifest)
    job.folder = final if job.status == "ok" else run_dir / f"{job.notebook.stem}.failed"
    shutil.rmtree(job.folder, ignore_errors=True)
    os.replace(staging, job.folder)
    if job.status == "ok" and figures_dir is not None:
        figures_dir.mkdir(parents=True, exist_ok=True)
        for figure in sorted((job.folder / "figures").glob("*")):
            shutil.copy2(figure, figures_dir / figure.name)
    return job


def run_all(jobs: list[NotebookRun], out: Path, figures_dir: Path | None, workers: int) -> bool:
    """Execute every job (up to `workers` at a time); report each; True if all succeeded."""
    # Notebooks of one run go in order (later ones reuse models the earlier ones cached);
    # different runs go in parallel.
    by_run: dict[str, list[NotebookRun]] = {}
    for job in jobs:
        by_run.setdefault(job.run, []).append(job)

    def run_sequence(sequence):
        for job in sequence:
            print(f"[{job.run}] {job.notebook.stem} ...", flush=True)
            execute(job, out, figures_dir)
            mark = "ok    " if job.status == "ok" else "FAILED"
            print(f"[{job.run}] {job.notebook.stem} {mark} {job.error}".rstrip(), flush=True)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(run_sequence, by_run.values()))
    failed = [job for job in jobs if job.status != "ok"]
    for job in failed:
        print(f"FAILED: {job.notebook.name} in run {job.run!r}: {job.error}\n"
              f"        executed notebook: {job.folder / job.notebook.name}", file=sys.stderr)
    return not failed


def summary_table(out: Path) -> str:
    """The per-exit perplexity of every model the runs measured, one table per notebook run
    (mean over seeds)."""
    df = load_runs(out)
    if df.empty or "ppl" not in df:
        return "(no per-exit results)"
    per_exit = df[(df["table"] == "per_exit") & df["layer"].notna()]
    tables = []
    for (run, notebook), rows in per_exit.groupby(["run", "notebook"], sort=True):
        table = rows.pivot_table(index="name", columns="layer", values="ppl", aggfunc="mean")
        table.columns = [f"L{int(c)}" for c in table.columns]
        tables.append(f"{run} / {notebook}: perplexity per exit\n"
                      + table.to_string(float_format=lambda v: f"{v:.4g}"))
    return "\n\n".join(tables) or "(no per-exit results)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ease.runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--notebooks", nargs="*",
                        help="notebook name prefixes (default: all)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"), help="a notebook parameter (VALUE is YAML)")
    parser.add_argument("--sweep", type=Path, help="YAML sweep file (see above)")
    parser.add_argument("--out", type=Path, default=REPO_DIR / "runs", help="runs folder")
    parser.add_argument("--figures", type=Path, default=REPO_DIR / "figures",
                        help="where figures of a run without --sweep/-p are collected")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="runs in parallel (each notebook run uses num_threads cores)")
    args = parser.parse_args(argv)

    overrides = {name: yaml.safe_load(value) for name, value in args.parameter}
    selectors = args.notebooks
    if args.sweep:
        sweep = yaml.safe_load(args.sweep.read_text()) or {}
        selectors = selectors or sweep.get("notebooks")
        points = [(name, {**params, **overrides}) for name, params in expand_sweep(sweep)]
    else:
        points = [("default" if not overrides else
                   "-".join(f"{k}={_slug(v)}" for k, v in overrides.items()), overrides)]
    notebooks = find_notebooks(selectors)
    jobs = [NotebookRun(nb, run, params) for run, params in points for nb in notebooks]
    # Only the default run owns figures/: a sweep or an override keeps figures in its run folder.
    figures_dir = args.figures if points == [("default", {})] else None
    print(f"{len(jobs)} notebook run(s) into {args.out}", flush=True)
    ok = run_all(jobs, args.out, figures_dir, args.jobs)
    print(summary_table(args.out))
    if figures_dir is not None and ok:
        print(f"figures written to {figures_dir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
