"""Data-parallel training: the same Trainer under torchrun matches one process.

Two CPU ranks (gloo) train a tiny model on every batch split in two; with the same global
batch, the history and the final weights must equal a single-process run's up to float
rounding. The batch of 5 splits unevenly (3 + 2 rows), and layer 3 has weight 0, so the
loss scaling and DDP's unused-parameter handling are both exercised.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT

# Float sums differ between one batch of 5 and two of 3 + 2, then Adam amplifies them a
# little over 12 steps; weights are O(0.1) and move O(1e-2).
RTOL, ATOL = 1e-5, 1e-6

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from ease import DeepSupervisionTransformer, TokenBatches, Trainer, TrainingConfig, set_seed

    out = sys.argv[1]
    torch.set_num_threads(1)
    set_seed(0)
    model = DeepSupervisionTransformer(vocab_size=50, dim=16, num_layers=3, num_heads=2,
                                       max_seq_len=16)
    ids = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(1))
    train = TokenBatches(ids[:1600], seq_len=12, batch_size=5, shuffle=True, seed=0,
                         num_batches=6)
    val = TokenBatches(ids[1600:], seq_len=12, batch_size=4)
    trainer = Trainer(TrainingConfig({1: 0.5, 2: 0.5, 3: 0.0}), vocab_size=50, progress=False)
    history = trainer.fit(model, train, val, epochs=2, base_lr=1e-2,
                          checkpoint_dir=os.path.join(out, "run"),
                          on_epoch_end=lambda epoch, row: open(
                              os.path.join(out, f"callback_rank{trainer.rank}"), "a").write("x"))
    columns = [c for c in history.columns if c != "seconds"]
    result = {"world_size": trainer.world_size, "history": history[columns].to_dict("list"),
              "weights": {k: v.tolist() for k, v in model.state_dict().items()}}
    with open(os.path.join(out, f"result_rank{trainer.rank}.json"), "w") as f:
        json.dump(result, f)
''')

PROBE = textwrap.dedent('''
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    value = torch.ones(1)
    dist.all_reduce(value)
    assert value.item() == dist.get_world_size()
''')


def _run(args, cwd, timeout=120):
    env_script = [sys.executable, *args]
    return subprocess.run(env_script, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _torchrun(script, out, tmp_path):
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 str(script), str(out)], cwd=tmp_path)


def _load(path):
    return json.loads(path.read_text())


def test_two_ranks_match_one_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    done = _run([str(script), str(single)], cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    launched = _torchrun(script, ddp, tmp_path)
    if launched.returncode != 0:
        probe = tmp_path / "probe.py"
        probe.write_text(PROBE)
        if _torchrun(probe, ddp, tmp_path).returncode != 0:
            pytest.skip("torchrun cannot start two gloo ranks here (environment)")
        pytest.fail(f"the distributed run failed:\n{launched.stderr[-3000:]}")

    expected = _load(single / "result_rank0.json")
    ranks = [_load(ddp / f"result_rank{rank}.json") for rank in (0, 1)]
    assert expected["world_size"] == 1 and ranks[0]["world_size"] == 2
    for result in ranks:
        for column, values in expected["history"].items():
            torch.testing.assert_close(torch.tensor(result["history"][column]),
                                       torch.tensor(values), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, c=column: f"{c}: {m}")
        for name, weight in expected["weights"].items():
            torch.testing.assert_close(torch.tensor(result["weights"][name]),
                                       torch.tensor(weight), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name: f"{n}: {m}")
    # Training changed the weights, so equality above is not trivial.
    assert expected["history"]["train_loss"][1] < expected["history"]["train_loss"][0]
    # Only rank 0 wrote the checkpoint's files and ran the callback.
    assert (ddp / "run" / "checkpoint" / "trainer_state.pt").exists()
    assert (ddp / "callback_rank0").read_text() == "xx"
    assert not (ddp / "callback_rank1").exists()
