"""The YAML Component: attributes resolve into Settings and build the same graph as the Python API."""

from __future__ import annotations

import importlib.metadata
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import pytest
import yaml
from dagster.components.core.package_entry import (
    DG_PLUGIN_ENTRY_POINT_GROUP,
    discover_entry_point_package_objects,
)

from st_assets.component import SentenceTransformerPipeline
from st_assets.defs.builder import PIPELINE_JOB, build_definitions
from st_assets.settings import Settings
from st_assets.steps.formats import PairFormat
from st_assets_tests.conftest import EIGHT_ASSETS, write_bundled_slice


def make_project(root: Path, attributes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A minimal dg project under ``root`` whose defs folder holds one SentenceTransformerPipeline."""
    # A fresh package name per project: Python caches imported modules by name.
    package = f"st_component_project_{uuid.uuid4().hex[:8]}"
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{package}"\nversion = "0.0.0"\n\n'
        f'[tool.dg]\ndirectory_type = "project"\n\n[tool.dg.project]\nroot_module = "{package}"\n'
    )
    component_dir = root / "src" / package / "defs" / "fine_tune"
    component_dir.mkdir(parents=True)
    (root / "src" / package / "__init__.py").write_text("")
    (root / "src" / package / "defs" / "__init__.py").write_text("")
    (component_dir / "defs.yaml").write_text(
        yaml.safe_dump({"type": "st_assets.component.SentenceTransformerPipeline", "attributes": attributes})
    )
    monkeypatch.syspath_prepend(str(root / "src"))
    return root


def test_entry_point_registers_the_component() -> None:
    entry_points = importlib.metadata.entry_points(group=DG_PLUGIN_ENTRY_POINT_GROUP)
    assert any(ep.name == "st_assets" and ep.value == "st_assets.component" for ep in entry_points)
    registered = {
        (key.namespace, key.name): obj for key, obj in discover_entry_point_package_objects().items()
    }
    assert registered[("st_assets.component", "SentenceTransformerPipeline")] is SentenceTransformerPipeline


def test_yaml_project_builds_the_eight_assets(
    tmp_path: Path, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_bundled_slice(tmp_path / "data" / "incoming")
    project = make_project(
        tmp_path,
        {
            # Relative to the defs.yaml folder: src/<package>/defs/fine_tune -> the project's data/.
            "home": "../../../../data",
            "base_model": str(tiny_model_path),
            "epochs": 2,
            "sensor_enabled": False,
            "retrain_schedule": "0 4 * * 0",
        },
        monkeypatch,
    )

    defs = dg.load_from_defs_folder(path_within_project=project)

    keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert set(EIGHT_ASSETS) <= keys
    finetuned = defs.get_assets_def("finetuned_model")
    assert str(tiny_model_path) in (finetuned.descriptions_by_key[dg.AssetKey("finetuned_model")] or "")
    repository = defs.get_repository_def()
    (sensor,) = repository.sensor_defs
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    # The home resolved against the component's folder, not the working directory.
    assert str((tmp_path / "data" / "incoming").resolve()) in (sensor.description or "")
    assert [schedule.cron_schedule for schedule in repository.schedule_defs] == ["0 4 * * 0"]


def test_attributes_resolve_into_settings(tmp_path: Path) -> None:
    (tmp_path / "local_model").mkdir()
    component = SentenceTransformerPipeline.from_attributes_dict(
        attributes={
            "home": "home",
            "base_model": "local_model",
            "pair_format": "scored",
            "score_scale": 5,
            "losses": {"scored": "CoSENTLoss"},
            "epochs": 3,
            "batch_size": 16,
            "learning_rate": 3e-5,
            "max_seq_length": 64,
            "promotion_margin": 0.01,
            "fairness_tolerance": 0.1,
            "max_quarantine_rate": 0.3,
            "sensor_enabled": False,
            "retrain_schedule": None,
        }
    )

    settings = component.settings(base_dir=tmp_path)

    assert settings.home == tmp_path.resolve() / "home"
    assert settings.base_model == str((tmp_path / "local_model").resolve())
    assert settings.pair_format is PairFormat.SCORED
    assert settings.score_scale == 5
    assert settings.losses == {"scored": "CoSENTLoss"}
    assert (settings.epochs, settings.batch_size, settings.max_seq_length) == (3, 16, 64)
    assert settings.learning_rate == pytest.approx(3e-5)
    assert (settings.promotion_margin, settings.fairness_tolerance) == (0.01, 0.1)
    assert settings.max_quarantine_rate == 0.3
    assert settings.sensor_enabled is False
    assert settings.retrain_schedule is None
    # A model name with no folder of that name stays a name for the offline-first resolver.
    assert SentenceTransformerPipeline(home="h").settings(base_dir=tmp_path).base_model == "all-MiniLM-L6-v2"


def test_a_component_without_a_home_fails_as_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A default relative to defs.yaml would put the warehouse and the models into the source tree.
    project = make_project(tmp_path, {"epochs": 2}, monkeypatch)
    with pytest.raises(Exception) as failure:
        dg.load_from_defs_folder(path_within_project=project)
    chain = []
    error: BaseException | None = failure.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("home" in message for message in chain), chain


def test_invalid_attribute_fails_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = make_project(tmp_path, {"home": "data", "epochs": -1}, monkeypatch)

    with pytest.raises(Exception) as failure:
        dg.load_from_defs_folder(path_within_project=project)

    # Dagster names the failing defs.yaml; pydantic's message underneath names the field and bound.
    assert "defs.yaml" in str(failure.value)
    chain = []
    error: BaseException | None = failure.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    message = "\n".join(chain)
    assert "epochs" in message
    assert "greater than or equal to 1" in message


def test_the_graph_merges_into_a_project_with_its_own_executor(tmp_path: Path) -> None:
    project = dg.Definitions(executor=dg.multiprocess_executor)
    merged = dg.Definitions.merge(build_definitions(Settings(home=tmp_path)), project)
    assert merged.resolve_job_def(PIPELINE_JOB).executor_def.name == "in_process"
    assert merged.resolve_implicit_global_asset_job_def().executor_def.name == "multiprocess"


def test_every_settings_field_is_an_attribute_and_reaches_the_settings(tmp_path: Path) -> None:
    assert {item.name for item in fields(SentenceTransformerPipeline)} == set(Settings.model_fields)
    component = SentenceTransformerPipeline.from_attributes_dict(
        attributes={"home": "~/st", "device": "cpu", "encode_backend": "torch", "retrain_min_new_pairs": 50}
    )
    settings = component.settings(base_dir=tmp_path)
    assert settings.home == Path.home() / "st"
    assert (settings.device, settings.encode_backend, settings.retrain_min_new_pairs) == ("cpu", "torch", 50)


def test_an_unknown_device_fails_when_the_settings_load(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="device"):
        SentenceTransformerPipeline(home=str(tmp_path), device="gpu")
    assert SentenceTransformerPipeline(home=str(tmp_path), device="cuda:1").settings().device == "cuda:1"
