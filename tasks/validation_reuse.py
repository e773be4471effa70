"""Reusing a validation report: is the report on disk the one these files would give?

Kept free of Prefect (and of TensorFlow) so the ``imgflow validate`` command can answer
from an unchanged report in a fraction of a second, without starting any server, and
so a child process can validate beside a command's TensorFlow import
(:mod:`imgflow.flows.validate_ahead`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgflow.tasks import atomic, paths, scan

REPORT_NAME = "validation.json"

# reports this process's command had written by a child beside its imports: the flow
# still runs its validation step (artifacts, events), which reuses them
_validated_ahead: set[str] = set()


def summarize(report: dict[str, Any], report_path: Path) -> dict[str, Any]:
    """The small record a flow passes on: where the report is and its headline numbers."""
    return {
        "report_path": str(report_path),
        "usable": report["usable"],
        "classes": report["classes"],
        "errors": report["stats"]["errors"],
        "warnings": report["stats"]["warnings"],
    }


def report_path_for(workdir: Path | str, report: Path | str | None = None) -> Path:
    """``report`` when given, else ``<workdir>/validation.json``."""
    return Path(report) if report else Path(workdir) / REPORT_NAME


def read_report(path: Path) -> dict[str, Any] | None:
    """The JSON report at ``path``, or None when it is missing or unreadable."""
    try:
        return atomic.read_json(path)
    except (OSError, ValueError):
        return None


def fingerprint(data_dir: Path, val_dir: Path | None, options: Any, exclude: list[Path]) -> str:
    """The digest a report of these files, options and code records (``tree_fingerprint``)."""
    from imgflow.tasks.dataset import tree_fingerprint

    roots = [Path(data_dir)] + ([Path(val_dir)] if val_dir else [])
    return tree_fingerprint(roots, options, scan.file_ids(exclude)).digest


def validation_outputs(report_path: Path) -> dict[str, Path]:
    """What a validation writes, by the names a path conflict is reported with (:func:`imgflow.tasks.paths.check_run`)."""
    return {"--report": report_path, "the Markdown summary": paths.summary_path(report_path)}


def _still_valid(report_path: Path, data_dir: Path, val_dir: Path | None, options: Any,
                 exclude: list[Path]) -> dict[str, Any] | None:
    """The report at ``report_path`` when its fingerprint is the one of these files, options and code now."""
    previous = read_report(report_path)
    if previous is None or "fingerprint" not in previous:
        return None
    return previous if previous["fingerprint"] == fingerprint(data_dir, val_dir, options, exclude) else None


def reusable_summary(
    data_dir: Path, val_dir: Path | None, workdir: Path, options: Any, report: Path | None = None
) -> dict[str, Any] | None:
    """The summary of the report on disk when it is still valid for these files, else None.

    Valid means its recorded fingerprint equals the one of the files now (paths, sizes,
    modification times), the options and the validation code: nothing would change by
    decoding again. Walks the tree and stats each file; decodes nothing.
    """
    report_path = report_path_for(workdir, report)
    exclude = paths.workdirs_to_skip(workdir, {"DATA_DIR": data_dir, "VAL_DIR": val_dir})
    previous = _still_valid(report_path, data_dir, val_dir, options, exclude)
    return None if previous is None else summarize(previous, report_path)


def validate_or_reuse(
    data_dir: Path, val_dir: Path | None, options: Any, report_path: Path, exclude: list[Path]
) -> tuple[dict[str, Any], bool]:
    """Write the report of these files to ``report_path`` unless the one there is still valid.

    Returns:
        ``(summary, reused)``: the report's summary, and whether the report on disk
        (same paths, sizes, modification times, options and code) was kept.
    """
    previous = _still_valid(report_path, data_dir, val_dir, options, exclude)
    if previous is not None:
        return summarize(previous, report_path), True
    from imgflow.tasks.dataset import report_markdown, validate_dataset

    report = validate_dataset(data_dir, val_dir, options, exclude=exclude)
    atomic.write_json(report_path, report)
    atomic.write_text(paths.summary_path(report_path), report_markdown(report))
    return summarize(report, report_path), False


def note_validated_ahead(report_path: Path | str) -> None:
    """Record that this command's child wrote ``report_path`` (:mod:`imgflow.flows.validate_ahead`)."""
    _validated_ahead.add(str(Path(report_path).absolute()))


def validated_ahead(report_path: Path | str, forget: bool = False) -> bool:
    """Whether ``report_path`` was written beside this command's imports (see :func:`note_validated_ahead`).

    ``forget``: the validation step that reuses it clears the mark, so a later run in the
    same process (a test session, a long-lived caller) reuses the report as usual.
    """
    key = str(Path(report_path).absolute())
    found = key in _validated_ahead
    if forget:
        _validated_ahead.discard(key)
    return found
