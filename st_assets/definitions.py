"""The bundled Dagster entry point: ``defs`` for ``ST_ASSETS_HOME`` (default ``./data``) and its settings.yaml."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dagster as dg

from st_assets.defs.builder import build_definitions
from st_assets.settings import home_settings

# `dagster asset materialize --select '*'` runs the implicit asset job: in-process too, like the
# pipeline job, so that torch is imported once rather than once per step.
defs = dg.Definitions.merge(
    build_definitions(home_settings(Path(os.environ.get("ST_ASSETS_HOME", "data")))),
    dg.Definitions(executor=dg.in_process_executor),
)
