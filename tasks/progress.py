"""Progress on long work: rich bars in an interactive terminal, periodic log lines elsewhere.

The one place imgflow reports progress. A flow (or a command) opens a named tracker
with :func:`track`; the pure tasks it runs, possibly on several threads, report their
counts with :func:`advance` by the same name. Nothing happens when no tracker of that
name is open (a task called from a notebook or a test), so tasks stay pure and testable.

* Interactive terminal (stderr is a TTY): one shared ``rich`` progress display with a
  bar per open tracker: done / total, rate, elapsed and ETA. Lines said with
  :func:`say` (the per-epoch lines of training) print above the bars.
* Not a terminal (CI, cron, a Prefect worker, output piped): no bars. A tracker logs
  ``<name>: done/total files (rate/s, ETA ...)`` on the ``imgflow.progress`` logger at
  most every :data:`LOG_INTERVAL` seconds (``IMGFLOW_PROGRESS_INTERVAL`` overrides), and
  one closing line when the work took longer than that; :func:`say` logs its line.

``IMGFLOW_PROGRESS=plain`` forces the log lines on a terminal, ``IMGFLOW_PROGRESS=off``
silences both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

LOGGER = logging.getLogger("imgflow.progress")
LOG_INTERVAL = 30.0
MODE_ENV = "IMGFLOW_PROGRESS"
INTERVAL_ENV = "IMGFLOW_PROGRESS_INTERVAL"

_lock = threading.RLock()
_open: dict[str, "Tracker"] = {}
_display: Any = None  # the shared rich.progress.Progress while a bar is open on a terminal


def mode() -> str:
    """``"bars"`` on an interactive terminal, ``"log"`` elsewhere, ``"off"`` when silenced."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in ("off", "plain", "log"):
        return "off" if forced == "off" else "log"
    stream = sys.stderr
    try:
        return "bars" if stream is not None and stream.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or replaced stream
        return "log"


def log_interval() -> float:
    """Seconds between two progress log lines when not on a terminal."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, LOG_INTERVAL)))
    except ValueError:
        return LOG_INTERVAL


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h04m`` (rounded to whole seconds)."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(name: str, done: int, total: int | None, seconds: float, unit: str = "files") -> str:
    """The plain progress line: ``validate: 120/500 files (40.0/s, ETA 9s)``."""
    rate = done / seconds if seconds > 0 else 0.0
    counted = f"{done}/{total}" if total is not None else f"{done}"
    parts = [f"{rate:.1f}/s"]
    if total is not None and rate > 0 and done < total:
        parts.append(f"ETA {format_duration((total - done) / rate)}")
    elif total is not None and done >= total:
        parts.append(f"in {format_duration(seconds)}")
    return f"{name}: {counted} {unit} ({', '.join(parts)})"


class Tracker:
    """Counts of one named piece of work; thread-safe. Made by :func:`track`."""

    def __init__(self, name: str, total: int | None, unit: str, how: str):
        self.name, self.total, self.unit, self.how = name, total, unit, how
        self.done = 0
        self.started = self.last_log = time.monotonic()
        self.task_id: Any = None

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        with _lock:
            self.done += n
            if self.how == "bars" and _display is not None:
                _display.update(self.task_id, completed=self.done)
            elif self.how == "log":
                now = time.monotonic()
                if now - self.last_log >= log_interval() and (self.total is None or self.done < self.total):
                    self.last_log = now
                    _log(progress_line(self.name, self.done, self.total, now - self.started, self.unit))

    def add_total(self, n: int) -> None:
        """Grow the total by ``n`` (work discovered while it runs, e.g. a streamed scan)."""
        with _lock:
            self.total = (self.total or 0) + n
            if self.how == "bars" and _display is not None:
                _display.update(self.task_id, total=self.total)

    def _close(self) -> None:
        seconds = time.monotonic() - self.started
        if self.how == "log" and seconds >= log_interval() and self.done:
            _log(progress_line(self.name, self.done, self.total, seconds, self.unit))


def _log(line: str) -> None:
    """A plain line on ``imgflow.progress`` when logging shows it (the CLI sets that up), else on stderr."""
    if LOGGER.isEnabledFor(logging.INFO) and LOGGER.hasHandlers():
        LOGGER.info(line)
    else:  # a script or a Prefect run outside the CLI: INFO of this logger would be dropped
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _new_display() -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    class RateColumn(TextColumn):  # items per second, from rich's own speed estimate
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task: Any) -> Any:
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} {task.fields.get('unit', '')}/s" if speed else "", style="progress.data.speed")

    return Progress(
        TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
        TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=Console(file=sys.stderr), refresh_per_second=5,
    )


@contextlib.contextmanager
def track(name: str, total: int | None = None, unit: str = "files") -> Iterator[Tracker]:
    """Open a progress tracker called ``name`` for the duration of the block.

    Args:
        name: what is being done (``validate``, ``shards``, ``evaluate``, ``predict``);
            tasks report to it with ``advance(name, n)``.
        total: items to do, or None when not known yet (grow it with ``add_total``).
        unit: what an item is, for the display.

    Yields:
        The :class:`Tracker` (``advance``, ``add_total``).
    """
    global _display
    how = mode()
    tracker = Tracker(name, total, unit, how)
    with _lock:
        previous = _open.get(name)
        _open[name] = tracker
        if how == "bars":
            if _display is None:
                _display = _new_display()
                _display.start()
            tracker.task_id = _display.add_task(name, total=total, unit=unit)
    try:
        yield tracker
    finally:
        with _lock:
            if previous is not None:
                _open[name] = previous
            else:
                _open.pop(name, None)
            tracker._close()
            if how == "bars" and _display is not None:
                # finished: the total is what was done (an estimate such as a folder's
                # entry count may include files that were never items)
                _display.update(tracker.task_id, completed=tracker.done, total=tracker.done)
                if not _open:  # the last bar: stop the display and leave its final state on screen
                    _display.stop()
                    _display = None


def iterate(
    items: Iterable[T], name: str, total: int | None = None, unit: str = "files",
    weight: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """Yield ``items``, counting each (or ``weight(item)`` units) on a tracker open while they are consumed."""
    with track(name, total, unit) as tracker:
        for item in items:
            yield item
            tracker.advance(weight(item) if weight is not None else 1)


def advance(name: str, n: int = 1) -> None:
    """Count ``n`` items done on the open tracker ``name``; nothing when none is open."""
    tracker = _open.get(name)
    if tracker is not None:
        tracker.advance(n)


def add_total(name: str, n: int) -> None:
    """Grow the total of the open tracker ``name`` by ``n``; nothing when none is open."""
    tracker = _open.get(name)
    if tracker is not None:
        tracker.add_total(n)


def say(line: str) -> None:
    """Show one line to the user: above the bars on a terminal, a log line otherwise."""
    how = mode()
    if how == "off":
        return
    if how == "log":
        _log(line)
        return
    with _lock:
        if _display is not None:
            _display.console.print(line, highlight=False, markup=False, soft_wrap=True)
            return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def epoch_line(epoch: int, epochs: int, logs: dict[str, Any], seconds: float, best: bool) -> str:
    """One line for a finished epoch: ``epoch  3/10  loss 0.5120  accuracy 0.8430  |  val_loss ...  2.1s  * best``.

    Args:
        epoch: the epoch number, counted from 1.
        epochs: the planned number of epochs.
        logs: Keras epoch logs (``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``, ...).
        seconds: the epoch's wall time.
        best: whether this epoch is the best so far on the monitored metric.
    """
    def figures(prefix: str) -> list[str]:
        out = []
        for key in sorted(logs, key=lambda k: (k.removeprefix("val_") != "loss", k)):  # loss first
            is_val = key.startswith("val_")
            if is_val != (prefix == "val_") or key in ("seconds", "learning_rate", "lr"):
                continue
            try:
                value = float(logs[key])
            except (TypeError, ValueError):
                continue
            label = key  # Keras's own metric names, as in history.csv
            out.append(f"{label} {value:.4f}" if math.isfinite(value) else f"{label} {value}")
        return out

    width = len(str(epochs))
    train, val = figures(""), figures("val_")
    text = f"epoch {epoch:>{width}}/{epochs}  " + "  ".join(train)
    if val:
        text += "  |  " + "  ".join(val)
    text += f"  {seconds:.1f}s"
    return text + ("  * best" if best else "")
