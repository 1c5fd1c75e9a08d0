"""``SentenceTransformerPipeline``: the st_assets graph as a YAML-configured Dagster Component.

The component only turns YAML attributes into one ``Settings`` and calls ``build_definitions``,
the same API ``st_assets.definitions`` uses, so there is one way the graph is built::

    # src/my_project/defs/fine_tune/defs.yaml
    type: st_assets.component.SentenceTransformerPipeline
    attributes:
      home: ../../../../data      # relative paths resolve against this defs.yaml's folder
      base_model: all-MiniLM-L6-v2
      losses: {scored: CoSENTLoss}
      epochs: 2
      sensor_enabled: false
      retrain_schedule: "0 3 * * 0"
"""

# No ``from __future__ import annotations``: Resolvable derives the YAML schema from the real
# annotation objects of the dataclass fields, not from their string forms.

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import dagster as dg

from st_assets.defs.builder import build_definitions
from st_assets.settings import Settings
from st_assets.steps.formats import PairFormat


def _default(name: str) -> Any:
    """The Settings default for ``name``, so the component never disagrees with the Python API."""
    return Settings.model_fields[name].default


def _doc(name: str, extra: str = "") -> dg.Resolver:
    """Default resolution, described like the Settings field ``name`` in the YAML schema (``dg`` UI)."""
    own = Settings.model_fields[name].description
    return dg.Resolver.default(description=" ".join(part for part in (own, extra) if part) or None)


@dataclass
class SentenceTransformerPipeline(dg.Component, dg.Resolvable):
    """Fine-tune a sentence-transformer as the st_assets lineage graph, configured from YAML."""

    # Required: a default relative to the defs.yaml folder would put models and the warehouse in the source tree.
    home: Annotated[str, _doc("home", "Relative paths resolve against the folder of this defs.yaml.")]
    base_model: Annotated[str, _doc("base_model", "A relative path that exists resolves like home.")] = (
        _default("base_model")
    )
    pair_format: Annotated[PairFormat | None, _doc("pair_format")] = None
    score_scale: Annotated[float, _doc("score_scale")] = _default("score_scale")
    score_scales: Annotated[dict[str, float], _doc("score_scales")] = field(default_factory=dict)
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
    keep_model_versions: Annotated[int | None, _doc("keep_model_versions")] = _default("keep_model_versions")
    augment: Annotated[str, _doc("augment", "One of: none, counterfactual.")] = _default("augment")
    embedding_partitions: Annotated[bool, _doc("embedding_partitions")] = _default("embedding_partitions")
    eval_fraction: Annotated[float, _doc("eval_fraction")] = _default("eval_fraction")
    seed: Annotated[int, _doc("seed")] = _default("seed")
    matryoshka_dims: Annotated[list[int], _doc("matryoshka_dims")] = field(default_factory=list)
    counterfactual_groups: Annotated[list[str], _doc("counterfactual_groups")] = field(
        default_factory=Settings.model_fields["counterfactual_groups"].default_factory
    )
    hard_negatives: Annotated[bool, _doc("hard_negatives")] = _default("hard_negatives")
    warmup_ratio: Annotated[float, _doc("warmup_ratio")] = _default("warmup_ratio")
    eval_steps: Annotated[int | None, _doc("eval_steps")] = _default("eval_steps")
    keep_best_checkpoint: Annotated[bool, _doc("keep_best_checkpoint")] = _default("keep_best_checkpoint")
    early_stopping_patience: Annotated[int | None, _doc("early_stopping_patience")] = _default(
        "early_stopping_patience"
    )
    train_window_rows: Annotated[int | None, _doc("train_window_rows")] = _default("train_window_rows")
    train_window_days: Annotated[float | None, _doc("train_window_days")] = _default("train_window_days")
    replay_fraction: Annotated[float, _doc("replay_fraction")] = _default("replay_fraction")
    max_text_tokens: Annotated[int | None, _doc("max_text_tokens")] = _default("max_text_tokens")
    max_text_chars: Annotated[int, _doc("max_text_chars")] = _default("max_text_chars")
    max_file_bytes: Annotated[int, _doc("max_file_bytes")] = _default("max_file_bytes")
    min_train_rows: Annotated[int, _doc("min_train_rows")] = _default("min_train_rows")
    invariance_threshold: Annotated[float, _doc("invariance_threshold")] = _default("invariance_threshold")
    min_group_rows: Annotated[int, _doc("min_group_rows")] = _default("min_group_rows")
    group_gap_tolerance: Annotated[float, _doc("group_gap_tolerance")] = _default("group_gap_tolerance")
    bootstrap_samples: Annotated[int, _doc("bootstrap_samples")] = _default("bootstrap_samples")
    fairness_severity: Annotated[str, _doc("fairness_severity")] = _default("fairness_severity")
    fairness_permutations: Annotated[int, _doc("fairness_permutations")] = _default("fairness_permutations")
    retrain_min_new_pairs: Annotated[int, _doc("retrain_min_new_pairs")] = _default("retrain_min_new_pairs")
    retrain_drift_auc: Annotated[float, _doc("retrain_drift_auc")] = _default("retrain_drift_auc")
    retrain_after_days: Annotated[float, _doc("retrain_after_days")] = _default("retrain_after_days")
    encode_backend: Annotated[str, _doc("encode_backend", "One of: torch, onnx, onnx-int8.")] = _default(
        "encode_backend"
    )
    encode_batch_size: Annotated[int, _doc("encode_batch_size")] = _default("encode_batch_size")
    device: Annotated[str, _doc("device")] = _default("device")

    def __post_init__(self) -> None:
        # Fail at load time with pydantic's field-by-field message, not mid-run.
        self.settings()

    def settings(self, base_dir: Path | None = None) -> Settings:
        """The one Settings these attributes mean; relative paths resolve against ``base_dir``."""
        home = Path(self.home).expanduser()
        base_model = self.base_model
        if base_dir is not None:
            home = home if home.is_absolute() else (base_dir / home).resolve()
            local_model = base_dir / base_model
            # A model name such as all-MiniLM-L6-v2 stays a name unless a folder of that name is here.
            if not Path(base_model).is_absolute() and local_model.exists():
                base_model = str(local_model.resolve())
        attributes = {item.name: getattr(self, item.name) for item in fields(self)}
        return Settings(**{**attributes, "home": home, "base_model": base_model})

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        """``build_definitions`` for these settings; relative paths resolve against the defs.yaml folder."""
        return build_definitions(self.settings(base_dir=context.path))
