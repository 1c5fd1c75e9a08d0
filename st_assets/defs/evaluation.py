"""Evaluation assets: held-out metrics, fairness report, and the champion promotion gate."""

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import dagster as dg
import pandas as pd
from sentence_transformers import SentenceTransformer

from st_assets.defs.resources import WAREHOUSE_POOL, markdown_table
from st_assets.settings import Settings
from st_assets.steps.evaluate import EmbeddingCache, Metric, evaluate_model, primary_score
from st_assets.steps.fairness import (
    bundled_test_paths,
    counterfactual_invariance,
    load_association_tests,
    run_association_test,
)
from st_assets.steps.models import encode_texts, load_model, resolve_base_model
from st_assets.steps.promotion import decide_promotion
from st_assets.steps.train import resolve_device
from st_assets.store.registry import (
    BASE_VERSION,
    get_champion,
    get_latest_challenger,
    record_decision,
    register_model,
)
from st_assets.store.warehouse import Warehouse, replace_rows

COUNTERFACTUAL_TEST = "counterfactual_invariance"


@dataclass(frozen=True)
class ComparedModel:
    """A model in a comparison: its registry version, folder and role (base, challenger, champion)."""

    version: str
    path: str
    role: str


@lru_cache(maxsize=4)
def _cached_model(path: str, device: str) -> SentenceTransformer:
    return load_model(path, device=device)


def models_to_compare(warehouse: Warehouse, settings: Settings) -> tuple[str, list[ComparedModel]]:
    """The latest challenger's version and the models it is compared with: base, challenger, champion."""
    with warehouse.connect() as connection:
        challenger = get_latest_challenger(connection)
        champion = get_champion(connection)
    if challenger is None:
        raise RuntimeError("no fine-tuned model is registered; materialise finetuned_model first")
    compared = [
        ComparedModel(BASE_VERSION, resolve_base_model(settings.base_model), "base"),
        ComparedModel(challenger.version, challenger.path, "challenger"),
    ]
    if champion is not None and champion.version not in (BASE_VERSION, challenger.version):
        compared.append(ComparedModel(champion.version, champion.path, "champion"))
    return challenger.version, compared


def encoder_for(model: ComparedModel, settings: Settings) -> EmbeddingCache:
    """An encode function for one model that embeds each distinct text once."""
    loaded = _cached_model(model.path, resolve_device(settings.device))
    return EmbeddingCache(lambda texts: encode_texts(loaded, texts, settings.encode_batch_size))


def build_evaluation_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    """``evaluation_report``, ``fairness_report`` and ``champion_model`` for these settings."""
    warehouse = Warehouse(settings.warehouse_path)

    @dg.asset(
        deps=["finetuned_model"],
        group_name="evaluation",
        kinds={"pytorch", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version="1",
        owners=["team:ml-platform"],
        description=(
            "Base model vs challenger vs current champion on the held-out eval split, with the metrics "
            "that fit each format (Spearman for scored pairs, kNN label accuracy and MRR@10 for labelled "
            "texts, ...). Rows in evaluation_metrics."
        ),
    )
    def evaluation_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        challenger_version, compared = models_to_compare(warehouse, settings)
        with warehouse.connect() as connection:
            pairs = connection.execute("SELECT * FROM validated_pairs ORDER BY source_file, row_number").df()
        now = datetime.now(UTC)
        rows, scores = [], {}
        for model in compared:
            metrics = evaluate_model(pairs, encoder_for(model, settings))
            scores[model.role] = primary_score(metrics)
            context.log.info(f"{model.role} {model.version}: primary score {scores[model.role]:.4f}")
            rows += [
                {
                    "model_version": model.version,
                    "role": model.role,
                    "dataset": m.dataset,
                    "metric": m.metric,
                    "value": m.value,
                    "eval_rows": m.rows,
                    "evaluated_for": challenger_version,
                    "evaluated_at": now,
                }
                for m in metrics
            ]
        report = pd.DataFrame(rows)
        with warehouse.connect() as connection:
            replace_rows(
                connection,
                "evaluation_metrics",
                report.drop(columns="role"),
                "evaluated_for",
                [challenger_version],
            )
        wide = report.pivot_table(index=["dataset", "metric"], columns="role", values="value").reset_index()
        numeric = {
            f"{row.role}/{row.dataset}/{row.metric}": float(row.value)
            for row in report.itertuples()
            if row.role != "champion"
        }
        return dg.MaterializeResult(
            metadata={
                "challenger_version": challenger_version,
                **{f"primary_score/{role}": float(score) for role, score in scores.items()},
                **numeric,
                "report": dg.MetadataValue.md(markdown_table(wide.to_dict("records"))),
            }
        )

    @dg.asset(
        deps=["finetuned_model"],
        group_name="evaluation",
        kinds={"pytorch", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version="1",
        owners=["team:ml-platform"],
        description=(
            "Bias report for base, challenger and champion: SEAT/WEAT association tests (bundled probes and "
            "any *.jsonl in fairness_tests/; effect size and permutation p-value) and counterfactual "
            "invariance of eval texts under gender-term swaps. Association tests can show bias; they "
            "cannot prove its absence."
        ),
    )
    def fairness_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        challenger_version, compared = models_to_compare(warehouse, settings)
        user_tests = (
            sorted(settings.fairness_tests_dir.glob("*.jsonl"))
            if settings.fairness_tests_dir.is_dir()
            else []
        )
        tests = load_association_tests([*bundled_test_paths(), *user_tests])
        with warehouse.connect() as connection:
            eval_texts = [
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT sentence1 FROM validated_pairs WHERE split = 'eval' ORDER BY sentence1 LIMIT 2000"
                ).fetchall()
            ]
        now = datetime.now(UTC)
        rows, worst = [], []
        for model in compared:
            encode = encoder_for(model, settings)
            for test in tests:
                result = run_association_test(
                    test, encode, permutations=settings.fairness_permutations, seed=settings.seed
                )
                rows += [
                    (model, test.name, "effect_size", result.effect_size),
                    (model, test.name, "p_value", result.p_value),
                ]
            invariance = counterfactual_invariance(eval_texts, encode)
            rows += [
                (model, COUNTERFACTUAL_TEST, "mean_cosine", invariance.mean_cosine),
                (model, COUNTERFACTUAL_TEST, "p05_cosine", invariance.p05_cosine),
                (model, COUNTERFACTUAL_TEST, "n_texts", float(invariance.n_texts)),
            ]
            worst += [
                {"model": model.role, "original": a, "counterfactual": b, "cosine": c}
                for a, b, c in invariance.worst[:3]
            ]
        report = pd.DataFrame(
            [
                {
                    "model_version": m.version,
                    "role": m.role,
                    "test": t,
                    "metric": k,
                    "value": float(v),
                    "evaluated_for": challenger_version,
                    "evaluated_at": now,
                }
                for m, t, k, v in rows
            ]
        )
        with warehouse.connect() as connection:
            replace_rows(
                connection,
                "fairness_metrics",
                report.drop(columns="role"),
                "evaluated_for",
                [challenger_version],
            )
        effect = (
            report[report["metric"] == "effect_size"]
            .pivot_table(index="test", columns="role", values="value")
            .reset_index()
        )
        context.log.info(f"fairness: {len(tests)} association tests for {len(compared)} models")
        return dg.MaterializeResult(
            metadata={
                "challenger_version": challenger_version,
                "tests": [test.name for test in tests],
                **{
                    f"{r.role}/{r.test}/effect_size": float(r.value)
                    for r in report[report["metric"] == "effect_size"].itertuples()
                    if r.role != "champion"
                },
                "effect_sizes": dg.MetadataValue.md(markdown_table(effect.to_dict("records"))),
                "worst_counterfactuals": dg.MetadataValue.md(markdown_table(worst)),
                "limits": "Association tests can show bias; a small effect size does not prove its absence.",
            }
        )

    @dg.asset(
        deps=[evaluation_report, fairness_report],
        group_name="evaluation",
        kinds={"duckdb"},
        pool=WAREHOUSE_POOL,
        code_version="1",
        owners=["team:ml-platform"],
        description=(
            "The promotion gate: the challenger becomes champion only if its primary eval score beats the "
            f"incumbent's (the champion, or the base model at first) by more than {settings.promotion_margin} "
            f"and no association test's |effect size| grows by more than {settings.fairness_tolerance}. "
            "When the first challenger fails, the base model becomes champion. Exactly one champion row."
        ),
    )
    def champion_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        with warehouse.connect() as connection:
            challenger = get_latest_challenger(connection)
            champion = get_champion(connection)
            if challenger is None:
                raise RuntimeError("no fine-tuned model is registered; materialise finetuned_model first")
            if champion is not None and champion.version == challenger.version:
                return dg.MaterializeResult(
                    metadata={
                        "champion_version": champion.version,
                        "changed": False,
                        "decision": "the challenger is already the champion",
                    }
                )
            incumbent = champion.version if champion else BASE_VERSION
            metrics = connection.execute(
                "SELECT model_version, dataset, metric, value, eval_rows FROM evaluation_metrics "
                "WHERE evaluated_for = ?",
                [challenger.version],
            ).df()
            effects = connection.execute(
                "SELECT model_version, test, value FROM fairness_metrics "
                "WHERE evaluated_for = ? AND metric = 'effect_size'",
                [challenger.version],
            ).df()
        scores = {
            version: _primary_from_rows(metrics[metrics["model_version"] == version])
            for version in (challenger.version, incumbent)
        }
        effect_sizes = {
            version: dict(zip(group["test"], group["value"], strict=True))
            for version, group in effects.groupby("model_version")
        }
        decision = decide_promotion(
            scores[challenger.version],
            scores[incumbent],
            effect_sizes.get(challenger.version, {}),
            effect_sizes.get(incumbent, {}),
            settings.promotion_margin,
            settings.fairness_tolerance,
        )
        context.log.info(f"{challenger.version} {decision.summary}")
        with warehouse.connect() as connection:
            record_decision(
                connection, challenger.version, decision.promote, decision.challenger_score, decision.summary
            )
            if not decision.promote and champion is None:
                register_model(
                    connection,
                    {
                        "version": BASE_VERSION,
                        "path": resolve_base_model(settings.base_model),
                        "base_model": settings.base_model,
                        "loss": "",
                        "data_version": "",
                    },
                )
                record_decision(
                    connection,
                    BASE_VERSION,
                    True,
                    decision.incumbent_score,
                    "base model promoted: the first challenger did not beat it",
                )
            new_champion = get_champion(connection)
        return dg.MaterializeResult(
            metadata={
                "champion_version": new_champion.version if new_champion else None,
                "challenger_version": challenger.version,
                "promoted": decision.promote,
                "challenger_score": float(decision.challenger_score),
                "incumbent_score": float(decision.incumbent_score),
                "decision": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
                "changed": decision.promote or champion is None,
            }
        )

    return [evaluation_report, fairness_report, champion_model]


def _primary_from_rows(rows: pd.DataFrame) -> float:
    return primary_score([Metric(r.dataset, r.metric, r.value, int(r.eval_rows)) for r in rows.itertuples()])
