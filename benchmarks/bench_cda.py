"""Counterfactual data augmentation: the same data trained without and with ``augment: counterfactual``,
both through the plugin's own assets, compared by the plugin's own reports.

stsb:     STS-B train (scores 0-5, score_scale=5) in incoming/; also Spearman on STS-B dev for both models.
bundled:  the bundled data (data/incoming: Banking77 support texts and helpdesk pairs).

Run 1 materialises training, evaluation, fairness and the gate with the settings given (augment none).
Run 2 trains again on the same validated rows with ``augment: counterfactual`` (launchpad config,
``force: true``) and runs the reports and the gate again: when the run-1 model is champion, run 2's
fairness and evaluation reports (and reports/<version>.html) compare base, the CDA challenger and that
champion side by side. Prints JSON: per model the gender association effect sizes, their mean |d|,
counterfactual invariance, the primary eval metric with its CI, and the CDA-minus-plain difference of
the primary score with its paired-bootstrap CI.
Usage: python -m benchmarks.bench_cda stsb|bundled [--home DIR] [--set key=json-value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd

from benchmarks.bench_quality import dev_spearman
from benchmarks.datasets import read_stsb
from st_assets.defs.builder import build_definitions
from st_assets.defs.evaluation import ComparedModel, encoder_for
from st_assets.settings import Settings
from st_assets.steps.evaluate import compare_to_incumbent

REPO_ROOT = Path(__file__).resolve().parents[1]
REPORT_ASSETS = ["finetuned_model", "evaluation_report", "fairness_report", "champion_model"]


def _materialise(settings: Settings, selection: list[str], run_config: dict | None = None) -> None:
    graph = build_definitions(settings).resolve_asset_graph()
    dg.materialize(
        list(graph.assets_defs),
        selection=selection,
        run_config=run_config,
        instance=dg.DagsterInstance.ephemeral(),
    )


def _registry(settings: Settings) -> pd.DataFrame:
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        return connection.execute(
            "SELECT version, path, status, decision, config, train_rows FROM model_registry "
            "WHERE version <> 'base' ORDER BY created_at"
        ).df()


def _model_summary(connection: duckdb.DuckDBPyConnection, version: str, metric: str) -> dict[str, object]:
    """What the plugin's reports hold about one model (its latest evaluation), ``metric`` as its headline."""
    fairness = connection.execute(
        "SELECT test, metric, value FROM fairness_metrics WHERE model_version = ? "
        "AND evaluated_for = (SELECT max(evaluated_for) FROM fairness_metrics WHERE model_version = ?)",
        [version, version],
    ).df()
    effects = fairness[(fairness["metric"] == "effect_size") & fairness["test"].str.startswith("gender_")]
    invariance = fairness[(fairness["test"] == "counterfactual_invariance")].set_index("metric")["value"]
    primary = connection.execute(
        "SELECT dataset, metric, value, ci_low, ci_high FROM evaluation_metrics WHERE model_version = ? "
        "AND metric = ? ORDER BY evaluated_at DESC LIMIT 1",
        [version, metric],
    ).fetchall()
    return {
        "gender_effect_sizes": dict(zip(effects["test"], effects["value"].round(4), strict=True)),
        "mean_abs_gender_effect_size": round(float(effects["value"].abs().mean()), 4),
        "counterfactual_mean_cosine": round(float(invariance.get("mean_cosine", float("nan"))), 4),
        "counterfactual_p05_cosine": round(float(invariance.get("p05_cosine", float("nan"))), 4),
        "eval_primary": {
            "dataset": primary[0][0],
            "metric": primary[0][1],
            "value": round(primary[0][2], 4),
            "ci95": [round(primary[0][3], 4), round(primary[0][4], 4)],
        },
    }


def run(dataset: str, home: Path, overrides: dict[str, object]) -> dict[str, object]:
    """Both trainings in ``home`` and their comparison."""
    (home / "incoming").mkdir(parents=True, exist_ok=True)
    if dataset == "stsb":
        read_stsb("train").to_csv(home / "incoming" / "stsb_train.csv", index=False)
        overrides = {"score_scale": 5.0, **overrides}
    else:
        for path in (REPO_ROOT / "data" / "incoming").glob("*.csv"):
            shutil.copy(path, home / "incoming" / path.name)
    settings = Settings.model_validate({"home": home, **overrides, "augment": "none"})
    started = time.perf_counter()
    _materialise(settings, ["raw_texts", "labelled_pairs", "validated_pairs", *REPORT_ASSETS])
    _materialise(
        settings,
        REPORT_ASSETS,
        {"ops": {"finetuned_model": {"config": {"augment": "counterfactual", "force": True}}}},
    )
    seconds = time.perf_counter() - started
    registry = _registry(settings)
    plain, augmented = registry.iloc[0], registry.iloc[-1]
    # STS-B is scored pairs alone; the bundled data's headline is its labelled texts' 1-NN accuracy.
    headline = "spearman" if dataset == "stsb" else "knn_accuracy"
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as connection:
        pairs = connection.execute("SELECT * FROM validated_pairs ORDER BY source_file, row_number").df()
        summary = {
            "base": _model_summary(connection, "base", headline),
            "plain": _model_summary(connection, plain["version"], headline),
            "counterfactual": _model_summary(connection, augmented["version"], headline),
        }
    difference = compare_to_incumbent(
        pairs,
        encoder_for(ComparedModel(augmented["version"], augmented["path"], "challenger"), settings),
        encoder_for(ComparedModel(plain["version"], plain["path"], "champion"), settings),
        n_boot=settings.bootstrap_samples,
        seed=settings.seed,
    )
    result: dict[str, object] = {
        "benchmark": f"cda/{dataset}",
        "settings": overrides,
        "models": {
            "plain": {
                "version": plain["version"],
                "status": plain["status"],
                "train_rows": int(plain["train_rows"]),
            },
            "counterfactual": {
                "version": augmented["version"],
                "status": augmented["status"],
                "train_rows": int(augmented["train_rows"]),
                "decision": augmented["decision"],
            },
        },
        **summary,
        "counterfactual_minus_plain_primary": {
            "value": round(difference.difference, 4),
            # The gate's interval: 90% (GATE_CONFIDENCE), where each model's own score has a 95% one.
            "ci90": [round(difference.ci_low, 4), round(difference.ci_high, 4)],
        },
        "report": str(home / "reports" / f"{augmented['version']}.html"),
        "wall_seconds": round(seconds, 1),
    }
    if dataset == "stsb":
        dev = read_stsb("dev")
        result["dev_spearman"] = {
            "base": round(dev_spearman(settings.base_model, dev), 4),
            "plain": round(dev_spearman(plain["path"], dev), 4),
            "counterfactual": round(dev_spearman(augmented["path"], dev), 4),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", choices=["stsb", "bundled"])
    parser.add_argument("--home", type=Path, help="keep the home (warehouse, models, reports) here")
    parser.add_argument("--set", action="append", default=[], help="a Settings override, key=json-value")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    if args.home:
        print(json.dumps(run(args.dataset, args.home, overrides)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        print(json.dumps(run(args.dataset, Path(scratch), overrides)))


if __name__ == "__main__":
    main()
