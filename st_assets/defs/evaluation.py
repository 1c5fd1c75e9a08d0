"""Evaluation assets: held-out metrics with CIs, fairness report, edge cases, and the promotion gate."""

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg
import duckdb
import pandas as pd

from st_assets.defs.resources import (
    WAREHOUSE_POOL,
    WarehouseResource,
    markdown_table,
    model_encoder,
    require_passed_validation,
    settings_code_version,
)
from st_assets.settings import Settings
from st_assets.steps.augment import load_swapped_groups
from st_assets.steps.edge_cases import edge_case_report
from st_assets.steps.evaluate import (
    GAP_SUFFIX,
    EmbeddingCache,
    ScoreDifference,
    compare_to_incumbent,
    evaluate_groups,
    evaluate_model,
    primary_group_gaps,
    primary_rows,
    primary_score,
)
from st_assets.steps.evaluate import PRIMARY_METRIC as FORMAT_PRIMARY_METRIC
from st_assets.steps.fairness import (
    bundled_test_paths,
    counterfactual_invariance,
    load_association_tests,
    run_association_test,
    user_test_paths,
)
from st_assets.steps.formats import CONTENT_ORDER, PairFormat
from st_assets.steps.models import require_base_model, resolve_base_model
from st_assets.steps.promotion import decide_promotion
from st_assets.steps.report import LIMITS_NOTE, render_html_report, write_html_report
from st_assets.steps.split import rows_holding
from st_assets.store.registry import (
    BASE_VERSION,
    ModelVersion,
    get_champion,
    get_latest_challenger,
    record_decision,
    register_model,
    require_model_folder,
)
from st_assets.store.warehouse import Replacement, replace_rows, replace_tables

COUNTERFACTUAL_TEST = "counterfactual_invariance"
PRIMARY_DATASET = "all"
PRIMARY_METRIC = "primary_score"
DIFFERENCE_METRIC = "primary_score_difference"
# Rows beside the difference (dataset: the incumbent): both models' primary scores on the rows compared,
# and how many eval rows were left out because the incumbent trained on their texts.
COMPARED_SCORE_METRICS = {"challenger": "compared_score_challenger", "incumbent": "compared_score_incumbent"}
LEFT_OUT_METRIC = "eval_rows_incumbent_trained_on"


@dataclass(frozen=True)
class ComparedModel:
    """A model in a comparison: its registry version, folder and role (base, challenger, champion)."""

    version: str
    path: str
    role: str


@dataclass(frozen=True)
class Comparison:
    """The challenger, the model it must beat (champion, or base at first) and everything compared."""

    challenger: ModelVersion
    incumbent_version: str
    models: list[ComparedModel]


def current_comparison(warehouse: WarehouseResource) -> Comparison:
    """The latest challenger, its incumbent, and the models to report: base, challenger, champion."""
    with warehouse.connect(read_only=True) as connection:
        challenger = get_latest_challenger(connection)
        champion = get_champion(connection)
    if challenger is None:
        raise RuntimeError("no fine-tuned model is registered; materialise finetuned_model first")
    require_model_folder(challenger)
    if champion is not None:
        require_model_folder(champion)
    base_path = resolve_base_model(challenger.base_model)
    models = [
        ComparedModel(BASE_VERSION, base_path, "base"),
        ComparedModel(challenger.version, challenger.path, "challenger"),
    ]
    if champion is None or champion.version == challenger.version:
        return Comparison(challenger, BASE_VERSION, models)
    if champion.version == BASE_VERSION and champion.path == base_path:
        return Comparison(challenger, BASE_VERSION, models)
    # A fine-tuned champion, or a base model champion that is not this challenger's base (the base
    # model was changed since): the challenger must beat that model, under a label of its own.
    label = champion.version if champion.version != BASE_VERSION else f"{BASE_VERSION}:{champion.base_model}"
    models.append(ComparedModel(label, champion.path, "champion"))
    return Comparison(challenger, label, models)


def _not_scored(report: str, comparison: Comparison, severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    """A failed check: ``report`` holds no results for the latest challenger (registered after it ran)."""
    return dg.AssetCheckResult(
        passed=False,
        severity=severity,
        description=f"{report} has not scored {comparison.challenger.version} yet; materialise {report}",
    )


def training_texts(connection: duckdb.DuckDBPyConnection, comparison: Comparison) -> set[str] | None:
    """The normalised texts the incumbent was fine-tuned from: none for a base model; None when its
    training predates their recording."""
    incumbent = comparison.incumbent_version
    if incumbent == BASE_VERSION or incumbent.startswith(f"{BASE_VERSION}:"):
        return set()
    texts = connection.execute(
        "SELECT text FROM training_texts WHERE model_version = ?", [incumbent]
    ).fetchall()
    return {text for (text,) in texts} or None


def _below_invariance_floor(fairness: pd.DataFrame, threshold: float) -> str:
    """A clause for the base model's decision when its own counterfactual invariance misses ``threshold``:
    it serves anyway (something must), and its decision says so."""
    base = fairness[
        (fairness["test"] == COUNTERFACTUAL_TEST)
        & (fairness["model_version"] == BASE_VERSION)
        & (fairness["metric"] == "mean_cosine")
    ]["value"]
    if base.empty or math.isnan(float(base.iloc[0])) or float(base.iloc[0]) >= threshold:
        return ""
    return (
        f"; its own counterfactual invariance {float(base.iloc[0]):.3f} is below the threshold {threshold} "
        "too, and it serves until a challenger passes"
    )


def encoder_for(model: ComparedModel, settings: Settings) -> EmbeddingCache:
    """An encode function for one model that embeds each distinct text once."""
    return EmbeddingCache(model_encoder(model.path, settings))


def _role_of(version: str, comparison: Comparison) -> str:
    return next((m.role for m in comparison.models if m.version == version), "other")


def _models_compared(comparison: Comparison, trained: pd.DataFrame) -> pd.DataFrame:
    """Role, version and how each compared model was trained (loss, rows, epochs, augmentation)."""
    # The base model has no registry row until it is made champion, and then no training config.
    by_version = {row.version: row._asdict() for row in trained.itertuples()}
    rows = []
    for model in comparison.models:
        record = by_version.get(model.version, {})
        config = json.loads(record["config"]) if isinstance(record.get("config"), str) else {}
        rows.append(
            {
                "role": model.role,
                "version": model.version,
                "loss": record.get("loss") if isinstance(record.get("loss"), str) and record["loss"] else "—",
                "train rows": int(record["train_rows"]) if pd.notna(record.get("train_rows")) else 0,
                "epochs": config.get("epochs", "—"),
                "augment": config.get("augment", "—"),
            }
        )
    return pd.DataFrame(rows)


def _group_table(groups: pd.DataFrame, comparison: Comparison) -> str:
    """Markdown: each format's primary metric per group, one column per model role."""
    is_primary = [
        FORMAT_PRIMARY_METRIC.get(PairFormat(dataset)) == metric
        for dataset, metric in zip(groups["dataset"], groups["metric"], strict=True)
    ]
    primary = groups[is_primary]
    wide = (
        primary.assign(role=[_role_of(v, comparison) for v in primary["model_version"]])
        .pivot_table(index=["dataset", "metric", "group_name", "eval_rows"], columns="role", values="value")
        .reset_index()
    )
    return markdown_table(wide.to_dict("records"))


def build_evaluation_assets(
    settings: Settings,
) -> tuple[list[dg.AssetsDefinition], list[dg.AssetChecksDefinition]]:
    """``evaluation_report``, ``fairness_report``, ``champion_model`` and the report checks."""

    @dg.asset(
        deps=["finetuned_model", "validated_pairs"],
        group_name="evaluation",
        kinds={"pytorch", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version=settings_code_version(
            "7", settings, {"seed", "bootstrap_samples", "min_group_rows", "encode_backend"}
        ),
        owners=["team:ml-platform"],
        description=(
            "Base model vs challenger vs current champion on the held-out eval split, with the metrics that "
            "fit each format (Spearman/Pearson; accuracy/F1/AP; triplet accuracy; MRR@10, NDCG@10, "
            "Recall@1/5/10, 1-NN label accuracy), each with a seeded bootstrap 95% CI, plus the "
            "challenger-minus-incumbent difference of the primary score with its 90% CI (the gate's one-sided "
            "95% test; on the eval rows holding "
            "no text a fine-tuned incumbent trained on, per training_texts; both scores on those rows and the "
            "count left out are stored beside it), and edge-case "
            "stability (casing, punctuation, typos, negation, length, emoji, non-Latin). When rows carry a "
            "group column: every metric per group (group_metrics) and its largest gap between groups "
            "(<metric>_group_gap). Rows in evaluation_metrics, group_metrics and edge_case_results."
        ),
    )
    def evaluation_report(
        context: dg.AssetExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        require_passed_validation(context)
        comparison = current_comparison(st_assets_warehouse)
        require_base_model(comparison.challenger.base_model)  # offline, a base model not here is named
        challenger_version = comparison.challenger.version
        with st_assets_warehouse.connect() as connection:
            pairs = connection.execute(f"SELECT * FROM validated_pairs ORDER BY {CONTENT_ORDER}").df()
            incumbent_texts = training_texts(connection, comparison)
        # An eval row holding a text the incumbent trained on (the split moved since: another seed or eval
        # fraction, or a group that changed sides) is not held out from it: the comparison leaves it out.
        trained_on = (pairs["split"] == "eval") & rows_holding(pairs, incumbent_texts or set())
        if trained_on.any():
            context.log.warning(
                f"{int(trained_on.sum())} of {int((pairs['split'] == 'eval').sum())} eval rows hold texts "
                f"{comparison.incumbent_version} trained on; its comparison with the challenger leaves them out"
            )
        if incumbent_texts is None:
            context.log.warning(
                f"{comparison.incumbent_version} was trained before training texts were recorded: its "
                "comparison uses every eval row"
            )
        now = datetime.now(UTC)
        caches = {model.version: encoder_for(model, settings) for model in comparison.models}
        rows, edge_rows, group_rows = [], [], []
        scored_rows: dict[str, int] = {}  # per model, the eval rows its primary score weighs
        for model in comparison.models:
            metrics = evaluate_model(
                pairs, caches[model.version], n_boot=settings.bootstrap_samples, seed=settings.seed
            )
            per_group, gaps = evaluate_groups(
                pairs,
                caches[model.version],
                n_boot=settings.bootstrap_samples,
                seed=settings.seed,
                min_group_rows=settings.min_group_rows,
            )
            rows += [
                {
                    "model_version": model.version,
                    "dataset": m.dataset,
                    "metric": m.metric,
                    "value": m.value,
                    "ci_low": m.ci_low,
                    "ci_high": m.ci_high,
                    "eval_rows": m.rows,
                }
                for m in [*metrics, *gaps]
            ]
            group_rows += [
                {
                    "model_version": model.version,
                    "dataset": g.dataset,
                    "group_name": g.group,
                    "metric": g.metric,
                    "value": g.value,
                    "ci_low": g.ci_low,
                    "ci_high": g.ci_high,
                    "eval_rows": g.rows,
                }
                for g in per_group
            ]
            scored_rows[model.version] = primary_rows(metrics)
            rows.append(
                {
                    "model_version": model.version,
                    "dataset": PRIMARY_DATASET,
                    "metric": PRIMARY_METRIC,
                    "value": primary_score(metrics),
                    "eval_rows": scored_rows[model.version],
                }
            )
            edges = edge_case_report(caches[model.version], seed=settings.seed)
            edge_rows.append(edges.assign(model_version=model.version))
        difference = compare_to_incumbent(
            pairs[~trained_on],
            caches[challenger_version],
            caches[comparison.incumbent_version],
            n_boot=settings.bootstrap_samples,
            seed=settings.seed,
        )
        rows.append(
            {
                "model_version": challenger_version,
                "dataset": comparison.incumbent_version,
                "metric": DIFFERENCE_METRIC,
                "value": difference.difference,
                "ci_low": difference.ci_low,
                "ci_high": difference.ci_high,
                "eval_rows": difference.rows,
            }
        )
        for role, version, score in (
            ("challenger", challenger_version, difference.challenger_score),
            ("incumbent", comparison.incumbent_version, difference.incumbent_score),
        ):
            rows.append(
                {
                    "model_version": version,
                    "dataset": comparison.incumbent_version,
                    "metric": COMPARED_SCORE_METRICS[role],
                    "value": score,
                    "eval_rows": difference.rows,
                }
            )
        rows.append(
            {
                "model_version": challenger_version,
                "dataset": comparison.incumbent_version,
                "metric": LEFT_OUT_METRIC,
                "value": float(trained_on.sum()),
            }
        )
        report = pd.DataFrame(rows).assign(evaluated_for=challenger_version, evaluated_at=now)
        edges = pd.concat(edge_rows, ignore_index=True).assign(evaluated_for=challenger_version)
        groups = pd.DataFrame(group_rows).assign(evaluated_for=challenger_version, evaluated_at=now)
        with st_assets_warehouse.connect() as connection:
            replace_tables(
                connection,
                [
                    Replacement(table, rows, "evaluated_for", [challenger_version])
                    for table, rows in (
                        ("evaluation_metrics", report),
                        ("group_metrics", groups),
                        ("edge_case_results", edges),
                    )
                ],
            )
        context.log.info(
            f"{challenger_version} vs {comparison.incumbent_version}: {difference.difference:+.4f} "
            f"[{difference.ci_low:+.4f}, {difference.ci_high:+.4f}]"
        )
        report["role"] = [_role_of(v, comparison) for v in report["model_version"]]
        per_model = report[report["dataset"] != comparison.incumbent_version]
        wide = per_model.pivot_table(
            index=["dataset", "metric"], columns="role", values="value"
        ).reset_index()
        numeric = {
            f"{r.role}/{r.dataset}/{r.metric}": float(r.value)
            for r in per_model.itertuples()
            if r.role in ("base", "challenger")
        }
        edge_table = edges.assign(role=[_role_of(v, comparison) for v in edges["model_version"]])
        return dg.MaterializeResult(
            metadata={
                "challenger_version": challenger_version,
                "incumbent_version": comparison.incumbent_version,
                "eval_rows_incumbent_trained_on": int(trained_on.sum()),
                "primary_score_difference": float(difference.difference),
                "primary_score_difference_ci_low": float(difference.ci_low),
                "primary_score_difference_ci_high": float(difference.ci_high),
                **numeric,
                "report": dg.MetadataValue.md(markdown_table(wide.to_dict("records"))),
                "edge_cases": dg.MetadataValue.md(
                    markdown_table(
                        edge_table[
                            ["role", "kind", "mean_cosine", "min_cosine", "expectation", "passed"]
                        ].to_dict("records")
                    )
                ),
                **({"groups": dg.MetadataValue.md(_group_table(groups, comparison))} if len(groups) else {}),
            }
        )

    @dg.asset(
        deps=["finetuned_model", "validated_pairs"],
        group_name="evaluation",
        kinds={"pytorch", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version=settings_code_version(
            "5", settings, {"seed", "fairness_permutations", "counterfactual_groups", "encode_backend"}
        ),
        owners=["team:ml-platform"],
        description=(
            "Bias report for base, challenger and champion: SEAT/WEAT association tests (bundled probes and "
            "any *.jsonl in fairness_tests/; effect size and two-sided permutation p-value) and counterfactual "
            "invariance of eval texts under gender-term swaps (bundled term map, extended by "
            "counterfactual_terms.json in the home). " + LIMITS_NOTE
        ),
    )
    def fairness_report(
        context: dg.AssetExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        require_passed_validation(context)
        comparison = current_comparison(st_assets_warehouse)
        require_base_model(comparison.challenger.base_model)  # offline, a base model not here is named
        challenger_version = comparison.challenger.version
        tests_dir = settings.fairness_tests_dir
        tests = load_association_tests([*bundled_test_paths(), *user_test_paths(tests_dir)])
        term_map = load_swapped_groups(settings.home, settings.counterfactual_groups)
        with st_assets_warehouse.connect() as connection:
            # Every text column: a gendered term may sit in the answer or the negative as well.
            eval_texts = [
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT text FROM (SELECT unnest([sentence1, sentence2, negative]) AS text "
                    "FROM validated_pairs WHERE split = 'eval') WHERE text IS NOT NULL ORDER BY text"
                ).fetchall()
            ]
        now = datetime.now(UTC)
        # Every model is probed on the same swaps: those each of them reads (a swap past a model's token
        # window would score a perfect 1.0).
        encoders = [model_encoder(model.path, settings) for model in comparison.models]

        def read_differently(text: str, swapped: str) -> bool:
            return all(encoder.reads_difference(text, swapped) for encoder in encoders)

        rows, worst = [], []
        for model in comparison.models:
            encode = encoder_for(model, settings)
            for test in tests:
                result = run_association_test(
                    test, encode, permutations=settings.fairness_permutations, seed=settings.seed
                )
                rows += [
                    (model, test.name, "effect_size", result.effect_size),
                    (model, test.name, "p_value", result.p_value),
                ]
            invariance = counterfactual_invariance(
                eval_texts,
                encode,
                term_map=term_map,
                groups=settings.counterfactual_groups,
                read_differently=read_differently,
            )
            rows += [
                (model, COUNTERFACTUAL_TEST, "mean_cosine", invariance.mean_cosine),
                (model, COUNTERFACTUAL_TEST, "p05_cosine", invariance.p05_cosine),
                (model, COUNTERFACTUAL_TEST, "n_texts", float(invariance.n_texts)),
                (model, COUNTERFACTUAL_TEST, "n_past_token_window", float(invariance.n_past_window)),
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
        with st_assets_warehouse.connect() as connection:
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
        context.log.info(f"fairness: {len(tests)} association tests for {len(comparison.models)} models")
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
                "limits": LIMITS_NOTE,
            }
        )

    @dg.asset(
        deps=[evaluation_report, fairness_report],
        group_name="evaluation",
        kinds={"duckdb"},
        pool=WAREHOUSE_POOL,
        code_version="5",
        owners=["team:ml-platform"],
        description=(
            "The promotion gate: the challenger becomes champion only if its primary eval score (on rows "
            "held out from both) beats the "
            f"incumbent's (the champion, or the base model at first) by more than {settings.promotion_margin} "
            "with the bootstrap 90% CI of the difference above zero (a one-sided 95% test), no association "
            f"test's |effect size| grows by more than {settings.fairness_tolerance}, and counterfactual invariance stays at or above "
            f"{settings.invariance_threshold}. When the first challenger fails, the base model becomes "
            "champion. Exactly one champion; the decision, its reasons and an HTML report "
            "(reports/<version>.html) are kept."
        ),
    )
    def champion_model(
        context: dg.AssetExecutionContext, st_assets_warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        comparison = current_comparison(st_assets_warehouse)
        challenger = comparison.challenger
        with st_assets_warehouse.connect() as connection:
            champion = get_champion(connection)
            if champion is not None and champion.version == challenger.version:
                return dg.MaterializeResult(
                    data_version=dg.DataVersion(champion.version),
                    metadata={
                        "champion_version": champion.version,
                        "changed": False,
                        "decision": "the challenger is already the champion",
                    },
                )
            if challenger.status == "rejected":
                # Gated once: testing the same model again on every run would, sooner or later, let a
                # gain that is only noise through. Building it again (force: true) makes it a candidate.
                return dg.MaterializeResult(
                    data_version=dg.DataVersion(champion.version if champion else "none"),
                    metadata={
                        "champion_version": champion.version if champion else None,
                        "changed": False,
                        "decision": f"{challenger.version} was rejected and not built again since; "
                        "the decision stands (launch finetuned_model with force: true to gate it again)",
                    },
                )
            metrics = connection.execute(
                "SELECT * FROM evaluation_metrics WHERE evaluated_for = ?", [challenger.version]
            ).df()
            fairness = connection.execute(
                "SELECT * FROM fairness_metrics WHERE evaluated_for = ?", [challenger.version]
            ).df()
            edges = connection.execute(
                "SELECT * FROM edge_case_results WHERE evaluated_for = ?", [challenger.version]
            ).df()
            groups = connection.execute(
                "SELECT * FROM group_metrics WHERE evaluated_for = ?", [challenger.version]
            ).df()
            trained = connection.execute(
                "SELECT version, loss, train_rows, config FROM model_registry WHERE version IN (SELECT unnest(?))",
                [[model.version for model in comparison.models]],
            ).df()
        incumbent = comparison.incumbent_version
        difference_row = metrics[(metrics["metric"] == DIFFERENCE_METRIC) & (metrics["dataset"] == incumbent)]
        if difference_row.empty:
            raise RuntimeError(
                f"evaluation_report has not compared {challenger.version} with {incumbent} yet"
            )
        beside = metrics[metrics["dataset"] == incumbent].set_index("metric")
        if not {*COMPARED_SCORE_METRICS.values(), LEFT_OUT_METRIC} <= set(beside.index):
            raise RuntimeError(
                f"evaluation_report compared {challenger.version} with {incumbent} in an earlier version; "
                "materialise evaluation_report again"
            )
        difference = difference_row.iloc[0]
        comparison_scores = ScoreDifference(
            float(beside.loc[COMPARED_SCORE_METRICS["challenger"], "value"]),
            float(beside.loc[COMPARED_SCORE_METRICS["incumbent"], "value"]),
            float(difference["value"]),
            float(difference["ci_low"]),
            float(difference["ci_high"]),
            int(difference["eval_rows"]),
        )
        effects = fairness[fairness["metric"] == "effect_size"]
        effect_sizes = {
            version: dict(zip(group["test"], group["value"], strict=True))
            for version, group in effects.groupby("model_version")
        }
        invariance = fairness[
            (fairness["test"] == COUNTERFACTUAL_TEST) & (fairness["model_version"] == challenger.version)
        ].set_index("metric")["value"]
        if "n_texts" not in invariance.index:
            # fairness_report writes this row for every model it scores; without it no bias check ran.
            raise RuntimeError(f"fairness_report has not scored {challenger.version} yet")
        swapped_texts = float(invariance.get("n_texts", 0.0))
        decision = decide_promotion(
            comparison_scores,
            effect_sizes.get(challenger.version, {}),
            effect_sizes.get(incumbent, {}),
            float(invariance.get("mean_cosine", float("nan"))),
            swapped_texts=0 if math.isnan(swapped_texts) else int(swapped_texts),
            left_out_rows=int(beside.loc[LEFT_OUT_METRIC, "value"]),
            margin=settings.promotion_margin,
            fairness_tolerance=settings.fairness_tolerance,
            invariance_threshold=settings.invariance_threshold,
        )
        context.log.info(f"{challenger.version} {decision.summary}")
        # Written before the decision is recorded: a report that cannot be written fails the step with
        # the champion as it was, and the next run gates the challenger again.
        per_model = metrics[metrics["dataset"] != incumbent]
        html_path = write_html_report(
            settings.home / "reports" / f"{challenger.version}.html",
            render_html_report(
                f"st_assets report: challenger {challenger.version}",
                per_model.assign(role=[_role_of(v, comparison) for v in per_model["model_version"]]),
                fairness.assign(role=[_role_of(v, comparison) for v in fairness["model_version"]]),
                edges.drop(columns="evaluated_for").assign(
                    role=[_role_of(v, comparison) for v in edges["model_version"]]
                ),
                list(decision.reasons),
                groups=groups.assign(role=[_role_of(v, comparison) for v in groups["model_version"]]),
                models=_models_compared(comparison, trained),
            ),
        )
        with st_assets_warehouse.connect() as connection:
            record_decision(
                connection, challenger.version, decision.promote, decision.challenger_score, decision.summary
            )
            if not decision.promote and champion is None:
                register_model(
                    connection,
                    {
                        "version": BASE_VERSION,
                        "path": resolve_base_model(challenger.base_model),
                        "base_model": challenger.base_model,
                        "loss": "",
                        "data_version": "",
                    },
                )
                record_decision(
                    connection,
                    BASE_VERSION,
                    True,
                    decision.incumbent_score,
                    "base model promoted: the first challenger did not pass the gate"
                    + _below_invariance_floor(fairness, settings.invariance_threshold),
                )
            new_champion = get_champion(connection)
        return dg.MaterializeResult(
            # The champion readers get: assets downstream are stale exactly when it changes.
            data_version=dg.DataVersion(new_champion.version if new_champion else "none"),
            metadata={
                "champion_version": new_champion.version if new_champion else None,
                "challenger_version": challenger.version,
                "promoted": decision.promote,
                "challenger_score": float(decision.challenger_score),
                "incumbent_score": float(decision.incumbent_score),
                "decision": dg.MetadataValue.md("\n".join(f"- {r}" for r in decision.reasons)),
                "html_report": dg.MetadataValue.path(str(html_path)),
                "changed": decision.promote or champion is None,
            },
        )

    @dg.asset_check(
        asset=evaluation_report,
        description=(
            "ERROR when the challenger's primary held-out score is below the base model's (fine-tuning hurt)."
        ),
    )
    def challenger_not_worse_than_base(st_assets_warehouse: WarehouseResource) -> dg.AssetCheckResult:
        comparison = current_comparison(st_assets_warehouse)
        with st_assets_warehouse.connect(read_only=True) as connection:
            scores = dict(
                connection.execute(
                    "SELECT model_version, value FROM evaluation_metrics WHERE evaluated_for = ? AND metric = ?",
                    [comparison.challenger.version, PRIMARY_METRIC],
                ).fetchall()
            )
        # evaluation_report stores every compared model's primary score, the base model's included.
        if BASE_VERSION not in scores or comparison.challenger.version not in scores:
            return _not_scored("evaluation_report", comparison, dg.AssetCheckSeverity.ERROR)
        base_score = scores[BASE_VERSION]
        challenger_score = scores[comparison.challenger.version]
        if base_score is None or math.isnan(base_score):
            return dg.AssetCheckResult(
                passed=True,
                description="no held-out primary metric for these formats (unlabelled texts alone): nothing to compare",
            )
        if challenger_score is None or math.isnan(challenger_score):
            # The base model scored and the challenger did not: its embeddings are broken (NaN).
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=f"the challenger has no primary score where the base model scores {base_score:.4f}",
                metadata={"base_score": float(base_score)},
            )
        return dg.AssetCheckResult(
            passed=bool(challenger_score >= base_score),
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"{PRIMARY_METRIC}: challenger {challenger_score:.4f} "
                f"{'≥' if challenger_score >= base_score else '<'} base model {base_score:.4f}"
            ),
            metadata={"challenger_score": float(challenger_score), "base_score": float(base_score)},
        )

    @dg.asset_check(
        asset=fairness_report,
        description=(
            "No association test's |effect size| grew by more than the tolerance over the base model, and "
            "counterfactual invariance is at or above its threshold."
        ),
    )
    def fairness_within_bounds(st_assets_warehouse: WarehouseResource) -> dg.AssetCheckResult:
        comparison = current_comparison(st_assets_warehouse)
        with st_assets_warehouse.connect(read_only=True) as connection:
            fairness = connection.execute(
                "SELECT model_version, test, metric, value FROM fairness_metrics WHERE evaluated_for = ?",
                [comparison.challenger.version],
            ).df()
        severity = dg.AssetCheckSeverity[settings.fairness_severity]
        if not (fairness["model_version"] == comparison.challenger.version).any():
            return _not_scored("fairness_report", comparison, severity)
        effects = (
            fairness[fairness["metric"] == "effect_size"]
            .pivot_table(index="test", columns="model_version", values="value", dropna=False)
            .reindex(columns=[BASE_VERSION, comparison.challenger.version])
        )
        growth = (effects[comparison.challenger.version].abs() - effects[BASE_VERSION].abs()).dropna()
        grown = growth[growth > settings.fairness_tolerance]
        challenger_invariance = fairness[
            (fairness["test"] == COUNTERFACTUAL_TEST)
            & (fairness["model_version"] == comparison.challenger.version)
        ].set_index("metric")["value"]
        invariance_value = float(challenger_invariance.get("mean_cosine", float("nan")))
        # NaN means no eval text has a term to swap, unless texts were swapped and the scores are NaN.
        invariant = (
            invariance_value >= settings.invariance_threshold
            if not pd.isna(invariance_value)
            else not challenger_invariance.get("n_texts", 0.0)
        )
        if not pd.isna(invariance_value):
            invariance = f"invariance {invariance_value:.3f} {'≥' if invariant else '<'} {settings.invariance_threshold}"
        elif invariant:
            invariance = "invariance not measured: no eval text holds a term to swap"
        else:
            invariance = "invariance not scored (NaN) though eval texts were swapped"
        return dg.AssetCheckResult(
            passed=bool(grown.empty and invariant),
            severity=severity,
            description=(
                f"grew beyond tolerance: {sorted(grown.index)}"
                if len(grown)
                else f"no effect size grew beyond tolerance ({settings.fairness_tolerance})"
            )
            + f"; {invariance}",
            metadata={
                "largest_growth": float(growth.max()) if len(growth) else 0.0,
                "counterfactual_mean_cosine": invariance_value,
            },
        )

    @dg.asset_check(
        asset=evaluation_report,
        description=(
            "When eval rows carry a group column: the challenger's largest gap between groups on each "
            f"format's primary metric is at most {settings.group_gap_tolerance} wider than the base model's."
        ),
    )
    def group_gap_within_tolerance(st_assets_warehouse: WarehouseResource) -> dg.AssetCheckResult:
        comparison = current_comparison(st_assets_warehouse)
        gap_metrics = [metric + GAP_SUFFIX for metric in FORMAT_PRIMARY_METRIC.values()]
        with st_assets_warehouse.connect(read_only=True) as connection:
            gaps = connection.execute(
                "SELECT model_version, dataset, metric, value FROM evaluation_metrics "
                "WHERE evaluated_for = ? AND metric IN (SELECT unnest(?)) AND model_version IN (?, ?)",
                [comparison.challenger.version, gap_metrics, BASE_VERSION, comparison.challenger.version],
            ).df()
            scored = connection.execute(
                "SELECT count(*) FROM evaluation_metrics WHERE evaluated_for = ? AND model_version = ?",
                [comparison.challenger.version, comparison.challenger.version],
            ).fetchone()
        severity = dg.AssetCheckSeverity[settings.fairness_severity]
        if not (scored and scored[0]):
            return _not_scored("evaluation_report", comparison, severity)
        gaps = primary_group_gaps(gaps)
        if gaps.empty:
            return dg.AssetCheckResult(
                passed=True,
                severity=severity,
                description="no eval rows carry a group (or fewer than two groups are large enough)",
            )
        wide = gaps.pivot_table(index=["dataset", "metric"], columns="model_version", values="value").reindex(
            columns=[BASE_VERSION, comparison.challenger.version]
        )
        growth = (wide[comparison.challenger.version] - wide[BASE_VERSION]).dropna()
        widened = growth[growth > settings.group_gap_tolerance]
        return dg.AssetCheckResult(
            passed=bool(widened.empty),
            severity=severity,
            description=(
                f"group gap widened beyond tolerance: {[f'{d}/{m}' for d, m in widened.index]}"
                if len(widened)
                else "no group gap widened beyond tolerance"
            ),
            metadata={
                f"{dataset}/{metric}": float(value)
                for (dataset, metric), value in wide[comparison.challenger.version].items()
            }
            | {"largest_growth": float(growth.max()) if len(growth) else 0.0},
        )

    return [evaluation_report, fairness_report, champion_model], [
        challenger_not_worse_than_base,
        fairness_within_bounds,
        group_gap_within_tolerance,
    ]
