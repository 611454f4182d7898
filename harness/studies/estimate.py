"""How long the unfinished final runs of a study will take, from the study's own latest epochs.

A final run trains until its validation metric has not improved for `patience` epochs, so its length
is unknown until it stops. The estimate takes, per configuration (a model and its settings, across
seeds), the median epoch count of its finished runs and its current epoch time (training plus
validation): the median of the last `RECENT_EPOCHS` epochs measured in this study, from its most
recently measured run (topped up from the run before when that one has fewer). Only the latest
epochs, because a study outlives its code and its machine's load: a run resumed after a faster
kernel landed, or a second worker that started, changes every later epoch, and a median over the
whole history would keep quoting the old pace. A run of a configuration with no finished run yet is counted at its minimum (best epoch + patience); a configuration with no epoch measured at
all yet is timed instead: a throwaway trainer of one of its runs trains a few batches and validates
one batch of users on this machine, scaled to a whole epoch (harness.train.Trainer.time_epoch), and
its runs are counted at the minimum. A study with a search has no configurations before its search,
so its whole plan is given as a range from the same timed step per (dataset, model): every training
stopped by early stopping at its earliest (patience + 1 epochs) up to every one running its maximum
epochs. `run --dry-run` prints the result; it is a planning figure, not a promise.
"""

from __future__ import annotations

import dataclasses
import statistics

#: epochs of a configuration's latest run that give its current epoch time
RECENT_EPOCHS = 10


@dataclasses.dataclass
class RunState:
    """One final run of the plan: done so far (nothing when not started) and its stopping rule."""

    configuration: str
    patience: int
    max_epochs: int
    epochs: int = 0  # epochs trained so far
    best_epoch: int = 0  # epoch of the best validation value so far (0: none)
    finished: bool = False
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)  # in epoch order
    measured_at: float = 0.0  # when its last epoch was recorded (any clock, compared across runs)


@dataclasses.dataclass
class Estimate:
    seconds: float  # run-seconds left over the counted runs
    counted: int  # unfinished runs in `seconds`
    at_minimum: int  # of those, runs counted at their minimum length
    unmeasured: list[str]  # configurations with unfinished runs and no epoch measured yet


def _recent_epochs(measured: list[RunState]) -> list[float]:
    """The last RECENT_EPOCHS epoch times of a configuration: its most recently measured run's last epochs,
    topped up from the run measured before it when that run has fewer (a run just started, or resumed)."""
    recent: list[float] = []
    for state in sorted(measured, key=lambda s: s.measured_at, reverse=True):  # stable: plan order among equals
        recent = state.epoch_seconds[-(RECENT_EPOCHS - len(recent)) :] + recent
        if len(recent) >= RECENT_EPOCHS:
            break
    return recent


def estimate_time_left(runs: list[RunState]) -> Estimate:
    by_configuration: dict[str, list[RunState]] = {}
    for run in runs:
        by_configuration.setdefault(run.configuration, []).append(run)
    seconds, counted, at_minimum, unmeasured = 0.0, 0, 0, []
    for configuration, states in by_configuration.items():
        pending = [s for s in states if not s.finished]
        if not pending:
            continue
        measured = [s for s in states if s.epoch_seconds]
        if not measured:
            unmeasured.append(configuration)
            continue
        epoch_seconds = statistics.median(_recent_epochs(measured))
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


@dataclasses.dataclass
class Timed:
    """A configuration (or a study cell) whose epoch time was measured by a timed step."""

    name: str
    seconds: float  # one epoch, training and validation
    how: str  # what was timed (EpochTiming.describe)


def time_configuration(config, data) -> tuple[float, str]:
    """(seconds of one epoch of `config` on `data`, what was timed), from a throwaway trainer."""
    from harness.train import Trainer

    timing = Trainer(config, data=data, progress=None).time_epoch()
    return timing.seconds, timing.describe()


def describe_timed(timed: list[Timed]) -> str:
    """Which epoch times come from a timed step, not from the study's epochs: a line each."""
    return "\n".join(
        ["epoch times measured by a timed step on this machine (no epoch of theirs stored yet):"]
        + [f"  {t.name}: {t.seconds:.1f} s per epoch ({t.how})" for t in timed]
    )


def duration(seconds: float) -> str:
    """A planning figure's length in the unit that reads best."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe_range(low_seconds: float, high_seconds: float, trainings: int, workers: int) -> str:
    """The whole plan of a study with a search, as a range of run time."""
    line = (
        f"time for the whole plan, from a timed step per (dataset, model): {duration(low_seconds)} to "
        f"{duration(high_seconds)} of run time for {trainings} training(s) (each stopped by early "
        "stopping at its earliest, patience + 1 epochs, up to each running its maximum epochs)"
    )
    if workers > 1:
        line += (
            f", at best {duration(low_seconds / workers)} to {duration(high_seconds / workers)} with {workers} workers"
        )
    return line


def describe(estimate: Estimate, workers: int) -> str:
    """One line for the dry-run."""
    if not estimate.counted and not estimate.unmeasured:
        return "time left: none (every final run has finished)"
    parts = []
    if estimate.counted:
        hours = estimate.seconds / 3600
        line = (
            f"time left, estimated from this study's latest epochs: about {hours:.1f} run-hours for "
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
