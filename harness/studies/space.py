"""Search-space parameters: int, float (optionally log), categorical, fixed and derived.

In a study file a parameter is either a mapping with `type`, or a shorthand:
  hidden_size: [8, 16, 32]            -> categorical
  dropout: 0.2                        -> fixed
  lr: {low: 1e-4, high: 1e-2, log: true}   -> float (int when both bounds are integers)
  head_dim: {expr: "hidden_size * expand // 4"}  -> derived from the other settings
Derived expressions may use + - * / // % **, parentheses, numbers, min, max, int, round and the
names of training settings and model options (after the other parameters are applied).
"""

from __future__ import annotations

import ast
import itertools
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scalar = bool | int | float | str | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IntParam(_Strict):
    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = 1
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.step < 1:
            raise ValueError("step must be a positive integer")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("log scale needs low >= 1 and step 1")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))

    def describe(self) -> str:
        scale = ", log" if self.log else ""
        step = f" step {self.step}" if self.step != 1 else ""
        return f"int [{self.low}, {self.high}]{step}{scale}"


class FloatParam(_Strict):
    type: Literal["float"] = "float"
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log scale needs low > 0 and no step")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be positive")
        return self

    def values(self) -> list[float]:
        if self.step is None:
            raise ValueError("a continuous float range has no finite set of values")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        return [round(self.low + i * self.step, 12) for i in range(count)]

    def describe(self) -> str:
        scale = ", log" if self.log else ""
        step = f" step {self.step}" if self.step else ""
        return f"float [{self.low:g}, {self.high:g}]{step}{scale}"


class CategoricalParam(_Strict):
    type: Literal["categorical"] = "categorical"
    choices: list[Scalar] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        seen = []
        for choice in self.choices:
            if any(type(choice) is type(s) and choice == s for s in seen):
                raise ValueError(f"duplicate choice {choice!r}")
            seen.append(choice)
        return self

    def values(self) -> list[Any]:
        return list(self.choices)

    def describe(self) -> str:
        return "{" + ", ".join(str(c) for c in self.choices) + "}"


class FixedParam(_Strict):
    type: Literal["fixed"] = "fixed"
    value: Any

    def describe(self) -> str:
        return f"= {self.value!r}"


class DerivedParam(_Strict):
    type: Literal["derived"] = "derived"
    expr: str

    @model_validator(mode="after")
    def _check(self):
        names(self.expr)  # raises ValueError on anything but arithmetic
        return self

    def describe(self) -> str:
        return f"= {self.expr}"


ParamSpec = Annotated[
    IntParam | FloatParam | CategoricalParam | FixedParam | DerivedParam,
    Field(discriminator="type"),
]
SEARCHABLE = (IntParam, FloatParam, CategoricalParam)


def normalise_param(value: Any) -> Any:
    """Expand the shorthands into {type: ...} mappings (validated by pydantic afterwards)."""
    if isinstance(value, list):
        return {"type": "categorical", "choices": value}
    if isinstance(value, dict):
        if "type" in value:
            return value
        if "choices" in value:
            return {"type": "categorical", **value}
        if "expr" in value:
            return {"type": "derived", **value}
        if "value" in value:
            return {"type": "fixed", **value}
        if "low" in value or "high" in value:
            bounds = [value.get("low"), value.get("high"), value.get("step")]
            integral = all(isinstance(b, int) and not isinstance(b, bool) for b in bounds if b is not None)
            return {"type": "int" if integral else "float", **value}
        return value  # pydantic reports the missing discriminator
    return {"type": "fixed", "value": value}


# ---------------------------------------------------------------------------- derived expressions
_FUNCTIONS = {"min": min, "max": max, "int": int, "round": round, "abs": abs}
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}


def names(expr: str) -> set[str]:
    """Variables an expression reads; ValueError for anything but plain arithmetic."""
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse expression {expr!r}: {err.msg}") from None
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in _FUNCTIONS:
                found.add(node.id)
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS or node.keywords:
                raise ValueError(f"expression {expr!r} may call only {sorted(_FUNCTIONS)}")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise ValueError(f"expression {expr!r} may use only numbers")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.USub, ast.UAdd, *_BINARY)):
            raise ValueError(f"expression {expr!r}: {type(node).__name__} is not allowed")
    return found


def evaluate(expr: str, values: dict[str, Any]) -> Any:
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in values:
                raise ValueError(f"expression {expr!r}: unknown name {node.id!r}")
            return values[node.id]
        if isinstance(node, ast.UnaryOp):
            operand = walk(node.operand)
            return -operand if isinstance(node.op, ast.USub) else +operand
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Call):
            return _FUNCTIONS[node.func.id](*(walk(a) for a in node.args))
        raise ValueError(f"expression {expr!r}: unsupported syntax")

    names(expr)
    try:
        return walk(ast.parse(expr, mode="eval"))
    except ZeroDivisionError:
        raise ValueError(f"expression {expr!r} divides by zero") from None


# ---------------------------------------------------------------------------- sampling and grids
def suggest(trial, name: str, spec) -> Any:
    """Ask an Optuna trial for one searchable parameter."""
    if isinstance(spec, IntParam):
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, FloatParam):
        return trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
    if isinstance(spec, CategoricalParam):
        return trial.suggest_categorical(name, spec.choices)
    raise TypeError(f"{name} is not searchable")


def searchable(space: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in space.items() if isinstance(v, SEARCHABLE)}


def is_discrete(spec) -> bool:
    return isinstance(spec, (IntParam, CategoricalParam)) or (isinstance(spec, FloatParam) and spec.step is not None)


def grid(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the searchable parameters (all must be discrete), in file order."""
    items = searchable(space)
    if not items:
        return [{}]
    keys = list(items)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(items[k].values() for k in keys))]


def grid_size(space: dict[str, Any]) -> int:
    size = 1
    for spec in searchable(space).values():
        size *= len(spec.values())
    return size


def check_points(space: dict[str, Any], limit: int = 400) -> list[dict[str, Any]]:
    """Points that validation builds: every combination of the discrete values (ranges of more
    than 50 values and continuous ranges reduced to their ends), capped at `limit` spread evenly."""
    items = searchable(space)
    if not items:
        return [{}]
    axes = []
    for spec in items.values():
        if is_discrete(spec) and len(spec.values()) <= 50:
            axes.append(spec.values())
        else:
            axes.append(sorted({spec.low, spec.high}))
    total = math.prod(len(a) for a in axes)
    keys = list(items)
    if total <= limit:
        return [dict(zip(keys, c)) for c in itertools.product(*axes)]
    stride = total / limit
    points = []
    for i in range(limit):
        index, combo = int(i * stride), []
        for axis in reversed(axes):
            index, r = divmod(index, len(axis))
            combo.append(axis[r])
        points.append(dict(zip(keys, reversed(combo))))
    return points
