"""Every trial accounted for: who runs it (host, pid, heartbeat), when it is dead, what counts
against the budget.

A worker stamps each trial it runs with its host identity, pid (and the pid's start time) and a
heartbeat refreshed by a thread. A RUNNING trial is dead when its process is gone (same host:
checked at once, so a rerun after kill -9 recovers immediately) or when its heartbeat is older
than `stale_after` seconds (other hosts). A dead trial is marked FAIL with the reason, and a copy
with the same parameters is enqueued (`harness.retry_of` = the dead trial's number); retries do
not count against n_trials, so a killed study ends with exactly its budget of trials.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from harness.store.contract import FAILURE, FAILURE_KIND, RETRY_OF
from harness.store.liveness import HOST_ID, pid_alive, process_start

HOST = "harness:host"
PID = "harness:pid"
PID_START = "harness:pid_start"
HEARTBEAT = "harness:heartbeat"


def stamp(storage, trial_id: int) -> None:
    pid = os.getpid()
    storage.set_trial_system_attr(trial_id, HOST, HOST_ID)
    storage.set_trial_system_attr(trial_id, PID, pid)
    storage.set_trial_system_attr(trial_id, PID_START, process_start(pid))
    storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())


class Heartbeat:
    """Refreshes a trial's heartbeat every `interval` seconds until stopped."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT, time.time())
            except Exception:  # trial finished or storage gone: nothing left to keep alive
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def heartbeat_interval(stale_after: float) -> float:
    return max(0.5, min(30.0, stale_after / 4))


def _timestamp(value: datetime | None) -> float | None:
    return value.timestamp() if value else None


def why_dead(trial, stale_after: float, now: float | None = None) -> str | None:
    """The reason a RUNNING trial is dead, or None while it is alive."""
    now = now or time.time()
    attrs = trial.system_attrs
    host, pid = attrs.get(HOST), attrs.get(PID)
    if host == HOST_ID and pid is not None:
        if pid == os.getpid():
            return None
        if not pid_alive(int(pid), attrs.get(PID_START)):
            return f"worker process {pid} on this machine stopped while the trial ran (killed?)"
    last = attrs.get(HEARTBEAT) or _timestamp(trial.datetime_start) or now
    if now - last > stale_after:
        where = f"{host} pid {pid}" if host else "an unknown worker"
        return f"no heartbeat for {now - last:.0f} s from {where} (stale after {stale_after:.0f} s)"
    return None


def retried_numbers(trials) -> set[int]:
    return {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}


def fresh(trials) -> list:
    """Trials that count against n_trials: all but the enqueued retries of dead trials."""
    return [t for t in trials if RETRY_OF not in t.user_attrs]


def trial_params(trial) -> dict[str, Any]:
    """Parameters a trial ran (or was enqueued) with."""
    return {**trial.system_attrs.get("fixed_params", {}), **trial.params}


def seconds_used(trials, now: float | None = None) -> float:
    """Trial time recorded in the storage (the timeout budget): finished and running trials."""
    from optuna.trial import TrialState

    now = now or time.time()
    total = 0.0
    for t in trials:
        if t.datetime_start is None:
            continue
        if t.state.is_finished() and t.datetime_complete:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
        elif t.state == TrialState.RUNNING:
            total += max(0.0, now - t.datetime_start.timestamp())
    return total


def reap(study, stale_after: float, on_reaped: Callable[[Any, str], None] | None = None) -> int:
    """Fail the dead RUNNING trials of a study and enqueue their retries; call under the
    storage lock so that two reapers never retry one trial twice. Returns how many."""
    from optuna.trial import TrialState

    storage = study._storage
    count = 0
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = why_dead(trial, stale_after, now)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, FAILURE, f"interrupted: {reason}")
            storage.set_trial_user_attr(trial._trial_id, FAILURE_KIND, "interrupted")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # finished meanwhile (or reaped by another process): leave it
            continue
        study.enqueue_trial(trial_params(trial), user_attrs={RETRY_OF: trial.number})
        count += 1
        if on_reaped:
            on_reaped(trial, reason)
    return count
