"""The study file's schema: what keys a study YAML may hold and their shapes (pydantic), with the
short forms it accepts (a list of model names, `sampler: tpe`, `final: 3`, ...) and the one-line
message naming the bad key. The format, for people: docs/studies.md.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import UserError
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


def format_validation(err: ValidationError) -> str:
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
