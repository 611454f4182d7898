"""Who trains a final run: one live process at a time, whether the workers share a host or not.

Workers share a study's final runs by claiming them, not by a fixed split: a worker takes the next
run that is neither finished nor claimed, so no worker idles while a run is left. Two kinds of
claim, chosen by the study's storage (`claims_for`):

- `LockFiles` (journal file or SQLite storage: one host). A lock file beside the local checkpoints,
  held with an OS lock while the run trains. The kernel releases it when its holder dies, so a
  killed worker never leaves a stale claim, and a run being trained is never taken for a dead one.
- `Leases` (PostgreSQL or MySQL storage: any number of hosts). A claim is a RUNNING trial, named
  by the run's final key, of the Optuna study `<study>/final-claims` in the shared storage, kept
  alive by Optuna's RDB heartbeat. The heartbeat is stamped with the database's clock, so the
  hosts' clocks do not matter. A claim without a heartbeat for `storage.stale_after` seconds is
  failed by the next worker that looks (optuna.storages.fail_stale_trials), which then takes the
  run over and resumes it from the checkpoint in its MLflow run (harness/studies/shared.py).
  Never two live trainers: a holder that has not renewed its lease for half of stale_after stops
  by itself (RunTakenOver, raised in its main thread) before anyone may take the run over, and it
  checks before every write that its claim is still the RUNNING one.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from harness.store.contract import CLAIM_HOLDER, FINAL_KEY
from harness.train import RunTakenOver


class Claim:
    """A final run held by this process; `check()` raises RunTakenOver once it is not any more."""

    def check(self) -> None:
        pass

    def done(self) -> None:
        """The run is finished: the claim is complete, not released for another worker."""


# ---------------------------------------------------------------------------- one host
class LockFiles:
    """Claims as OS-locked files in `directory` (the final runs' checkpoint folder)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    @contextlib.contextmanager
    def take(self, key: str, name: str = "", wait: float = 1.0) -> Iterator[Claim | None]:
        """Hold the run `key` for the duration of the block; yields None (and holds nothing) when
        another process holds it for `wait` seconds (a read-only probe holds a free lock for
        microseconds, hence the wait)."""
        from filelock import FileLock, Timeout

        self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self._path(key))
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            yield None
            return
        try:
            yield Claim()
        finally:
            lock.release()

    def held_elsewhere(self, key: str | None) -> bool:
        """Whether a live process trains the run `key` now (read-only: no lock file is made)."""
        if not key or not self._path(key).exists():
            return False
        with self.take(key, wait=0.0) as mine:
            return mine is None


# ---------------------------------------------------------------------------- many hosts
class Leases:
    """Claims as heartbeat-kept trials of the Optuna study `<study>/final-claims`."""

    def __init__(self, storage, study_name: str, stale_after: float):
        self.storage = storage  # harness.studies.storage.StudyStorage, an RDB server
        self.name = f"{study_name}/final-claims"
        self.grace = max(2, round(stale_after))  # Optuna takes whole seconds
        self.interval = max(1, self.grace // 4)
        self._study = None

    def _claims(self, create: bool = True):
        import optuna

        if self._study is None:
            rdb = self.storage.heartbeat_storage(self.interval, self.grace)
            with self.storage.lock("final-claims"):
                if not create and self.name not in optuna.get_all_study_names(rdb):
                    return None
                self._study = optuna.create_study(storage=rdb, study_name=self.name, load_if_exists=True)
        return self._study

    def _live(self, key: str) -> list:
        from optuna.trial import TrialState

        trials = self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t for t in trials if t.user_attrs.get(FINAL_KEY) == key]

    @contextlib.contextmanager
    def take(self, key: str, name: str = "", wait: float = 0.0) -> Iterator[Claim | None]:
        """Hold the run `key` for the duration of the block (None when a live worker holds it). The
        claim ends COMPLETE after `done()`, else FAIL: released at once for another worker."""
        import optuna

        study = self._claims()
        trial = None
        with self.storage.lock("final-claims"):  # look and take as one step
            optuna.storages.fail_stale_trials(study)  # the claims of dead workers expire here
            if not self._live(key):
                with warnings.catch_warnings():  # "heartbeat is meant for Study.optimize": here it is not
                    warnings.simplefilter("ignore", UserWarning)
                    trial = study.ask()
                trial.set_user_attr(FINAL_KEY, key)
                trial.set_user_attr(CLAIM_HOLDER, f"{_host()} pid {os.getpid()} {name}".strip())
                study._storage.record_heartbeat(trial._trial_id)
        if trial is None:
            yield None
            return
        lease = _Lease(study._storage, trial._trial_id, self.interval, self.grace / 2)
        with lease:
            try:
                yield lease
            finally:
                lease.stop()
                try:
                    if lease.finished:
                        study.tell(trial, 0.0)  # the value is unused: the run's results are in MLflow
                    else:
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                except Exception:  # failed as stale meanwhile: the run is another worker's now
                    pass

    def held_elsewhere(self, key: str | None) -> bool:
        """Whether a worker anywhere holds a live claim on the run `key` (creates nothing)."""
        if not key or self._claims(create=False) is None:
            return False
        from optuna.storages._heartbeat import is_heartbeat_enabled

        stale = (
            set(self._study._storage._get_stale_trial_ids(self._study._study_id))
            if is_heartbeat_enabled(self._study._storage)
            else set()
        )
        return any(t._trial_id not in stale for t in self._live(key))


class _Lease(Claim):
    """A held claim: renews its heartbeat every `interval` seconds on a thread. Once it has gone
    `limit` seconds without a renewal, or finds its trial no longer RUNNING (taken over), it is lost:
    the main thread gets RunTakenOver (through SIGUSR1, so even a long epoch stops)."""

    def __init__(self, storage, trial_id: int, interval: float, limit: float):
        self.storage, self.trial_id, self.interval, self.limit = storage, trial_id, interval, limit
        self.renewed = time.monotonic()
        self.lost: str | None = None
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-claim-lease", daemon=True)
        self._previous_handler = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, self._interrupt)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _interrupt(self, signum, frame) -> None:
        if self.lost and not self._stop.is_set():
            raise RunTakenOver(self.lost)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            began = time.monotonic()
            try:
                self.storage.record_heartbeat(self.trial_id)
                self.renewed = began  # the lease runs from before the write, to be safe
            except Exception:  # the database is unreachable: the lease runs out below
                pass
            reason = self._why_lost()
            if reason:
                self.lost = reason
                if self._previous_handler is not None:
                    _thread.interrupt_main(signal.SIGUSR1)
                return

    def _why_lost(self) -> str | None:
        from optuna.trial import TrialState

        silent = time.monotonic() - self.renewed
        if silent > self.limit:
            return f"the claim's heartbeat could not be renewed for {silent:.0f} s; another worker may take it over"
        try:
            state = self.storage.get_trial(self.trial_id).state
        except Exception:
            return None  # unknown for now; the renewal deadline above decides
        if state != TrialState.RUNNING:
            return "the claim expired and another worker took the run over"
        return None

    def check(self) -> None:
        reason = self.lost or self._why_lost()
        if reason:
            self.lost = reason
            raise RunTakenOver(reason)

    def done(self) -> None:
        self.check()
        self.finished = True


def _host() -> str:
    import socket

    return socket.gethostname()


def claims_for(ctx) -> LockFiles | Leases:
    """Leases when the study's storage is a database server (several hosts may share it), else lock
    files beside the local checkpoints."""
    if ctx.storage.multi_machine:
        return Leases(ctx.storage, ctx.study.name, ctx.stale_after)
    return LockFiles(ctx.final_checkpoints)
