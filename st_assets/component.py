"""``SentenceTransformerPipeline``: the st_assets graph as a YAML-configured Dagster Component.

The component only turns YAML attributes into one ``Settings`` and calls ``build_definitions``,
the same API ``st_assets.definitions`` uses, so there is one way the graph is built::

    # defs/fine_tune/defs.yaml
    type: st_assets.component.SentenceTransformerPipeline
    attributes:
      home: ../../data            # relative paths resolve against this defs.yaml's folder
      base_model: all-MiniLM-L6-v2
      losses: {scored: CoSENTLoss}
      epochs: 2
      sensor_enabled: false
      retrain_schedule: "0 3 * * 0"
"""

# No ``from __future__ import annotations``: Resolvable derives the YAML schema from the real
# annotation objects of the dataclass fields, not from their string forms.

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import dagster as dg

from st_assets.defs.builder import build_definitions
from st_assets.settings import Settings
from st_assets.steps.formats import PairFormat


def _default(name: str) -> Any:
    """The Settings default for ``name``, so the component never disagrees with the Python API."""
    return Settings.model_fields[name].default


# For the Settings fields that carry no description of their own.
_DESCRIPTIONS = {
    "epochs": "Training epochs over the train split (at least 1).",
    "learning_rate": "AdamW learning rate.",
    "max_seq_length": "Truncate inputs to this many tokens (at least 8).",
    "max_quarantine_rate": "Largest share of a file's rows that may be quarantined before validation blocks the run.",
}


def _doc(name: str, extra: str = "") -> dg.Resolver:
    """Default resolution, described like the Settings field ``name`` in the YAML schema (``dg`` UI)."""
    own = Settings.model_fields[name].description or _DESCRIPTIONS.get(name)
    return dg.Resolver.default(description=" ".join(part for part in (own, extra) if part) or None)


@dataclass
class SentenceTransformerPipeline(dg.Component, dg.Resolvable):
    """Fine-tune a sentence-transformer as the st_assets lineage graph, configured from YAML."""

    home: Annotated[str, _doc("home", "Relative paths resolve against the folder of this defs.yaml.")] = str(
        _default("home")
    )
    base_model: Annotated[str, _doc("base_model", "A relative path that exists resolves like home.")] = (
        _default("base_model")
    )
    pair_format: Annotated[PairFormat | None, _doc("pair_format")] = None
    score_scale: Annotated[float, _doc("score_scale")] = _default("score_scale")
    losses: Annotated[dict[str, str], _doc("losses")] = field(default_factory=dict)
    epochs: Annotated[int, _doc("epochs")] = _default("epochs")
    batch_size: Annotated[int | None, _doc("batch_size")] = _default("batch_size")
    learning_rate: Annotated[float, _doc("learning_rate")] = _default("learning_rate")
    max_seq_length: Annotated[int, _doc("max_seq_length")] = _default("max_seq_length")
    promotion_margin: Annotated[float, _doc("promotion_margin")] = _default("promotion_margin")
    fairness_tolerance: Annotated[float, _doc("fairness_tolerance")] = _default("fairness_tolerance")
    max_quarantine_rate: Annotated[float, _doc("max_quarantine_rate")] = _default("max_quarantine_rate")
    sensor_enabled: Annotated[bool, _doc("sensor_enabled", "false: the sensor is STOPPED.")] = _default(
        "sensor_enabled"
    )
    retrain_schedule: Annotated[str | None, _doc("retrain_schedule")] = _default("retrain_schedule")
    augment: Annotated[str, _doc("augment", "One of: none, counterfactual.")] = _default("augment")
    embedding_partitions: Annotated[bool, _doc("embedding_partitions")] = _default("embedding_partitions")

    def __post_init__(self) -> None:
        # Fail at load time with pydantic's field-by-field message, not mid-run.
        self.settings()

    def settings(self, base_dir: Path | None = None) -> Settings:
        """The one Settings these attributes mean; relative paths resolve against ``base_dir``."""
        home = Path(self.home)
        base_model = self.base_model
        if base_dir is not None:
            home = home if home.is_absolute() else (base_dir / home).resolve()
            local_model = base_dir / base_model
            # A model name such as all-MiniLM-L6-v2 stays a name unless a folder of that name is here.
            if not Path(base_model).is_absolute() and local_model.exists():
                base_model = str(local_model.resolve())
        return Settings(
            home=home,
            base_model=base_model,
            pair_format=self.pair_format,
            score_scale=self.score_scale,
            losses=self.losses,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            max_seq_length=self.max_seq_length,
            promotion_margin=self.promotion_margin,
            fairness_tolerance=self.fairness_tolerance,
            max_quarantine_rate=self.max_quarantine_rate,
            sensor_enabled=self.sensor_enabled,
            retrain_schedule=self.retrain_schedule,
            augment=self.augment,
            embedding_partitions=self.embedding_partitions,
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """``build_definitions`` for these settings; relative paths resolve against the defs.yaml folder."""
        return build_definitions(self.settings(base_dir=context.path))
