"""The corpus to embed (every distinct validated text, keyed by a hash of the text), its table rows, and
shards of vectors encoded ahead per incoming file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from st_assets.steps.models import fsync_path


def text_id(text: str) -> str:
    """Stable id of a text: the first 16 hex digits of its sha256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def corpus_texts(validated_pairs: pd.DataFrame) -> pd.DataFrame:
    """Distinct texts of every validated row (both splits), with ``text_id`` and ``text`` columns."""
    columns = [column for column in ("sentence1", "sentence2", "negative") if column in validated_pairs]
    texts = pd.unique(validated_pairs[columns].to_numpy().ravel())
    texts = [text for text in texts if isinstance(text, str)]
    return pd.DataFrame({"text_id": [text_id(text) for text in texts], "text": texts})


def sign_bit_columns(dimension: int) -> list[str]:
    """Names of the UBIGINT columns holding a vector's sign bits: ``b0`` .. ``b{ceil(d/64)-1}``."""
    return [f"b{word}" for word in range(-(-int(dimension) // 64))]


def sign_bit_words(vectors: np.ndarray) -> np.ndarray:
    """Sign bits of each row packed into uint64 words, shape ``(n, ceil(d/64))``.

    Bit ``63 - j`` of word ``w`` is ``vector[64*w + j] > 0``: the byte packing of
    ``quantize_embeddings(..., precision="ubinary")`` read as big-endian 64-bit words, zero-padded.
    """
    count, dimension = vectors.shape
    words = len(sign_bit_columns(dimension))
    packed = np.zeros((count, words * 8), dtype=np.uint8)
    packed[:, : -(-dimension // 8)] = np.packbits(vectors > 0, axis=1)
    return packed.view(">u8").astype(np.uint64)


def embedding_rows(
    texts: pd.DataFrame, vectors: np.ndarray, model_version: str, precision: str = "float32"
) -> pa.Table:
    """An Arrow table for the ``embeddings`` table (fixed-size list vectors insert fastest into DuckDB)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dimension = vectors.shape[1]
    flat = pa.array(vectors.ravel(), type=pa.float32())
    bits = sign_bit_words(vectors)
    return pa.table(
        {
            "text_id": pa.array(texts["text_id"].tolist(), type=pa.string()),
            "text": pa.array(texts["text"].tolist(), type=pa.string()),
            "model_version": pa.array([model_version] * len(texts), type=pa.string()),
            "precision": pa.array([precision] * len(texts), type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dimension),
            "embedded_at": pa.array([datetime.now(UTC)] * len(texts), type=pa.timestamp("us", tz="UTC")),
            **{
                column: pa.array(bits[:, word], type=pa.uint64())
                for word, column in enumerate(sign_bit_columns(dimension))
            },
        }
    )


# ---------------------------------------------------------------------------------------------------------
# Shards: vectors encoded ahead, one file per incoming file and model version (the partitioned path)


def shard_directory(cache_dir: Path, model_key: str, precision: str = "float32") -> Path:
    """Where the shards of one model (``model_key``: its version and the fingerprint of its files) live,
    those of its int8 encoder apart."""
    return cache_dir / "embeddings" / (model_key if precision == "float32" else f"{model_key}-{precision}")


def shard_path(cache_dir: Path, model_key: str, source_file: str, precision: str = "float32") -> Path:
    """The shard of one incoming file's texts embedded by one model (named by a hash of the file name, so
    any file name is a safe file name)."""
    return shard_directory(cache_dir, model_key, precision) / f"{text_id(source_file)}.parquet"


def write_shard(path: Path, texts: pd.DataFrame, vectors: np.ndarray) -> None:
    """Write ``text_id`` and ``embedding`` of ``texts`` atomically: readers see the whole shard or none."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    table = pa.table(
        {
            "text_id": pa.array(texts["text_id"].tolist(), type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.ravel(), type=pa.float32()), vectors.shape[1]
            ),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        fsync_path(Path(temporary))
        os.replace(temporary, path)
        fsync_path(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_shards(directory: Path) -> dict[str, np.ndarray]:
    """Every vector in the shards of ``directory``, by text id (empty when there are none)."""
    vectors: dict[str, np.ndarray] = {}
    for path in sorted(directory.glob("*.parquet")) if directory.is_dir() else []:
        table = pq.read_table(path)
        dimension = table.schema.field("embedding").type.list_size
        matrix = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dimension)
        vectors.update(zip(table.column("text_id").to_pylist(), matrix, strict=True))
    return vectors


class ShardedEncoder:
    """An encode function that takes vectors from the shards first and encodes only the texts they lack."""

    def __init__(self, directory: Path, encode: Callable[[list[str]], np.ndarray]) -> None:
        self._directory = directory
        self._encode = encode
        self.from_shards = 0
        self.encoded = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        shards = read_shards(self._directory)
        ids = [text_id(text) for text in texts]
        missing = [text for text, key in zip(texts, ids, strict=True) if key not in shards]
        fresh = dict(zip(missing, self._encode(missing), strict=True)) if missing else {}
        self.from_shards += len(texts) - len(missing)
        self.encoded += len(missing)
        return np.stack(
            [shards[key] if key in shards else fresh[text] for text, key in zip(texts, ids, strict=True)]
        ).astype(np.float32)
