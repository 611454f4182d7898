"""Checkpoints carried inside an exported store, so a study's unfinished final runs continue on
another clone.

A long study outlives the machine it started on: a session ends, a laptop is wiped, a fresh clone
has no results/. The exported store already carries every run's record; with checkpoints, it also
carries each unfinished final run's last epoch checkpoint (`<store>/checkpoints/<study>/`, one file
per run, as in the study's own checkpoint folder). `import` puts the runs back in the local tracking
store and the checkpoints beside them, so `run` skips what finished and resumes what did not, from
its last epoch, into the same MLflow run.

A checkpoint names the MLflow run it belongs to, and every copy gives a run a new id: each file is
rewritten with the id of its run's copy (and only what an exact resume needs: harness.checkpoints).
A checkpoint whose run was not copied is left behind, and a checkpoint already at the destination is
never overwritten (locally, it is the newer state of that run).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"


def in_store(store: Path, study: str) -> Path:
    """The folder of `study`'s carried checkpoints inside the exported store folder `store`."""
    return Path(store) / CHECKPOINTS / study


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


def carry(source: Path, target: Path, id_map: dict[str, str]) -> list[Path]:
    """Copy the checkpoints in `source` whose runs were copied (id_map: old -> new run id) into
    `target`, each naming its run's new id; returns the files written."""
    from harness import checkpoints

    written = []
    for path in sorted(source.glob("*.pt")) if source.is_dir() else []:
        destination = target / path.name
        if destination.exists():
            continue
        checkpoint = checkpoints.Checkpoint(path)
        try:
            run_id = checkpoint.read().get("run_id")
            if run_id not in id_map:
                continue
            # slim: committed stores keep only what an exact resume needs
            written.append(checkpoint.rewrite(destination, slim=True, run_id=id_map[run_id]).path)
        except checkpoints.CheckpointCorrupt:
            continue  # nothing to carry: the run starts again where it lands
    return written
