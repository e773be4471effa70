"""Path rules: outputs never touch inputs.

imgflow reads DATA_DIR, VAL_DIR and INPUT_DIR and never writes onto or inside them:
no ``--report``, ``--out``, work folder or file in it may land there (a report written
over ``data/ones/x.jpg`` would replace an image with JSON). The rules, in one place
for the CLI and the flows:

* an output (``--report``, ``--out``, the Markdown summary ...) may not be an input
  folder or lie inside one (after resolving symlinks, so a link cannot sneak it in);
* the work folder may not *be* an input folder;
* the one exception: a work folder *inside* an input folder (``imgflow train .`` with
  the default ``./imgflow-work``) is allowed, and so is every output inside it; the
  walkers skip it (:func:`workdirs_to_skip`), so it is never scanned as data;
* VAL_DIR may not be DATA_DIR, nor lie inside it or hold it (its folders would be
  read as classes of the other).

A violation raises :class:`PathConflict` (a usage error: exit 2) whose message is one
line naming both paths and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from imgflow.tasks.errors import UsageError

Inputs = Mapping[str, "Path | str | None"]


class PathConflict(UsageError, ValueError):
    """An output would be written onto or inside an input folder, or two inputs overlap (exit 2)."""


def _real(path: Path | str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def is_within(path: Path | str, folder: Path | str) -> bool:
    """True when ``path`` is ``folder`` or lies inside it, after resolving symlinks (``path`` need not exist)."""
    inner, outer = _real(path), _real(folder)
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _present(inputs: Inputs) -> list[tuple[str, Path | str]]:
    return [(name, path) for name, path in inputs.items() if path is not None]


def check_output_outside_inputs(
    output: Path | str, inputs: Inputs, what: str, workdir: Path | str | None = None
) -> None:
    """Raise unless ``output`` lies outside every input folder (or inside a work folder that lies in one).

    Args:
        output: a file or folder imgflow is about to write.
        inputs: ``{"DATA_DIR": path, "VAL_DIR": path or None, ...}``.
        what: how the user names the output (``--report``, ``--out``), for the message.
        workdir: the work folder; an output inside it is allowed even when the work
            folder itself lies inside an input (it is never scanned as data).

    Raises:
        PathConflict: ``output`` is an input folder or inside one.
    """
    for name, folder in _present(inputs):
        if not is_within(output, folder):
            continue
        if workdir is not None and is_within(output, workdir) and not is_within(folder, workdir):
            continue  # inside a work folder that lies in the input: skipped by every scan
        where = "is" if _real(output) == _real(folder) else "is inside"
        raise PathConflict(
            f"{what} {output} {where} {name} {folder}: imgflow never writes into its inputs; "
            f"choose a path outside {folder}"
        )


def check_workdir(workdir: Path | str, inputs: Inputs) -> None:
    """Raise when the work folder is one of the input folders (inside one is allowed, and skipped).

    Raises:
        PathConflict: ``workdir`` resolves to an input folder.
    """
    for name, folder in _present(inputs):
        if _real(workdir) == _real(folder):
            raise PathConflict(
                f"--workdir {workdir} is {name} {folder}: imgflow never writes into its inputs; "
                f"choose another --workdir (the default ./imgflow-work is fine)"
            )


def check_val_dir(data_dir: Path | str, val_dir: Path | str | None) -> None:
    """Raise when VAL_DIR is DATA_DIR, or one lies inside the other.

    Raises:
        PathConflict: the two folders overlap.
    """
    if val_dir is None:
        return
    if _real(val_dir) == _real(data_dir):
        raise PathConflict(
            f"--val-dir {val_dir} is DATA_DIR {data_dir} itself: validating on the training images "
            "measures nothing; give a separate folder, or leave --val-dir out to hold out a split"
        )
    if is_within(val_dir, data_dir) or is_within(data_dir, val_dir):
        inner, outer = (("VAL_DIR", val_dir), ("DATA_DIR", data_dir)) if is_within(val_dir, data_dir) else (
            ("DATA_DIR", data_dir), ("VAL_DIR", val_dir))
        raise PathConflict(
            f"{inner[0]} {inner[1]} is inside {outer[0]} {outer[1]}: its folders would be read as classes "
            f"of {outer[0]}; move it out"
        )


def workdirs_to_skip(workdir: Path | str | None, inputs: Inputs) -> list[Path]:
    """The work folder when it lies strictly inside an input folder (the walkers skip it), else ``[]``."""
    if workdir is None:
        return []
    inside = any(is_within(workdir, folder) and _real(workdir) != _real(folder) for _, folder in _present(inputs))
    return [Path(workdir)] if inside else []


def check_run(
    inputs: Inputs, workdir: Path | str | None = None, outputs: Mapping[str, Path | str | None] | None = None
) -> None:
    """All the rules for one command: distinct inputs, the work folder, every named output.

    Args:
        inputs: ``{"DATA_DIR": ..., "VAL_DIR": ... or None}`` or ``{"INPUT_DIR": ...}``.
        workdir: the work folder, when the command has one.
        outputs: ``{"--report": path or None, "--out": path or None, ...}``; ``None`` values are skipped.

    Raises:
        PathConflict: the first rule broken, in one line naming both paths.
    """
    if "DATA_DIR" in inputs and inputs.get("VAL_DIR") is not None:
        check_val_dir(inputs["DATA_DIR"], inputs["VAL_DIR"])  # type: ignore[arg-type]
    if workdir is not None:
        check_workdir(workdir, inputs)
    for what, output in (outputs or {}).items():
        if output is not None:
            check_output_outside_inputs(output, inputs, what, workdir)


def summary_path(report_path: Path | str) -> Path:
    """Where the Markdown summary of a JSON report goes: never the report itself.

    ``x.json`` -> ``x.md``; a report that already ends in ``.md`` (``x.md``) -> ``x.summary.md``.
    """
    report_path = Path(report_path)
    summary = report_path.with_suffix(".md")
    return summary if summary != report_path else report_path.with_name(report_path.stem + ".summary.md")
