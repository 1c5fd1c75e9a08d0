"""The corpus to embed: every distinct validated text, keyed by a hash of the text."""

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


def embedding_rows(texts: pd.DataFrame, vectors: np.ndarray, model_version: str) -> pa.Table:
    """An Arrow table for the ``embeddings`` table (fixed-size list vectors insert fastest into DuckDB)."""
    dimension = vectors.shape[1] if vectors.ndim == 2 else 0
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    return pa.table(
        {
            "text_id": pa.array(texts["text_id"].tolist(), type=pa.string()),
            "text": pa.array(texts["text"].tolist(), type=pa.string()),
            "model_version": pa.array([model_version] * len(texts), type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dimension),
            "embedded_at": pa.array([datetime.now(UTC)] * len(texts), type=pa.timestamp("us", tz="UTC")),
        }
    )
