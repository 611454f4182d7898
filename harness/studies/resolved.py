"""A study as it runs: the validated file resolved into objectives and one cell per (dataset, model
entry), each an Optuna study whose sampled values become a training configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from harness.store import contract as tc
from harness.studies import space as sp
from harness.studies.schema import ObjectiveSpec, StudySpec, StudySpecError


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
class StudyCell:
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
        from harness.config import ConfigError, TrainConfig, make_config, route_setting

        train, params = dict(self.train), dict(self.params)

        def put(key: str, value: Any) -> None:
            route_setting(key, value, train, params)

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
            names.update(model_defaults(models.model_class(self.model).config_class))
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


def model_defaults(config_class) -> dict[str, Any]:
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
    cells: list[StudyCell] = dataclasses.field(default_factory=list)

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
