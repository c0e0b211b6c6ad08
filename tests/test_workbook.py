"""The workbook layer: cached experiments, result tables, figures, slider views and the
papermill batch runner."""

from __future__ import annotations

import json
from dataclasses import replace

import matplotlib
import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from ease.evaluation import LayerOutputs  # noqa: E402
from ease.experiments import experiment_from_preset, run_experiment  # noqa: E402
from ease.figures import per_layer_metric, quality_vs_compute, training_curves  # noqa: E402
from ease.plotting import figure, save_figure  # noqa: E402
from ease.results import load_runs, paired_comparison, per_exit_metrics  # noqa: E402
from ease.results import training_curves as curves_table  # noqa: E402
from ease.runs import NotebookRun, expand_sweep, run_all  # noqa: E402
from ease.views import routing_view  # noqa: E402

TINY = dict(dim=16, num_heads=2, seq_len=16, batch_size=8, epochs=2, steps_per_epoch=3)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_experiment_is_trained_once_then_loaded_from_cache(cache):
    experiment = experiment_from_preset("asymmetric", 2, alpha=0.7, **TINY)
    first = run_experiment(experiment, cache_dir=cache)
    second = run_experiment(experiment, cache_dir=cache)
    assert (first.from_cache, second.from_cache) == (False, True)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_frame_equal(first.history, second.history)
    # The display name is not part of the key; the weights are.
    assert replace(experiment, name="other").key() == experiment.key()
    assert experiment_from_preset("asymmetric", 2, alpha=0.5, **TINY).key() != experiment.key()


def test_per_exit_metrics_and_curves_are_tidy(cache):
    results = [run_experiment(experiment_from_preset(p, 2, seed=s, **TINY), cache_dir=cache)
               for p in ("standard", "deep_supervision") for s in (0, 1)]
    per_exit = per_exit_metrics(results, split="val", max_batches=2)
    assert len(per_exit) == 2 * 2 * 2
    assert set(per_exit["layer"]) == {1, 2}
    assert (per_exit["ppl"] == np.exp(per_exit["loss"])).all()
    comparison = paired_comparison(per_exit, "ppl", "deep_supervision", "standard", layer=2)
    diff = (per_exit.query("layer == 2 and name == 'deep_supervision'")["ppl"].to_numpy()
            - per_exit.query("layer == 2 and name == 'standard'")["ppl"].to_numpy())
    assert comparison["mean_diff"] == pytest.approx(diff.mean())
    assert comparison["ci_low"] < comparison["mean_diff"] < comparison["ci_high"]
    curves = curves_table(results)
    assert len(curves) == 4 * 2 * TINY["epochs"]
    for fig in (per_layer_metric(per_exit), training_curves(curves)):
        assert fig.axes


def test_paired_comparison_verdict_follows_the_interval():
    rows = [{"name": n, "seed": s, "layer": 1, "ppl": base + s * 0.01}
            for s in range(4) for n, base in (("a", 5.0), ("b", 6.0))]
    result = paired_comparison(pd.DataFrame(rows), "ppl", "a", "b", 1)
    assert result["mean_diff"] == pytest.approx(-1.0)
    assert "a has lower ppl than b" in result["verdict"]
    with pytest.raises(ValueError, match="'c'"):
        paired_comparison(pd.DataFrame(rows), "ppl", "c", "b", 1)


def hand_outputs() -> LayerOutputs:
    """4 tokens, 2 layers; layer 1 is confident on tokens 0 and 1 only."""
    return LayerOutputs(nll=torch.tensor([[0.1, 0.2], [0.3, 0.1], [2.0, 0.5], [3.0, 0.4]]),
                        pred=torch.tensor([[1, 1], [2, 2], [0, 3], [0, 4]]),
                        max_prob=torch.tensor([[0.9, 0.8], [0.95, 0.9], [0.3, 0.6], [0.2, 0.7]]),
                        scores=torch.tensor([[0.9, 0.8], [0.95, 0.9], [0.3, 0.6], [0.2, 0.7]]),
                        target=torch.tensor([1, 2, 3, 4]), exit_layers=[1, 2],
                        criterion="max_prob")


def test_routing_view_redraws_with_the_threshold():
    outputs = hand_outputs()
    sweep = outputs.sweep(np.linspace(0, 1, 11))
    tokens = ["a", "b", "c", "d"]
    low = routing_view(outputs, 0.5, sweep, tokens)
    high = routing_view(outputs, 1.0, sweep, tokens)
    assert "threshold 0.50" in low._suptitle.get_text()
    assert "compute 0.750" in low._suptitle.get_text()  # tokens 0, 1 leave at layer 1 of 2
    assert "compute 1.000" in high._suptitle.get_text()
    heights = [bar.get_height() for bar in low.axes[1].patches]
    assert heights == pytest.approx([0.5, 0.5])


def test_quality_vs_compute_draws_every_model_and_the_front():
    outputs = hand_outputs()
    sweeps = {"a": outputs.sweep([0, 0.5, 1]), "b": outputs.sweep([0, 0.92, 1])}
    fig = quality_vs_compute(sweeps)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["a", "b", "Pareto front"]


def test_save_figure_writes_reproducible_pdf_and_png(tmp_path):
    paths = []
    for folder in ("one", "two"):
        fig, ax = figure("single")
        ax.plot([0, 1], [1, 0])
        paths.append(save_figure(fig, "line", tmp_path / folder))
    assert [p.suffix for p in paths[0]] == [".pdf", ".png"]
    for a, b in zip(*paths, strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert abs(fig.get_size_inches()[0] - 3.25) < 1e-9


def test_expand_sweep_is_the_cartesian_product():
    points = expand_sweep({"parameters": {"epochs": 1},
                           "grid": {"num_layers": [3, 4], "seeds": [[0], [1]]}})
    assert [name for name, _ in points] == ["num_layers=3-seeds=0", "num_layers=3-seeds=1",
                                           "num_layers=4-seeds=0", "num_layers=4-seeds=1"]
    assert points[-1][1] == {"epochs": 1, "num_layers": 4, "seeds": [1]}
    with pytest.raises(ValueError, match="unknown keys"):
        expand_sweep({"grids": {}})
    with pytest.raises(ValueError, match="non-empty list"):
        expand_sweep({"grid": {"num_layers": 3}})


def _notebook(path, body: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("value = 1\noutput_dir = '.'\nfigures_dir = '.'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def test_batch_run_reports_a_failing_notebook_and_keeps_the_others(tmp_path, capsys):
    good = _notebook(tmp_path / "10_good.ipynb", """
import pandas as pd
from ease.results import write_metrics
write_metrics(pd.DataFrame({"value": [value]}), output_dir, "table")""")
    bad = _notebook(tmp_path / "11_bad.ipynb", "raise ValueError(f'bad value {value}')")
    out = tmp_path / "runs"
    jobs = [NotebookRun(good, "r", {"value": 7}), NotebookRun(bad, "r", {"value": 7})]
    assert run_all(jobs, out, figures_dir=None, workers=1) is False
    err = capsys.readouterr().err
    assert "11_bad.ipynb" in err and "ValueError: bad value 7" in err and "cell" in err
    assert (out / "r" / "10_good" / "manifest.json").exists()
    assert not (out / "r" / "11_bad").exists()  # nothing unfinished looks like a result
    failed = json.loads((out / "r" / "11_bad.failed" / "manifest.json").read_text())
    assert failed["status"] == "failed" and "bad value 7" in failed["error"]
    table = load_runs(out)
    assert list(table["value"]) == [7] and list(table["notebook"]) == ["10_good"]
    assert list(table["param_value"]) == [7]


def test_quickstart_runs_on_a_real_corpus_with_papermill(shared_data_dir, tmp_path, monkeypatch):
    """CI runs one notebook through papermill on a real corpus with small parameters."""
    from ease.runs import main

    if not (shared_data_dir / "tinyshakespeare" / "input.txt").exists():
        pytest.skip("tinyshakespeare not in the shared data folder")
    monkeypatch.setenv("EASE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("EASE_CACHE_DIR", str(tmp_path / "cache"))
    code = main(["-n", "00", "--out", str(tmp_path / "runs"), "-p", "corpus", "tinyshakespeare",
                 "-p", "dim", "16", "-p", "num_heads", "2", "-p", "epochs", "1",
                 "-p", "steps_per_epoch", "3", "-p", "num_layers", "2", "-p", "num_threads", "1"])
    assert code == 0
    (run,) = (tmp_path / "runs").iterdir()  # one run, named after its parameters
    assert run.name.startswith("corpus=tinyshakespeare-dim=16")
    manifest = json.loads((run / "00_quickstart" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["parameters"]["corpus"] == "tinyshakespeare"
    executed = nbformat.read(run / "00_quickstart" / "00_quickstart.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "tinyshakespeare: vocab" in text and "char-level" in text
    assert (run / "00_quickstart" / "figures" / "00_quickstart_per_layer_ppl.pdf").exists()


def test_preset_spec_carries_alpha():
    spec = experiment_from_preset("asymmetric:0.7", 3, **TINY)
    assert spec.layer_weights == experiment_from_preset("asymmetric", 3, alpha=0.7,
                                                        **TINY).layer_weights
    assert spec.layer_weights == {1: 0.7, 2: 0.0, 3: pytest.approx(0.3)}
    with pytest.raises(ValueError, match="'x' is not a number"):
        experiment_from_preset("asymmetric:x", 3)
    with pytest.raises(ValueError, match="alpha given twice"):
        experiment_from_preset("asymmetric:0.7", 3, alpha=0.5)


def test_best_time_warms_up_and_keeps_the_fastest_call():
    from ease.generation import best_time

    calls = []
    result, seconds = best_time(lambda: calls.append(len(calls)) or len(calls), repeats=3)
    assert len(calls) == 4 and result == 4  # one warm-up, three timed
    assert seconds >= 0
    with pytest.raises(ValueError, match="repeats = 0"):
        best_time(lambda: None, repeats=0)
