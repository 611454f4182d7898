"""The study file: a YAML document validated (pydantic, then against the model registry and the
training configuration) before anything touches storage or trains.

    name: low_dim                      # experiment name in MLflow, prefix of the Optuna studies
    description: hidden dimension sweep
    datasets: [ml-latest-small]        # catalogue names or file paths
    models:                            # a list of names, or name -> per-model overrides
      sasrec: {params: {n_heads: 2}}
      tim4rec: {train: {protocol: prefix}, space: {head_dim: {expr: "hidden_size // 2"}}}
      tim4rec-causal: {model: tim4rec, params: {time_encoding: causal}}   # a named variant
      tisasrec: {seeds: 1}             # this model's final seeds instead of final.seeds
    train: {max_len: 20, epochs: 2, protocol: all_positions}   # shared training settings
    params: {dropout: 0.2}             # shared fixed model options
    space:                             # shared search space (per-model `space` entries win)
      hidden_size: [8, 16, 32, 64]     # categorical; also {low, high, step, log}, fixed, {expr}
    objectives: [valid_ndcg_at_10]     # or {metric: throughput, direction: maximize}, ...
    sampler: grid                      # grid | random | tpe | nsga2, or {type: tpe, seed: 1}
    pruner: none                       # median | hyperband | none, or {type: median, ...}
    n_trials: 8                        # per (dataset, model); 0 = no search, final runs only
    timeout: null                      # seconds of trial time per (dataset, model)
    select_per: [hidden_size]          # pick the best configuration per value of these
    final: {seeds: 3}                  # N seeds (base_seed + i) or a list of seeds
    storage: null                      # default: journal file results/studies/<name>.journal
    tracking_uri: null                 # default: sqlite:///results/mlflow.db
    workers: 1                         # local worker processes (--workers overrides)

Keys of `train` are TrainConfig settings (see `python -m harness train --help`); every other key
in `params`/`space` is a model option (`model.<option>` forces that reading). Per-model `train`,
`params` and `space` entries override the shared ones.

Semantics:
- One Optuna study per (dataset, model entry), named `<name>/<dataset>/<model entry>`.
- Objectives: any validation metric (valid_ndcg_at_10, ndcg@20, hit@10, ...), `throughput`
  (training samples per second) and `peak_memory_mb`; test metrics are refused. Several objectives
  make a multi-objective study (default sampler nsga2; pruning is impossible there).
- Budget: `n_trials` per (dataset, model) (the grid sampler defaults to the whole grid), and/or
  `timeout`: a worker starts no new trial once the trials recorded in that study used `timeout`
  seconds in total (so it survives restarts and adds up across workers).
- Pruner (median/hyperband) acts on the first objective's per-epoch validation value.
- select_per: the best COMPLETE trial per value of these settings (resolved values, so a key
  that is not searched is one group); `final.select: pareto` takes each group's Pareto front.
- n_trials 0: no search; every configuration of the (discrete) space runs the final seeds.
- final.seeds N means seeds base_seed..base_seed+N-1 (base_seed defaults to train.seed, 2020,
  which is also the trials' seed); final.reuse_trial lets that seed reuse the trial's training.
- Validation builds every combination of the discrete values (ranges reduced to their ends) and
  checks shapes, model options, causality for all_positions and metric cut-offs up front.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import UserError
from harness.store import contract as tc
from harness.studies import space as sp


class StudySpecError(UserError, ValueError):
    """A study file that cannot run; the message is one line naming the bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _space(value: Any) -> Any:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: sp.normalise_param(v) for k, v in value.items()}
    return value


def _check_seeds(value):
    if isinstance(value, int) and value < 0:
        raise ValueError("seeds must be a non-negative count or a list of seeds")
    if isinstance(value, list) and len(set(value)) != len(value):
        raise ValueError("seeds must be distinct")
    return value


class ModelEntry(_Strict):
    model: str | None = Field(None, description="registered model, when the key names a variant")
    train: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, sp.ParamSpec] = Field(default_factory=dict)
    seeds: int | list[int] | None = Field(None, description="this model's final seeds, instead of final.seeds")

    _seeds = field_validator("seeds")(lambda cls, v: _check_seeds(v))

    _norm_space = field_validator("space", mode="before")(lambda cls, v: _space(v))
    _none_dicts = field_validator("train", "params", mode="before")(lambda cls, v: v or {})


class ObjectiveSpec(_Strict):
    metric: str
    direction: Literal["maximize", "minimize"] | None = None


class SamplerSpec(_Strict):
    type: Literal["grid", "random", "tpe", "nsga2"]
    seed: int | None = None
    n_startup_trials: int | None = Field(None, ge=0)
    population_size: int | None = Field(None, ge=2)


class PrunerSpec(_Strict):
    type: Literal["median", "hyperband", "none"]
    n_startup_trials: int = Field(2, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class FinalSpec(_Strict):
    seeds: int | list[int] = 3
    base_seed: int | None = None
    select: Literal["best", "pareto"] = "best"
    reuse_trial: bool = False

    _seeds = field_validator("seeds")(lambda cls, v: _check_seeds(v))


class StorageSpec(_Strict):
    url: str | None = None
    stale_after: float = Field(
        120.0, gt=1, description="seconds without a heartbeat before a running trial counts as dead"
    )


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=80)
    description: str = ""
    datasets: list[str] = Field(min_length=1)
    models: dict[str, ModelEntry] = Field(min_length=1)
    train: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, sp.ParamSpec] = Field(default_factory=dict)
    objectives: list[ObjectiveSpec] = Field(
        default_factory=lambda: [ObjectiveSpec(metric="valid_ndcg_at_10")], min_length=1
    )
    sampler: SamplerSpec | None = None
    pruner: PrunerSpec | None = None
    n_trials: int | None = Field(None, ge=0)
    timeout: float | None = Field(None, gt=0)
    select_per: list[str] = Field(default_factory=list)
    final: FinalSpec = Field(default_factory=FinalSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking_uri: str | None = None
    workers: int = Field(1, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value):
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ValueError("a list of models must hold model names")
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {k: (v if v is not None else {}) for k, v in value.items()}
        return value

    _norm_space = field_validator("space", mode="before")(lambda cls, v: _space(v))
    _none_dicts = field_validator("train", "params", mode="before")(lambda cls, v: v or {})

    @field_validator("datasets", "select_per", mode="before")
    @classmethod
    def _listify(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, value):
        value = [value] if isinstance(value, (str, dict)) else value
        if isinstance(value, list):
            return [{"metric": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _typed(cls, value):
        return {"type": value} if isinstance(value, str) else value

    @field_validator("storage", mode="before")
    @classmethod
    def _storage(cls, value):
        if value is None:
            return {}
        return {"url": value} if isinstance(value, str) else value

    @field_validator("final", mode="before")
    @classmethod
    def _final(cls, value):
        if value is None:
            return {}
        return {"seeds": value} if isinstance(value, (int, list)) else value

    @model_validator(mode="after")
    def _unique(self):
        if len(set(self.datasets)) != len(self.datasets):
            raise ValueError("datasets must be distinct")
        return self


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for model in (
        StudySpec,
        ModelEntry,
        ObjectiveSpec,
        SamplerSpec,
        PrunerSpec,
        FinalSpec,
        StorageSpec,
        sp.IntParam,
        sp.FloatParam,
        sp.CategoricalParam,
        sp.FixedParam,
        sp.DerivedParam,
    ):
        names.update(model.model_fields)
    return names


_UNION_TAGS = {"int", "float", "categorical", "fixed", "derived", "str", "list[int]", "int-list"}


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    # drop union/discriminator tags pydantic inserts into the location
    path = [p for i, p in enumerate(loc) if not (i > 0 and (p in _UNION_TAGS or "[" in p))]
    where = ".".join(path) or "(top level)"
    if first["type"] == "extra_forbidden":
        key = path[-1] if path else "?"
        close = difflib.get_close_matches(key, sorted(_all_field_names()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{where}: unknown key {key!r}{hint}"
    if first["type"] == "missing":
        return f"{where}: required key missing"
    if first["type"] == "union_tag_invalid" or first["type"] == "union_tag_not_found":
        return f"{where}: parameter type must be one of int, float, categorical, fixed, derived"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


# ---------------------------------------------------------------------------- resolved study
@dataclasses.dataclass
class Objective:
    key: str  # valid_ndcg_at_10 | train_throughput | peak_memory_mb
    direction: str  # maximize | minimize

    @property
    def is_validation(self) -> bool:
        return self.key.startswith("valid_")

    def label(self) -> str:
        return f"{self.direction} {self.key}"


THROUGHPUT = tc.TRAIN_THROUGHPUT
MEMORY = tc.PEAK_MEMORY_MB
_ALIASES = {
    "throughput": THROUGHPUT,
    "train_throughput": THROUGHPUT,
    "samples_per_second": THROUGHPUT,
    "peak_memory_mb": MEMORY,
    "peak_memory": MEMORY,
    "memory": MEMORY,
    "memory_mb": MEMORY,
}


def parse_objective(spec: ObjectiveSpec) -> Objective:
    from harness.metrics import metric_key, parse_metric

    name = spec.metric.strip()
    if name in _ALIASES:
        key = _ALIASES[name]
        default = "maximize" if key == THROUGHPUT else "minimize"
    else:
        if name.startswith("test_") or name.startswith("test"):
            raise StudySpecError(f"objectives: {name!r} is a test metric; studies select on validation metrics only")
        try:
            metric, k = parse_metric(name.removeprefix("valid_"))
        except ValueError as err:
            raise StudySpecError(f"objectives: {err}; or one of throughput, peak_memory_mb") from None
        key, default = metric_key(metric, k, "valid"), "maximize"
    return Objective(key, spec.direction or default)


@dataclasses.dataclass
class Cell:
    """One (dataset, model) pair: one Optuna study."""

    study: Study
    dataset: str
    model: str
    train: dict[str, Any]
    params: dict[str, Any]
    space: dict[str, Any]
    n_trials: int
    seeds: list[int]
    name: str = ""  # the key in the study's `models` (a variant name when `model:` is given)

    def __post_init__(self):
        self.name = self.name or self.model

    @property
    def optuna_name(self) -> str:
        return f"{self.study.name}/{self.dataset}/{self.name}"

    @property
    def label(self) -> str:
        from harness.data.catalogue import shown_name

        return f"{self.name}/{shown_name(self.dataset)}"

    @property
    def searchable(self) -> dict[str, Any]:
        return sp.searchable(self.space)

    def resolve(self, sampled: dict[str, Any]):
        """(TrainConfig, derived values) for the sampled parameter values; ConfigError if the
        combination cannot be built."""
        import models
        from harness.config import TRAIN_KEYS, ConfigError, TrainConfig, make_config

        train, params = dict(self.train), dict(self.params)

        def put(key: str, value: Any) -> None:
            if key.startswith("model."):
                params[key.removeprefix("model.")] = value
            elif key in TRAIN_KEYS:
                train[key] = value
            else:
                params[key] = value

        for key, spec in self.space.items():
            if isinstance(spec, sp.FixedParam):
                put(key, spec.value)
        for key, value in sampled.items():
            put(key, value)
        derived: dict[str, Any] = {}
        pending = {k: s for k, s in self.space.items() if isinstance(s, sp.DerivedParam)}
        if pending:
            names = {k: v for k, v in TrainConfig().model_dump().items() if k != "model_params"}
            names.update(train)
            names.update(_model_defaults(models.model_class(self.model).config_class))
            names.update(params)
            for key, spec in pending.items():
                try:
                    value = sp.evaluate(spec.expr, names)
                except (ValueError, TypeError) as err:
                    raise ConfigError(f"{key}: {err}") from None
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                derived[key] = value
                names[key.removeprefix("model.")] = value
                put(key, value)
        config = make_config({**train, "model": self.model, "dataset": self.dataset, "model_params": params})
        return config, derived

    def select_label(self, config) -> str:
        if not self.study.select_per:
            return "all"
        return ",".join(f"{key}={select_value(config, key)}" for key in self.study.select_per)

    def fingerprint(self) -> str:
        """What must not change between runs of one Optuna study (budget and seeds may)."""
        payload = {
            "model": self.model,
            "train": self.train,
            "params": self.params,
            "space": {k: v.model_dump() for k, v in self.space.items()},
            "objectives": [dataclasses.asdict(o) for o in self.study.objectives],
            "select_per": self.study.select_per,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_defaults(config_class) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[field.name] = field.default_factory()  # type: ignore[misc]
    return out


def select_value(config, key: str) -> Any:
    import models
    from harness.config import TRAIN_KEYS

    if key in TRAIN_KEYS:
        return getattr(config, key)
    options = models.build_config(config.model, config.model_params).to_dict()
    return options[key.removeprefix("model.")]


@dataclasses.dataclass
class Study:
    spec: StudySpec
    path: Path | None
    objectives: list[Objective]
    cells: list[Cell] = dataclasses.field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def select_per(self) -> list[str]:
        return self.spec.select_per

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def sampler_type(self) -> str:
        if self.spec.sampler:
            return self.spec.sampler.type
        return "nsga2" if self.multi_objective else "tpe"

    @property
    def pruner_type(self) -> str:
        if self.spec.pruner:
            return self.spec.pruner.type
        return "none" if self.multi_objective or not self.objectives[0].is_validation else "median"

    @property
    def search(self) -> bool:
        return any(cell.n_trials > 0 for cell in self.cells)

    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


# ---------------------------------------------------------------------------- loading
def load_study(path: str | Path, check_datasets: bool = True) -> Study:
    """Parse and validate a study file; StudySpecError (one line) for anything wrong."""
    path = Path(path)
    prefix = f"{path}: "
    try:
        text = path.read_text()
    except OSError as err:
        raise StudySpecError(f"cannot read study file {path}: {err.strerror or err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise StudySpecError(f"{prefix}not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise StudySpecError(f"{prefix}a study file is a YAML mapping (name, datasets, models, ...)")
    try:
        spec = StudySpec(**raw)
    except ValidationError as err:
        raise StudySpecError(prefix + _format_validation(err)) from None
    try:
        return resolve(spec, path, check_datasets=check_datasets)
    except StudySpecError as err:
        raise StudySpecError(prefix + str(err)) from None


def resolve(spec: StudySpec, path: Path | None = None, check_datasets: bool = True) -> Study:
    import models
    from harness.config import TRAIN_KEYS, ConfigError

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
            options = _model_defaults(models.model_class(cell.model).config_class)
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
    _ = ConfigError  # (imported for callers' isinstance checks)
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


def _make_cell(study: Study, dataset: str, name: str, entry: ModelEntry) -> Cell:
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
    return Cell(study, dataset, entry.model or name, train, params, space, n_trials, seeds, name=name)


def _check_cell(study: Study, cell: Cell) -> None:
    """Build every check point of the space (model options, shapes, causality, metrics)."""
    import models
    from harness.config import ConfigError

    where = f"models.{cell.name}"
    options = _model_defaults(models.model_class(cell.model).config_class)
    from harness.config import TRAIN_KEYS

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
            if model is not None and not model.is_causal:
                raise StudySpecError(
                    f"{where}: configuration {_show({**point, **derived})} is not causal, so "
                    "protocol all_positions would leak targets; use protocol: prefix for it"
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
