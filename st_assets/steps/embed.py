"""The corpus to embed (every distinct validated text, keyed by a hash of the text) and its table rows."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa


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


def embedding_rows(texts: pd.DataFrame, vectors: np.ndarray, model_version: str) -> pa.Table:
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
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dimension),
            "embedded_at": pa.array([datetime.now(UTC)] * len(texts), type=pa.timestamp("us", tz="UTC")),
            **{
                column: pa.array(bits[:, word], type=pa.uint64())
                for word, column in enumerate(sign_bit_columns(dimension))
            },
        }
    )
