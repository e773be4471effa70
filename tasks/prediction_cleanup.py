"""Housekeeping of prediction run folders: stale part files, killed runs' temporaries, superseded runs.

A run folder ``<workdir>/predictions/runs/<id>`` holds one part file (and drift
profile) per file group and a ``run.json``; these functions remove what a later run
can never use again, so a growing inbox does not grow the workdir without end.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from imgflow.tasks.atomic import read_json
from imgflow.tasks.drift import profile_path


def remove_stale_parts(run_dir: Path | str, keep: Iterable[str]) -> int:
    """Delete part files of chunks that are no longer in the scan; return how many."""
    from imgflow.tasks.prediction import PART_PREFIX, part_path

    keep_names = {part_path(Path(run_dir), key).name for key in keep}
    removed = 0
    for path in Path(run_dir).glob(f"{PART_PREFIX}*.csv"):
        if path.name not in keep_names:
            path.unlink(missing_ok=True)
            profile_path(path).unlink(missing_ok=True)
            removed += 1
    return removed


def remove_stale_temporaries(run_dir: Path | str, older_than_s: float = 3600.0) -> int:
    """Delete ``.tmp-`` files a killed run left in ``run_dir`` (older than ``older_than_s``)."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in Path(run_dir).glob(".tmp-*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:  # already gone (another run cleaned it)
            continue
    return removed


def remove_superseded_runs(run_dir: Path | str) -> list[str]:
    """Delete other run folders of the same INPUT_DIR and output made with another model.

    Run folders sit side by side under ``<workdir>/predictions/runs``, each with a
    ``run.json`` naming its ``input_dir``, ``out`` and ``model``. Once ``run_dir`` has
    assembled the CSV, a folder for the same input and output but another model (an
    older champion) can never be resumed into that CSV again: its parts are dead weight.

    Returns:
        The names of the folders removed.
    """
    import shutil

    run_dir = Path(run_dir)
    try:
        mine = read_json(run_dir / "run.json")
    except (OSError, ValueError):
        return []
    removed: list[str] = []
    for other in sorted(run_dir.parent.iterdir()):
        if other == run_dir or not other.is_dir():
            continue
        try:
            theirs = read_json(other / "run.json")
        except (OSError, ValueError):
            continue
        same_target = theirs.get("input_dir") == mine.get("input_dir") and theirs.get("out") == mine.get("out")
        if same_target and theirs.get("model") != mine.get("model"):
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other.name)
    return removed
