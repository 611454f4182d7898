"""Loading a study file: YAML, then the schema, then everything the schema cannot know, checked
before anything touches storage or trains: models registered, training settings known, datasets
present, a search strategy that can run, and every combination of the discrete values (ranges
reduced to their ends) built: shapes, model options, causality for all_positions, metric cut-offs.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from harness.studies import space as sp
from harness.studies.resolved import Study, StudyCell, model_defaults, parse_objective
from harness.studies.schema import ModelEntry, StudySpec, StudySpecError, format_validation
from harness.yaml_file import read_mapping


def load_study(path: str | Path, check_datasets: bool = True) -> Study:
    """Parse and validate a study file; StudySpecError (one line) for anything wrong."""
    path = Path(path)
    prefix = f"{path}: "
    raw = read_mapping(path, "study file", StudySpecError, "study settings (name, datasets, models, ...)")
    if raw is None:
        raise StudySpecError(f"study file {path} is empty: a study names at least its datasets and models")
    try:
        spec = StudySpec(**raw)
    except ValidationError as err:
        raise StudySpecError(prefix + format_validation(err)) from None
    try:
        return resolve(spec, path, check_datasets=check_datasets)
    except StudySpecError as err:
        raise StudySpecError(prefix + str(err)) from None


def resolve(spec: StudySpec, path: Path | None = None, check_datasets: bool = True) -> Study:
    """The resolved study of a schema-valid spec; StudySpecError naming the key for what cannot run."""
    import models
    from harness.config import TRAIN_KEYS

    objectives = [parse_objective(o) for o in spec.objectives]
    if len({o.key for o in objectives}) != len(objectives):
        raise StudySpecError("objectives: each metric may appear once")
    study = Study(spec, path, objectives)

    available = models.available()
    for name, entry in spec.models.items():
        registered = entry.model or name
        if registered not in available:
            raise StudySpecError(
                f"models.{name}: model {registered!r} is not registered; available: {', '.join(available)}"
            )
    for key in spec.train:
        if key in ("model", "dataset", "model_params"):
            raise StudySpecError(f"train.{key}: set by the study (use datasets/models/params)")
        if key not in TRAIN_KEYS:
            raise StudySpecError(f"train.{key}: unknown training setting (model options go under params)")
    for name, entry in spec.models.items():
        for key in entry.train:
            if key not in TRAIN_KEYS or key in ("model", "dataset"):
                raise StudySpecError(f"models.{name}.train.{key}: unknown training setting")
    if check_datasets:
        for dataset in spec.datasets:
            _check_dataset(dataset)

    _check_strategy(study)
    for dataset in spec.datasets:
        for name, entry in spec.models.items():
            cell = _make_cell(study, dataset, name, entry)
            study.cells.append(cell)
    for key in spec.select_per:
        for cell in study.cells:
            options = model_defaults(models.model_class(cell.model).config_class)
            if key not in TRAIN_KEYS and key.removeprefix("model.") not in options:
                raise StudySpecError(
                    f"select_per: {key!r} is neither a training setting nor an option of model {cell.model!r}"
                )
    seen_cells = set()
    for cell in study.cells:
        if cell.name in seen_cells:
            continue
        seen_cells.add(cell.name)
        _check_cell(study, cell)
    return study


def _check_dataset(dataset: str) -> None:
    from harness.data.catalogue import CATALOGUE, find_local

    if dataset in CATALOGUE:
        spec = CATALOGUE[dataset]
        if find_local(spec) is None and not spec.url:
            from harness.data.catalogue import data_dir

            where = data_dir() or "$HARNESS_DATA_DIR"
            raise StudySpecError(f"datasets: {dataset!r} not found: place {spec.files[0].path} under {where}")
    elif not Path(dataset).expanduser().is_file():
        raise StudySpecError(
            f"datasets: unknown dataset {dataset!r} (not a file either); named datasets: {', '.join(CATALOGUE)}"
        )


def _check_strategy(study: Study) -> None:
    spec = study.spec
    if study.pruner_type != "none":
        if study.multi_objective:
            raise StudySpecError("pruner: Optuna cannot prune multi-objective studies; use pruner: none")
        if not study.objectives[0].is_validation:
            raise StudySpecError(
                f"pruner: pruning reads per-epoch validation metrics, but the objective is "
                f"{study.objectives[0].key}; use pruner: none"
            )
    if spec.final.select == "pareto" and not study.multi_objective:
        raise StudySpecError("final.select: pareto needs several objectives")
    if spec.n_trials is None and spec.timeout is None and study.sampler_type != "grid":
        raise StudySpecError("n_trials: set n_trials and/or timeout (the trial budget), or use sampler: grid")


def _make_cell(study: Study, dataset: str, name: str, entry: ModelEntry) -> StudyCell:
    spec = study.spec
    train = {**spec.train, **entry.train}
    params = {**spec.params, **entry.params}
    space = {**spec.space, **entry.space}
    where = f"models.{name}"
    for key in space:
        if key in params or key.removeprefix("model.") in params:
            raise StudySpecError(f"{where}: {key!r} is both a fixed param and in the search space")
        if key in train:
            raise StudySpecError(f"{where}: {key!r} is both a training setting and in the search space")
    searchable = sp.searchable(space)
    if spec.n_trials == 0:
        n_trials = 0
        bad = [k for k, s in searchable.items() if not sp.is_discrete(s)]
        if bad:
            raise StudySpecError(
                f"{where}: n_trials 0 runs every configuration of the space, which needs discrete "
                f"parameters; {bad[0]!r} is continuous"
            )
    else:
        if not searchable:
            raise StudySpecError(
                f"{where}: empty search space (nothing to search); add `space` entries or set n_trials: 0"
            )
        if study.sampler_type == "grid":
            bad = [k for k, s in searchable.items() if not sp.is_discrete(s)]
            if bad:
                raise StudySpecError(
                    f"{where}.space.{bad[0]}: the grid sampler needs discrete values "
                    "(categorical, int, or float with step)"
                )
            size = sp.grid_size(space)
            n_trials = min(spec.n_trials, size) if spec.n_trials is not None else size
        else:
            n_trials = spec.n_trials if spec.n_trials is not None else 10**9  # timeout-bound
    base_seed = spec.final.base_seed
    if base_seed is None:
        base_seed = int(train.get("seed", 2020))
    wanted = entry.seeds if entry.seeds is not None else spec.final.seeds
    seeds = wanted if isinstance(wanted, list) else [base_seed + i for i in range(wanted)]
    return StudyCell(study, dataset, entry.model or name, train, params, space, n_trials, seeds, name=name)


def _check_cell(study: Study, cell: StudyCell) -> None:
    """Build every check point of the space (model options, shapes, causality, metrics)."""
    import models
    from harness.config import NOT_CAUSAL, TRAIN_KEYS, ConfigError, leaks_targets

    where = f"models.{cell.name}"
    options = model_defaults(models.model_class(cell.model).config_class)
    for key in list(cell.space) + list(cell.params):
        bare = key.removeprefix("model.")
        if key not in TRAIN_KEYS and bare not in options:
            close = difflib.get_close_matches(bare, list(options) + sorted(TRAIN_KEYS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise StudySpecError(
                f"{where}: {key!r} is neither a training setting nor an option of model {cell.model!r}{hint}"
            )
    cls = models.model_class(cell.model)
    built_models = 0
    for point in sp.check_points(cell.space):
        try:
            config, derived = cell.resolve(point)
        except ConfigError as err:
            shown = {**point}
            raise StudySpecError(f"{where}: configuration {_show(shown)} is impossible: {err}") from None
        for objective in study.objectives:
            if objective.is_validation:
                k = int(objective.key.rsplit("_", 1)[1])
                if k not in config.topk:
                    raise StudySpecError(f"objectives: {objective.key} needs K={k} in train.topk (have {config.topk})")
        if config.protocol == "all_positions" and built_models < 64:
            built_models += 1
            model = _tiny_model(cls, config)
            if model is not None and leaks_targets(config.protocol, model):
                raise StudySpecError(
                    f"{where}: configuration {_show({**point, **derived})} {NOT_CAUSAL}; use protocol: prefix for it"
                )


def _tiny_model(cls, config):
    """The model at this configuration with a 3-item table, to read its capabilities."""
    import models

    try:
        built = models.build_config(config.model, config.model_params)
        return cls(n_items=3, max_len=config.max_len or 50, config=built)
    except Exception:  # capability check only; the trainer reports real build errors
        return None


def _show(point: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in point.items()) + "}" if point else "(base)"
