"""Encoder backends: ONNX gives torch's vectors, exports once, works on any mean-pooling model; int8 runs."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from st_assets.steps.encoders import ONNX_FILE, ONNX_INT8_FILE, build_encoder
from st_assets.steps.fairness import counterfactual_invariance
from st_assets.steps.models import resolve_base_model
from st_assets_tests.conftest import SHARED_DATA


def _linked_copy(model: Path, folder: Path) -> Path:
    """A model folder of our own whose entries link to ``model``'s, so that exports land in ``folder``."""
    folder.mkdir(parents=True)
    for entry in model.iterdir():
        if entry.name != "onnx":
            (folder / entry.name).symlink_to(entry.resolve())
    return folder


@pytest.fixture(scope="module")
def minilm_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2, linked into tmp (the module's tests share its export)."""
    bundled = Path(resolve_base_model("all-MiniLM-L6-v2"))
    return _linked_copy(bundled, tmp_path_factory.mktemp("minilm") / "model")


@pytest.fixture
def tiny_copy(tiny_model_path: Path, tmp_path: Path) -> Path:
    """The tiny random model, linked into this test's tmp folder."""
    return _linked_copy(tiny_model_path, tmp_path / "tiny")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """50 distinct Banking77 texts of varied lengths (a seeded sample)."""
    banking = pd.read_csv(SHARED_DATA / "banking77" / "train.csv")["text"].drop_duplicates()
    return banking.sample(50, random_state=7).tolist()


def _nearest_neighbours(vectors: np.ndarray) -> np.ndarray:
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)
    return similarities.argmax(axis=1)


@pytest.mark.slow
def test_onnx_vectors_equal_torch_vectors(minilm_copy: Path, texts: list[str]) -> None:
    torch_vectors = build_encoder(str(minilm_copy), backend="torch")(texts)
    onnx_encoder = build_encoder(str(minilm_copy), backend="onnx", batch_size=16)
    onnx_vectors = onnx_encoder(texts)
    assert onnx_encoder.backend == "onnx" and onnx_encoder.dimension == 384
    assert onnx_vectors.dtype == np.float32 and onnx_vectors.shape == (50, 384)
    assert np.abs(onnx_vectors - torch_vectors).max() < 1e-4
    assert (_nearest_neighbours(onnx_vectors) == _nearest_neighbours(torch_vectors)).all()
    assert np.allclose(np.linalg.norm(onnx_vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_the_onnx_export_is_reused_not_redone(minilm_copy: Path, texts: list[str]) -> None:
    build_encoder(str(minilm_copy), backend="onnx")
    exported = minilm_copy / "onnx" / ONNX_FILE
    first_mtime = exported.stat().st_mtime_ns
    again = build_encoder(str(minilm_copy), backend="onnx")
    assert exported.stat().st_mtime_ns == first_mtime
    assert again(texts[:3]).shape == (3, 384)
    assert [p.name for p in exported.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_int8_is_opt_in_and_returns_unit_vectors(minilm_copy: Path, texts: list[str]) -> None:
    encoder = build_encoder(str(minilm_copy), backend="onnx-int8")
    vectors = encoder(texts)
    assert encoder.backend == "onnx-int8" and (minilm_copy / "onnx" / ONNX_INT8_FILE).exists()
    assert encoder.precision == "int8"
    assert vectors.shape == (50, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_the_tiny_model_works_with_onnx(tiny_copy: Path) -> None:
    texts = ["a short text", "one that is quite a bit longer than the first", "mid length"]
    torch_vectors = build_encoder(str(tiny_copy), backend="torch")(texts)
    onnx_encoder = build_encoder(str(tiny_copy), backend="onnx", batch_size=2)
    assert onnx_encoder.backend == "onnx" and (tiny_copy / "onnx" / ONNX_FILE).exists()
    assert onnx_encoder.precision == "float32"  # the same vectors as torch: the same embeddings table
    assert np.abs(onnx_encoder(texts) - torch_vectors).max() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_swap_past_the_token_window_is_left_out_of_the_invariance_probe(
    tiny_copy: Path, backend: str
) -> None:
    encoder = build_encoder(str(tiny_copy), backend=backend)  # the tiny model reads 64 tokens
    padding = "the bank sent a letter about the card " * 12
    late = (padding + "and my husband read it", padding + "and my wife read it")
    early = ("my husband read " + padding, "my wife read " + padding)
    assert not encoder.reads_difference(*late)
    assert encoder.reads_difference(*early)
    # Without the check the late swap scores a perfect 1.0: the model never reads the changed word.
    assert counterfactual_invariance([late[0]], encoder).mean_cosine == pytest.approx(1.0)
    probed = counterfactual_invariance(
        [late[0], early[0]], encoder, read_differently=encoder.reads_difference
    )
    assert (probed.n_texts, probed.n_past_window) == (1, 1)
    assert probed.worst[0][:2] == early


def test_an_export_removes_the_temporary_file_a_killed_export_left_a_day_ago(tiny_copy: Path) -> None:
    folder = tiny_copy / "onnx"
    folder.mkdir()
    killed, running = folder / ".model-killed.onnx", folder / ".model-running.onnx"
    for leftover in (killed, running):
        leftover.write_bytes(b"half an export")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(killed, (two_days_ago, two_days_ago))
    build_encoder(str(tiny_copy), backend="onnx")
    assert (folder / ONNX_FILE).exists()
    assert not killed.exists()
    assert running.exists()  # recent: another process may still be writing it


def _save_over(weights: Path) -> None:
    """Save other weights (every float scaled by 1.5) over ``weights``; a link is replaced, not written
    through, so the shared tiny model stays as it is."""
    from safetensors.torch import load_file, save_file

    changed = {
        name: tensor * 1.5 if tensor.is_floating_point() else tensor
        for name, tensor in load_file(weights).items()
    }
    weights.unlink()
    save_file(changed, weights)


def test_weights_saved_over_in_place_are_exported_anew(tiny_copy: Path) -> None:
    texts = ["a short text", "one that is quite a bit longer than the first"]
    build_encoder(str(tiny_copy), backend="onnx")(texts)
    _save_over(tiny_copy / "model.safetensors")
    torch_vectors = build_encoder(str(tiny_copy), backend="torch")(texts)
    assert np.abs(build_encoder(str(tiny_copy), backend="onnx")(texts) - torch_vectors).max() < 1e-4


def test_an_export_without_a_stamp_is_made_again_where_it_can_be(tiny_copy: Path) -> None:
    """Graphs that came with the folder (a clone of a hub repository), or whose stamp a crash never wrote,
    may be of other weights: in a writable folder they are exported anew."""
    texts = ["a short text", "one that is quite a bit longer than the first"]
    build_encoder(str(tiny_copy), backend="onnx")(texts)
    (tiny_copy / "onnx" / "weights.stamp").unlink()
    _save_over(tiny_copy / "model.safetensors")
    torch_vectors = build_encoder(str(tiny_copy), backend="torch")(texts)
    assert np.abs(build_encoder(str(tiny_copy), backend="onnx")(texts) - torch_vectors).max() < 1e-4


def test_weights_saved_over_in_a_subfolder_are_exported_anew(tiny_copy: Path) -> None:
    """The older layout keeps the transformer in ``0_Transformer/``, not beside modules.json."""
    subfolder = tiny_copy / "0_Transformer"
    subfolder.mkdir()
    kept_at_top = {
        "modules.json",
        "config_sentence_transformers.json",
        "README.md",
        "1_Pooling",
        "0_Transformer",
    }
    for item in list(tiny_copy.iterdir()):
        if item.name not in kept_at_top:
            shutil.copy(item, subfolder / item.name)
            item.unlink()
    modules = json.loads((tiny_copy / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    (tiny_copy / "modules.json").unlink()  # a link to the shared tiny model: replaced, not written through
    (tiny_copy / "modules.json").write_text(json.dumps(modules))
    texts = ["a short text", "one that is quite a bit longer than the first"]
    build_encoder(str(tiny_copy), backend="onnx")(texts)
    _save_over(subfolder / "model.safetensors")
    torch_vectors = build_encoder(str(tiny_copy), backend="torch")(texts)
    assert np.abs(build_encoder(str(tiny_copy), backend="onnx")(texts) - torch_vectors).max() < 1e-4


def test_a_stale_export_that_cannot_be_removed_falls_back_to_torch(
    tiny_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_encoder(str(tiny_copy), backend="onnx")
    (tiny_copy / "onnx" / "weights.stamp").write_text("weights of another day")

    real_unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:
        if self.is_relative_to(tiny_copy):
            raise PermissionError(f"read-only: {self}")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    assert build_encoder(str(tiny_copy), backend="onnx").backend == "torch"
    # With a cache_dir, the export is made there afresh instead.
    texts = ["a short text", "one that is quite a bit longer than the first"]
    encoder = build_encoder(str(tiny_copy), backend="onnx", cache_dir=tiny_copy.parent / "cache")
    assert encoder.backend == "onnx" and len(list((tiny_copy.parent / "cache").glob(f"*/{ONNX_FILE}"))) == 1
    assert np.abs(encoder(texts) - build_encoder(str(tiny_copy), backend="torch")(texts)).max() < 1e-4


def test_no_texts_give_an_empty_matrix_of_the_right_width(tiny_copy: Path) -> None:
    for backend in ("torch", "onnx"):
        empty = build_encoder(str(tiny_copy), backend=backend)([])
        assert empty.shape == (0, 32) and empty.dtype == np.float32


def test_a_read_only_model_folder_exports_under_the_cache_dir(
    tiny_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: not Path(path).is_relative_to(tiny_copy) and real_access(path, mode)
    )
    encoder = build_encoder(str(tiny_copy), backend="onnx", cache_dir=tmp_path / "cache")
    assert encoder.backend == "onnx"
    assert len(list((tmp_path / "cache").glob(f"*/{ONNX_FILE}"))) == 1
    assert not (tiny_copy / "onnx").exists()
    assert build_encoder(str(tiny_copy), backend="onnx").backend == "torch"


def test_a_model_that_is_not_mean_pooled_falls_back_to_torch(
    tiny_model_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The numpy pooling only reproduces mean pooling; anything else must stay on torch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    model = SentenceTransformer(str(tiny_model_path))
    cls_model = SentenceTransformer(modules=[model[0], Pooling(model.get_embedding_dimension(), "cls")])
    cls_model.save(str(tmp_path / "cls"))
    encoder = build_encoder(str(tmp_path / "cls"), backend="onnx")
    assert encoder.backend == "torch"
    assert "pooling mode is 'cls'" in caplog.text
    assert not (tmp_path / "cls" / "onnx").exists()


def test_an_unknown_backend_is_refused(tiny_model_path: Path) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        build_encoder(str(tiny_model_path), backend="tensorrt")  # type: ignore[arg-type]
