"""Training configuration: one validated object, settable from the CLI (`--set key=value`) and
from study files. Unknown keys and bad values fail before any work starts, in one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import UserError
from harness.metrics import parse_metric
from harness.store.contract import EXECUTION_SETTINGS, without_late_defaults
from harness.yaml_file import read_mapping


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message is one line meant for the user."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = Field("ml-latest-small", description="dataset name or file path")
    data_format: str | None = Field(
        None,
        description="format of a dataset file given by path: atomic, movielens-dat, csv, tsv or "
        "amazon-json (default: from the file name)",
    )
    data_columns: list[str] | None = Field(
        None,
        description="user, item and timestamp columns of a dataset file given by path "
        "(default: recognised from common names)",
    )
    model: str = Field("sasrec", description="registered model name")
    model_params: dict[str, Any] = Field(default_factory=dict, description="model options")
    protocol: Literal["prefix", "all_positions"] = Field(
        "prefix",
        description="prefix: one sample per prefix (the paper's); all_positions: loss "
        "at every position in one pass (causal models only)",
    )
    max_len: int | None = Field(None, ge=1, description="history length (default: dataset's)")
    min_user_inter: int = Field(5, ge=1, description="k-core threshold for users")
    min_item_inter: int = Field(5, ge=1, description="k-core threshold for items")
    tie_order: Literal["file", "item"] = Field(
        "file",
        description="order of a user's interactions with equal timestamps: file order "
        "(RecBole's stable sort) or ascending item id",
    )
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    batch_size: int = Field(2048, ge=1, description="training samples (target positions) per step")
    eval_batch_size: int = Field(4096, ge=1, description="users per evaluation batch")
    epochs: int = Field(300, ge=1, description="maximum training epochs")
    patience: int = Field(10, ge=1, description="early-stopping patience in epochs")
    valid_metric: str = Field("ndcg@10", description="validation metric for early stopping")
    topk: list[int] = Field(default_factory=lambda: [10, 20, 50], description="cut-offs K")
    mask_seen: bool = Field(False, description="mask already-seen items at evaluation")
    batching: Literal["random", "bucketed"] = Field(
        "random", description="random batches (faithful) or length-bucketed (less padding)"
    )
    seed: int = Field(2020, description="seed for initialisation, shuffling and dropout")
    device: str = Field("auto", description="auto, cpu or cuda[:N]")
    amp: bool = Field(False, description="bfloat16 autocast on CUDA")
    kernel_backend: str = Field(
        "auto",
        description="auto, torch, cpp (compiled CPU kernels) or triton/cuda (GPU kernels), optionally with "
        "per-kernel overrides, e.g. cpp:dropout=torch",
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the encoder: true, false or auto (on CUDA only: on CPU it "
        "measured no faster, harness/compiling.py)",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")

    @field_validator("valid_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        metric, k = parse_metric(value)
        return f"{metric}@{k}"

    @field_validator("topk")
    @classmethod
    def _positive_topk(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("topk must be a non-empty list of positive integers")
        return sorted(set(value))

    @field_validator("data_columns")
    @classmethod
    def _three_columns(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) != 3 or not all(isinstance(v, str) and v for v in value)):
            raise ValueError("data_columns names three columns: user, item, timestamp")
        return value

    @model_validator(mode="after")
    def _early_stopping_cutoff(self) -> TrainConfig:
        # every epoch's validation summary is computed at the topk cut-offs only: a metric at
        # another K would exist nowhere, and the run would fail after its first epoch
        metric, k = parse_metric(self.valid_metric)
        if k not in self.topk:
            raise ValueError(
                f"valid_metric {self.valid_metric} needs K={k} in topk {self.topk}: add it "
                f"(topk=[{', '.join(str(v) for v in sorted({k, *self.topk}))}]) or stop early on a "
                f"metric at one of {self.topk} (e.g. valid_metric={metric}@{self.topk[0]})"
            )
        return self


TRAIN_KEYS = set(TrainConfig.model_fields) - {"model_params"}

# Settings added after results were stored (ADDED_LATER) are part of the tracking contract:
# harness/store/contract.py.
# How to read a dataset file given by path: unset (None) they stay out of run identities, like the
# ADDED_LATER settings; set, they are part of them (other columns are other data).
SOURCE_OPTIONS = ("data_format", "data_columns")


def identity(config: TrainConfig) -> dict[str, Any]:
    """What makes two runs the same run: every setting except where and how fast it executes
    (EXECUTION_SETTINGS: they change results by float rounding only)."""
    values = config.model_dump(exclude=set(EXECUTION_SETTINGS))
    values = {k: v for k, v in values.items() if not (k in SOURCE_OPTIONS and v is None)}
    return without_late_defaults(values)


def identity_key(config: TrainConfig, **context: Any) -> str:
    """Short stable hash of a run's identity plus `context` (e.g. the data fingerprint)."""
    payload = identity(config) | context
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def parse_value(text: str) -> Any:
    """CLI values are YAML scalars: 1e-3, true, [10, 20], strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML config file (`train --config`), or one ConfigError line naming the file."""
    return read_mapping(path, "config file", ConfigError, "settings (key: value)") or {}


def parse_setting(item: str) -> tuple[str, Any]:
    """A `key=value` setting (`--set`) as (key, value); the value is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    return key.strip(), parse_value(raw)


def route_setting(key: str, value: Any, train: dict[str, Any], params: dict[str, Any]) -> None:
    """Put one setting where it belongs: a training setting into `train`, anything else into the
    model options `params`; `model.<option>` is always a model option (for a name that is both)."""
    if key.startswith("model."):
        params[key.removeprefix("model.")] = value
    elif key in TRAIN_KEYS:
        train[key] = value
    else:
        params[key] = value


def make_config(base: dict[str, Any] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a TrainConfig from a dict plus `key=value` overrides; keys that are not training
    settings are model options (`model.hidden_size=32` or plain `hidden_size=32`)."""
    values: dict[str, Any] = dict(base or {})
    params = dict(values.pop("model_params", {}) or {})
    for item in overrides or []:
        route_setting(*parse_setting(item), values, params)
    values["model_params"] = params
    try:
        config = TrainConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if not where:  # a check across settings (model_validator): its message names them
            raise ConfigError(f"invalid settings: {message}") from None
        raise ConfigError(f"invalid setting {where}: {message}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_model(config)
    return config


def _check_model(config: TrainConfig) -> None:
    import models

    try:
        models.build_config(config.model, config.model_params)
    except models.ModelConfigError as err:
        raise ConfigError(str(err)) from None


#: why a model that is not causal cannot train with all_positions (docs/design.md#protocol)
NOT_CAUSAL = "is not causal (a position sees later positions), so all_positions training would leak targets"


def leaks_targets(protocol: str, model) -> bool:
    """Whether training `model` with `protocol` would show it its targets: all_positions takes the
    loss at every position in one pass, exact only for a model in which no position sees a later one."""
    return protocol == "all_positions" and not model.is_causal
