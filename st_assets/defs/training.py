"""The training asset: fine-tune the challenger on the train split and register it."""

import json

import dagster as dg

from st_assets.defs.resources import WAREHOUSE_POOL
from st_assets.settings import Settings
from st_assets.steps.train import TRAINING_CODE_VERSION, train_model
from st_assets.store.registry import register_model
from st_assets.store.warehouse import Warehouse


def build_training_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """``finetuned_model`` for these settings."""
    warehouse = Warehouse(settings.warehouse_path)

    @dg.asset(
        deps=["validated_pairs"],
        group_name="training",
        kinds={"pytorch", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version=TRAINING_CODE_VERSION,
        owners=["team:ml-platform"],
        description=(
            f"The challenger: {settings.base_model} fine-tuned with sentence-transformers on the train split, "
            "one loss per pair format, saved as safetensors under models/<version>/. The version hashes base "
            "model, training data, config and code, so unchanged inputs reuse it instead of retraining."
        ),
    )
    def finetuned_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with warehouse.connect() as connection:
            train_pairs = connection.execute(
                "SELECT * FROM validated_pairs WHERE split = 'train' ORDER BY source_file, row_number"
            ).df()
        trained = train_model(train_pairs, settings)
        context.log.info(
            f"{'reused' if trained.reused else 'trained'} {trained.version} on {trained.train_rows} rows "
            f"({trained.loss_summary}) in {trained.train_seconds:.0f} s"
        )
        with warehouse.connect() as connection:
            register_model(
                connection,
                {
                    "version": trained.version,
                    "path": str(trained.path.resolve()),
                    "base_model": trained.base_model,
                    "loss": trained.loss_summary,
                    "data_version": trained.data_version,
                    "config": json.dumps(trained.config, sort_keys=True),
                    "code_version": TRAINING_CODE_VERSION,
                    "train_rows": trained.train_rows,
                    "train_seconds": trained.train_seconds,
                },
            )
        losses = [entry["loss"] for entry in trained.log_history if "loss" in entry]
        return dg.MaterializeResult(
            metadata={
                "model_version": trained.version,
                "reused_existing_version": trained.reused,
                "data_version": trained.data_version,
                "losses": trained.loss_summary,
                "train_rows": trained.train_rows,
                "train_seconds": float(trained.train_seconds),
                "final_train_loss": float(losses[-1]) if losses else float("nan"),
                "train_loss_curve": dg.MetadataValue.json(losses),
                "path": dg.MetadataValue.path(str(trained.path)),
            }
        )

    return [finetuned_model]
