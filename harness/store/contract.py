"""The tracking contract: every name the harness writes to a tracking store and reads back.

Writers (train, studies, bench) and readers (report, export/import, a study's progress view) use
these constants, so that a name has one spelling and a reader never looks for something no writer
writes. A `harness.*` name spelled anywhere else fails tests/test_layers.py. (harness/train.py still
spells its plain tags and per-epoch metric names in place.) The values are on disk in every
committed store (reports/*/store/): changing one breaks reading them, so names are added, never
renamed.

Optuna user attributes that studies write carry the same `harness.*` vocabulary and are listed here
too (some, such as `harness.select`, are both a trial's user attribute and its MLflow run's tag).
"""

from __future__ import annotations

import re
from typing import Any

# ------------------------------------------------------------------ run kinds (tag KIND)
KIND = "harness.kind"
KIND_TRAIN = "train"  # `harness train`
KIND_TRIAL = "trial"  # one Optuna trial of a study (validation only)
KIND_FINAL = "final"  # one seed of a selected configuration (tested once)
KIND_STUDY = "study"  # a study's parent run
KIND_BENCH = "bench"  # one `harness bench` cell

# ------------------------------------------------------------------ `harness.*` run tags
STUDY = "harness.study"  # the study file's name (also the MLflow experiment)
OPTUNA_STUDY = "harness.optuna_study"  # the Optuna study of one dataset x model cell
DATASET = "harness.dataset"  # the cell's dataset
# the name a run's model goes by: a study cell's name (the registry model, or its alias in the study
# file); a `harness train` run's registry model, or `<model>-<variant>` for options that make it another
# model (models.ModelConfig.variant: tim4rec-causal)
MODEL = "harness.model"
TRIAL = "harness.trial"  # Optuna trial number ("none" for a final run without search)
#: the checkpoint file (its run key) a tracked `harness train` run resumes from: how a fresh start
#: finds the runs of the same training that were left RUNNING and ends them
CHECKPOINT_TAG = "harness.checkpoint"
SELECT = "harness.select"  # the selection group a trial or final run belongs to (select_per)
SEED = "harness.seed"
STATE = "harness.state"  # a trial's or study's end: STATE_COMPLETE | STATE_PRUNED | STATE_FAILED
STATE_COMPLETE = "complete"
STATE_PRUNED = "pruned"
STATE_FAILED = "failed"
FAILURE_KIND = "harness.failure_kind"  # oom | config | error | interrupted | pruned
MEMORY_SOURCE = "harness.memory_source"  # how a trial's peak memory was measured
RETRY_OF = "harness.retry_of"  # the dead trial a retry reruns
PARETO = "harness.pareto"  # "true" when a final run's configuration is on the Pareto front
REUSED_TRIAL = "harness.reused_trial"  # the trial whose checkpoint a final run continued
# a final run's configuration and seed: what makes two final runs the same run (studies write it,
# import matches on it)
FINAL_KEY = "harness.final_key"
# the run id a run was first recorded under, kept through any number of export/import copies
SOURCE_RUN_ID = "harness.source_run_id"
# the process training a run (harness.store.liveness): its machine (hostname#boot id), pid and the
# pid's start time, so that a run left RUNNING by a killed process is told from one still training
OWNER_HOST = "harness.owner_host"
OWNER_PID = "harness.owner_pid"
OWNER_PID_START = "harness.owner_pid_start"
OWNER_TAGS = (OWNER_HOST, OWNER_PID, OWNER_PID_START)
# a study's parent run on a tracking server: the storage its trials and claims are in, so that a
# worker with another storage (a journal file on another host) stops instead of running it twice
STORAGE_TAG = "harness.storage"

# ------------------------------------------------------------------ `harness.*` Optuna user attributes
FAILURE = "harness.failure"  # why a trial failed (its MLflow run has it as FAILURE_TAG)
MLFLOW_RUN_ID = "harness.mlflow_run_id"  # a trial's MLflow run
MEASURED = "harness.measured"  # a trial's measurements (objectives and more)
DERIVED = "harness.derived"  # settings a trial's sampled ones implied
READY = "harness.ready"  # an Optuna study fully set up (user attributes written, grid enqueued)
FINGERPRINT = "harness.fingerprint"  # the study-file cell an Optuna study was made from
REGISTRY_MODEL = "harness.registry_model"
DIRECTIONS = "harness.directions"
OBJECTIVES = "harness.objectives"
# where a study's runs are recorded (its cells' Optuna studies carry it): a worker sharing the
# storage but writing elsewhere would train runs that the others never see
TRACKING = "harness.tracking_uri"
CLAIM_HOLDER = "harness.holder"  # a final-run claim's holder: host, pid and run name
# spellings older stores or other tools may have used for a study's objectives; read, never written
LEGACY_DIRECTION = "harness.direction"
LEGACY_OBJECTIVE = "harness.objective"

# ------------------------------------------------------------------ plain tags readers rely on
RUN_NAME = "mlflow.runName"
#: an experiment's kind in the MLflow UI: without it, MLflow 3.x UIs before the GenAI/model-training
#: switch open an experiment on their GenAI views ("Traces", an assistant panel); model training opens
#: it on the runs table. From 3.17 the switch decides instead (harness/store/ui_view.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
#: a saved view of an experiment's runs page in the MLflow UI: the experiment tag <prefix><view id>
#: holds {"name", "createdAt", "updatedAt", "state"} and a link's viewStateShareKey=<view id> opens it
UI_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
UI_VIEW_ID = "harness-tested"  # the harness's view: an experiment's tested runs (harness/store/ui_view.py)
PARENT_RUN_ID = "mlflow.parentRunId"
MODEL_TAG = "model"  # the registry model name
DATASET_TAG = "dataset"  # the dataset name
PROTOCOL_ID = "protocol_id"  # hash of the comparability protocol: runs are compared only within one
PROTOCOL_PREFIX = "protocol."  # protocol.<key>: the protocol itself, one tag per key
FAILURE_TAG = "failure"  # why a run ended FAILED or KILLED
#: the failure of a run someone stopped: Ctrl-C and SIGTERM both arrive as KeyboardInterrupt
STOPPED = "stopped by Ctrl-C or SIGTERM"
GIT_COMMIT = "git_commit"
KERNEL_BACKEND = "kernel_backend"  # the backends that ran, comma-separated
DEVICE_NAME = "device_name"
BENCH_MEMORY_SOURCE = "memory_source"  # a bench cell's memory measurement (see harness.bench)

# ------------------------------------------------------------------ metrics
# Ranking metrics are named by harness.metrics.metric_key: `<split>_<metric>_at_<k>`, e.g. test_ndcg_at_10.
#: Hit/NDCG/MRR at k, of any split, and their best-epoch copies
RANKING_METRIC = re.compile(r"^(best_)?(\w+_)?(hit|ndcg|mrr)_at_\d+$")
BEST_PREFIX = "best_"  # best_<valid metric>: its value at the best validation epoch
BEST_EPOCH = "best_epoch"
EPOCHS_RUN = "epochs_run"
SECONDS_PER_EPOCH = "seconds_per_epoch"  # median over epochs, the first excluded when there are more
TRAIN_LOSS = "train_loss"  # per epoch (step = epoch), as are the two below
TRAIN_SECONDS = "train_seconds"
VALID_SECONDS = "valid_seconds"
TRAIN_THROUGHPUT = "train_throughput"  # a trial's training samples per second
PEAK_MEMORY_MB = "peak_memory_mb"  # a trial's (or bench cell's) peak memory
TRAIN_SAMPLES_PER_EPOCH = "train_samples_per_epoch"
OBJECTIVE_METRIC = re.compile(r"objective_(\d+)")  # a trial's objective values, in the study's order


def objective_key(index: int) -> str:
    return f"objective_{index}"


def selected_objective_key(index: int) -> str:
    """A final run's copy of the objective value its configuration was selected with."""
    return f"selected_objective_{index}"


#: metrics of a bench cell (one MLflow run each)
BENCH_METRICS = (
    "train_seqs_per_s",
    "train_positions_per_s",
    "train_tokens_per_s",
    "train_step_ms",
    "train_step_ms_q1",
    "train_step_ms_q3",
    "train_step_ms_min",
    "train_step_ms_max",
    "infer_users_per_s",
    "infer_latency_ms",
    "infer_latency_ms_q1",
    "infer_latency_ms_q3",
    "infer_latency_ms_min",
    "infer_latency_ms_max",
    "peak_memory_mb",
    "infer_peak_memory_mb",
    "n_parameters",
)

# ------------------------------------------------------------------ artifacts
PER_USER_ARTIFACT = "per_user/test_ranks.csv"  # columns user, user_token, target, rank (0-based)
CHECKPOINT_ARTIFACT = "checkpoint"  # an unfinished final run's checkpoint, on a tracking server

# ------------------------------------------------------------------ what identifies a configuration
# Settings that say where and how fast a run executes, not what it computes (they change results by
# float rounding only): never part of a run's identity (harness/config.py, `identity`) nor of what
# makes a report row another configuration (harness/report/results.py, `NOT_CONFIGURATION`).
EXECUTION_SETTINGS = frozenset({"device", "threads", "compile"})

# ------------------------------------------------------------------ settings added after runs were stored
# Training settings added after results were stored: at their default they stay out of run
# identities, so runs stored before the setting existed still match their configuration (and are
# not retrained), and their protocol tags read as the default.
ADDED_LATER = {"tie_order": "file"}


def without_late_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` less the ADDED_LATER ones at their default: what stored identities were made of."""
    return {k: v for k, v in settings.items() if k not in ADDED_LATER or v != ADDED_LATER[k]}


def with_late_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` read back from a store, the ADDED_LATER ones filled in where they were left out."""
    return {**ADDED_LATER, **settings}


def harness_names() -> frozenset[str]:
    """Every `harness.*` name above (tags and user attributes): what no other module may spell out."""
    return frozenset(v for k, v in globals().items() if k.isupper() and isinstance(v, str) and v.startswith("harness."))


def failure_text(err: BaseException) -> str:
    """A run's FAILURE_TAG: what ended it, in one line."""
    if isinstance(err, KeyboardInterrupt):
        return STOPPED
    return f"{type(err).__name__}: {err}"[:500]
