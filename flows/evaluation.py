"""The evaluate step: ``imgflow evaluate MODEL DATA_DIR --out DIR`` and the pipeline's evaluation.

Thin Prefect wrappers around :mod:`imgflow.tasks.evaluation`; nothing heavy is imported
until a flow or task runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imgflow.flows.config import DEFAULT_WORKDIR
from imgflow.flows.gpu_slot import as_gpu_task
from imgflow.tasks.options import EvaluateOptions

# keys of the small summary a task hands back (the full metrics live in metrics.json)
_SUMMARY_KEYS = (
    "out_dir", "accuracy", "loss", "count", "skipped", "report_html", "report_md", "metrics_json",
    "macro", "per_class", "prediction_distribution", "class_names", "class_notes", "saliency_method",
    "expected_calibration_error", "top_k", "top_k_accuracy", "plots", "non_finite_outputs", "promotion",
    "predictions_csv", "calibration", "novelty",
)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    summary = {key: result[key] for key in _SUMMARY_KEYS if key in result}
    if "comparison" in result:
        comparison = result["comparison"]
        summary["comparison"] = {key: comparison[key] for key in
                                 ("candidate_run_id", "champion_run_id", "decision", "reason", "rows")}
    return summary


@task(name="evaluate-folder", tags={"gpu"}, cache_policy=NO_CACHE, timeout_seconds=3600)
def evaluate_folder_task(
    model_dir: str,
    data_dir: str,
    out_dir: str,
    champion_dir: str | None = None,
    tolerance: float = 0.0,
    min_class_images_for_recall_gate: int = 10,
    csv_neutralise: bool = True,
    batch_size: int = 64,
    exclude: list[str] | None = None,
    ood_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate a model directory on a class-folder directory; returns the report summary."""
    from imgflow.tasks.evaluation import evaluate_folder

    result = evaluate_folder(Path(model_dir), Path(data_dir), Path(out_dir),
                             Path(champion_dir) if champion_dir else None, tolerance=tolerance,
                             min_class_images_for_recall_gate=min_class_images_for_recall_gate,
                             csv_neutralise=csv_neutralise, batch_size=batch_size,
                             exclude=exclude or (), ood_dir=Path(ood_dir) if ood_dir else None)
    return _summary(result)


def publish_artifacts(summary: dict[str, Any], key_prefix: str = "evaluation") -> None:
    """Prefect artifacts of an evaluation: markdown summary, per-class table, link to the HTML.

    Call inside a flow or task run. Keys are ``<prefix>-summary``, ``<prefix>-per-class``
    and ``<prefix>-report`` (lowercase letters, digits and dashes only).
    """
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    from imgflow.tasks.report import summary_markdown

    prefix = re.sub(r"[^a-z0-9-]+", "-", key_prefix.lower()).strip("-") or "evaluation"
    metrics_like = {
        "count": summary["count"], "accuracy": summary["accuracy"], "loss": summary["loss"],
        "macro": summary["macro"], "expected_calibration_error": summary["expected_calibration_error"],
        "class_notes": summary["class_notes"], "chance_accuracy": 1.0 / len(summary["class_names"]),
        "majority_accuracy": max(v["support"] for v in summary["per_class"].values()) / max(summary["count"], 1),
        "non_finite_outputs": summary.get("non_finite_outputs", 0),
    }
    if "top_k_accuracy" in summary:
        metrics_like.update(top_k=summary["top_k"], top_k_accuracy=summary["top_k_accuracy"])
    markdown = summary_markdown(metrics_like, {"run_id": summary.get("run_id", "model"),
                                               "data": summary.get("data", summary["out_dir"]),
                                               "skipped_count": summary["skipped"]})
    if "comparison" in summary:
        comparison = summary["comparison"]
        markdown += (f"\n\n**Champion comparison** ({comparison['candidate_run_id']} vs "
                     f"{comparison['champion_run_id']}): {comparison['decision']} — {comparison['reason']}")
    markdown += f"\n\nFull report: `{summary['report_html']}`"
    create_markdown_artifact(markdown, key=f"{prefix}-summary", description="Evaluation summary")
    rows = [
        {"class": name, **{k: round(float(v), 4) if k != "support" else int(v) for k, v in values.items()},
         "predicted": summary["prediction_distribution"][name]}
        for name, values in summary["per_class"].items()
    ]
    create_table_artifact(rows, key=f"{prefix}-per-class", description="Per-class precision, recall, F1, support")
    create_link_artifact(Path(summary["report_html"]).resolve().as_uri(), link_text="report.html",
                         key=f"{prefix}-report", description="Self-contained HTML evaluation report")


@flow(name="evaluate")
def evaluate_flow(
    model: str,
    data_dir: Path,
    workdir: Path = DEFAULT_WORKDIR,
    out: Path | None = None,
    options: EvaluateOptions | None = None,
    ood_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate MODEL (a model directory or ``champion``) on a class-folder directory.

    Writes metrics.json, report.html, report.md, predictions.csv and PNG plots into
    ``out`` (default ``<workdir>/evaluations/<run_id>-<data_dir name>``). When a
    champion other than MODEL is promoted in ``workdir``, it is evaluated on the same
    images and shown side by side. ``options`` is the ``evaluate`` section of the config
    (default: its defaults); ``csv_neutralise: false`` there writes ``predictions.csv``
    cells raw (no ``'`` before a leading ``=``, ``+``, ``-``, ``@``, tab or CR).
    ``ood_dir`` (images known to be none of the classes) adds the novelty AUROC and a
    histogram of novelty scores; a model directory without novelty statistics (or a
    calibration temperature) gets them fitted first.

    Returns:
        {"out_dir", "accuracy", "report_html", "metrics_json", "skipped"} plus
        ``report_md``, ``count``, ``non_finite_outputs``, ``promotion`` (what the
        pipeline's rule decides for MODEL) and ``comparison`` (with a champion).

    Raises:
        imgflow.tasks.registry.RegistryError: no such model directory, or no champion in ``workdir``.
        imgflow.tasks.evaluation.EvaluationError: no class folder the model knows in ``data_dir``,
            or no readable image. Both are ValueErrors and usage errors (CLI exit 2).
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # quiet TensorFlow start-up in this process too (a worker runs only the flow)
    from imgflow.tasks.registry import champion_dir as find_champion
    from imgflow.tasks.paths import workdirs_to_skip
    from imgflow.tasks.registry import read_metadata, resolve_model_dir

    logger = get_run_logger()
    workdir = Path(workdir)
    data_dir = Path(data_dir)
    model_dir = resolve_model_dir(model, workdir)
    metadata = read_metadata(model_dir)
    run_id = str(metadata.get("run_id", model_dir.name))
    out_dir = Path(out) if out is not None else workdir / "evaluations" / f"{run_id}-{data_dir.resolve().name}"
    champion_dir = find_champion(workdir)
    if champion_dir is not None and champion_dir.resolve() == model_dir.resolve():
        champion_dir = None
    config = metadata.get("config") or {}
    tolerance = float(config.get("promotion_tolerance", 0.0))
    min_images = int(config.get("min_class_images_for_recall_gate", 10))
    options = options or EvaluateOptions()
    summary = as_gpu_task(evaluate_folder_task)(str(model_dir), str(data_dir), str(out_dir), str(champion_dir) if champion_dir else None,
                                   tolerance, min_images, options.csv_neutralise, options.batch_size,
                                   [str(p) for p in workdirs_to_skip(workdir, {"DATA_DIR": data_dir})],
                                   str(ood_dir) if ood_dir else None)
    summary.update(run_id=run_id, data=str(data_dir))
    publish_artifacts(summary)
    logger.info("accuracy %.4f on %d images (%d skipped); report %s",
                summary["accuracy"], summary["count"], summary["skipped"], summary["report_html"])
    result = {key: summary[key] for key in ("out_dir", "accuracy", "report_html", "metrics_json", "skipped",
                                            "report_md", "count", "non_finite_outputs", "promotion")}
    if "comparison" in summary:
        result["comparison"] = {k: summary["comparison"][k] for k in ("decision", "reason", "champion_run_id")}
    result["calibration"] = summary.get("calibration")
    result["novelty_auroc"] = (summary.get("novelty") or {}).get("auroc")
    return result
