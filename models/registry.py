"""Name -> model class. The harness reaches models only through this registry.

Model modules register themselves on import; `available()` imports the built-in ones lazily so
that `import models` stays cheap and never touches optional GPU libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from models.base import ModelConfig, ModelConfigError, SequentialRecommender

_REGISTRY: dict[str, type[SequentialRecommender]] = {}
# Built-in models: name -> module that defines it (imported on first lookup).
_BUILTIN = {
    "sasrec": "models.sasrec",
    "tisasrec": "models.tisasrec",
    "mamba4rec": "models.mamba4rec",
    "ssd4rec": "models.ssd4rec",
    "tim4rec": "models.tim4rec",
}


class UnknownModelError(ModelConfigError):
    pass


def register(cls: type[SequentialRecommender]) -> type[SequentialRecommender]:
    """Class decorator: make a model available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for name, module in _BUILTIN.items():
        if name not in _REGISTRY:
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                # a built-in whose module is not written yet is simply not available
                if err.name != module:
                    raise


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[SequentialRecommender]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; available models: {', '.join(sorted(_REGISTRY))}") from None


def build_config(name: str, params: dict[str, Any] | None = None) -> ModelConfig:
    """Validate model options (unknown keys, types, impossible shapes) without building weights."""
    cls = model_class(name)
    return cls.config_class.from_dict(dict(params or {}), model_name=name)


def build(
    name: str,
    n_items: int,
    max_len: int,
    params: dict[str, Any] | None = None,
    kernel_backend: str = "auto",
    device: torch.device | str = "cpu",
) -> SequentialRecommender:
    cls = model_class(name)
    config = build_config(name, params)
    model = cls(n_items=n_items, max_len=max_len, config=config)
    model.set_kernel_backend(kernel_backend, torch.device(device))
    return model.to(device)
