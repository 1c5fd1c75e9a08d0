"""What the Dagster definitions need of training without importing torch, which ``train`` imports."""

from __future__ import annotations

# Bump when a change to train.py changes what a given config and data train into.
TRAINING_CODE_VERSION = "12"


class NoTrainingPairsError(ValueError):
    """The rows selected for training form no training example (a labelled text alone in its label)."""


class TrainingSettingError(ValueError):
    """A setting this model or machine cannot train with (a device it lacks, Matryoshka dimensions past the
    model's own): another try would fail the same way."""
