"""Carry a study's unfinished final runs from one clone to another inside its exported store.

A long study outlives the machine it started on: a session ends, a laptop is wiped, a fresh clone
has no results/. The exported store already carries every run's record; with checkpoints, it also
carries each unfinished final run's last epoch checkpoint (`<store>/checkpoints/<study>/`, one file
per run, as in results/studies/<study>/checkpoints/final/). `import` puts the runs back in the local
tracking store and the checkpoints beside them, so `run` skips what finished and resumes what did
not, from its last epoch, into the same MLflow run.

A checkpoint names the MLflow run it belongs to, and every copy gives a run a new id: each file is
rewritten with the id of its run's copy. A checkpoint whose run was not copied is left behind, and a
local checkpoint is never overwritten (it is the newer state of that run).
"""
from __future__ import annotations

from pathlib import Path

from harness.studies.context import final_checkpoint_dir

CHECKPOINTS = "checkpoints"


def carry_out(study: str, id_map: dict[str, str], store: Path) -> list[Path]:
    """Copy study's final-run checkpoints whose runs were exported (id_map: local -> exported id)
    into the exported store folder `store`; returns the files written."""
    return _carry(final_checkpoint_dir(study), Path(store) / CHECKPOINTS / study, id_map)


def carry_in(study: str, id_map: dict[str, str], store: Path) -> list[Path]:
    """Copy the exported store's checkpoints of `study` whose runs were imported (id_map: exported
    -> local id) into the local checkpoint folder; returns the files written."""
    return _carry(Path(store) / CHECKPOINTS / study, final_checkpoint_dir(study), id_map)


def check_store(store: Path) -> list[Path]:
    """Read every checkpoint the exported store carries, before anything is imported: one that asks
    to run code stops the import (UnsafeCheckpointError, nothing copied); corrupt ones are returned,
    to be reported and left behind (their runs start again)."""
    from harness import checkpoints

    corrupt = []
    for path in sorted((Path(store) / CHECKPOINTS).glob("*/*.pt")):
        try:
            checkpoints.load(path)
        except checkpoints.CheckpointCorrupt:
            corrupt.append(path)
    return corrupt


def _carry(source: Path, target: Path, id_map: dict[str, str]) -> list[Path]:
    from harness import checkpoints

    written = []
    for path in sorted(source.glob("*.pt")) if source.is_dir() else []:
        destination = target / path.name
        if destination.exists():
            continue
        try:
            state = checkpoints.load(path)
        except checkpoints.CheckpointCorrupt:
            continue  # nothing to carry: the run starts again where it lands
        run_id = state.get("run_id")
        if run_id not in id_map:
            continue
        state["run_id"] = id_map[run_id]
        checkpoints.save(state, destination)  # a reader never sees half a checkpoint
        written.append(destination)
    return written
