"""Studies: file validation, a tiny study end to end (search + final seeds, MLflow tree), failure
handling, validation-only selection, the MLflow UI command. Worker/resume tests live in
tests/test_studies_workers.py.

Everything is tiny: ml-latest-small filtered to a 20/100 k-core (334 users, 96 items), max_len 10,
one epoch, hidden 8-16, one torch thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml

import models
from harness import cli
from harness.studies import finals as fin
from harness.studies.schema import StudySpecError
from harness.studies.validation import load_study

ROOT = Path(__file__).resolve().parents[1]

TINY_TRAIN = {
    "max_len": 10,
    "epochs": 1,
    "protocol": "all_positions",
    "min_user_inter": 20,
    "min_item_inter": 100,
    "batch_size": 1024,
    "threads": 1,
}


def write_study(directory: Path, name: str = "tiny", **changes) -> Path:
    spec = {
        "name": name,
        "datasets": ["ml-latest-small"],
        "models": {"sasrec": {"params": {"n_heads": 1}}},
        "train": dict(TINY_TRAIN),
        "space": {"hidden_size": [8, 16]},
        "sampler": "grid",
        "pruner": "none",
        "select_per": ["hidden_size"],
        "final": {"seeds": 1},
        "tracking_uri": f"sqlite:///{directory / 'results' / 'mlflow.db'}",
    }
    for key, value in changes.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def mlflow_runs(directory: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{directory / 'results' / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def journal_trials(directory: Path, name: str) -> dict[str, list]:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = directory / "results" / "studies" / f"{name}.journal"
    storage = JournalStorage(JournalFileBackend(str(path)))
    return {
        s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
        for s in optuna.get_all_study_summaries(storage)
    }


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


# ---------------------------------------------------------------------------- validation
def test_dry_run_prints_plan_and_touches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    path = write_study(
        tmp_path,
        space={"hidden_size": [8, 16], "lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        sampler={"type": "tpe", "seed": 1},
        n_trials=4,
        final={"seeds": 2},
    )
    assert run_cli("run", str(path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "sasrec on ml-latest-small: 4 trials" in out
    assert "hidden_size {8, 16}" in out and "lr float [0.0001, 0.01], log" in out
    assert "journal file" in out and "expected cost: 4 trials + 4 final runs" in out
    # a fresh study's time: one timed step of its cell, at the space's last point, as a range
    assert "timing a few training steps of sasrec/ml-latest-small at hidden_size=16, lr=0.01" in out
    assert re.search(
        r"sasrec/ml-latest-small at hidden_size=16, lr=0\.01: \d+\.\d s per epoch \(3 of \d+ training", out
    )
    assert re.search(
        r"time for the whole plan, from a timed step per \(dataset, model\): \d+ (s|min) to \d+ (s|min) of run "
        r"time for 8 training\(s\)",
        out,
    )
    assert not (tmp_path / "results").exists()


def test_a_dataset_given_by_path_is_named_by_its_stem(tmp_path, monkeypatch, capsys):
    # as `train` names it: plan lines, run names and checkpoint folders never carry the whole path
    import pandas as pd

    from harness.data.catalogue import EMBEDDED_DIR
    from harness.studies.context import StudyContext
    from harness.studies.validation import load_study

    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    ratings = pd.read_csv(EMBEDDED_DIR / "ml-latest-small" / "ratings.csv")
    data = tmp_path / "my data" / "sports.csv"
    data.parent.mkdir()
    ratings[ratings["userId"] <= 100].to_csv(data, index=False)
    path = write_study(tmp_path, datasets=[str(data)], n_trials=0, space={"hidden_size": [8]}, sampler=None)
    assert run_cli("run", str(path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "  sasrec on sports: no search" in out
    assert "not started: 1 final run(s), in this order: sasrec-sports-hidden_size=8-s2020" in out
    assert f"dataset {data}: file {data}" in out  # the one line that names the file
    study = load_study(path)
    folder = StudyContext(study).trial_checkpoints(study.cells[0], 0)
    assert folder.is_relative_to(tmp_path / "results") and folder.parent.name.startswith("sports-")


def test_dry_run_of_a_fresh_study_without_search_times_its_configurations(tmp_path, monkeypatch, capsys):
    # the README promises the time left; before any epoch is stored it comes from a timed step
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    path = write_study(tmp_path, n_trials=0, space={"hidden_size": [8]}, sampler=None)
    assert run_cli("run", str(path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "timing a few training steps of sasrec-ml-latest-small-hidden_size=8 for the estimate" in out
    assert re.search(
        r"time left, estimated from this study's latest epochs: about \d+\.\d run-hours for 1 unfinished", out
    )
    assert "no estimate for" not in out
    assert run_cli("run", str(path), "--dry-run", "--no-timing") == 0
    out = capsys.readouterr().out
    assert "timing" not in out and "no estimate for sasrec-ml-latest-small-hidden_size=8 (no epoch measured yet)" in out
    assert not (tmp_path / "results").exists()


BAD_STUDIES = [
    ({"samplr": "grid"}, "samplr: unknown key 'samplr' (did you mean 'sampler'?)"),
    ({"models": {"sasrec": {"params": {"n_heads": 1}}, "nosuchmodel": {}}}, "model 'nosuchmodel' is not registered"),
    ({"models": {"sasrec": {"params": {"n_heads": 1, "hidden_sise": 8}}}}, "did you mean 'hidden_size'"),
    ({"space": {}}, "empty search space"),
    ({"space": {"hidden_size": {"type": "categorcal", "choices": [8]}}}, "parameter type must be one of"),
    ({"objectives": ["test_ndcg_at_10"]}, "is a test metric"),
    ({"objectives": ["ndcg@100"]}, "needs K=100 in train.topk"),
    ({"space": {"hidden_size": [8, 12]}}, "configuration {hidden_size: 12} is impossible"),  # n_heads 8
    ({"space": {"lr": {"low": 1e-4, "high": 1e-2}}}, "grid sampler needs discrete values"),
    ({"objectives": ["valid_ndcg_at_10", "throughput"], "pruner": "median"}, "cannot prune multi-objective"),
    ({"train": {**TINY_TRAIN, "epochz": 3}}, "train.epochz: unknown training setting"),
]


@pytest.mark.parametrize("changes,message", BAD_STUDIES, ids=[m[:24] for _, m in BAD_STUDIES])
def test_invalid_study_rejected_before_any_work(tmp_path, monkeypatch, capsys, changes, message):
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    if "impossible" in message:
        changes = {**changes, "models": {"sasrec": {"params": {"n_heads": 8}}}}
    path = write_study(tmp_path, **changes)
    journal = tmp_path / "results" / "studies" / "tiny.journal"
    journal.parent.mkdir(parents=True)
    journal.write_bytes(b"existing storage\n")
    before = journal.stat().st_mtime_ns
    assert run_cli("run", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert journal.read_bytes() == b"existing storage\n" and journal.stat().st_mtime_ns == before
    assert sorted(p.name for p in (tmp_path / "results").rglob("*")) == ["studies", "tiny.journal"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: tiny\nmodels: [sasrec\n", "YAML syntax error at line 3, column 1"),
        ("", "is empty: a study names at least its datasets and models"),
        ("- sasrec\n", "must be a mapping of study settings (name, datasets, models, ...), not a list"),
    ],
    ids=["syntax", "empty", "list"],
)
def test_a_study_file_that_is_not_a_yaml_mapping_is_one_line_naming_it(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    assert run_cli("run", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: study file {path}") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "results").exists()
    assert run_cli("run", str(tmp_path / "absent.yaml")) == 2
    assert capsys.readouterr().err.strip() == f"error: study file {tmp_path / 'absent.yaml'} does not exist"


def test_unreadable_dataset_stops_the_study_before_storage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    bad = tmp_path / "bad.inter"
    bad.write_text("this is not\tan interaction file\n")
    assert run_cli("run", str(write_study(tmp_path, datasets=[str(bad)]))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "results" / "studies").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_study_file_is_valid(path):
    study = load_study(path, check_datasets=False)  # the data of some is not on this machine
    assert study.name == path.stem and study.cells


@pytest.mark.parametrize("name", ["paper_ml1m", "paper_kuairand", "paper_steam"])
def test_paper_study_without_its_data_refuses_to_start(name, tmp_path, monkeypatch, capsys):
    from harness.data import catalogue

    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "cache"))
    # the download (where a dataset has one) fails as it does offline, without touching the network
    for dataset in yaml.safe_load((ROOT / "studies" / f"{name}.yaml").read_text())["datasets"]:
        spec = catalogue.CATALOGUE[dataset]
        if spec.url:
            offline = catalogue.dataclasses.replace(spec, url=(tmp_path / "absent.zip").as_uri())
            monkeypatch.setitem(catalogue.CATALOGUE, dataset, offline)
    assert run_cli("run", str(ROOT / "studies" / f"{name}.yaml")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not found" in err and "place " in err, err
    assert not (tmp_path / "results" / "studies").exists()


@pytest.mark.skipif("ssd4rec" not in models.available(), reason="ssd4rec not registered")
def test_impossible_ssd_shape_names_the_point(tmp_path):
    path = write_study(tmp_path, models={"ssd4rec": {"params": {"head_dim": 32}}}, space={"hidden_size": [16, 20]})
    with pytest.raises(StudySpecError, match=r"hidden_size: 20\} is impossible: hidden_size\*expand"):
        load_study(path)


def test_derived_parameter_and_unregistered_model_message(tmp_path):
    study = load_study(write_study(tmp_path, space={"hidden_size": [8, 16], "inner_size": {"expr": "hidden_size * 4"}}))
    config, derived = study.cells[0].resolve({"hidden_size": 16})
    assert derived == {"inner_size": 64} and config.model_params["inner_size"] == 64
    assert study.cells[0].select_label(config) == "hidden_size=16"


# ---------------------------------------------------------------------------- selection
class _FakeTrial:
    def __init__(self, number, values, test):
        self.number, self.values = number, values
        self.user_attrs = {"harness.select": "hidden_size=8", "test_ndcg_at_10": test}


def test_selection_reads_validation_values_only():
    trials = [_FakeTrial(0, [0.10], test=0.9), _FakeTrial(1, [0.20], test=0.0), _FakeTrial(2, [0.20], test=1.0)]
    assert fin.best_trial(trials, "maximize").number == 1  # best validation, lower number on ties
    assert fin.best_trial(trials, "minimize").number == 0
    front = fin.pareto_front(
        [_FakeTrial(0, [0.1, 5.0], 0), _FakeTrial(1, [0.2, 1.0], 0), _FakeTrial(2, [0.3, 0.5], 0)],
        ["maximize", "maximize"],
    )
    assert [t.number for t in front] == [0, 1, 2]
    front = fin.pareto_front(
        [_FakeTrial(0, [0.1, 5.0], 0), _FakeTrial(1, [0.2, 1.0], 0), _FakeTrial(2, [0.3, 0.5], 0)],
        ["maximize", "minimize"],
    )
    assert [t.number for t in front] == [2]


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A tiny study run in-process, with test evaluation made to explode inside trials."""
    from harness.train import Trainer

    directory = tmp_path_factory.mktemp("tiny")
    study_models = {"sasrec": {"params": {"n_heads": 1}}}
    if "mamba4rec" in models.available():
        study_models["mamba4rec"] = {}
    path = write_study(
        directory,
        models=study_models,
        sampler={"type": "random", "seed": 3},
        n_trials=3,
        space={"hidden_size": [8, 16], "lr": {"low": 1e-3, "high": 1e-2, "log": True}},
        final={"seeds": 2},
    )
    calls = []
    original_split, original_fit = Trainer.evaluate_split, Trainer.fit

    def guarded_split(self, split):
        kind = self.extra_tags.get("harness.kind")
        calls.append(("evaluate", kind, split))
        if split == "test" and kind == "trial":
            raise AssertionError("a trial evaluated the test split")
        return original_split(self, split)

    def spy_fit(self, *args, **kwargs):
        calls.append(("fit", self.extra_tags.get("harness.kind"), kwargs.get("evaluate_test", True)))
        return original_fit(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_RESULTS_DIR", str(directory / "results"))
        mp.setattr(Trainer, "evaluate_split", guarded_split)
        mp.setattr(Trainer, "fit", spy_fit)
        rc = run_cli("run", str(path), "--no-live")
    return {"dir": directory, "path": path, "rc": rc, "calls": calls, "models": list(study_models)}


def test_tiny_study_end_to_end(tiny_study):
    assert tiny_study["rc"] == 0
    directory = tiny_study["dir"]
    trials = journal_trials(directory, "tiny")
    assert sorted(trials) == sorted(f"tiny/ml-latest-small/{m}" for m in tiny_study["models"])
    for name, found in trials.items():
        assert [t.state.name for t in found] == ["COMPLETE"] * 3, name
        assert [t.number for t in found] == [0, 1, 2]

    runs = mlflow_runs(directory, "tiny")
    by_kind = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("harness.kind"), []).append(run)
    (parent,) = by_kind["study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["harness.study"] == "tiny"
    assert len(by_kind["trial"]) == 3 * len(tiny_study["models"])
    for run in by_kind["trial"] + by_kind["final"]:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["harness.study"] == "tiny" and tags["harness.select"].startswith("hidden_size=")
        assert tags["harness.seed"] in ("2020", "2021") and "harness.trial" in tags
        assert "model.hidden_size" in run.data.params
    for run in by_kind["trial"]:
        assert run.info.status == "FINISHED" and run.data.tags["harness.state"] == "complete"
        assert "objective_0" in run.data.metrics and "valid_ndcg_at_10" in run.data.metrics
        assert not [k for k in run.data.metrics if k.startswith("test_")]
        assert "optuna.hidden_size" in run.data.params
    finals = by_kind["final"]
    groups = {(r.data.tags["harness.model"], r.data.tags["harness.select"]) for r in finals}
    assert len(finals) == 2 * len(groups)  # two seeds per selected configuration
    for run in finals:
        assert run.info.status == "FINISHED" and "test_ndcg_at_10" in run.data.metrics
    # each final run retrains exactly the selected trial's configuration
    trial_params = {
        (r.data.tags["harness.model"], r.data.tags["harness.trial"]): r.data.params for r in by_kind["trial"]
    }
    for run in finals:
        selected = trial_params[(run.data.tags["harness.model"], run.data.tags["harness.trial"])]
        for key in ("model.hidden_size", "lr"):
            assert run.data.params[key] == selected[key]


def test_the_study_leaves_the_mlflow_ui_a_view_of_its_final_runs(tiny_study):
    from mlflow.tracking import MlflowClient

    from harness.store.contract import UI_VIEW_ID, UI_VIEW_TAG_PREFIX

    client = MlflowClient(f"sqlite:///{tiny_study['dir'] / 'results' / 'mlflow.db'}")
    view = json.loads(client.get_experiment_by_name("tiny").tags[UI_VIEW_TAG_PREFIX + UI_VIEW_ID])
    state = json.loads(view["state"])
    assert state["searchFilter"] == "tags.`harness.kind` = 'final'"
    assert state["selectedColumns"][:2] == ["metrics.`selected_objective_0`", "metrics.`test_ndcg_at_10`"]


def test_objective_never_reads_test_metrics(tiny_study):
    calls = tiny_study["calls"]
    trial_fits = [c for c in calls if c[0] == "fit" and c[1] == "trial"]
    final_fits = [c for c in calls if c[0] == "fit" and c[1] == "final"]
    assert trial_fits and all(c[2] is False for c in trial_fits)
    assert final_fits and all(c[2] is True for c in final_fits)
    assert not [c for c in calls if c == ("evaluate", "trial", "test")]
    assert ("evaluate", "final", "test") in calls
    # the selection is the best validation value of each group
    trials = journal_trials(tiny_study["dir"], "tiny")
    finals = [r for r in mlflow_runs(tiny_study["dir"], "tiny") if r.data.tags.get("harness.kind") == "final"]
    for run in finals:
        found = trials[run.data.tags["harness.optuna_study"]]
        group = [t for t in found if t.user_attrs["harness.select"] == run.data.tags["harness.select"]]
        best = max(group, key=lambda t: (t.values[0], -t.number))
        assert run.data.tags["harness.trial"] == str(best.number)


def test_rerun_of_finished_study_redoes_nothing(tiny_study, monkeypatch):
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tiny_study["dir"] / "results"))
    before = {r.info.run_id for r in mlflow_runs(tiny_study["dir"], "tiny")}
    assert run_cli("run", str(tiny_study["path"]), "--no-live") == 0
    assert {r.info.run_id for r in mlflow_runs(tiny_study["dir"], "tiny")} == before


def test_trial_failures_are_recorded_and_do_not_stop_the_study(tmp_path, monkeypatch):
    import optuna
    import torch

    from harness.config import ConfigError
    from harness.train import Trainer

    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    original_fit = Trainer.fit
    failures = {
        8: FloatingPointError("training loss became nan at epoch 1"),
        12: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        16: ConfigError("hidden states of shape [4, 10, 12] cannot be split into 5 heads"),
    }

    def fit(self, *args, **kwargs):
        if self.extra_tags.get("harness.kind") == "trial":
            size = self.config.model_params["hidden_size"]
            if size in failures:
                raise failures[size]
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.params.get("hidden_size") == 24)
    path = write_study(
        tmp_path,
        name="failing",
        space={"hidden_size": [8, 12, 16, 20, 24]},
        models={"sasrec": {"params": {"n_heads": 4}}},
        pruner="median",
    )
    assert run_cli("run", str(path), "--no-live") == 0
    (found,) = journal_trials(tmp_path, "failing").values()
    by_size = {t.params["hidden_size"]: t for t in found}
    assert {s: t.state.name for s, t in by_size.items()} == {
        8: "FAIL",
        12: "FAIL",
        16: "FAIL",
        20: "COMPLETE",
        24: "PRUNED",
    }
    kinds = {s: by_size[s].user_attrs.get("harness.failure_kind") for s in (8, 12, 16, 24)}
    assert kinds == {8: "nan", 12: "oom", 16: "config", 24: "pruned"}
    assert "nan at epoch 1" in by_size[8].user_attrs["harness.failure"]
    runs = mlflow_runs(tmp_path, "failing")
    trial_runs = {r.data.tags["harness.trial"]: r for r in runs if r.data.tags.get("harness.kind") == "trial"}
    assert len(trial_runs) == 5
    for size, trial in by_size.items():
        run = trial_runs[str(trial.number)]
        if size in failures:
            assert run.info.status == "FAILED" and run.data.tags["harness.state"] == "failed"
            assert run.data.tags["harness.failure_kind"] == kinds[size]
            assert type(failures[size]).__name__ in run.data.tags["failure"]
        elif size == 24:
            assert run.info.status == "KILLED" and run.data.tags["harness.state"] == "pruned"
    finals = [r for r in runs if r.data.tags.get("harness.kind") == "final"]
    assert [r.data.tags["harness.select"] for r in finals] == ["hidden_size=20"]


def test_final_only_study_and_trial_reuse(tmp_path, monkeypatch):
    """n_trials 0: every configuration is final (paper reproduction). With reuse_trial, the
    final seed equal to the trial's seed reuses the trial's training."""
    from harness.train import Trainer

    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    fits = []
    original_fit = Trainer.fit

    def fit(self, *args, **kwargs):
        fits.append(
            (
                self.extra_tags.get("harness.kind"),
                self.config.seed,
                self.checkpoint_path and self.checkpoint_path.exists(),
            )
        )
        return original_fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", fit)
    path = write_study(
        tmp_path, name="fixed", n_trials=0, space={"hidden_size": [8, 16]}, sampler=None, final={"seeds": [2020, 7]}
    )
    assert run_cli("run", str(path), "--no-live") == 0
    finals = [r for r in mlflow_runs(tmp_path, "fixed") if r.data.tags.get("harness.kind") == "final"]
    assert sorted((r.data.tags["harness.select"], r.data.tags["harness.seed"]) for r in finals) == [
        ("hidden_size=16", "2020"),
        ("hidden_size=16", "7"),
        ("hidden_size=8", "2020"),
        ("hidden_size=8", "7"),
    ]
    assert all(r.data.tags["harness.trial"] == "none" for r in finals)

    fits.clear()
    path = write_study(tmp_path, name="reuse", final={"seeds": 2, "reuse_trial": True})
    assert run_cli("run", str(path), "--no-live") == 0
    runs = mlflow_runs(tmp_path, "reuse")
    finals = [r for r in runs if r.data.tags.get("harness.kind") == "final"]
    assert len(finals) == 4
    reused = [r for r in finals if "harness.reused_trial" in r.data.tags]
    assert sorted(r.data.tags["harness.seed"] for r in reused) == ["2020", "2020"]
    assert all("test_ndcg_at_10" in r.data.metrics for r in finals)
    # the reused finals started from a finished checkpoint: no epoch was trained for them
    assert [f for f in fits if f[0] == "final" and f[1] == 2020] == [("final", 2020, True)] * 2
    assert not list((tmp_path / "results" / "studies" / "reuse" / "checkpoints").rglob("*.pt"))


def test_killed_final_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    from harness.train import Trainer

    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    train = {**TINY_TRAIN, "epochs": 2, "patience": 5}
    path = write_study(tmp_path, name="resume", n_trials=0, space={"hidden_size": [8]}, sampler=None, train=train)
    original = Trainer.train_epoch

    def interrupted(self, epoch, progress=None):
        if self.extra_tags.get("harness.kind") == "final" and epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch, progress)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    assert run_cli("run", str(path), "--no-live") == 130
    (killed,) = [r for r in mlflow_runs(tmp_path, "resume") if r.data.tags.get("harness.kind") == "final"]
    assert killed.info.status == "KILLED"
    assert list((tmp_path / "results" / "studies" / "resume" / "checkpoints" / "final").glob("*.pt"))
    capsys.readouterr()
    assert run_cli("run", str(path), "--dry-run") == 0  # the progress so far, read-only
    out = capsys.readouterr().out
    assert re.search(
        r"sasrec-ml-latest-small-hidden_size=8-s2020 +│ +killed \(checkpoint after epoch 1\) +│ "
        r"+ndcg@10 \d\.\d{4} \(epoch 1 of 1\) │ +- │",
        out,
    ), out
    assert "not started: 0 final run(s)" in out
    # one epoch left at most (epochs: 2), no finished run to learn a typical length from
    assert re.search(
        r"time left, estimated from this study's latest epochs: about \d+\.\d run-hours for 1 "
        r"unfinished run\(s\) \(1 counted at the minimum",
        out,
    ), out
    # a RUNNING run is "running now" while a process holds its claim, "interrupted" once none does
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}").update_run(killed.info.run_id, "RUNNING")
    final_dir = tmp_path / "results" / "studies" / "resume" / "checkpoints" / "final"
    for held, status in ((True, "running now"), (False, "interrupted")):
        with fin.claim(final_dir, killed.data.tags[fin.FINAL_KEY]) if held else nullcontext():
            assert run_cli("run", str(path), "--dry-run") == 0
        assert re.search(rf"hidden_size=8-s2020 +│ +{status} \(checkpoint after epoch 1\) +│", capsys.readouterr().out)

    epochs, statuses = [], []

    def resumed_epoch(self, epoch, progress=None):
        epochs.append(epoch)
        statuses.append(self.tracker.client.get_run(killed.info.run_id).info.status)
        return original(self, epoch, progress)

    monkeypatch.setattr(Trainer, "train_epoch", resumed_epoch)
    assert run_cli("run", str(path), "--no-live") == 0
    assert epochs == [2]  # resumed after the checkpointed epoch 1
    assert statuses == ["RUNNING"]  # no longer KILLED while it trains again
    (final,) = [r for r in mlflow_runs(tmp_path, "resume") if r.data.tags.get("harness.kind") == "final"]
    assert final.info.run_id == killed.info.run_id and final.info.status == "FINISHED"
    assert "test_ndcg_at_10" in final.data.metrics
    assert final.data.tags["resumed"].startswith("epoch 2 at ")  # the code the rest ran under
    assert "failure" in killed.data.tags and "failure" not in final.data.tags  # finished: nothing ended it
    assert run_cli("run", str(path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert re.search(r"hidden_size=8-s2020 +│ +finished +│ +ndcg@10 \d\.\d{4} \(epoch [12] of 2\) │ +\d\.\d{4} │", out)
    assert "time left: none (every final run has finished)" in out


def test_time_left_estimate_from_the_study_own_epochs():
    from harness.studies.estimate import RunState, describe, estimate_time_left

    def run(configuration, epochs=0, best=0, finished=False, seconds=0.0, patience=10, max_epochs=300, at=0.0):
        return RunState(configuration, patience, max_epochs, epochs, best, finished, [seconds] * epochs, at)

    runs = [
        run("A", 30, 20, True, 10.0, at=1.0),
        run("A", 40, 30, True, 10.0, at=2.0),  # typical length 35
        run("A", 20, 18, seconds=12.0, at=3.0),  # 15 more to the typical 35 (more than early stopping's 8)
        run("A"),  # 35 epochs
        run("B", 5, 5, seconds=4.0, patience=3),  # no finished B: its minimum, 3 epochs
        run("B", patience=3, max_epochs=2),  # minimum 1 + 3 epochs, capped at the 2 allowed
        run("C"),  # never measured: not counted
    ]
    estimate = estimate_time_left(runs)
    # A's epoch time is that of its latest run (12 s), not the median of all its epochs (10 s)
    assert estimate.seconds == pytest.approx(15 * 12 + 35 * 12 + 3 * 4 + 2 * 4)
    assert (estimate.counted, estimate.at_minimum, estimate.unmeasured) == (4, 2, ["C"])
    line = describe(estimate, workers=2)
    assert "about 0.2 run-hours for 4 unfinished run(s), at best 0.1 hours with 2 workers" in line
    assert "(2 counted at the minimum" in line and "no estimate for C (no epoch measured yet)" in line


def test_time_left_follows_the_latest_epochs_of_a_resumed_run():
    """A run resumed under faster code: only its last epochs set the pace of what is left."""
    from harness.studies.estimate import RECENT_EPOCHS, RunState, estimate_time_left

    slow_then_fast = [30.0] * 40 + [12.0] * RECENT_EPOCHS
    resumed = RunState("A", 20, 300, len(slow_then_fast), 35, False, slow_then_fast, 5.0)
    older = RunState("A", 20, 300, 60, 40, True, [30.0] * 60, 1.0)
    estimate = estimate_time_left([older, resumed])
    assert estimate.seconds == pytest.approx((60 - 50) * 12.0)  # to the finished run's 60 epochs
    # a run just started: its 2 epochs and the 8 last of the run before set the pace, not its 2 alone
    started = RunState("A", 20, 300, 2, 2, False, [100.0, 100.0], 9.0)
    pace = estimate_time_left([older, started]).seconds / (60 - 2)
    assert pace == pytest.approx(30.0)  # median of [30.0] * 8 + [100.0] * 2


def test_epoch_times_count_an_epoch_trained_again_once():
    """An epoch logged twice (killed after its metrics, trained again on resume): its last record counts."""
    import types

    from harness.store import contract as tc
    from harness.studies.plan import _epochs

    def metric(step, value, timestamp):
        return types.SimpleNamespace(step=step, value=value, timestamp=timestamp)

    history = {
        tc.TRAIN_SECONDS: [metric(1, 10.0, 100), metric(2, 50.0, 200), metric(2, 12.0, 300), metric(3, 11.0, 400)],
        tc.VALID_SECONDS: [metric(1, 1.0, 101), metric(2, 1.0, 201), metric(2, 2.0, 301), metric(3, 1.0, 401)],
    }
    client = types.SimpleNamespace(get_metric_history=lambda run_id, key: history.get(key, []))
    run = types.SimpleNamespace(info=types.SimpleNamespace(run_id="r"), data=types.SimpleNamespace(params={}))
    _, seconds, logged_at = _epochs(client, run)
    assert seconds == [11.0, 14.0, 12.0] and logged_at == 401


def test_storage_urls():
    from harness.studies.storage import StudyStorage

    assert StudyStorage("/tmp/x.journal").kind == "journal"
    assert StudyStorage("journal:///tmp/x.log").path == Path("/tmp/x.log")
    pg = StudyStorage("postgresql+psycopg2://u:secret@h:5432/db")
    assert (pg.kind, pg.dialect, pg.multi_machine) == ("rdb", "postgresql", True)
    assert "secret" not in pg.describe()
    assert StudyStorage("sqlite:///tmp/o.db").dialect == "sqlite"
    with pytest.raises(StudySpecError, match="unsupported URL scheme"):
        StudyStorage("redis://localhost/0")


# ---------------------------------------------------------------------------- MLflow UI
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_with(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline and "mlflow" in cmdline:
                found.append(int(entry.name))
    return found


def test_ui_serves_the_study_runs_and_stops_cleanly(tiny_study):
    port = _free_port()
    env = {**os.environ, "HARNESS_RESULTS_DIR": str(tiny_study["dir"] / "results")}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{tiny_study['dir'] / 'results' / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "ui", "--port", str(port), "--tracking-uri", uri],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.time() + 120
        experiment = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=tiny", timeout=5) as r:
                    experiment = json.load(r)["experiment"]["experiment_id"]
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.5)
        assert experiment is not None, "MLflow UI did not come up"
        request = urllib.request.Request(
            f"{base}/runs/search",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps(
                {"experiment_ids": [experiment], "max_results": 1000, "filter": "tags.`harness.kind` = 'final'"}
            ).encode(),
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.load(response)["runs"]
        expected = [r for r in mlflow_runs(tiny_study["dir"], "tiny") if r.data.tags.get("harness.kind") == "final"]
        assert len(runs) == len(expected) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0
    log = proc.stdout.read().decode()
    assert "Traceback" not in log and log.rstrip().endswith("MLflow UI stopped"), log
    # the link it prints opens the model-training side on the study's saved view (docs/ui.md)
    link = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert f"  tiny  {link}&viewStateShareKey=harness-tested\n" in log, log
    time.sleep(0.5)
    assert _processes_with(f"--port {port}") == []
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_dashboard_without_optuna_dashboard_explains_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    assert run_cli("dashboard", str(write_study(tmp_path))) == 2
    assert "pip install optuna-dashboard" in capsys.readouterr().err


def test_per_model_seeds_and_seed_major_order(tmp_path):
    """A model's own `seeds` replaces final.seeds for it; final jobs run seed-major (every
    configuration's first seed before any second seed), so a stopped study compares every model."""
    from harness.config import TrainConfig

    models = {
        "sasrec": {"params": {"n_heads": 1}},
        "tisasrec": {"seeds": [7], "params": {"n_heads": 1}},
        "mamba4rec": {"seeds": 2},
    }
    path = write_study(tmp_path, models=models, final={"seeds": 3, "base_seed": 100})
    study = load_study(path)
    assert {c.name: c.seeds for c in study.cells} == {
        "sasrec": [100, 101, 102],
        "tisasrec": [7],
        "mamba4rec": [100, 101],
    }

    class Item:  # the part of a selected configuration jobs_for reads
        def __init__(self, cell):
            self.cell, self.config = cell, TrainConfig(model=cell.model, dataset="ml-latest-small")
            self.select, self.trial, self.values, self.pareto = "all", None, [], False

    jobs = fin.jobs_for(None, [Item(c) for c in study.cells])
    assert [(j.selected.cell.name, j.seed) for j in jobs] == [
        ("sasrec", 100),
        ("tisasrec", 7),
        ("mamba4rec", 100),
        ("sasrec", 101),
        ("mamba4rec", 101),
        ("sasrec", 102),
    ]
    # several studies queued together: round by round across them, each job numbered in its own study
    other = load_study(write_study(tmp_path, name="other", final={"seeds": 2, "base_seed": 1}))
    other_jobs = fin.jobs_for(None, [Item(c) for c in other.cells])
    queued = fin.queue([("first", jobs), ("second", other_jobs)])
    assert [(q.ctx, q.job.selected.cell.name, q.job.seed, f"{q.number}/{q.of}") for q in queued] == [
        ("first", "sasrec", 100, "1/6"),
        ("first", "tisasrec", 7, "2/6"),
        ("first", "mamba4rec", 100, "3/6"),
        ("second", "sasrec", 1, "1/2"),
        ("first", "sasrec", 101, "4/6"),
        ("first", "mamba4rec", 101, "5/6"),
        ("second", "sasrec", 2, "2/2"),
        ("first", "sasrec", 102, "6/6"),
    ]
    with pytest.raises(StudySpecError, match="distinct"):
        load_study(write_study(tmp_path, name="bad", models={"sasrec": {"seeds": [1, 1]}}))


def test_a_queue_of_studies_runs_round_by_round(tmp_path, monkeypatch, capsys):
    """`run A B` with one worker: A's first seed, then B's, then A's second: a queue stopped part-way
    has a result of every study's every configuration before a second seed of any."""
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    first = write_study(
        tmp_path, name="first", n_trials=0, space={"hidden_size": [8]}, sampler=None, final={"seeds": [1, 2]}
    )
    second = write_study(
        tmp_path, name="second", n_trials=0, space={"hidden_size": [8]}, sampler=None, final={"seeds": [1]}
    )
    assert run_cli("run", str(first), str(second), "--workers", "1", "--no-live") == 0
    started = re.findall(r"^(final \d+/\d+): \S+-(s\d+)$", capsys.readouterr().out, re.M)
    assert [" ".join(parts) for parts in started] == [
        "final 1/2 s1",
        "final 1/1 s1",
        "final 2/2 s2",
    ], started
    assert [
        r.info.status
        for r in mlflow_runs(tmp_path, "first") + mlflow_runs(tmp_path, "second")
        if r.data.tags.get("harness.kind") == "final"
    ] == ["FINISHED"] * 3


def test_final_runs_are_claimed_so_workers_never_run_one_twice(tmp_path, monkeypatch, capsys):
    """A final run held by another process is skipped (no second training of it, no KILLED mark on
    its run); the claim is an OS lock, free again the moment its holder lets go or dies."""
    monkeypatch.setenv("HARNESS_RESULTS_DIR", str(tmp_path / "results"))
    final_dir = tmp_path / "c"
    with fin.claim(final_dir, "k") as mine:
        assert mine and fin.held_elsewhere(final_dir, "k")
        with fin.claim(final_dir, "k") as other:  # a second claimant, same process or not
            assert not other
    assert not fin.held_elsewhere(final_dir, "k")
    assert not fin.held_elsewhere(final_dir, "never-claimed") and not (final_dir / "never-claimed.lock").exists()

    path = write_study(tmp_path, name="claims", n_trials=0, space={"hidden_size": [8, 16]}, sampler=None)
    study = load_study(path)
    from harness.studies.context import StudyContext

    ctx = StudyContext(study, None, None, worker_index=0)
    jobs = fin.jobs_for(ctx, fin.select(ctx)[0])
    held = jobs[0]
    with fin.claim(ctx.final_checkpoints, held.key):  # "another worker" runs the first job
        assert run_cli("run", str(path), "--no-live") == 1  # incomplete: the held run is not done
    finals = [r for r in mlflow_runs(tmp_path, "claims") if r.data.tags.get("harness.kind") == "final"]
    assert [r.data.tags[fin.FINAL_KEY] for r in finals] == [jobs[1].key]
    assert "final 2/2" in capsys.readouterr().out

    # the other worker's MLflow run, in its first epoch (RUNNING, no checkpoint yet): left alone
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    other = client.create_run(
        client.get_experiment_by_name("claims").experiment_id,
        tags={"harness.kind": "final", "harness.study": "claims", fin.FINAL_KEY: held.key},
    ).info.run_id
    with fin.claim(ctx.final_checkpoints, held.key):
        assert run_cli("run", str(path), "--no-live") == 1
    assert client.get_run(other).info.status == "RUNNING"
    # its holder gone: the run is dead, marked so, and the job runs again
    assert run_cli("run", str(path), "--no-live") == 0
    assert client.get_run(other).info.status == "KILLED"
    finals = [
        r
        for r in mlflow_runs(tmp_path, "claims")
        if r.data.tags.get("harness.kind") == "final" and r.info.run_id != other
    ]
    assert sorted(r.data.tags[fin.FINAL_KEY] for r in finals) == sorted(j.key for j in jobs)
    assert all(r.info.status == "FINISHED" for r in finals)
