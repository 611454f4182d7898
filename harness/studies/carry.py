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

import os
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


def _carry(source: Path, target: Path, id_map: dict[str, str]) -> list[Path]:
    import torch

    written = []
    for path in sorted(source.glob("*.pt")) if source.is_dir() else []:
        destination = target / path.name
        if destination.exists():
            continue
        state = torch.load(path, map_location="cpu", weights_only=False)
        run_id = state.get("run_id")
        if run_id not in id_map:
            continue
        state["run_id"] = id_map[run_id]
        target.mkdir(parents=True, exist_ok=True)
        staging = destination.with_suffix(".carry.tmp")
        torch.save(state, staging)
        os.replace(staging, destination)  # a reader never sees half a checkpoint
        written.append(destination)
    return written
