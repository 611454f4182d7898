"""Checkpoints (issues 24 and 25): atomic writes, corrupt files set aside and the run recovered, a kill
during epoch 1 resumed into the same MLflow run, and crafted pickles refused -- on a local rerun and
on `import` of a foreign store -- with one line and nothing executed."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from harness import checkpoints
from harness.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAIN = [
    "train",
    "--no-progress",
    "--epochs",
    "2",
    "--set",
    "max_len=10",
    "--set",
    "hidden_size=8",
    "--set",
    "n_heads=2",
    "--set",
    "n_layers=1",
    "--set",
    "min_user_inter=20",
    "--set",
    "min_item_inter=50",
    "--experiment",
    "ckpt",
]


class Payload:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _craft(path: Path, marker: Path, run_id: str | None = None) -> None:
    state = {"epoch": 1, "model": {}, "run_id": run_id, "evil": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    # the file is a real exploit: a plain unpickling of its data.pkl runs it (marker removed again)
    with zipfile.ZipFile(path) as archive:
        [member] = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        pickle.loads(archive.read(member))
    assert marker.exists()
    marker.unlink()


def _runs(results: Path, experiment: str = "ckpt"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def _results() -> Path:
    return Path(os.environ["HARNESS_RESULTS_DIR"])


# ---------------------------------------------------------------------------- the file layer
def test_a_trainer_checkpoint_needs_no_type_outside_the_allow_list(tmp_path):
    # what every model, the optimiser and the RNG states save is readable with weights_only=True;
    # a new type in a checkpoint fails here first (add it to ALLOWED_GLOBALS, deliberately)
    import models

    state = {}
    for name in models.available():
        model = models.build(name, 50, 10, {"hidden_size": 16}, kernel_backend="auto", device=torch.device("cpu"))
        optimizer = torch.optim.Adam(model.parameters())
        items = torch.randint(1, 51, (2, 10))
        stamps = torch.arange(20, dtype=torch.float64).reshape(2, 10) if model.uses_timestamps else None
        model.loss(model.last_hidden(items, stamps, torch.full((2,), 10)), torch.ones(2, dtype=torch.long)).backward()
        optimizer.step()  # Adam's state (step counts, moments) is in the file too
        state[name] = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    state["rng"] = torch.get_rng_state()
    path = tmp_path / "all.pt"
    checkpoints.save(state, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert set(checkpoints.load(path)) == set(state)


def test_the_committed_carried_checkpoints_load_with_weights_only():
    found = sorted((REPO / "reports").glob("*/store/checkpoints/*/*.pt"))
    if not found:
        pytest.skip("no carried checkpoint committed")
    for path in found:
        state = checkpoints.load(path)
        assert {"epoch", "model", "optimizer", "run_id"} <= set(state)


@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped", "junk"])
def test_damaged_files_are_corrupt_not_loaded(tmp_path, damage):
    path = tmp_path / "c.pt"
    checkpoints.save({"w": torch.arange(10000.0)}, path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flipped":  # inside the tensor bytes: torch alone would load wrong weights
        blob = bytearray(data)
        blob[data.index(b"\x00\x00\x80?") + 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(os.urandom(4096))
    with pytest.raises(checkpoints.CheckpointCorrupt) as err:
        checkpoints.load(path)
    assert str(path) in str(err.value)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoints.save({"epoch": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        checkpoints.save({"epoch": 2}, path)
    assert checkpoints.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


# ---------------------------------------------------------------------------- a training run
def _kill_during_epoch(epoch: int, argv: list[str], env: dict) -> None:
    """Run `harness argv` in a child that SIGKILLs itself as epoch `epoch` begins (no handler runs)."""
    code = (
        "import os, signal, sys\n"
        "from harness import cli\n"
        "from harness.train import Trainer\n"
        "train = Trainer.train_epoch\n"
        "def dying(self, epoch, progress=None):\n"
        f"    if epoch == {epoch}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return train(self, epoch, progress)\n"
        "Trainer.train_epoch = dying\n"
        f"sys.exit(cli.main({argv!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == -signal.SIGKILL, out.stderr


def test_kill_during_epoch_one_resumes_the_same_mlflow_run(capsys):
    _kill_during_epoch(1, TRAIN, dict(os.environ))
    [run] = _runs(_results())
    assert run.info.status == "RUNNING"
    [checkpoint] = (_results() / "checkpoints").glob("*.pt")
    assert checkpoints.load(checkpoint)["epoch"] == 0  # remembered before epoch 1 began
    _the_killed_run_is_not_called_training(run.info.run_id)
    assert main(TRAIN) == 0
    out = capsys.readouterr().out
    assert f"MLflow run {run.info.run_id}" in out and "it stopped during epoch 1" in out
    assert "evaluating the test split" in out
    [again] = _runs(_results())
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["resumed"].startswith("epoch 1 at ")
    assert "dropout=" in again.data.tags["resumed"].partition(", kernels ")[2]  # the kernels the rest ran on
    assert "test_ndcg_at_10" in again.data.metrics


def _the_killed_run_is_not_called_training(run_id: str) -> None:
    """Never rerun, a killed run is not left RUNNING for ever: the report (which never writes to a
    store) calls it interrupted, not "still training", and the next writer to open the store marks
    it KILLED (harness.store.liveness); a rerun still resumes it."""
    from harness.report.results import select_result_runs
    from harness.store.reader import Store
    from harness.store.writer import Tracker

    store = Store()
    _, _, notes = select_result_runs(store.runs(store.experiments()), "train")
    assert not any("still training" in note for note in notes), notes
    assert any("run(s) stopped before their test" in note and "on this machine is gone" in note for note in notes)
    Tracker(None, "ckpt")  # any writer: train, run, worker, import
    [run] = _runs(_results())
    assert run.info.run_id == run_id and run.info.status == "KILLED"
    assert run.data.tags["failure"].startswith("interrupted: its process ")


def test_truncated_checkpoint_is_set_aside_and_the_run_recovers(capsys, tmp_path):
    reference_dir = tmp_path / "reference"
    assert main([*TRAIN, "--checkpoint-dir", str(reference_dir), "--no-track"]) == 0
    reference = _table(capsys, None)
    assert reference
    _kill_during_epoch(2, TRAIN, dict(os.environ))  # epoch 1 checkpointed, the run left RUNNING
    [killed] = _runs(_results())
    [path] = (_results() / "checkpoints").glob("*.pt")
    assert checkpoints.load(path)["epoch"] == 1
    path.write_bytes(path.read_bytes()[:1000])  # another tool truncated it
    assert main(TRAIN) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(path) in warnings[0] and "starts again from epoch 1" in warnings[0]
    [moved] = (_results() / "checkpoints").glob("*.corrupt-*")
    assert moved.name.startswith(path.name) and moved.stat().st_size == 1000
    runs = {r.info.run_id: r for r in _runs(_results())}
    assert runs[killed.info.run_id].info.status == "KILLED"
    assert "unreadable" in runs[killed.info.run_id].data.tags["failure"]
    [fresh] = [r for r in runs.values() if r.info.run_id != killed.info.run_id]
    assert fresh.info.status == "FINISHED"
    # from scratch with the same seed: the uninterrupted run's numbers
    assert _table(None, captured.out) == reference


def _table(capsys, out):
    """The printed test table's rows (metric and values)."""
    text = out if out is not None else capsys.readouterr().out
    return [line for line in text.splitlines() if line.startswith("│")]


def test_crafted_checkpoint_is_refused_on_a_local_rerun(capsys, tmp_path):
    _kill_during_epoch(2, TRAIN, dict(os.environ))
    [path] = (_results() / "checkpoints").glob("*.pt")
    marker = tmp_path / "pwned"
    _craft(path, marker)
    crafted = path.read_bytes()
    assert main(TRAIN) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {path} was refused") and "\n" not in err, err
    assert "(global io.open)" in err
    assert not marker.exists() and path.read_bytes() == crafted  # not run, not moved: a person decides


def test_crafted_checkpoint_in_a_foreign_store_refuses_the_import(capsys, tmp_path):
    source = REPO / "reports" / "low_dim_beauty" / "store"
    carried = sorted(source.glob("checkpoints/*/*.pt"))
    if not carried:
        pytest.skip("no committed store carries checkpoints")
    store = tmp_path / "foreign"
    shutil.copytree(source, store)
    victim = store / carried[0].relative_to(source)
    marker = tmp_path / "pwned"
    _craft(victim, marker, run_id=checkpoints.load(carried[0])["run_id"])
    assert main(["import", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {victim} was refused") and "\n" not in err, err
    assert not marker.exists()
    assert not _results().exists()  # nothing imported: the local store was never opened


# ---------------------------------------------------------------------------- what a checkpoint holds
def test_a_checkpoint_holds_what_an_exact_resume_needs_and_a_finished_one_its_best_weights(tmp_path):
    from harness.config import make_config
    from harness.train import Trainer

    config = make_config(
        {
            "dataset": "ml-latest-small",
            "max_len": 10,
            "epochs": 1,
            "min_user_inter": 20,
            "min_item_inter": 50,
            "model_params": {"hidden_size": 16, "n_heads": 2, "n_layers": 1},
        }
    )
    trainer = Trainer(config, checkpoint_dir=tmp_path, progress=None)
    whole = trainer.fit(evaluate_test=True, keep_checkpoint=True)
    weights = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
    saved = trainer.checkpoint
    state = saved.read()
    assert state["finished"] and state["best"]["epoch"] == state["epoch"] == 1
    # best weights equal to the current ones are written once (beside Adam's two moments)
    apart = checkpoints.Checkpoint(tmp_path / "apart.pt")
    apart.write({**state, "best": {**state["best"], "state": {k: v.clone() for k, v in state["model"].items()}}})
    assert apart.path.stat().st_size - saved.path.stat().st_size > 0.95 * weights

    slim = saved.rewrite(tmp_path / "slim" / saved.path.name, slim=True, run_id=None)
    assert set(slim.read()) == {"epoch", "best", "history", "run_id", "finished"}
    assert saved.path.stat().st_size - slim.path.stat().st_size > 1.95 * weights  # no optimiser left
    resumed = Trainer(config, checkpoint_dir=tmp_path / "slim", progress=None).fit(evaluate_test=True)
    assert resumed.test == whole.test and resumed.best_epoch == whole.best_epoch
