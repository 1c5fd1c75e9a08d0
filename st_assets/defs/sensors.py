"""The incoming-data sensor: one run of the whole graph per batch of new file contents."""

import hashlib
import json
import time
from enum import StrEnum

import dagster as dg
import duckdb

from st_assets.defs.ingestion import FILES_NOT_READ
from st_assets.settings import Settings
from st_assets.steps.ingest import IncomingFile, list_incoming_files
from st_assets.store.warehouse import Warehouse, WarehouseLockedError

# The cursor keeps this many hex digits of each requested file's sha256: enough to tell contents apart,
# and a quarter of the bytes a daemon stores with every tick.
_CURSOR_HASH_DIGITS = 16


# Requests whose run is still to be looked at: a run that ends before raw_texts ingested (cancelled while
# queued, failed to launch) gives its files back. Only the latest ones are kept.
_PENDING_REQUESTS = 50
_FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


# How long a fresh cursor's tick waits for a run's hold on the warehouse before trying again next tick.
_FRESH_CURSOR_WAIT_SECONDS = 5.0

# Dagster refuses a tag value longer than this.
_TAG_CHARS = 200


def _names_tag(names: list[str]) -> str:
    """File names for a run tag: as many as fit, then how many more there are."""
    shown: list[str] = []
    for index, name in enumerate(names):
        more = f" (+{len(names) - index} more)"
        if len(",".join([*shown, name])) + (len(more) if index < len(names) - 1 else 0) > _TAG_CHARS:
            return ",".join(shown) + more
        shown.append(name)
    return ",".join(shown)


def _short(content_hash: str) -> str:
    return content_hash[:_CURSOR_HASH_DIGITS]


def _mark(item: IncomingFile) -> str:
    """Size and content: a file is settled when both held still for a tick (a copy that sets the final
    size first, then fills it, changes content at one size)."""
    return f"{item.size}:{_short(item.content_hash)}"


class _Outcome(StrEnum):
    """What a finished requested run did with its files."""

    READ = "read"  # raw_texts materialised: the files were read
    FAILED_READING = "failed_reading"  # raw_texts started and did not finish
    NOT_STARTED = "not_started"  # cancelled while queued, failed to launch, or failed upstream


def _step_events(instance: dg.DagsterInstance, run_id: str, event_type: dg.DagsterEventType) -> list:
    return [
        record.event_log_entry.dagster_event
        for record in instance.get_records_for_run(run_id, of_type=event_type).records
        if record.event_log_entry.dagster_event is not None
    ]


def _finished_requests(
    instance: dg.DagsterInstance, pending: dict[str, dict[str, str]]
) -> dict[str, tuple[_Outcome, set[str]]]:
    """For each run key of ``pending`` whose run has finished: what it did with its files, and those
    raw_texts left for a later run."""
    finished = {}
    for run_key in pending:
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
        if not runs or runs[0].status not in _FINISHED:
            continue
        run_id = runs[0].run_id
        materialised = [
            event.event_specific_data.materialization.metadata
            for event in _step_events(instance, run_id, dg.DagsterEventType.ASSET_MATERIALIZATION)
            if event.asset_key == dg.AssetKey("raw_texts")
        ]
        if materialised:
            not_read = materialised[0].get(FILES_NOT_READ)
            finished[run_key] = (_Outcome.READ, set(not_read.value) if not_read is not None else set())
        elif any(
            event.step_key == "raw_texts"
            for event in _step_events(instance, run_id, dg.DagsterEventType.STEP_START)
        ):
            finished[run_key] = (_Outcome.FAILED_READING, set())
        else:
            finished[run_key] = (_Outcome.NOT_STARTED, set())
    return finished


def _ingested_contents(settings: Settings) -> dict[str, str]:
    """Each file name ``ingested_files`` records, with the content it read: what a fresh cursor (a new
    Dagster instance, a reset) counts as requested already. Raises ``WarehouseLockedError`` while a run
    holds the warehouse longer than a tick should wait."""
    if not settings.warehouse_path.is_file():
        return {}
    with Warehouse(settings.warehouse_path, lock_timeout_seconds=_FRESH_CURSOR_WAIT_SECONDS).connect(
        read_only=True
    ) as connection:
        try:
            rows = connection.execute("SELECT source_file, content_hash FROM ingested_files").fetchall()
        except duckdb.CatalogException:  # a file opened before any run made the tables: nothing ingested
            return {}
    return {name: _short(content_hash) for name, content_hash in rows if content_hash}


def build_incoming_sensor(settings: Settings, job_name: str) -> dg.SensorDefinition:
    """A sensor that requests the job ``job_name`` when files with new content appear in ``incoming/``,
    or when a file it requested before leaves the folder.

    The cursor holds each file's last requested content and a count of requests, so a restart repeats
    nothing, and a file name with content not yet requested under it is new data: a new file, changed
    content (even content the file held before), or a file renamed (to fix its name, as a rejection
    may ask; a renamed copy's rows are then quarantined as repeats, which blocks nothing). A file is
    requested only once its size and content held still from one tick to the next: one that is new or
    changed since the previous tick may still be being written, and waits. The run it requests reads only
    contents the sensor saw settle (``raw_texts`` config ``settled_content``). A file taken out (as a
    blocking check may ask) requests a run too, so the files that came with it go ahead. The cursor
    names the folder it watches: pointed at another folder, the sensor starts afresh. A requested run
    that ends without ``raw_texts`` having read its files (cancelled while queued, failed before
    ingesting) gives them back: they are requested again, once they hold still. So does a run
    whose raw_texts failed (a lock held too long, the process killed), once per file content: one that
    fails twice in the same content waits for a new content, so that a file no run can read does not
    request a failing run every tick. And a run gives back the files raw_texts left for a later run
    (changed since the sensor saw them settle), in case they return to the content requested.
    """

    @dg.sensor(
        job_name=job_name,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING
        if settings.sensor_enabled
        else dg.DefaultSensorStatus.STOPPED,
        description=f"Watches {settings.incoming_dir} and runs the graph when new file content arrives.",
    )
    def incoming_files_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        folder = str(settings.incoming_dir.resolve())
        state = json.loads(context.cursor) if context.cursor else {}
        files = list_incoming_files(settings.incoming_dir)
        if state.get("incoming_dir", folder) != folder:
            state = {}
        requested: dict[str, str] = {name: _short(h) for name, h in state.get("requested", {}).items()}
        if not state:
            # A fresh cursor: contents already ingested (by `make demo`, or before a reset) are not new.
            try:
                ingested = _ingested_contents(settings)
            except WarehouseLockedError:
                return dg.SkipReason("a run holds the warehouse: which files are ingested is read next tick")
            present_now = {item.source_file for item in files}
            requested = {name: digest for name, digest in ingested.items() if name in present_now}
        pending: dict[str, dict[str, str]] = state.get("pending", {})
        # The file contents a run has failed to read once.
        failed_reads: dict[str, str] = state.get("failed_reads", {})
        for run_key, (outcome, not_read) in _finished_requests(context.instance, pending).items():
            given_back = pending.pop(run_key)
            if outcome is _Outcome.READ:
                # Only the files it left for a later run: one may come back to the content requested.
                given_back = {name: digest for name, digest in given_back.items() if name in not_read}
            if outcome is _Outcome.FAILED_READING:
                twice = sorted(
                    name for name, digest in given_back.items() if failed_reads.get(name) == digest
                )
                if twice:
                    context.log.warning(
                        f"raw_texts failed reading {twice} twice (run {run_key}; its log says why): they "
                        "wait until their content changes, or until the sensor's cursor is reset"
                    )
                given_back = {name: digest for name, digest in given_back.items() if name not in twice}
                failed_reads |= given_back
            if given_back:
                context.log.info(
                    f"run {run_key} ended without reading {sorted(given_back)}: requesting them again"
                )
            requested = {name: digest for name, digest in requested.items() if given_back.get(name) != digest}
        if "seen" in state:
            # A cursor of an earlier version: files whose content it saw count as requested.
            seen = set(state["seen"])
            requested |= {
                item.source_file: _short(item.content_hash) for item in files if item.content_hash in seen
            }
        changed = [item for item in files if requested.get(item.source_file) != _short(item.content_hash)]
        unsettled = [
            item.source_file
            for item in changed
            if state.get("settling", {}).get(item.source_file) != _mark(item)
        ]
        new_files = [item for item in changed if item.source_file not in unsettled]
        present = {item.source_file for item in files}
        removed = sorted(name for name in requested if name not in present)
        request_count = int(state.get("request_count", 0))
        new_cursor = {
            "incoming_dir": folder,
            # Set once per cursor: after a reset, request keys must not repeat those of the first cursor.
            "epoch": state.get("epoch", time.time_ns()),
            "requested": requested,
            # Only files not yet requested in their current content need a mark to compare next tick.
            "settling": {item.source_file: _mark(item) for item in changed},
            "request_count": request_count,
            "pending": pending,
            "failed_reads": {name: digest for name, digest in failed_reads.items() if name in present},
        }
        # A removal alone waits for files still changing: a renamed file then makes one request, not two.
        if not new_files and (not removed or unsettled):
            reason = (
                f"waiting one tick for {_names_tag(unsettled)} to stop changing"
                if unsettled
                else f"no new content among {len(files)} files in {settings.incoming_dir}"
            )
            context.update_cursor(json.dumps(new_cursor))
            return dg.SkipReason(reason)
        new_cursor["requested"] = {name: h for name, h in requested.items() if name in present} | {
            item.source_file: _short(item.content_hash) for item in new_files
        }
        new_cursor["settling"] = {item.source_file: _mark(item) for item in changed if item not in new_files}
        new_cursor["request_count"] = request_count + 1
        # The request count makes every request's key its own (A -> B -> A -> B repeats no key), while a
        # tick evaluated again after a crash, before its cursor was saved, repeats its key and is skipped.
        changes = sorted(f"{item.source_file}:{item.content_hash}" for item in new_files)
        key_parts = [
            folder,
            str(new_cursor["epoch"]),
            str(request_count),
            *changes,
            *(f"-{n}" for n in removed),
        ]
        run_key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:24]
        if new_files:
            pending[run_key] = {item.source_file: _short(item.content_hash) for item in new_files}
            new_cursor["pending"] = dict(list(pending.items())[-_PENDING_REQUESTS:])
        settled = sorted({item.content_hash for item in files if item.source_file not in unsettled})
        tags = {"st_assets/new_files": _names_tag([item.source_file for item in new_files])}
        if removed:
            tags["st_assets/removed_files"] = _names_tag(removed)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    run_config={"ops": {"raw_texts": {"config": {"settled_content": settled}}}},
                    tags=tags,
                )
            ],
            cursor=json.dumps(new_cursor),
        )

    return incoming_files_sensor
