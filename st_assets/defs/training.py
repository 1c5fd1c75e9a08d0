"""The training asset: fine-tune the challenger on the train split and register it."""

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field, model_validator

from st_assets.defs.resources import (
    WAREHOUSE_POOL,
    WarehouseResource,
    require_passed_validation,
    settings_code_version,
    stops_when_interrupted,
)
from st_assets.settings import Settings, setting_default
from st_assets.steps.drift import embedding_drift
from st_assets.steps.formats import CONTENT_ORDER
from st_assets.steps.models import encode_texts, load_model, resolve_base_model, resolve_device
from st_assets.steps.policy import MIN_DRIFT_TEXTS, RetrainDecision, decide_retraining
from st_assets.steps.training_code import TRAINING_CODE_VERSION, NoTrainingPairsError, TrainingSettingError
from st_assets.store.registry import (
    BASE_VERSION,
    FolderRemoval,
    ModelVersion,
    get_champion,
    get_latest_challenger,
    register_model,
    remove_old_model_folders,
    require_model_folder,
)
from st_assets.store.warehouse import Replacement, fetch_scalar, replace_tables

# More texts than this on either side add encoding time without changing the drift AUC much.
DRIFT_SAMPLE_TEXTS = 1000


def _override(name: str) -> Any:
    """A launchpad field overriding the setting ``name``, described as the setting is."""
    return Field(
        default=None,
        description=f"{Settings.model_fields[name].description} Empty: the definitions' {name}.",
    )


class TrainingConfig(dg.Config):
    """Per-run overrides of the training settings, set in the launchpad; empty fields keep the settings.

    They are checked as Settings when the step starts; a bad value fails the run at once, not retried.
    """

    base_model: str | None = _override("base_model")
    epochs: int | None = _override("epochs")
    batch_size: int | None = _override("batch_size")
    learning_rate: float | None = _override("learning_rate")
    warmup_ratio: float | None = _override("warmup_ratio")
    max_seq_length: int | None = _override("max_seq_length")
    seed: int | None = _override("seed")
    eval_steps: int | None = _override("eval_steps")
    keep_best_checkpoint: bool | None = _override("keep_best_checkpoint")
    early_stopping_patience: int | None = _override("early_stopping_patience")
    losses: dict[str, str] | None = _override("losses")
    matryoshka_dims: list[int] | None = _override("matryoshka_dims")
    hard_negatives: bool | None = _override("hard_negatives")
    train_window_rows: int | None = _override("train_window_rows")
    train_window_days: float | None = _override("train_window_days")
    replay_fraction: float | None = _override("replay_fraction")
    device: str | None = _override("device")
    augment: str | None = _override("augment")
    counterfactual_groups: list[str] | None = _override("counterfactual_groups")
    unset: list[str] = Field(
        default=[],
        description=(
            "Settings this run takes at their defaults, whatever settings.yaml says (an empty field above keeps "
            "the file's value): e.g. [train_window_rows] trains on every row, [early_stopping_patience] "
            "trains every epoch."
        ),
    )
    force: bool = Field(
        default=False,
        description="Train now whatever the retraining policy says, and gate the challenger anew.",
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_means_default(cls, values: Any) -> Any:
        """An empty ``unset:`` or ``force:`` in the launchpad's YAML (null) is its default, as for the rest."""
        if isinstance(values, dict):
            return {
                name: value
                for name, value in values.items()
                if value is not None or name not in {"unset", "force"}
            }
        return values

    def overridden(self) -> list[str]:
        """The names of the settings this run overrides or unsets."""
        given = self.model_dump(exclude={"force", "unset"})
        return [name for name, value in given.items() if value is not None] + list(self.unset)

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with this run's overrides, validated like any Settings; ``ValueError`` names a
        setting in ``unset`` that no field above overrides, or one given a value as well."""
        for name in self.unset:
            if name not in TrainingConfig.model_fields or name in {"force", "unset"}:
                raise ValueError(f"unset: {name!r} is no training setting of this launchpad")
            if getattr(self, name) is not None:
                raise ValueError(f"unset: {name!r} is given a value as well")
        overrides = {name: getattr(self, name) for name in self.overridden() if name not in self.unset}
        if "losses" in overrides:
            # A run's loss for one format leaves the configured losses of the others in place.
            overrides["losses"] = {**settings.losses, **overrides["losses"]}
        overrides |= {name: setting_default(name) for name in self.unset}
        return Settings.model_validate({**settings.model_dump(), **overrides})


def _retraining_decision(
    pairs: pd.DataFrame,
    champion: ModelVersion | None,
    champion_built: datetime | None,
    last_trained: datetime | None,
    settings: Settings,
    run_tags: Mapping[str, str],
    forced: bool,
    changed_settings: list[str],
) -> tuple[RetrainDecision, float]:
    """Apply the retraining policy to the rows that arrived since the last training.

    That is since the champion was registered, or since a later challenger was built: rows a rejected
    challenger trained on are not new again on every run after it.
    """
    train_rows = pairs[pairs["split"] == "train"]
    if champion is None or champion_built is None:
        new_rows, old_rows = train_rows, train_rows.iloc[:0]
    else:
        since = max(champion_built, last_trained) if last_trained is not None else champion_built
        arrived_after = pd.to_datetime(train_rows["arrived_at"], utc=True) > pd.Timestamp(since)
        new_rows, old_rows = train_rows[arrived_after], train_rows[~arrived_after]
    drift_auc = float("nan")
    # A forced run trains whatever the drift: it neither needs the score nor a loadable champion.
    if (
        champion is not None
        and not forced
        and len(new_rows) >= MIN_DRIFT_TEXTS
        and len(old_rows) >= MIN_DRIFT_TEXTS
    ):
        model = load_model(require_model_folder(champion).path, device=resolve_device(settings.device))
        # Distinct texts: an anchor repeated over many rows is one text, not many (see embedding_drift).
        old_distinct, new_distinct = (
            old_rows["sentence1"].drop_duplicates(),
            new_rows["sentence1"].drop_duplicates(),
        )
        old_texts = old_distinct.sample(
            min(DRIFT_SAMPLE_TEXTS, len(old_distinct)), random_state=settings.seed
        )
        new_texts = new_distinct.sample(
            min(DRIFT_SAMPLE_TEXTS, len(new_distinct)), random_state=settings.seed
        )
        drift_auc = embedding_drift(
            encode_texts(model, old_texts.tolist()), encode_texts(model, new_texts.tolist()), settings.seed
        ).statistic
    age_days = (
        (datetime.now(UTC) - champion_built).total_seconds() / 86400 if champion_built is not None else None
    )
    decision = decide_retraining(
        has_champion=champion is not None,
        new_train_rows=len(new_rows),
        drift_auc=drift_auc,
        champion_age_days=age_days,
        scheduled="dagster/schedule_name" in run_tags,
        forced=forced,
        settings=settings,
        changed_settings=changed_settings,
    )
    return decision, drift_auc


# The settings a launchpad may override; not ``device``, which changes where a model trains, not what it becomes.
TRAINING_SETTING_NAMES = set(TrainingConfig.model_fields) - {"force", "unset", "device"}


def training_settings(settings: Settings) -> dict[str, Any]:
    """The training settings (``TRAINING_SETTING_NAMES``) as JSON values."""
    return settings.model_dump(mode="json", include=TRAINING_SETTING_NAMES)


def changed_training_settings(recorded: str | None, settings: Settings) -> list[str]:
    """Each training setting that differs from the ``recorded`` ones (JSON of ``training_settings``, stored
    with the last version trained), as ``name old → new``; none when nothing was recorded."""
    if recorded is None:
        return []
    before, now = json.loads(recorded), training_settings(settings)
    return [
        f"{name} {json.dumps(before.get(name))} → {json.dumps(now[name])}"
        for name in sorted(now)
        if name in before and before[name] != now[name]
    ]


def build_training_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """``finetuned_model`` for these settings."""

    @dg.asset(
        deps=["validated_pairs"],
        group_name="training",
        kinds={"pytorch", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version=settings_code_version(TRAINING_CODE_VERSION, settings, TRAINING_SETTING_NAMES),
        owners=["team:ml-platform"],
        retry_policy=dg.RetryPolicy(max_retries=1, delay=10),
        description=(
            "Applies the retraining policy (enough new rows, embedding drift, champion age or a scheduled "
            "run; the decision and the drift score are metadata), then trains the challenger: "
            f"{settings.base_model} fine-tuned with sentence-transformers on the train "
            "split, one loss per pair format (several formats train together), evaluated on the eval split "
            "during training with the best checkpoint kept, saved as safetensors under models/<version>/ "
            "with a model card, and its training texts recorded in training_texts; folders of versions past "
            "keep_model_versions (not the champion's) are removed, their registry rows kept. The version hashes base "
            "model files, training data, config and code, so unchanged inputs reuse it instead of retraining. "
            "A run that trains nothing names launchpad overrides it left unused; a window whose rows form no "
            "training pair trains nothing while a champion serves."
        ),
    )
    @stops_when_interrupted
    def finetuned_model(
        context: dg.AssetExecutionContext, config: TrainingConfig, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        try:
            run_settings = config.apply(settings)
        except ValueError as error:  # a pydantic ValidationError among them
            # Another try reads the same config: fail at once.
            raise dg.Failure(f"finetuned_model run config: {error}", allow_retries=False) from None
        require_passed_validation(context)
        # Before the drift score loads the champion on it: a device torch cannot use fails every try.
        if run_settings.device != "auto":
            try:
                resolve_device(run_settings.device)
            except TrainingSettingError as error:
                raise dg.Failure(str(error), allow_retries=False) from None
        with st_assets_warehouse.connect() as connection:
            pairs = connection.execute(f"SELECT * FROM validated_pairs ORDER BY {CONTENT_ORDER}").df()
            champion = get_champion(connection)
            latest = get_latest_challenger(connection)
            # When the champion was last built, not first: a version first built long ago, rebuilt
            # with force and promoted, is as old as its last build.
            champion_built = fetch_scalar(
                connection, "SELECT last_built_at FROM model_registry WHERE status = 'champion'"
            )
            last_trained = fetch_scalar(
                connection, "SELECT max(last_built_at) FROM model_registry WHERE version <> ?", [BASE_VERSION]
            )
            recorded_settings = (
                fetch_scalar(
                    connection,
                    "SELECT training_settings FROM model_registry WHERE version = ?",
                    [latest.version],
                )
                if latest is not None
                else None
            )
        # The home's settings, not this run's overrides: a run that overrides them (with force) must not
        # make the next run train again with the home's.
        changed_settings = changed_training_settings(recorded_settings, settings)
        decision, drift_auc = _retraining_decision(
            pairs,
            champion,
            champion_built,
            last_trained,
            run_settings,
            context.run.tags,
            config.force,
            changed_settings,
        )
        overridden = config.overridden()
        if overridden and not decision.train:
            # Overrides shape a training; a run that trains nothing would otherwise drop them unsaid.
            decision = RetrainDecision(
                False,
                (
                    *decision.reasons,
                    f"run config {', '.join(overridden)} unused: add force: true to train with it",
                ),
            )
            context.log.warning(decision.summary)
        else:
            context.log.info(decision.summary)

        def nothing_trained(summary: str) -> dg.MaterializeResult:
            return dg.MaterializeResult(
                data_version=dg.DataVersion(latest.version if latest else "none"),
                metadata={
                    "training_decision": summary,
                    "trained": False,
                    "drift_auc": float(drift_auc),
                    # The version this asset last produced, which evaluation compares; and the champion.
                    "model_version": latest.version if latest else None,
                    "champion_version": champion.version if champion else None,
                },
            )

        if not decision.train:
            return nothing_trained(decision.summary)
        try:
            resolve_base_model(run_settings.base_model)
        except ValueError as error:  # a packaged model not installed: another try fails too
            raise dg.Failure(str(error), allow_retries=False) from None
        # Imported here: train imports torch, which loading the definitions (every code-server reload,
        # every sensor tick in a fresh process) should not wait for.
        from st_assets.steps.train import train_model

        try:
            trained = train_model(
                pairs[pairs["split"] == "train"], run_settings, eval_pairs=pairs[pairs["split"] == "eval"]
            )
        except TrainingSettingError as error:
            raise dg.Failure(str(error), allow_retries=False) from None
        except NoTrainingPairsError as error:
            if champion is None or config.force:
                raise dg.Failure(str(error), allow_retries=False) from error
            # A window of rows that pair with nothing (a new intent's first text, replay_fraction 0) waits
            # for rows that do; the champion serves meanwhile and the new texts are embedded all the same.
            context.log.warning(f"{decision.summary}; but {error}")
            return nothing_trained(f"{decision.summary}; but nothing trained: {error}")
        context.log.info(
            f"{'reused' if trained.reused else 'trained'} {trained.version} on {trained.train_rows} rows "
            f"({trained.loss_summary}) in {trained.train_seconds:.0f} s"
        )
        with st_assets_warehouse.connect() as connection:
            # Only an incumbent's texts are ever read (by evaluation_report): those of versions that are
            # neither the champion nor this one go, and a version trained again records them anew.
            superseded = connection.execute(
                "SELECT DISTINCT model_version FROM training_texts WHERE model_version NOT IN "
                "(SELECT version FROM model_registry WHERE status = 'champion')"
            ).fetchall()
            # Before the registry row: a registered version always has its texts recorded.
            replace_tables(
                connection,
                [
                    Replacement(
                        "training_texts",
                        pd.DataFrame(
                            {"model_version": trained.version, "text": sorted(trained.trained_texts)},
                            columns=["model_version", "text"],
                        ),
                        "model_version",
                        [trained.version, *(version for (version,) in superseded)],
                    )
                ],
            )
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
                    "training_settings": json.dumps(training_settings(settings), sort_keys=True),
                    "train_rows": trained.train_rows,
                    "train_seconds": trained.train_seconds,
                },
            )
            old_folders = (
                remove_old_model_folders(
                    connection, settings.models_dir, settings.keep_model_versions, settings.base_model
                )
                if settings.keep_model_versions is not None
                else FolderRemoval([], [])
            )
        if old_folders.removed:
            context.log.info(
                f"keep_model_versions {settings.keep_model_versions}: removed the folders of "
                f"{', '.join(old_folders.removed)}"
            )
        for failure in old_folders.failed:
            context.log.warning(f"could not remove an old model folder, kept: {failure}")
        train_losses = [entry["loss"] for entry in trained.log_history if "loss" in entry]
        eval_scores = [
            entry["eval_sequential_score"]
            for entry in trained.log_history
            if "eval_sequential_score" in entry
        ]
        return dg.MaterializeResult(
            # The model version: evaluation and promotion are stale exactly when it changes.
            data_version=dg.DataVersion(trained.version),
            metadata={
                "training_decision": decision.summary,
                "trained": not trained.reused,
                "drift_auc": float(drift_auc),
                "augmentation": dg.MetadataValue.json(trained.augmentation),
                "model_version": trained.version,
                "reused_existing_version": trained.reused,
                "data_version": trained.data_version,
                "losses": trained.loss_summary,
                "train_rows": trained.train_rows,
                "train_seconds": float(trained.train_seconds),
                "train_examples": trained.train_examples,
                "train_pairs_per_second": float(trained.train_examples / trained.train_seconds)
                if trained.train_seconds
                else 0.0,
                # Below batch_size when label-distinct batches run short of labels (few labels, mined negatives).
                "examples_per_step": float(trained.train_examples / trained.train_steps)
                if trained.train_steps
                else float("nan"),
                "final_train_loss": float(train_losses[-1]) if train_losses else float("nan"),
                "best_eval_score": float(max(eval_scores)) if eval_scores else float("nan"),
                # The kept weights' score when keep_best_checkpoint is off (the last evaluation is the last step's).
                "last_eval_score": float(eval_scores[-1]) if eval_scores else float("nan"),
                "train_loss_curve": dg.MetadataValue.json(train_losses),
                "eval_score_curve": dg.MetadataValue.json(eval_scores),
                "config": dg.MetadataValue.json(trained.config),
                "path": dg.MetadataValue.path(str(trained.path)),
                "model_folders_removed": dg.MetadataValue.json(old_folders.removed),
            },
        )

    return [finetuned_model]
