"""Validate the data in a child process while the command imports TensorFlow.

``imgflow train`` (and a cold ``imgflow preprocess``) spend about 5 s on one core
importing TensorFlow and Keras before their first flow, and that flow starts by
validating the data, which needs neither. :func:`start` hands the validation to a child
process at once, so it decodes on the other cores during the imports: the child takes
the workdir's lock (without waiting), writes ``<workdir>/validation.json`` and its
Markdown summary exactly as the validate task would (:func:`imgflow.tasks.validation_reuse.validate_or_reuse`),
and exits. :meth:`Child.finish` waits for it before the first flow. The flow then finds the
report valid for these files and its validation step reuses it, saying so; its
artifacts and events are the same as ever.

It is only a head start. A child that finds the lock taken, the report already valid,
more than :data:`MAX_ENTRIES` files and folders or :data:`MAX_BYTES` of them (it would
still be decoding long after the imports, without the terminal's progress bar), or fails
in any way writes no report, and the flow validates as before and reports any error
itself. A command that fails before the flow stops its child (:func:`head_start`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_ENTRIES = 4000
MAX_BYTES = 200 * 2**20  # ~4,000 photos of 50 KiB; 12-megapixel camera files would take minutes
WROTE, NOTHING_TO_DO = 0, 3  # the child's exit codes; anything else is a failure
DISABLE_ENV = "IMGFLOW_VALIDATE_AHEAD"  # "0": validate in the flow only

log = logging.getLogger("imgflow.validate_ahead")


class Child:
    """A running child validation and the report it writes."""

    def __init__(self, process: subprocess.Popen[bytes], report_path: Path):
        self.process = process
        self.report_path = report_path

    def finish(self) -> bool:
        """Wait for the child; True (and the report noted for the flow) when it wrote the report."""
        from imgflow.tasks.validation_reuse import note_validated_ahead

        _, err = self.process.communicate()
        code = self.process.returncode
        if code == WROTE:
            note_validated_ahead(self.report_path)
        elif code != NOTHING_TO_DO:
            log.info("validation beside the imports ended with exit %s (%s); the flow validates", code,
                     _error_line(err.decode("utf-8", "replace")))
        return code == WROTE

    def stop(self) -> None:
        """Interrupt the child (it releases the lock and removes its temporary files), then reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


def _error_line(stderr: str) -> str:
    """The exception line of a traceback (the last ``Name: message`` line), else the last line."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Held|Conflict)\b", line)]
    return (errors or lines or ["no message"])[-1]


@contextlib.contextmanager
def head_start(data_dir: Path, val_dir: Path | None, workdir: Path, options: Any) -> Iterator[Child | None]:
    """:func:`start` the child for the ``with`` block, which calls :meth:`Child.finish` once the imports are done.

    An exception in the block (a failed import, Ctrl-C) stops the child, so no
    orphan keeps decoding and holding the workdir's lock.
    """
    child = start(data_dir, val_dir, workdir, options)
    try:
        yield child
    except BaseException:
        if child is not None:
            child.stop()
        raise


def start(data_dir: Path, val_dir: Path | None, workdir: Path, options: Any) -> Child | None:
    """Start validating ``data_dir`` (and ``val_dir``) into ``<workdir>/validation.json`` in a child process.

    ``options`` is the command's :class:`imgflow.tasks.options.ValidationOptions`. None
    when ``IMGFLOW_VALIDATE_AHEAD=0``.
    """
    if os.environ.get(DISABLE_ENV) == "0":
        return None
    from imgflow.tasks.validation_reuse import report_path_for

    request = {"data_dir": str(data_dir), "val_dir": str(val_dir) if val_dir else None, "workdir": str(workdir),
               "options": options.model_dump(mode="json")}
    from imgflow.tasks import child

    process = subprocess.Popen(child.module_command("imgflow.flows.validate_ahead", json.dumps(request)),
                               env=child.environment(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    return Child(process, report_path_for(workdir))


def validate(data_dir: Path, val_dir: Path | None, workdir: Path, options: Any, max_entries: int = MAX_ENTRIES,
             max_bytes: int = MAX_BYTES) -> int:
    """The child's work: :data:`WROTE` the report, or :data:`NOTHING_TO_DO`; raises on failure."""
    from imgflow.tasks import paths, scan
    from imgflow.tasks.errors import LockHeld
    from imgflow.tasks.locks import workdir_lock
    from imgflow.tasks.validation_reuse import report_path_for, validate_or_reuse, validation_outputs

    inputs = {"DATA_DIR": data_dir, "VAL_DIR": val_dir}
    report_path = report_path_for(workdir)
    paths.check_run(inputs, workdir, validation_outputs(report_path))
    roots = [data_dir] + ([val_dir] if val_dir else [])
    try:
        with workdir_lock(workdir, "imgflow (validating beside the imports)", wait=False, log=lambda _: None):
            exclude = paths.workdirs_to_skip(workdir, inputs)  # the lock made the workdir: skip it when inside
            if _more_than(roots, scan.file_ids(exclude), max_entries, max_bytes):
                return NOTHING_TO_DO
            _, reused = validate_or_reuse(data_dir, val_dir, options, report_path, exclude)
    except LockHeld:
        return NOTHING_TO_DO
    return NOTHING_TO_DO if reused else WROTE


def _more_than(roots: list[Path], exclude: frozenset[tuple[int, int]], entries: int, size: int) -> bool:
    """Whether the walk of ``roots`` finds more than ``entries`` entries or ``size`` bytes (it stops there)."""
    from imgflow.tasks import scan

    seen = total = 0
    for root in roots:
        for entry in scan.walk(root, stat=True, exclude=exclude):
            seen += 1
            total += entry.size or 0
            if seen > entries or total > size:
                return True
    return False


def main(argv: list[str]) -> int:
    from imgflow.tasks.options import ValidationOptions

    request = json.loads(argv[0])
    return validate(Path(request["data_dir"]), Path(request["val_dir"]) if request["val_dir"] else None,
                    Path(request["workdir"]), ValidationOptions(**request["options"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
