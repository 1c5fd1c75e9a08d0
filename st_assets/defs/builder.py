"""``build_definitions``: the one way the st_assets graph is built, from one Settings object."""

import dagster as dg

from st_assets.defs.evaluation import build_evaluation_assets
from st_assets.defs.ingestion import build_ingestion_assets
from st_assets.defs.resources import WAREHOUSE_RESOURCE, WarehouseResource
from st_assets.defs.sensors import build_incoming_sensor
from st_assets.defs.serving import EMBEDDING_SHARDS, build_serving_assets
from st_assets.defs.training import build_training_assets
from st_assets.defs.validation import build_validation_assets
from st_assets.settings import Settings

PIPELINE_JOB = "st_assets_pipeline"
PIPELINE_RUN_TAG = "st_assets/pipeline"


def build_definitions(settings: Settings) -> dg.Definitions:
    """Assets, checks, the warehouse resource, the pipeline job, the incoming-data sensor and the
    retraining schedule.

    The pipeline job runs in-process; the Definitions set no executor, so they merge into a project
    that chooses its own.
    """
    validation_assets, validation_checks = build_validation_assets(settings)
    evaluation_assets, evaluation_checks = build_evaluation_assets(settings)
    assets = [
        *build_ingestion_assets(settings),
        *validation_assets,
        *build_training_assets(settings),
        *evaluation_assets,
        *build_serving_assets(settings),
    ]
    # Partitioned shards run as backfills of their own; a job holds assets of one partitioning.
    selection = dg.AssetSelection.all()
    if settings.embedding_partitions:
        selection -= dg.AssetSelection.assets(EMBEDDING_SHARDS)
    job = dg.define_asset_job(
        PIPELINE_JOB,
        selection=selection,
        description=("Ingest, validate, train, evaluate, gate and embed: the whole st_assets graph."),
        # Steps run one after another and each would re-import torch in its own process.
        executor_def=dg.in_process_executor,
        # dagster.yaml queues runs carrying this tag one at a time: two interleaved pipeline runs could
        # train on data the other's blocking check failed, or gate each other's challenger.
        tags={PIPELINE_RUN_TAG: "1"},
    )
    schedules = (
        [
            dg.ScheduleDefinition(
                name="retraining_schedule",
                job_name=PIPELINE_JOB,
                cron_schedule=settings.retrain_schedule,
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description="Periodic retraining on recent data: the policy trains when new rows arrived.",
            )
        ]
        if settings.retrain_schedule
        else []
    )
    return dg.Definitions(
        schedules=schedules,
        assets=assets,
        asset_checks=[*validation_checks, *evaluation_checks],
        jobs=[job],
        sensors=[build_incoming_sensor(settings, PIPELINE_JOB)],
        resources={WAREHOUSE_RESOURCE: WarehouseResource(path=str(settings.warehouse_path))},
    )
