"""Checkpoint files: written so that no interruption leaves half a file, read without running code.

Writing: the state goes to a temporary file in the same folder, is flushed to disk (fsync), and
only then replaces the checkpoint (os.replace, atomic on POSIX). A kill, a full disk or a power cut
at any moment leaves the previous checkpoint whole; the temporary file is removed on failure.

Reading: `torch.load(weights_only=True)`, whose unpickler builds only tensors, containers and
plain values and refuses every other global, so a crafted file (a checkpoint carried in a store
from someone else, `harness import`) cannot execute code. The harness saves nothing beyond what
that unpickler accepts by default -- model and optimiser state dicts, torch RNG states (uint8
tensors), and dicts/lists of str, int, float, bool and None -- so ALLOWED_GLOBALS is empty;
tests/test_checkpoints.py fails the day a checkpoint needs another type, which then belongs here.

`Checkpoint` is one run's file: the training writes it after every epoch and reads it to resume, and
it is the one place where a checkpoint is rewritten for another run (a trial's training adopted by a
final run, a checkpoint carried into an exported store under its run's new id).

What an exact resume needs, and nothing more (`Checkpoint.rewrite(..., slim=True)`, used for the
checkpoints carried in committed stores): the weights, Adam's moments and step counts, the torch RNG
state (dropout) and the early-stopping state (best epoch, value, metrics and weights, history); the
batch order needs no state (it is derived from (seed, epoch)). Best weights equal to the current
ones are stored once (they share the tensors, which torch.save writes once), and a training that
has finished needs only its best weights: the test evaluation is all that is left.

Two ways a file can fail, told apart before anything is unpickled:
- corrupt (CheckpointCorrupt): not a zip archive (torch.save writes zips), or a member fails its
  CRC (a truncated copy, a flipped bit), or torch cannot read it. Nothing in it can be trusted;
  the caller sets it aside and goes on without it.
- refused (UnsafeCheckpointError, a UserError): a sound archive whose pickle names a global
  outside the allow-list. It was crafted or written by other code; it is left where it is and
  the command stops with one line, for a person to decide.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from harness.errors import UserError

#: extra globals a harness checkpoint may contain (beyond torch's weights-only defaults): none
ALLOWED_GLOBALS: list = []


class CheckpointCorrupt(Exception):
    """A checkpoint file that cannot be read back: truncated, damaged or not a checkpoint."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnsafeCheckpointError(UserError):
    """A checkpoint whose contents ask to run code (globals outside the allow-list)."""


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` atomically and durably."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The state saved in `path`; CheckpointCorrupt or UnsafeCheckpointError as described above."""
    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, EOFError) as err:
        raise CheckpointCorrupt(path, f"not a complete checkpoint archive ({err or 'empty'})") from None
    except OSError as err:
        raise CheckpointCorrupt(path, f"cannot be read ({err.strerror or err})") from None
    if damaged is not None:
        raise CheckpointCorrupt(path, f"member {damaged} fails its checksum")
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        detail = f"global {found.group(1)}" if found else "objects outside the allow-list"
        raise UnsafeCheckpointError(
            f"checkpoint {path} was refused: it holds more than model weights ({detail}); it was "
            "not made by the harness and was not loaded -- delete it if you do not trust it"
        ) from None
    except Exception as err:  # torch's own read errors: RuntimeError, EOFError, KeyError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointCorrupt(path, f"unreadable ({first[:160]})") from None
    if not isinstance(state, dict):
        raise CheckpointCorrupt(path, f"holds a {type(state).__name__}, not a checkpoint")
    return state


#: what a finished training still needs: its best weights and the record of its epochs
FINISHED_KEEPS = ("epoch", "best", "history", "run_id", "finished")


def essentials(state: dict[str, Any]) -> dict[str, Any]:
    """`state` without what an exact resume does not need: a finished training's weights, optimiser
    and RNG states (its best weights are what the test evaluation loads)."""
    if state.get("finished") and (state.get("best") or {}).get("state") is not None:
        return {key: state[key] for key in FINISHED_KEEPS if key in state}
    return state


class Checkpoint:
    """One run's checkpoint file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self, map_location: Any = "cpu") -> dict[str, Any]:
        return load(self.path, map_location=map_location)

    def write(self, state: dict[str, Any]) -> None:
        save(state, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def set_aside(self) -> Path:
        return set_aside(self.path)

    def rewrite(self, target: str | Path, slim: bool = False, **changes: Any) -> Checkpoint:
        """Write this checkpoint's state, with `changes` applied (e.g. another run_id), to `target`:
        read through the safe loader, written atomically; `slim` keeps only what a resume needs."""
        state = {**self.read(), **changes}
        copy = Checkpoint(target)
        copy.write(essentials(state) if slim else state)
        return copy


def set_aside(path: str | Path) -> Path:
    """Rename a corrupt checkpoint out of the way (kept for inspection, never read again);
    returns its new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, target)
    return target
