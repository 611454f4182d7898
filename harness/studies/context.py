"""A study as one process sees it: the validated spec, the Optuna storage and studies (one per
(dataset, model), named `<study>/<dataset>/<model>`), the MLflow experiment and parent run, and
a cache of loaded datasets."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.data.catalogue import folder_name
from harness.store import contract as tc
from harness.store.location import results_dir
from harness.store.writer import retrying
from harness.studies import accounting as acc
from harness.studies import shared
from harness.studies import space as sp
from harness.studies.resolved import Study, StudyCell
from harness.studies.schema import StudySpecError
from harness.studies.storage import StudyStorage, default_storage_url


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.getLogger("alembic").setLevel(logging.WARNING)


class RecordingTracker:
    """Delegates to a Tracker, remembers the run it started, retries SQLite 'database is locked'."""

    def __init__(self, inner, on_start: Callable[[str], None] | None = None):
        self._inner = inner
        self._on_start = on_start
        self.run_id: str | None = None

    def start_run(self, *args, **kwargs) -> str:
        run_id = retrying(self._inner.start_run, *args, **kwargs)
        self.run_id = run_id
        if self._on_start:
            self._on_start(run_id)
        return run_id

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if callable(attr):
            return lambda *a, **k: retrying(attr, *a, **k)
        return attr


def study_root(name: str) -> Path:
    """Where a study keeps its local state (checkpoints, logs, locks)."""
    return (results_dir() / "studies" / name).resolve()


def final_checkpoint_dir(name: str) -> Path:
    """The final runs' epoch checkpoints of study `name`, one file per run (its run_key)."""
    return study_root(name) / "checkpoints" / "final"


class StudyContext:
    def __init__(
        self,
        study: Study,
        storage_url: str | None = None,
        tracking_uri: str | None = None,
        worker_index: int | None = None,
    ):
        self.study = study
        self.spec = study.spec
        self.storage = StudyStorage(storage_url or self.spec.storage.url or default_storage_url(study.name))
        self.tracking_uri = tracking_uri or self.spec.tracking_uri
        self.worker_index = worker_index
        self.stale_after = self.spec.storage.stale_after
        self.root = study_root(study.name)
        self._tracker = None
        self._claims = None
        self._parent_run_id: str | None = None
        self._studies: dict[str, Any] = {}
        self._data: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ paths
    @property
    def final_checkpoints(self) -> Path:
        return final_checkpoint_dir(self.study.name)

    def trial_checkpoints(self, cell: StudyCell, number: int) -> Path:
        # a dataset given by path is a folder name, not a path: joined whole, an absolute one would
        # put the checkpoints beside the data file
        return self.root / "checkpoints" / "trials" / f"{folder_name(cell.dataset)}.{cell.name}" / f"t{number}"

    @property
    def claims(self):
        """How this study's final runs are claimed (harness/studies/claims.py)."""
        if self._claims is None:
            from harness.studies.claims import claims_for

            self._claims = claims_for(self)
        return self._claims

    @property
    def keep_trial_checkpoints(self) -> bool:
        return self.spec.final.reuse_trial

    # ------------------------------------------------------------------ Optuna
    def _sampler(self, cell: StudyCell):
        import optuna

        spec = self.spec.sampler
        seed = spec.seed if spec and spec.seed is not None else _stable_seed(cell.optuna_name)
        index = self.worker_index if self.worker_index is not None else os.getpid()
        seed = (seed + 1009 * index) % 2**31
        kind = self.study.sampler_type
        if kind in ("random", "grid"):  # grid points are enqueued, never sampled
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "tpe":
            kwargs = {"n_startup_trials": spec.n_startup_trials} if spec and spec.n_startup_trials is not None else {}
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True, **kwargs)
        kwargs = {"population_size": spec.population_size} if spec and spec.population_size else {}
        return optuna.samplers.NSGAIISampler(seed=seed, **kwargs)

    def _pruner(self, cell: StudyCell):
        import optuna

        spec = self.spec.pruner
        kind = self.study.pruner_type
        if kind == "median":
            return optuna.pruners.MedianPruner(
                n_startup_trials=spec.n_startup_trials if spec else 2,
                n_warmup_steps=spec.n_warmup_steps if spec else 0,
            )
        if kind == "hyperband":
            epochs = int(cell.train.get("epochs", 300))
            return optuna.pruners.HyperbandPruner(
                min_resource=spec.min_resource if spec else 1,
                max_resource=epochs,
                reduction_factor=spec.reduction_factor if spec else 3,
            )
        return optuna.pruners.NopPruner()

    def optuna_study(self, cell: StudyCell):
        import optuna

        if cell.optuna_name not in self._studies:
            self._studies[cell.optuna_name] = optuna.load_study(
                study_name=cell.optuna_name,
                storage=self.storage.open(),
                sampler=self._sampler(cell),
                pruner=self._pruner(cell),
            )
        return self._studies[cell.optuna_name]

    def setup(self) -> None:
        """Create (or load and check) every cell's Optuna study and enqueue missing grid points,
        under the storage lock: any number of processes may call this at once."""
        import optuna

        quiet_optuna()
        storage = self.storage.open()
        directions = self.study.directions()
        with self.storage.lock():
            for cell in self.study.cells:
                try:
                    optuna.create_study(storage=storage, study_name=cell.optuna_name, directions=directions)
                except optuna.exceptions.DuplicatedStudyError:
                    pass
                study = self.optuna_study(cell)
                attrs = study.user_attrs
                if self.storage.multi_machine:
                    shared.check_tracking(self, attrs.get(tc.TRACKING))
                if attrs.get(tc.READY):
                    if attrs.get(tc.FINGERPRINT) != cell.fingerprint():
                        raise StudySpecError(
                            f"{self.storage.describe()} holds study {cell.optuna_name!r} made from a "
                            "different definition (training settings, params, space, objectives or "
                            "select_per changed); use a new study name or --storage"
                        )
                else:
                    study.set_user_attr(tc.FINGERPRINT, cell.fingerprint())
                    study.set_user_attr(tc.STUDY, self.study.name)
                    study.set_user_attr(tc.DATASET, cell.dataset)
                    study.set_user_attr(tc.MODEL, cell.name)
                    study.set_user_attr(tc.REGISTRY_MODEL, cell.model)
                    study.set_user_attr(tc.DIRECTIONS, directions)
                    study.set_user_attr(tc.OBJECTIVES, [o.key for o in self.study.objectives])
                    if self.storage.multi_machine:
                        study.set_user_attr(tc.TRACKING, shared.tracking_place(self))
                if self.study.sampler_type == "grid" and cell.n_trials > 0:
                    self._enqueue_grid(cell, study)
                if not attrs.get(tc.READY):
                    study.set_user_attr(tc.READY, True)

    def _enqueue_grid(self, cell: StudyCell, study) -> None:
        points = sp.grid(cell.space)[: cell.n_trials]
        present = [acc.trial_params(t) for t in study.get_trials(deepcopy=False)]
        for point in points:
            if not any(_same_point(point, p) for p in present):
                study.enqueue_trial(point)

    # ------------------------------------------------------------------ MLflow
    @property
    def tracker(self):
        if self._tracker is None:
            from harness.store.writer import Tracker

            with self.storage.lock("mlflow"):  # a fresh SQLite store's schema is created once
                self._tracker = RecordingTracker(Tracker(self.tracking_uri, self.study.name))
        return self._tracker

    def write_ui_view(self) -> None:
        """The MLflow UI's saved view of the study's final runs (harness.store.ui_view), now that the
        experiment exists or has new finals. A convenience for browsing: it never stops a study."""
        from harness.store.ui_view import write_view

        try:
            retrying(write_view, self.tracker.client, self.tracker.experiment_id)
        except Exception as err:  # e.g. a tracking server that refuses experiment tags
            print(f"note: the MLflow UI's view of {self.study.name} was not written ({err})", flush=True)

    def find_parent_run(self) -> str | None:
        client = self.tracker.client
        runs = retrying(
            client.search_runs,
            [self.tracker.experiment_id],
            filter_string=f"tags.`{tc.KIND}` = '{tc.KIND_STUDY}' and tags.`{tc.STUDY}` = '{self.study.name}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    @property
    def parent_run_id(self) -> str:
        if self._parent_run_id is None:
            with self.storage.lock("parent-run"):
                run_id = self.find_parent_run()
                if run_id is None:
                    run_id = self._create_parent_run()
            self._parent_run_id = run_id
        return self._parent_run_id

    def _create_parent_run(self) -> str:
        spec = self.spec
        params = {
            "study": spec.name,
            "datasets": ",".join(spec.datasets),
            "models": ",".join(spec.models),
            "objectives": ",".join(o.label() for o in self.study.objectives),
            "sampler": self.study.sampler_type,
            "pruner": self.study.pruner_type,
            "n_trials": spec.n_trials,
            "timeout": spec.timeout,
            "select_per": ",".join(spec.select_per) or "-",
            "final_seeds": spec.final.seeds,
            "final_select": spec.final.select,
            "storage": self.storage.describe(),
        }
        tags = {
            tc.KIND: tc.KIND_STUDY,
            tc.STUDY: spec.name,
            "mlflow.note.content": spec.description or f"study {spec.name}",
            tc.STORAGE_TAG: shared.storage_place(self),
        }
        run_id = self.tracker.start_run(spec.name, params, tags)
        if self.study.path and self.study.path.is_file():
            self.tracker.log_text(run_id, self.study.path.read_text(), "study.yaml")
        return run_id

    # ------------------------------------------------------------------ data
    def data_for(self, config):
        from harness.data.catalogue import load_for
        from harness.data.preprocess import PreprocessSettings

        key = (config.dataset, config.data_format, tuple(config.data_columns or ()), PreprocessSettings.of(config))
        if key not in self._data:
            self._data[key] = load_for(config)
        return self._data[key]

    # ------------------------------------------------------------------ trial bookkeeping
    def trials(self, cell: StudyCell):
        return self.optuna_study(cell).get_trials(deepcopy=False)

    def reap(self, cell: StudyCell) -> int:
        """Fail dead workers' RUNNING trials of a cell and enqueue retries (takes the lock)."""
        with self.storage.lock():
            return acc.reap(self.optuna_study(cell), self.stale_after, self._mark_killed)

    def _mark_killed(self, trial, reason: str) -> None:
        run_id = trial.user_attrs.get(tc.MLFLOW_RUN_ID)
        if not run_id:
            return
        try:
            self.tracker.set_tags(run_id, {tc.STATE: tc.STATE_FAILED, tc.FAILURE_TAG: f"interrupted: {reason}"[:500]})
            self.tracker.end_run(run_id, "KILLED")
        except Exception:  # the tracking store is advisory here; the trial state is what counts
            pass

    def next_trial(self, cell: StudyCell):
        """The next trial of a cell this worker should run, or None when its budget is spent:
        under the lock, reap dead trials, then pop an enqueued trial (grid point or retry) or
        ask for a fresh one while n_trials/timeout allow."""
        from optuna.trial import TrialState

        if cell.n_trials <= 0:
            return None
        study = self.optuna_study(cell)
        with self.storage.lock():
            acc.reap(study, self.stale_after, self._mark_killed)
            trials = study.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials):
                return study.ask()
            if self.study.sampler_type == "grid":
                return None
            if len(acc.fresh(trials)) >= cell.n_trials:
                return None
            if self.spec.timeout and acc.seconds_used(trials) >= self.spec.timeout:
                return None
            return study.ask()

    def search_pending(self, cell: StudyCell) -> dict[str, int]:
        """Counts that decide whether a cell's search is over (after reaping)."""
        from optuna.trial import TrialState

        self.reap(cell)
        trials = self.trials(cell)
        states = [t.state for t in trials]
        return {
            "running": states.count(TrialState.RUNNING),
            "waiting": states.count(TrialState.WAITING),
        }


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 2**31


def _same_point(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k] == b[k] for k in a)
