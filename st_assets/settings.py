"""The one settings model: paths, base model, pair format, loss, training and gate thresholds."""

from __future__ import annotations

import json
from enum import Enum
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from st_assets.steps.formats import LOSS_NAMES, PairFormat

# Model versions live in <home>/models/<version>, beside the warehouse file.
MODELS_FOLDER = "models"

DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"

# The settings of a home, beside its incoming/ folder: read by the bundled definitions and st-assets.
SETTINGS_FILE = "settings.yaml"


class Settings(BaseModel):
    """Everything a run needs; flows from Dagster config/resources into the steps."""

    home: Path = Field(
        default=Path("data"),
        description="Data root (~ expanded): incoming/, models/, the warehouse, cache/ and reports/.",
    )
    base_model: str = Field(default=DEFAULT_BASE_MODEL, min_length=1, description="Local path or model name.")
    pair_format: PairFormat | None = Field(
        default=None,
        description=(
            "Read every incoming file as this format instead of detecting it from its columns (scored, binary, "
            "triplet, anchor_positive, labelled_texts, unlabelled_texts); columns it does not use are ignored."
        ),
    )
    score_scale: float = Field(default=1.0, gt=0, description="Divide scores by this (5 for STS-style 0-5).")
    score_scales: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description=(
            "Score scale per file-name pattern (fnmatch), e.g. {'stsb*.csv': 5}: files on different scales "
            "in one home. A file matching no pattern uses score_scale."
        ),
    )
    # 20% keeps the bootstrap CI of a 2-point gain above zero on a few thousand rows.
    eval_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Share of the rows held out as the eval split (rows sharing a text stay on one side).",
    )
    seed: int = Field(
        default=42,
        description=(
            "Seeds the train/eval split, training, bootstraps and samples. Changing it reshuffles the split; "
            "the gate then compares a fine-tuned champion only on eval rows it did not train on. A launchpad "
            "override of finetuned_model seeds that training alone."
        ),
    )
    # Keyed by PairFormat, so a misspelt format ("labeled_texts") is an error, not a silent default.
    losses: dict[PairFormat, str] = Field(
        default_factory=dict,
        description=(
            "Loss per pair format, overriding the format's default, e.g. {scored: CoSENTLoss} or "
            "{labelled_texts: MultipleNegativesRankingLoss}."
        ),
    )
    matryoshka_dims: list[PositiveInt] = Field(
        default_factory=list, description="Wrap every loss in MatryoshkaLoss over these dimensions."
    )
    hard_negatives: bool = Field(
        default=False,
        description=(
            "Mine one hard negative per anchor of anchor/positive pairs, and of labelled texts trained as pairs "
            "(MultipleNegativesRankingLoss): never of the anchor's label, never within 5% of the positive's "
            "similarity."
        ),
    )
    augment: Literal["none", "counterfactual"] = Field(
        default="none",
        description="none, or counterfactual: add gender-swapped copies of training rows (CDA).",
    )
    counterfactual_groups: list[str] = Field(
        default_factory=lambda: ["gender", "gender_names"],
        min_length=1,
        description=(
            "Term-map groups that counterfactual augmentation and the invariance probe swap: the bundled "
            "gender, gender_names and age, or groups of your own counterfactual_terms.json."
        ),
    )
    epochs: int = Field(default=1, ge=1, description="Passes over the training rows.")
    batch_size: int | None = Field(
        default=None,
        ge=2,
        description="Training batch size; null: 8 when every training row is a scored pair, else 32.",
    )
    learning_rate: float = Field(default=2e-5, gt=0, description="Peak learning rate (linear decay).")
    warmup_ratio: float = Field(
        default=0.1, ge=0, lt=1, description="Share of the training steps the learning rate warms up over."
    )
    max_seq_length: int = Field(
        default=128,
        ge=8,
        description="Tokens of each text the model reads in training; the rest is cut. The saved model reads as many "
        "as its base model does, or this many if more.",
    )
    eval_steps: int | None = Field(
        default=None,
        ge=0,
        description="Evaluate on the eval split every N steps; null: 4 times an epoch; 0: off.",
    )
    keep_best_checkpoint: bool = Field(
        default=True, description="End with the checkpoint that scored best during training."
    )
    early_stopping_patience: int | None = Field(
        default=None, ge=1, description="Stop after this many in-training evaluations without a better score."
    )
    train_window_rows: int | None = Field(
        default=None, ge=1, description="Train on the most recently arrived N rows (plus a replay sample)."
    )
    train_window_days: float | None = Field(
        default=None,
        gt=0,
        description="Train on rows that arrived in the last N days (plus a replay sample).",
    )
    replay_fraction: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Older rows mixed into a windowed training set, as a fraction of the window's rows (rounded up).",
    )
    max_text_tokens: int | None = Field(
        default=None, ge=1, description="Quarantine texts longer than this many base-model tokens."
    )
    max_text_chars: int = Field(
        default=2000, ge=1, description="Quarantine longer texts; st-assets serve refuses them too."
    )
    max_file_bytes: int = Field(
        default=512 * 1024**2,
        ge=1,
        description="Reject a larger incoming file (a Parquet file's decoded size); reading takes "
        "about ten times a file's size in memory.",
    )
    max_quarantine_rate: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Largest share of a file's rows that may be quarantined before validation blocks the run.",
    )
    min_train_rows: int = Field(
        default=8,
        ge=1,
        description="Fewest train rows validation lets through to training; fewer block the run.",
    )
    promotion_margin: float = Field(
        default=0.0,
        ge=0,
        description="Challenger's primary score must beat the champion's by more than this.",
    )
    # A bundled probe has 8 words per category, so an effect size near 1 has a standard error of about
    # 0.3-0.5: growth below a medium effect (0.5) is within what chance moves it between similar models.
    fairness_tolerance: float = Field(
        default=0.5, ge=0, description="Largest allowed growth of any |effect size| over the champion's."
    )
    # all-MiniLM-L6-v2 itself scores about 0.80 on gender-swapped Banking77 eval texts.
    invariance_threshold: float = Field(
        default=0.7,
        ge=-1,
        le=1,
        description="Lowest mean cosine between eval texts and their gender-swapped copies.",
    )
    min_group_rows: int = Field(
        default=10, ge=1, description="Eval rows a group needs to count towards the largest group gap."
    )
    group_gap_tolerance: float = Field(
        default=0.05,
        ge=0,
        description="Largest allowed growth of a primary metric's group gap over the base model's.",
    )
    bootstrap_samples: int = Field(
        default=1000,
        ge=100,
        description="Resamples for confidence intervals; the promotion gate needs the CI, so at least 100.",
    )
    fairness_severity: str = Field(
        default="WARN",
        pattern="^(WARN|ERROR)$",
        description=(
            "Severity of the fairness and group-gap checks when they fail (WARN or ERROR). Either way the "
            "gate refuses a challenger past fairness_tolerance or invariance_threshold; a group gap is reported."
        ),
    )
    fairness_permutations: int = Field(
        default=2_000, ge=10, description="Permutations behind each association test's p-value."
    )
    retrain_min_new_pairs: int = Field(
        default=200,
        ge=1,
        description="Retrain once this many new train rows arrived since the last training.",
    )
    retrain_drift_auc: float = Field(
        default=0.75,
        gt=0.5,
        le=1,
        description="Retrain when a classifier tells new texts from old this well.",
    )
    retrain_after_days: float = Field(
        default=7.0, gt=0, description="Retrain on any new data once the champion is this old."
    )
    retrain_schedule: str | None = Field(
        default="0 3 * * 1", description="Cron of the periodic retraining run (weekly); null: no schedule."
    )
    keep_model_versions: int | None = Field(
        default=5,
        ge=1,
        description=(
            "Fine-tuned model folders kept besides the champion's: the most recently built. A training removes "
            "older ones from models/ (their registry rows stay, with folder_removed_at); null keeps every one."
        ),
    )
    sensor_enabled: bool = Field(default=True, description="Start the incoming-files sensor with Dagster.")
    encode_backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        default="onnx",
        description="onnx: exported once per model, same vectors as torch, faster on CPU; onnx-int8 trades accuracy.",
    )
    encode_batch_size: int = Field(default=64, ge=1, description="Texts per batch when encoding embeddings.")
    embedding_partitions: bool = Field(
        default=False,
        description=(
            "Add embedding_shards, partitioned by incoming file, so encoding runs as parallel partition "
            "runs; corpus_embeddings then writes the table from the shards."
        ),
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:<index>.",
    )

    @field_validator("losses")
    @classmethod
    def _known_losses(cls, losses: dict[PairFormat, str]) -> dict[PairFormat, str]:
        for pair_format, name in losses.items():
            if name not in LOSS_NAMES[pair_format]:
                raise ValueError(
                    f"loss {name!r} does not fit format {pair_format.value}; "
                    f"choose one of {sorted(LOSS_NAMES[pair_format])}"
                )
        return losses

    @field_validator("home")
    @classmethod
    def _expand_user(cls, home: Path) -> Path:
        # ST_ASSETS_HOME=~/st from a .env file or a service unit reaches Python unexpanded by any shell.
        return home.expanduser()

    def score_scale_for(self, source_file: str) -> float:
        """The scale of ``source_file``'s scores: the first ``score_scales`` pattern it matches, else
        ``score_scale``."""
        return next(
            (scale for pattern, scale in self.score_scales.items() if fnmatchcase(source_file, pattern)),
            self.score_scale,
        )

    @property
    def incoming_dir(self) -> Path:
        return self.home / "incoming"

    @property
    def models_dir(self) -> Path:
        return self.home / MODELS_FOLDER

    @property
    def warehouse_path(self) -> Path:
        return self.home / "st_assets.duckdb"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def fairness_tests_dir(self) -> Path:
        return self.home / "fairness_tests"


def setting_default(name: str) -> Any:
    """The value of the setting ``name`` when ``settings.yaml`` does not set it."""
    field = Settings.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]


def settings_reference() -> str:
    """Every key ``settings.yaml`` takes, with its default and description, as a Markdown table (README)."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name == "home":  # ST_ASSETS_HOME, not a key of the file
            continue
        default = setting_default(name)
        shown = json.dumps(default.value if isinstance(default, Enum) else default)
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | `{shown}` | {description} |")
    return "\n".join(rows)


def home_settings(home: Path) -> Settings:
    """The settings of ``home``: any Settings field but ``home`` from its ``settings.yaml``, the defaults
    for the rest (all of them without the file). A key that is no field, or a bad value, raises naming
    the file."""
    path = home.expanduser() / SETTINGS_FILE
    if not path.is_file():
        return Settings(home=home)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings (name: value), got {type(values).__name__}")
    if unknown := sorted(str(name) for name in values if name not in Settings.model_fields or name == "home"):
        raise ValueError(
            f"{path}: {unknown} are not settings here (the home is ST_ASSETS_HOME); "
            f"the settings are {sorted(set(Settings.model_fields) - {'home'})}"
        )
    try:
        return Settings(home=home, **values)
    except ValidationError as error:
        raise ValueError(f"{path}: {error}") from None
