"""The bundled Dagster entry point: ``defs`` for ``ST_ASSETS_HOME`` (default ``./data``)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from st_assets.defs.builder import build_definitions
from st_assets.settings import Settings

defs = build_definitions(Settings(home=Path(os.environ.get("ST_ASSETS_HOME", "data"))))
