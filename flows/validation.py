"""The validation stage as a Prefect task and flow: check a folder dataset, write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from imgflow.flows.config import DEFAULT_WORKDIR, ValidationOptions
from imgflow.tasks import atomic, paths
from imgflow.flows.retrying import retry_unless
from imgflow.tasks.dataset import DatasetError, report_markdown
from imgflow.tasks.validation_reuse import (REPORT_NAME, summarize, validate_or_reuse, validated_ahead,
                                             validation_outputs)

__all__ = ["REPORT_NAME", "summarize", "validate_flow", "validate_task"]


@task(
    name="validate-dataset",
    cache_policy=NO_CACHE,
    timeout_seconds=4 * 3600,
    retries=2,
    retry_delay_seconds=5,
    # a missing folder or a report path that cannot be written fails the same way every time
    retry_condition_fn=retry_unless(DatasetError, NotADirectoryError, IsADirectoryError, PermissionError),
)
def validate_task(
    data_dir: Path, val_dir: Path | None, options: ValidationOptions, report_path: Path,
    exclude: list[Path] | None = None,
) -> dict[str, Any]:
    """Scan and decode every file, write the JSON and Markdown reports, return the summary.

    When ``report_path`` already holds the report of the same files (same paths, sizes
    and modification times), options and code, it is reused and nothing is decoded.
    ``exclude`` lists folders never scanned as data (the work folder inside DATA_DIR).
    """
    summary, reused = validate_or_reuse(data_dir, val_dir, options, report_path, list(exclude or []))
    if reused and validated_ahead(report_path, forget=True):
        get_run_logger().info("Validated %s while TensorFlow was imported: %s", data_dir, report_path)
    elif reused:
        get_run_logger().info("Reusing %s: the files, options and code are unchanged", report_path)
    return summary


def _publish_artifacts(report_path: Path) -> None:
    report = atomic.read_json(report_path)
    val = report.get("val_classes") or {}
    create_table_artifact(
        key="dataset-classes",
        table=[{"class": n, "images": c, "validation images": val.get(n, 0)} for n, c in report["classes"].items()],
        description=f"Usable images per class in {report['data_dir']}",
    )
    create_markdown_artifact(
        key="dataset-validation",
        markdown=report_markdown(report, max_problems=100),
        description="Dataset validation: problems found before training",
    )


@flow(name="validate-dataset", log_prints=True)
def validate_flow(
    data_dir: Path,
    val_dir: Path | None = None,
    workdir: Path = DEFAULT_WORKDIR,
    options: ValidationOptions | None = None,
    report: Path | None = None,
) -> dict[str, Any]:
    """Validate DATA_DIR (and VAL_DIR): report to ``report`` or ``<workdir>/validation.json``.

    The Markdown summary goes beside the report (:func:`imgflow.tasks.paths.summary_path`).
    Outputs never touch inputs (:mod:`imgflow.tasks.paths`); a work folder inside
    DATA_DIR is skipped by the scan, with a ``workdir_skipped`` warning.

    Returns the summary record (report path, usable, class counts, error and warning counts).

    Raises:
        imgflow.tasks.paths.PathConflict: VAL_DIR is (or overlaps) DATA_DIR, or the
            report or the work folder would be written onto or inside an input.
    """
    data_dir, val_dir = Path(data_dir), Path(val_dir) if val_dir else None
    inputs = {"DATA_DIR": data_dir, "VAL_DIR": val_dir}
    report_path = Path(report) if report else Path(workdir) / REPORT_NAME
    paths.check_run(inputs, workdir, validation_outputs(report_path))
    skip = paths.workdirs_to_skip(workdir, inputs)
    if skip:
        get_run_logger().warning("The work folder %s lies inside the data; it is never scanned as data", workdir)
    summary = validate_task(data_dir, val_dir, options or ValidationOptions(), report_path, exclude=skip)
    _publish_artifacts(report_path)
    if not summary["usable"]:
        from imgflow.flows import events

        events.dataset_unusable(workdir, data_dir, atomic.read_json(report_path),
                                f"{summary.get('errors')} errors; see {report_path}")
    return summary
