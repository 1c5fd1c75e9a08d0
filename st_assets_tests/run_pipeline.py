"""Materialise the whole graph once in this process, against the Dagster instance of ``DAGSTER_HOME``.

Usage: python -m st_assets_tests.run_pipeline <home> <base model path>. Tests start two of these at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import dagster as dg

from st_assets.settings import Settings
from st_assets_tests.conftest import materialize_everything

if __name__ == "__main__":
    home, base_model = Path(sys.argv[1]), sys.argv[2]
    settings = Settings(home=home, base_model=base_model, batch_size=8, min_train_rows=4)
    result = materialize_everything(settings, dg.DagsterInstance.get())
    print(f"run {result.run_id} success={result.success}")
