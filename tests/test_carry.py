"""A study continues on a fresh clone: `export --checkpoints` on one, `import` on the other, then
`run` skips the finished final runs and resumes the unfinished one from its last epoch, in the same
MLflow run. Tiny study as in test_studies.py (ml-latest-small at a 20/100 k-core, hidden 8)."""

from __future__ import annotations

from pathlib import Path

from harness.store.contract import SOURCE_RUN_ID
from harness.train import Trainer
from tests.test_studies import TINY_TRAIN, mlflow_runs, run_cli, write_study


def finals(directory: Path, study: str) -> dict[str, object]:
    return {
        r.data.tags["harness.seed"]: r
        for r in mlflow_runs(directory, study)
        if r.data.tags.get("harness.kind") == "final"
    }


def test_an_interrupted_study_resumes_on_another_clone_from_its_exported_store(tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    train = {**TINY_TRAIN, "epochs": 2, "patience": 5}
    spec = dict(
        name="carry", n_trials=0, space={"hidden_size": [8]}, sampler=None, train=train, final={"seeds": [2020, 2021]}
    )
    original = Trainer.train_epoch
    trained: list[tuple[int, int]] = []

    def interrupted(self, epoch, progress=None):  # seed 2021 is stopped in its second epoch
        if self.config.seed == 2021 and epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, progress)

    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(first / "results"))
    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert run_cli("run", str(write_study(first, **spec)), "--no-live") == 130
    before = finals(first, "carry")
    assert {s: r.info.status for s, r in before.items()} == {"2020": "FINISHED", "2021": "KILLED"}
    assert before["2021"].data.tags["failure"] == "stopped by Ctrl-C or SIGTERM"
    store = first / "store"
    capsys.readouterr()
    assert (
        run_cli(
            "export",
            "carry",
            "--tracking-uri",
            f"sqlite:///{first / 'results' / 'mlflow.db'}",
            "--out",
            str(store),
            "--checkpoints",
            "carry",
        )
        == 0
    )
    assert "1 unfinished run checkpoint(s)" in capsys.readouterr().out
    assert len(list((store / "checkpoints" / "carry").glob("*.pt"))) == 1

    # the other clone: nothing local but the exported store
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(second / "results"))
    path = write_study(second, **spec)
    target = f"sqlite:///{second / 'results' / 'mlflow.db'}"
    assert run_cli("import", str(store), "--tracking-uri", target) == 0
    assert "carry: 3 run(s) imported, 0 already here, 1 checkpoint(s) to resume from" in capsys.readouterr().out
    assert run_cli("import", str(store), "--tracking-uri", target) == 0  # twice changes nothing
    assert "carry: 0 run(s) imported, 3 already here, 0 checkpoint(s) to resume from" in capsys.readouterr().out
    imported = finals(second, "carry")
    # one identity through every copy: the id it was first recorded under
    assert {s: r.data.tags[SOURCE_RUN_ID] for s, r in imported.items()} == {s: r.info.run_id for s, r in before.items()}

    def recorded(self, epoch, progress=None):
        trained.append((self.config.seed, epoch))
        return original(self, epoch, progress)

    monkeypatch.setattr(Trainer, "train_epoch", recorded)
    assert run_cli("run", str(path), "--no-live") == 0
    assert trained == [(2021, 2)]  # seed 2020 is done; seed 2021 continues after its epoch 1
    after = finals(second, "carry")
    assert {s: r.info.status for s, r in after.items()} == {"2020": "FINISHED", "2021": "FINISHED"}
    assert after["2021"].info.run_id == imported["2021"].info.run_id
    assert after["2021"].data.tags["resumed"].startswith("epoch 2 at ")
    assert "test_ndcg_at_10" in after["2021"].data.metrics
    # the resumed run's curve is one history: epoch 1 from the first clone, epoch 2 from this one
    from mlflow.tracking import MlflowClient

    history = MlflowClient(target).get_metric_history(after["2021"].info.run_id, "valid_ndcg_at_10")
    assert sorted(m.step for m in history) == [1, 2]
    assert not list((second / "results" / "studies" / "carry").rglob("*.pt"))  # finished: none kept

    # a third clone ran the same study from scratch: other origins, same configurations and seeds;
    # its finals are already finished here, so importing its store adds no second result for them
    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(third / "results"))
    assert run_cli("run", str(write_study(third, **spec)), "--no-live") == 0
    assert (
        run_cli(
            "export",
            "carry",
            "--tracking-uri",
            f"sqlite:///{third / 'results' / 'mlflow.db'}",
            "--out",
            str(third / "store"),
        )
        == 0
    )
    capsys.readouterr()
    assert run_cli("import", str(third / "store"), "--tracking-uri", target) == 0
    assert "carry: 1 run(s) imported, 2 already here" in capsys.readouterr().out  # its study run only
    assert len(finals(second, "carry")) == 2


def test_import_refuses_a_folder_without_a_store(tmp_path, capsys):
    assert run_cli("import", str(tmp_path)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: no exported store at {tmp_path} (expected {tmp_path / 'experiments.json'} or {tmp_path / 'mlflow.db'})"
    )


def test_export_refuses_checkpoints_of_a_study_it_does_not_export(tmp_path, capsys):
    out = tmp_path / "store"
    assert run_cli("export", "carry", "--out", str(out), "--checkpoints", "other") == 2
    assert capsys.readouterr().err.strip() == "error: --checkpoints names studies that are not exported: other"
    assert not out.exists()
