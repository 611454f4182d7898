"""A YAML file that must hold a mapping (a `train --config` file, a study file), read with one error
line that names the file and, for a syntax error, the line and column where the parser stopped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_mapping(path: str | Path, what: str, error: type[Exception], shape: str) -> dict[str, Any] | None:
    """The mapping in `path`, or None for an empty file; `error` (one line starting with `what` and
    the path) for a missing or unreadable file, a syntax error, or a document that is not a mapping.
    `shape` says what the mapping holds, for that last message."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise error(f"{what} {path} cannot be read ({reason})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{what} {path}: YAML syntax error{where}: {problem}") from None
    if values is None or isinstance(values, dict):
        return values
    raise error(f"{what} {path} must be a mapping of {shape}, not a {type(values).__name__}")
