"""The incoming-data sensor: one run of the whole graph per batch of new file contents."""

import hashlib
import json

import dagster as dg

from st_assets.settings import Settings
from st_assets.steps.ingest import list_incoming_files


def build_incoming_sensor(settings: Settings, job_name: str) -> dg.SensorDefinition:
    """A sensor that requests the job ``job_name`` when files with new content appear in ``incoming/``.

    The cursor holds every content hash already requested and each file's last requested content, so a
    restart repeats nothing, a renamed copy triggers nothing, and changed content under an old name is
    new data, even when it reverts to what the file held before. A file is read only once its size
    held still from one tick to the next: one that is new or changed size since the previous tick may
    still be being written, and waits.
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
        seen = set(state.get("seen", []))
        requested: dict[str, str] = state.get("requested", {})
        files = list_incoming_files(settings.incoming_dir)
        sizes = {item.source_file: item.size for item in files}
        # New content, or a file changed back to content it held before (A -> B -> A).
        changed = [
            item
            for item in files
            if item.content_hash not in seen
            or requested.get(item.source_file, item.content_hash) != item.content_hash
        ]
        unsettled = [
            item.source_file for item in changed if state.get("sizes", {}).get(item.source_file) != item.size
        ]
        new_files = [item for item in changed if item.source_file not in unsettled]
        new_cursor = {"seen": sorted(seen), "sizes": sizes, "requested": requested}
        if not new_files:
            reason = (
                f"waiting one tick for {', '.join(unsettled)} to stop growing"
                if unsettled
                else f"no new content among {len(files)} files in {settings.incoming_dir}"
            )
            context.update_cursor(json.dumps(new_cursor))
            return dg.SkipReason(reason)
        new_cursor["seen"] = sorted(seen | {item.content_hash for item in new_files})
        new_cursor["requested"] = requested | {item.source_file: item.content_hash for item in new_files}
        # The content each file had before is part of the key, so that a revert is a run of its own.
        changes = sorted(
            f"{item.source_file}:{requested.get(item.source_file, '')}:{item.content_hash}"
            for item in new_files
        )
        run_key = hashlib.sha256("\n".join(changes).encode()).hexdigest()[:24]
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
