"""What a CLI run shows in the terminal, and the log file behind it.

For a command run from the terminal: Prefect's per-task INFO lines (state changes,
task logs) still go to the Prefect run log (API, UI) and to ``<workdir>/logs/imgflow.log``,
but not to the terminal, which shows imgflow's own progress (:mod:`imgflow.tasks.progress`),
warnings and errors. A Prefect line at WARNING or above, and a task retry (logged by
Prefect at INFO), still reach the terminal. ``--verbose`` (``IMGFLOW_VERBOSE=1``) shows
everything. Nothing heavy is imported here: Prefect's logging only when configuring.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imgflow.tasks.progress import format_duration

LOG_DIR = "logs"
LOG_FILE = "imgflow.log"
VERBOSE_ENV = "IMGFLOW_VERBOSE"
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def verbose() -> bool:
    """True when ``--verbose`` (or ``IMGFLOW_VERBOSE``) asks for every log line."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class TerminalFilter(logging.Filter):
    """Let through to the terminal: warnings and errors, and Prefect's task-retry line.

    TensorFlow's tf.function retracing notice is a WARNING about its own tracing cache
    (the model sees a smaller last batch): nothing a user can act on, kept in the log file.
    """

    def __init__(self, quiet: bool = True):
        super().__init__()
        self.quiet = quiet

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "imgflow" or record.name.startswith("imgflow."):
            return False  # imgflow's own lines are shown once, by its own handler (configure)
        if not self.quiet:
            return True
        if record.name == "tensorflow" and "triggered tf.function retracing" in str(record.msg):
            return False
        if record.levelno >= logging.WARNING:
            return True
        return "will start" in str(record.msg) and "Retry" in str(record.msg)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a test runner swaps it per command)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


class ImgflowFilter(logging.Filter):
    """imgflow's own terminal lines: progress and epoch lines, and warnings of any module."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.startswith("imgflow.progress") or verbose()


def _prefect_console_handlers() -> list[logging.Handler]:
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    if not PROCESS_LOGGING_CONFIG:  # prefect configures logging when prefect.main is imported
        setup_logging()
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in ("uvicorn", "fastapi")]
    return [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]


def log_file_for(workdir: Path | str) -> Path:
    """``<workdir>/logs/imgflow.log``, absolute."""
    return (Path(workdir) / LOG_DIR / LOG_FILE).absolute()


def configure(workdir: Path | str | None, prefect: bool = True) -> Path | None:
    """Set up the terminal and the log file for one CLI command.

    Args:
        workdir: the command's work folder; its ``logs/imgflow.log`` receives every
            Prefect and imgflow line at INFO and above (None: no log file).
        prefect: also filter Prefect's console handlers (this imports Prefect, which reads
            its settings: False for a command that runs no flow, or before the early server).

    Returns:
        The log file's path, or None when there is none (no workdir, or it cannot be written).
    """
    quiet = not verbose()
    for handler in _prefect_console_handlers() if prefect else []:
        for old in [f for f in handler.filters if isinstance(f, TerminalFilter)]:
            handler.removeFilter(old)
        handler.addFilter(TerminalFilter(quiet))
    own = logging.getLogger("imgflow")
    own.setLevel(logging.INFO)
    for old in [h for h in own.handlers if getattr(h, "_imgflow", False)]:  # an earlier command in this process
        own.removeHandler(old)
        old.close()
    for old in [h for h in logging.getLogger("prefect").handlers if getattr(h, "_imgflow", False)]:
        logging.getLogger("prefect").removeHandler(old)
        old.close()
    terminal = _StderrHandler()
    terminal.setFormatter(logging.Formatter("%(message)s"))
    terminal.addFilter(ImgflowFilter())
    terminal._imgflow = True  # type: ignore[attr-defined]
    own.addHandler(terminal)
    if workdir is None:
        return None
    path = log_file_for(workdir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")  # appended: one log across runs
    except OSError:  # a read-only workdir must not stop the command; the run log still has it all
        return None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handler._imgflow = True  # type: ignore[attr-defined]
    for name in ("prefect", "imgflow"):
        logging.getLogger(name).addHandler(handler)
    return path


class Summary:
    """The closing block of a command: what was done, where the outputs are, how long it took.

    The command adds lines and paths as it learns them; :meth:`render` puts the time last
    but one, so the command's verdict (or failure) can be the last line.
    """

    def __init__(self, command: str):
        self.command = command
        self.started = time.monotonic()
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        """A line saying what was done."""
        self.lines.append(line)

    def path(self, label: str, path: Path | str | None) -> None:
        """A line naming an output, with its absolute path (nothing when ``path`` is None)."""
        if path:
            self.lines.append(f"{label + ':':<13} {Path(path).absolute()}")

    def elapsed(self) -> str:
        """The time since the command started, as ``42s`` / ``3m05s``."""
        return format_duration(time.monotonic() - self.started)

    def render(self) -> list[str]:
        """The summary lines, ending with the time taken."""
        return ["", *self.lines, f"{self.command} took {self.elapsed()}"]


def read_metadata(model_dir: Path | str | None) -> dict[str, Any]:
    """A model directory's ``metadata.json``, or ``{}`` when there is none or it is unreadable."""
    if not model_dir:
        return {}
    try:
        import json

        return json.loads((Path(model_dir) / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def epoch_lines(metadata: dict[str, Any]) -> list[str]:
    """The kept epoch and why training stopped, from model metadata (read defensively).

    Reads ``best_epoch``, ``best_value``, ``epochs_run``, ``stopped_early`` (a bool, or
    ``{"stopped", "reason"}``), ``stop_reason`` and ``monitor``; missing keys are left out of the words.
    """
    best = metadata.get("best_epoch")
    run = metadata.get("epochs_run")
    planned = (metadata.get("config") or {}).get("epochs") if isinstance(metadata.get("config"), dict) else None
    monitor = metadata.get("monitor") or "val_loss"
    stopped = metadata.get("stopped_early")
    reason = metadata.get("stop_reason")
    if isinstance(stopped, dict):
        reason = reason or stopped.get("reason")
        stopped = stopped.get("stopped", stopped.get("value"))
    value = metadata.get("best_value")
    lines = []
    if best is not None:
        kept = f"Kept epoch {best}"
        if run is not None:
            kept += f" of {run} run"
        shown = f" {value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""
        lines.append(f"{kept} (best {monitor}{shown}).")
    if stopped:
        lines.append(f"Training stopped early: {reason or f'{monitor} stopped improving'}.")
    elif run is not None:
        ran_all = not reason or reason.startswith("ran all")
        lines.append(f"Training ran all {planned or run} epochs." if ran_all else f"Training stopped: {reason}.")
    return lines


def train_summary(run: Summary, result: dict[str, Any]) -> None:
    """Add the training pipeline's outcome to the summary: accuracy, kept epoch, fine-tuning, outputs, findings."""
    metadata = read_metadata(result.get("model_dir"))
    if result.get("val_accuracy") is not None:
        run.add(f"Validation accuracy: {result['val_accuracy']:.4f}")
    lines = epoch_lines(metadata)
    for line in lines:
        run.add(line)
    tune = metadata.get("fine_tune")
    if isinstance(tune, dict) and tune.get("frozen_epochs") is not None:
        line = f"Fine-tuning {tune.get('backbone', 'the backbone')}: {tune['frozen_epochs']} epoch(s) with it frozen"
        if tune.get("unfrozen_layers"):
            line += f", then its top {tune['unfrozen_layers']} layers at learning rate {tune['learning_rate']:.2g}"
        run.add(line + ".")
    if result.get("outcome") and not lines:  # the same facts, for metadata without the figures
        run.add(f"Training: {result['outcome']}")
    run.path("Model", result.get("model_dir"))
    report = (metadata.get("evaluation") or {}).get("report_html")
    run.path("Report", report)
    if result.get("findings"):
        run.add("Doctor's findings:")
        for finding in result["findings"][:5]:
            run.add(f"  [{finding['severity']}] {finding['code']}: {finding['advice']}")


def echo_all(lines: Iterable[str]) -> None:
    """Print lines on stdout, flushed (the summary comes after progress on stderr)."""
    sys.stderr.flush()
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
