"""Whether the process training a RUNNING run is still there.

MLflow has no notion of a dead run: a process killed with -9 (or a machine that lost power) leaves
its run RUNNING for ever, and the report would say "still training" about it indefinitely. Every
training stamps its run with its owner -- the machine (hostname and boot id, so a reboot is another
machine), the pid and the pid's start time (so a reused pid is told apart) -- when it starts or
resumes it. On the same machine, a run whose owner process is gone is certainly dead; one owned on
another machine cannot be checked from here and is taken at its word. Runs recorded before the
stamp existed carry none and are left as they are.

`end_dead_runs` marks the dead ones KILLED when a writer opens the store (harness.store.writer), so
the next `train`, `run`, `worker` or `import` sets the record straight; a rerun of the same command
then resumes the run from its checkpoint, as after any interruption. The report, which never writes
to a store, uses `why_dead` to call such a run interrupted rather than training.
"""

from __future__ import annotations

import os
import socket

from harness.store import contract as tc


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()[:8]
    except OSError:
        return "noboot"


HOST_ID = f"{socket.gethostname()}#{_boot_id()}"


def process_start(pid: int) -> str | None:
    """Start time of a process (Linux clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = open(f"/proc/{pid}/stat").read()
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return False
        if start is not None and len(fields) > 19 and fields[19] != start:
            return False
    except OSError:
        pass
    return True


def owner_tags() -> dict[str, str]:
    """The tags naming this process as the one training a run."""
    pid = os.getpid()
    return {tc.OWNER_HOST: HOST_ID, tc.OWNER_PID: str(pid), tc.OWNER_PID_START: process_start(pid) or ""}


def why_dead(tags: dict[str, str]) -> str | None:
    """Why a RUNNING run with these tags cannot be training any more, or None when it may be (its
    owner is alive, on another machine, or not recorded)."""
    pid = tags.get(tc.OWNER_PID, "")
    if tags.get(tc.OWNER_HOST) != HOST_ID or not pid.isdigit():
        return None
    if pid_alive(int(pid), tags.get(tc.OWNER_PID_START) or None):
        return None
    return f"its process {pid} on this machine is gone (killed?)"


def end_dead_runs(client, experiment_id: str) -> int:
    """Mark KILLED every RUNNING run of the experiment whose owner is gone; returns how many."""
    try:
        running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=50000)
    except Exception:  # a store that cannot search now (busy): the next opening tries again
        return 0
    ended = 0
    for run in running:
        why = why_dead(run.data.tags)
        if why is None:
            continue
        from mlflow.entities import RunTag

        client.log_batch(run.info.run_id, tags=[RunTag(tc.FAILURE_TAG, f"interrupted: {why}")])
        client.set_terminated(run.info.run_id, status="KILLED")
        ended += 1
    return ended
