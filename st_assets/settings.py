"""The one settings model: paths, base model, pair format, loss, training and gate thresholds."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from st_assets.steps.formats import PairFormat

DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"


class Settings(BaseModel):
    """Everything a run needs; flows from Dagster config/resources into the steps."""

    home: Path = Field(default=Path("data"), description="Data root: incoming/, models/, the warehouse.")
    base_model: str = Field(default=DEFAULT_BASE_MODEL, description="Local path or model name.")
    pair_format: PairFormat | None = Field(
        default=None, description="Force one format for every incoming file instead of detecting it."
    )
    score_scale: float = Field(default=1.0, gt=0, description="Divide scores by this (5 for STS-style 0-5).")
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 42
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=2)
    learning_rate: float = Field(default=2e-5, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_seq_length: int = Field(default=128, ge=8)
    max_text_chars: int = Field(default=2000, ge=1)
    max_quarantine_rate: float = Field(default=0.2, ge=0, le=1)
    min_train_rows: int = Field(default=8, ge=1)
    promotion_margin: float = Field(
        default=0.0,
        ge=0,
        description="Challenger's primary score must beat the champion's by more than this.",
    )
    fairness_tolerance: float = Field(
        default=0.25, ge=0, description="Largest allowed growth of any |effect size| over the champion's."
    )
    fairness_permutations: int = Field(default=2_000, ge=10)
    encode_batch_size: int = Field(default=64, ge=1)
    device: str = Field(default="auto", description="auto, cpu, cuda or mps.")

    @property
    def incoming_dir(self) -> Path:
        return self.home / "incoming"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def warehouse_path(self) -> Path:
        return self.home / "st_assets.duckdb"

    @property
    def fairness_tests_dir(self) -> Path:
        return self.home / "fairness_tests"
