"""Shared fixtures: a tiny random BERT wrapped as a SentenceTransformer, and small data homes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from st_assets.defs.builder import build_definitions
from st_assets.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The lineage graph, upstream first.
EIGHT_ASSETS = (
    "raw_texts",
    "labelled_pairs",
    "validated_pairs",
    "finetuned_model",
    "evaluation_report",
    "fairness_report",
    "champion_model",
    "corpus_embeddings",
)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT with MiniLM's tokenizer, saved as a SentenceTransformer."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from st_assets.steps.models import resolve_base_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("all-MiniLM-L6-v2"))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder / "bert")
    tokenizer.save_pretrained(folder / "bert")
    transformer = Transformer(str(folder / "bert"), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())])
    model.save(str(folder / "model"))
    return folder / "model"


def write_bundled_slice(incoming: Path, intents: int = 6, per_intent: int = 14) -> None:
    """A small slice of the bundled data: a few intents of Banking77 plus the helpdesk pairs."""
    import pandas as pd

    incoming.mkdir(parents=True, exist_ok=True)
    texts = pd.read_csv(REPO_ROOT / "data" / "incoming" / "banking77_support.csv")
    chosen = sorted(texts["label"].unique())[:intents]
    sliced = texts[texts["label"].isin(chosen)].groupby("label").head(per_intent)
    sliced.to_csv(incoming / "support.csv", index=False)
    (incoming / "helpdesk_pairs.csv").write_bytes(
        (REPO_ROOT / "data" / "incoming" / "helpdesk_pairs.csv").read_bytes()
    )


def materialize_everything(
    settings: Settings,
    instance: dg.DagsterInstance | None = None,
    run_config: dict | None = None,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialise every unpartitioned asset and check of the graph built from ``settings`` with
    ``dg.materialize`` (what ``--select '*'`` and the pipeline job run)."""

    definitions = build_definitions(settings)
    graph = definitions.resolve_asset_graph()
    unpartitioned = [key for key in graph.get_all_asset_keys() if not graph.get(key).is_partitioned]
    return dg.materialize(
        [*graph.assets_defs],
        selection=unpartitioned,
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config=run_config,
        tags=tags,
        raise_on_error=True,
    )


@pytest.fixture(scope="session")
def materialised_home(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_path: Path
) -> tuple[Settings, dg.ExecuteInProcessResult]:
    """A home with the bundled slice, materialised once with the tiny model (shared, read-only use)."""
    home = tmp_path_factory.mktemp("home")
    write_bundled_slice(home / "incoming")
    settings = Settings(home=home, base_model=str(tiny_model_path), batch_size=8, min_train_rows=4)
    result = materialize_everything(settings)
    return settings, result


def hold_open(path: Path, seconds: float, read_only: bool = True) -> subprocess.Popen[str]:
    """Another process with the file open: read-only, as a ``duckdb -readonly`` session or a notebook, or
    read-write, as a materialising step."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1], read_only=sys.argv[3] == 'True'); "
            "print('holding', flush=True); time.sleep(float(sys.argv[2]))",
            str(path),
            str(seconds),
            str(read_only),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    return holder
