"""Hyper-parameter studies as recorded in MLflow: one experiment per study, a parent run
(harness.kind=study), trial runs (harness.kind=trial, harness.trial=N, metrics objective_0, objective_1,
..., the trial's settings as params) and final seed runs.

Trial runs are grouped by their `harness.optuna_study` tag (one Optuna study per dataset x model
cell of a study file); the searched parameters are the trial runs' `optuna.*` params (what the sampler
chose) that vary, or, for runs without them, any varying param. Everything is rebuilt from the tracking
store: the optimisation history from the trial runs'
objective_0, the Pareto front from objective_0/objective_1, and parameter importances from an Optuna
study rebuilt in memory with `optuna.trial.create_trial` (no Optuna storage is read).

Importance method: fANOVA (`optuna.importance.FanovaImportanceEvaluator(seed=0)`, a random-forest
functional ANOVA; needs scikit-learn). Without scikit-learn, or if fANOVA fails, the share of the
objective's variance explained by each parameter on its own (eta squared: between-group sum of squares
over total sum of squares, numeric parameters with more than 5 values binned into 5 quantile bins),
normalised to sum to 1. The method used is printed with the figure.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.store import contract as tc
from harness.store.reader import Run

#: parameters that are bookkeeping or derived, never searched
NOT_SEARCHED = frozenset({"seed", "device", "threads", "n_parameters", "eval_batch_size", "dataset", "model"})
_DIRECTION_KEYS = ("directions", "study.directions", tc.DIRECTIONS, "direction", "study.direction", tc.LEGACY_DIRECTION)
_OBJECTIVE_KEYS = (
    "objectives",
    "study.objectives",
    tc.OBJECTIVES,
    "objective",
    "study.objective",
    tc.LEGACY_OBJECTIVE,
    "metrics",
    "study.metrics",
    "metric",
    "study.metric",
)
_MINIMISED = ("second", "time", "latency", "memory", "loss", "param", "_mb", "bytes", "cost")


@dataclasses.dataclass
class StoredStudy:
    name: str
    trials: pd.DataFrame  # number, run_id, objective_0.. and the searched params (strings)
    n_objectives: int
    directions: list[str]
    directions_source: str  # "recorded" or "assumed"
    objective_names: list[str]
    params: list[str]  # searched parameters that vary between trials (columns of `trials`)
    left_out: int  # trial runs without objectives or not finished (failed, pruned)


def _parse_list(text: str) -> list[str]:
    text = text.strip()
    try:  # a JSON list ('["valid_ndcg@10", "seconds_per_epoch"]') or string
        value = json.loads(text)
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str):
            return [value]
    except (ValueError, TypeError):
        pass
    return [p.strip().strip("'\"") for p in text.strip("[]()").split(",") if p.strip()]


def _lookup(run: Run | None, keys: Sequence[str]) -> str | None:
    if run is None:
        return None
    for key in keys:
        for source in (run.tags, run.params):
            if source.get(key):
                return source[key]
    return None


def _direction(word: str) -> str | None:
    word = word.lower()
    if word.startswith("maximi"):
        return "maximize"
    if word.startswith("minimi"):
        return "minimize"
    return None


def objectives_of(parent: Run | None, n_objectives: int) -> tuple[list[str], list[str], str]:
    """(names, directions, 'recorded' | 'assumed') from the parent run: its `objectives` param as
    the studies runner writes it ('maximize valid_ndcg_at_10,minimize peak_memory_mb'), or separate
    `objectives` / `directions` entries; directions are guessed from the names when not recorded."""
    names, directions = [], []
    for item in _parse_list(_lookup(parent, _OBJECTIVE_KEYS) or ""):
        words = item.split()
        if len(words) >= 2 and _direction(words[0]):
            directions.append(_direction(words[0]))
            names.append(" ".join(words[1:]))
        elif words:
            names.append(" ".join(words))
    if len(names) != n_objectives:
        names = [tc.objective_key(i) for i in range(n_objectives)]
    if len(directions) != n_objectives:
        recorded = [
            _direction(w) for w in re.findall(r"(?i)maximi[sz]e|minimi[sz]e", _lookup(parent, _DIRECTION_KEYS) or "")
        ]
        directions = recorded
    if len(directions) == n_objectives:
        return names, directions, "recorded"
    guessed = ["minimize" if any(w in n.lower() for w in _MINIMISED) else "maximize" for n in names]
    return names, guessed, "assumed"


def studies_from_runs(experiment: str, runs: Sequence[Run]) -> list[StoredStudy]:
    """The Optuna studies recorded in one experiment: trial runs grouped by their
    `harness.optuna_study` tag (one per dataset x model cell of a study file), or one study named
    after the experiment when the tag is absent."""
    trials = [r for r in runs if r.kind == tc.KIND_TRIAL]
    parent = next((r for r in sorted(runs, key=lambda r: (r.start_time, r.run_id)) if r.kind == tc.KIND_STUDY), None)
    by_study: dict[str, list[Run]] = {}
    for run in trials:
        by_study.setdefault(run.tags.get(tc.OPTUNA_STUDY) or experiment, []).append(run)
    out = []
    for name in sorted(by_study):
        study = _study(name, by_study[name], parent)
        if study is not None:
            out.append(study)
    return out


def _study(name: str, trials: Sequence[Run], parent: Run | None) -> StoredStudy | None:
    usable = [r for r in trials if r.status == "FINISHED" and 0 in r.objectives()]
    if not usable:
        return None
    n_obj = max(len(r.objectives()) for r in usable)
    usable = [r for r in usable if len(r.objectives()) == n_obj]
    names, directions, source = objectives_of(parent, n_obj)

    def number(run: Run, fallback: int) -> int:
        value = run.tags.get(tc.TRIAL) or run.params.get("trial") or run.params.get(tc.TRIAL)
        try:
            return int(float(value))
        except (TypeError, ValueError):
            return fallback

    ordered = sorted(usable, key=lambda r: (r.start_time, r.run_id))
    records = []
    for i, run in enumerate(ordered):
        record = {"number": number(run, i), "run_id": run.run_id}
        record.update({tc.objective_key(k): v for k, v in run.objectives().items()})
        record.update(run.params)
        records.append(record)
    frame = pd.DataFrame.from_records(records).sort_values(["number", "run_id"]).reset_index(drop=True)
    candidates = sorted({k for r in ordered for k in r.params})
    sampled = [k for k in candidates if k.startswith("optuna.")]  # what the sampler chose (studies runner)
    pool = sampled or [k for k in candidates if k not in NOT_SEARCHED and not k.startswith(("harness.", "study."))]
    searched = [k for k in pool if frame[k].notna().all() and frame[k].astype(str).nunique() > 1]
    keep = ["number", "run_id", *[tc.objective_key(i) for i in range(n_obj)], *searched]
    frame = frame[keep].rename(columns={k: k.removeprefix("optuna.") for k in searched})
    params = [k.removeprefix("optuna.") for k in searched]
    return StoredStudy(name, frame, n_obj, directions, source, names, params, len(trials) - len(usable))


# ------------------------------------------------------------------------------ importances


def _as_numbers(values: pd.Series) -> np.ndarray | None:
    try:
        return values.astype(float).to_numpy()
    except (TypeError, ValueError):
        return None


def _distribution(values: pd.Series):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numbers = _as_numbers(values)
    if numbers is None or values.astype(str).str.lower().isin(["true", "false"]).any():
        return CategoricalDistribution(sorted(values.astype(str).unique())), lambda v: str(v)
    low, high = float(numbers.min()), float(numbers.max())
    log = low > 0 and high / low >= 8  # sizes and learning rates span orders of magnitude
    if np.all(numbers == np.round(numbers)):
        return IntDistribution(int(low), int(high), log=log), lambda v: int(float(v))
    return FloatDistribution(low, high, log=log), lambda v: float(v)


def fanova_importances(study: StoredStudy, objective: int = 0) -> dict[str, float]:
    """fANOVA on an Optuna study rebuilt in memory from the trial runs (raises ImportError without
    scikit-learn)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    conversions = {p: _distribution(study.trials[p]) for p in study.params}
    rebuilt = optuna.create_study(directions=study.directions)
    for _, row in study.trials.iterrows():
        rebuilt.add_trial(
            optuna.trial.create_trial(
                params={p: conv(row[p]) for p, (_, conv) in conversions.items()},
                distributions={p: dist for p, (dist, _) in conversions.items()},
                values=[float(row[tc.objective_key(i)]) for i in range(study.n_objectives)],
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = optuna.importance.get_param_importances(
            rebuilt,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target=(lambda t: t.values[objective]) if study.n_objectives > 1 else None,
            normalize=True,
        )
    return {k: float(v) for k, v in result.items()}


def eta_squared_importances(study: StoredStudy, objective: int = 0) -> dict[str, float]:
    """Between-group share of the objective's variance per parameter, normalised to sum to 1."""
    y = study.trials[tc.objective_key(objective)].to_numpy(dtype=float)
    total = float(((y - y.mean()) ** 2).sum())
    raw = {}
    for p in study.params:
        values = study.trials[p]
        numbers = _as_numbers(values)
        if numbers is not None and len(np.unique(numbers)) > 5:
            edges = np.unique(np.quantile(numbers, np.linspace(0, 1, 6)))
            groups = np.digitize(numbers, edges[1:-1], right=True)
        else:
            groups = pd.factorize(values.astype(str), sort=True)[0]
        between = sum(len(y[groups == g]) * (y[groups == g].mean() - y.mean()) ** 2 for g in np.unique(groups))
        raw[p] = float(between / total) if total > 0 else 0.0
    s = sum(raw.values())
    return {k: (v / s if s > 0 else 0.0) for k, v in raw.items()}


def importances(study: StoredStudy, objective: int = 0) -> tuple[dict[str, float], str]:
    """(importances, method name); empty when fewer than 3 trials or nothing was searched."""
    if not study.params or len(study.trials) < 3:
        return {}, ""
    try:
        return fanova_importances(study, objective), "fANOVA (optuna, seed 0)"
    except ImportError:
        pass
    except Exception:  # degenerate study (constant objective, one value per parameter...)
        pass
    return eta_squared_importances(study, objective), "eta squared (variance share, 5 bins)"
