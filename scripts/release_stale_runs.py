"""Fail the runs of this Dagster instance whose process is gone, and free the pool slots they held.

``make demo`` and ``make ui`` call it first: with no daemon to notice, a run killed mid-step (out of
memory, its terminal closed) stays STARTED and keeps its ``st_assets_warehouse`` slot for ever, and the
next materialisation waits on that slot without a word.
"""

from __future__ import annotations

import os

import dagster as dg

_UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def release_stale_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark as failed every unfinished run none of whose processes (on this machine) is alive, free its
    pool slots, and return the ids of the runs released."""
    released = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_UNFINISHED)):
        pids = {
            entry.dagster_event.pid
            for entry in instance.all_logs(run.run_id)
            if entry.dagster_event is not None and entry.dagster_event.pid
        }
        if not pids or any(_alive(pid) for pid in pids):
            continue
        instance.report_run_failed(
            run, "its process ended without finishing the run (killed, or its terminal closed)"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def main() -> None:
    with dg.DagsterInstance.get() as instance:
        for run_id in release_stale_runs(instance):
            print(f"run {run_id} had stopped without finishing: marked failed, its pool slots freed")


if __name__ == "__main__":
    main()
