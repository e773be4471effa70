"""The inbox watcher: emit ``imgflow.inbox.changed`` when files arrive and settle.

Two ways to run it, the same loop:

* ``imgflow watch INBOX`` in a terminal, tmux pane or systemd unit (:func:`run_watch`);
* the ``inbox-watcher`` deployment of ``deployments/prefect.yaml`` (the
  :func:`watch_inbox` flow, started once; it runs until cancelled).

The ``batch-predict/inbox-predictions-on-change`` trigger in ``deployments/prefect.yaml``
turns each event into a prediction run (debounced there too). Events need a Prefect API
(``PREFECT_API_URL``); without one the watcher refuses to start rather than watch for nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from imgflow.tasks.watch import InboxChange, InboxWatcher, snapshot

DEFAULT_INTERVAL_S = 10.0
DEFAULT_SETTLE_S = 30.0


def run_watch(
    inbox: Path | str,
    interval_s: float = DEFAULT_INTERVAL_S,
    settle_s: float = DEFAULT_SETTLE_S,
    exclude: list[Path | str] | None = None,
    report_existing: bool = False,
    max_polls: int | None = None,
    on_change: Callable[[Path, InboxChange], Any] | None = None,
    log: Callable[[str], Any] = print,
    sleep: Callable[[float], Any] = time.sleep,
) -> int:
    """Poll ``inbox`` every ``interval_s`` seconds; call ``on_change`` for each settled change.

    Args:
        inbox: the folder watched (recursively).
        interval_s: seconds between two polls (a poll only lists and stats files).
        settle_s: seconds the inbox must stay unchanged before a change is reported.
        exclude: folders not watched (the workdir, when it lives inside the inbox).
        report_existing: report the files already there at start as added.
        max_polls: stop after this many polls (None: until interrupted).
        on_change: called with ``(inbox, change)``; default emits ``imgflow.inbox.changed``.
        log: where one line per reported change goes.
        sleep: the sleep function (tests pass a fake clock's).

    Returns:
        How many changes were reported.

    Raises:
        FileNotFoundError: INBOX is not a folder.
        ValueError: ``interval_s`` or ``settle_s`` out of range.
    """
    from imgflow.flows import events

    if interval_s <= 0:
        raise ValueError(f"interval_s: expected seconds > 0, found {interval_s}")
    if settle_s < 0:
        raise ValueError(f"settle_s: expected seconds >= 0, found {settle_s}")
    inbox = Path(inbox)
    emit = on_change or (lambda folder, change: events.inbox_changed(folder, change.payload()))
    watcher = InboxWatcher(settle_s=settle_s, reported={} if report_existing else None)
    polls = reported = 0
    clock = 0.0  # seconds since start, counted from the sleeps: a fake sleep gives a fake clock
    while max_polls is None or polls < max_polls:
        change = watcher.step(snapshot(inbox, exclude or ()), clock)
        polls += 1
        if change:
            reported += 1
            log(f"{inbox}: {len(change.added)} added, {len(change.changed)} changed, "
                f"{len(change.removed)} removed ({change.total} files)")
            emit(inbox, change)
        if max_polls is not None and polls >= max_polls:
            break
        sleep(interval_s)
        clock += interval_s
    return reported


@flow(name="inbox-watcher")
def watch_inbox(
    inbox: Path,
    interval_s: float = DEFAULT_INTERVAL_S,
    settle_s: float = DEFAULT_SETTLE_S,
    workdir: Path | None = None,
    report_existing: bool = False,
    max_polls: int | None = None,
) -> int:
    """Watch INBOX and emit ``imgflow.inbox.changed`` when files settle; runs until cancelled.

    Returns how many changes were reported (when ``max_polls`` ends it).
    """
    logger = get_run_logger()
    logger.info("watching %s every %.0f s (settle %.0f s)", inbox, interval_s, settle_s)
    return run_watch(inbox, interval_s, settle_s, [workdir] if workdir else None, report_existing,
                     max_polls, log=logger.info)
