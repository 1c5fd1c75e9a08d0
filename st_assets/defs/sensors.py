"""The incoming-data sensor: one run of the whole graph per batch of new file contents."""

import hashlib
import json

import dagster as dg

from st_assets.settings import Settings
from st_assets.steps.ingest import list_incoming_files


def build_incoming_sensor(settings: Settings, job_name: str) -> dg.SensorDefinition:
    """A sensor that requests the job ``job_name`` when files with new content appear in ``incoming/``.

    The cursor holds every content hash already requested, so a restart repeats nothing, a renamed
    copy triggers nothing, and changed content under an old name is new data. A file is read only
    once its size held still from one tick to the next: one that is new or changed size since the
    previous tick may still be being written, and waits.
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
        state = json.loads(context.cursor) if context.cursor else {"seen": [], "sizes": {}}
        seen = set(state["seen"])
        files = list_incoming_files(settings.incoming_dir)
        sizes = {item.source_file: item.size for item in files}
        unseen = [item for item in files if item.content_hash not in seen]
        unsettled = [item.source_file for item in unseen if state["sizes"].get(item.source_file) != item.size]
        new_files = [item for item in unseen if item.source_file not in unsettled]
        new_cursor = {"seen": state["seen"], "sizes": sizes}
        if not new_files:
            reason = (
                f"waiting one tick for {', '.join(unsettled)} to stop growing"
                if unsettled
                else f"no new content among {len(files)} files in {settings.incoming_dir}"
            )
            context.update_cursor(json.dumps(new_cursor))
            return dg.SkipReason(reason)
        hashes = sorted({item.content_hash for item in new_files})
        new_cursor["seen"] = sorted(seen | set(hashes))
        run_key = hashlib.sha256("".join(hashes).encode()).hexdigest()[:24]
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
