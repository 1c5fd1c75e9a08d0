"""Materialise the whole graph once in this process, against the Dagster instance of ``DAGSTER_HOME``.

Usage: python -m st_assets_tests.run_pipeline <home> <base model path> <go file>. Tests start two of
these at once. Each writes ``<go file>.ready`` once its imports and instance are loaded, then waits for
the go file, so that the test decides when each run starts materialising.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import dagster as dg

from st_assets.settings import Settings
from st_assets_tests.conftest import materialize_everything

if __name__ == "__main__":
    home, base_model, go_file = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    settings = Settings(home=home, base_model=base_model, batch_size=8, min_train_rows=4)
    instance = dg.DagsterInstance.get()
    go_file.with_name(go_file.name + ".ready").touch()
    deadline = time.monotonic() + 300
    while not go_file.exists():
        if time.monotonic() > deadline:
            sys.exit(f"{go_file} never appeared")
        time.sleep(0.02)
    result = materialize_everything(settings, instance)
    print(f"run {result.run_id} success={result.success}")
