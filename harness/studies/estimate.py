"""How long the unfinished final runs of a study will take, from the study's own epochs so far.

A final run trains until its validation metric has not improved for `patience` epochs, so its length
is unknown until it stops. The estimate takes, per configuration (a model and its settings, across
seeds), the median epoch count of its finished runs and its median epoch time (training plus
validation) as measured in this study, on this machine. A run of a configuration with no finished
run yet is counted at its minimum (best epoch + patience); a configuration with no epoch measured at
all is not counted. `run --dry-run` prints the result; it is a planning figure, not a promise.
"""

from __future__ import annotations

import dataclasses
import statistics


@dataclasses.dataclass
class RunState:
    """One final run of the plan: done so far (nothing when not started) and its stopping rule."""

    configuration: str
    patience: int
    max_epochs: int
    epochs: int = 0  # epochs trained so far
    best_epoch: int = 0  # epoch of the best validation value so far (0: none)
    finished: bool = False
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Estimate:
    seconds: float  # run-seconds left over the counted runs
    counted: int  # unfinished runs in `seconds`
    at_minimum: int  # of those, runs counted at their minimum length
    unmeasured: list[str]  # configurations with unfinished runs and no epoch measured yet


def estimate_time_left(runs: list[RunState]) -> Estimate:
    by_configuration: dict[str, list[RunState]] = {}
    for run in runs:
        by_configuration.setdefault(run.configuration, []).append(run)
    seconds, counted, at_minimum, unmeasured = 0.0, 0, 0, []
    for configuration, states in by_configuration.items():
        pending = [s for s in states if not s.finished]
        if not pending:
            continue
        epoch_times = [t for s in states for t in s.epoch_seconds]
        if not epoch_times:
            unmeasured.append(configuration)
            continue
        epoch_seconds = statistics.median(epoch_times)
        finished_lengths = [s.epochs for s in states if s.finished]
        typical = statistics.median(finished_lengths) if finished_lengths else None
        for state in pending:
            # early stopping ends a run `patience` epochs after its best one, at the earliest
            minimum = max(state.best_epoch, 1) + state.patience - state.epochs
            left = minimum if typical is None else max(minimum, typical - state.epochs)
            left = max(0.0, min(left, state.max_epochs - state.epochs))
            seconds += left * epoch_seconds
            counted += 1
            at_minimum += typical is None
    return Estimate(seconds, counted, at_minimum, sorted(unmeasured))


def describe(estimate: Estimate, workers: int) -> str:
    """One line for the dry-run."""
    if not estimate.counted and not estimate.unmeasured:
        return "time left: none (every final run has finished)"
    parts = []
    if estimate.counted:
        hours = estimate.seconds / 3600
        line = (
            f"time left, estimated from this study's own epochs: about {hours:.1f} run-hours for "
            f"{estimate.counted} unfinished run(s)"
        )
        if workers > 1:
            line += f", at best {hours / workers:.1f} hours with {workers} workers"
        if estimate.at_minimum:
            line += (
                f" ({estimate.at_minimum} counted at the minimum that early stopping allows: no "
                "finished run of the same configuration yet, so likely more)"
            )
        parts.append(line)
    if estimate.unmeasured:
        parts.append(f"no estimate for {', '.join(estimate.unmeasured)} (no epoch measured yet)")
    return "; ".join(parts)
