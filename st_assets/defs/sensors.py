"""The incoming-data sensor: one run of the whole graph per batch of new file contents."""

import hashlib
import json

import dagster as dg

from st_assets.settings import Settings
from st_assets.steps.ingest import list_incoming_files


def build_incoming_sensor(settings: Settings, job_name: str) -> dg.SensorDefinition:
    """A sensor that requests the job ``job_name`` when files with new content appear in ``incoming/``.

    The cursor holds each file's last requested content and a count of requests, so a restart repeats
    nothing, and a file name with content not yet requested under it is new data: a new file, changed
    content (even content the file held before), or a file renamed (to fix its name, as a rejection
    may ask; a renamed copy's rows are then quarantined as repeats, which blocks nothing). A file is
    requested only once its size held still from one tick to the next: one that is new or changed size
    since the previous tick may still be being written, and waits.
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
        state = json.loads(context.cursor) if context.cursor else {}
        files = list_incoming_files(settings.incoming_dir)
        requested: dict[str, str] = state.get("requested", {})
        if "seen" in state:
            # A cursor of an earlier version: files whose content it saw count as requested.
            seen = set(state["seen"])
            requested = {item.source_file: item.content_hash for item in files if item.content_hash in seen}
            requested |= state.get("requested", {})
        sizes = {item.source_file: item.size for item in files}
        changed = [item for item in files if requested.get(item.source_file) != item.content_hash]
        unsettled = [
            item.source_file for item in changed if state.get("sizes", {}).get(item.source_file) != item.size
        ]
        new_files = [item for item in changed if item.source_file not in unsettled]
        request_count = int(state.get("request_count", 0))
        new_cursor = {"requested": requested, "sizes": sizes, "request_count": request_count}
        if not new_files:
            reason = (
                f"waiting one tick for {', '.join(unsettled)} to stop growing"
                if unsettled
                else f"no new content among {len(files)} files in {settings.incoming_dir}"
            )
            context.update_cursor(json.dumps(new_cursor))
            return dg.SkipReason(reason)
        new_cursor["requested"] = requested | {item.source_file: item.content_hash for item in new_files}
        new_cursor["request_count"] = request_count + 1
        # The request count makes every request's key its own (A -> B -> A -> B repeats no key), while a
        # tick evaluated again after a crash, before its cursor was saved, repeats its key and is skipped.
        changes = sorted(f"{item.source_file}:{item.content_hash}" for item in new_files)
        run_key = hashlib.sha256("\n".join([str(request_count), *changes]).encode()).hexdigest()[:24]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=run_key,
                    tags={"st_assets/new_files": ",".join(item.source_file for item in new_files)[:200]},
                )
            ],
            cursor=json.dumps(new_cursor),
        )

    return incoming_files_sensor
