"""One writer per workdir: an advisory ``flock`` on ``<workdir>/.imgflow.lock``.

Training (with its promotion) and prediction take the lock for the whole run, in the
flow, so a flow started from a Prefect deployment is covered as well as the CLI. The lock
file holds a JSON record of its holder (``pid``, ``command``, ``host``, ``since``) so a
second writer can say who it is waiting for. ``flock`` is released by the kernel when
the holder dies, even by ``SIGKILL``: a lock left by a dead process is broken by the next
writer, which reports the stale record it replaced.

The lock is re-entrant within one process (a flow that calls another flow on the same
workdir does not wait for itself).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from imgflow.tasks.errors import LockHeld, UsageError

LOCK_FILE = ".imgflow.lock"

_held: dict[str, int] = {}
_held_guard = threading.Lock()


def lock_path(workdir: Path | str) -> Path:
    """The lock file of a workdir."""
    return Path(workdir) / LOCK_FILE


def read_holder(workdir: Path | str) -> dict[str, Any] | None:
    """The holder record in a workdir's lock file, or None (no file, empty, or half written)."""
    try:
        text = lock_path(workdir).read_text(encoding="utf-8")
        record = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_holder(record: dict[str, Any] | None) -> str:
    """``pid 123 (imgflow train data) on host since 2026-01-01T00:00:00+00:00``; for messages."""
    if not record:
        return "another process (it has not written its record yet)"
    text = (f"pid {record.get('pid', '?')} ({record.get('command', '?')}) on {record.get('host', '?')} "
            f"since {record.get('since', '?')}")
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) and not process_alive(record["pid"]):
        text += " (that process is gone; its lock is released as soon as the kernel closes its file)"
    return text


def process_alive(pid: int) -> bool:
    """True when a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open_lock_file(workdir: Path) -> int:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        return os.open(lock_path(workdir), os.O_RDWR | os.O_CREAT, 0o644)
    except (FileExistsError, NotADirectoryError) as exc:
        raise UsageError(f"--workdir {workdir} is a file, not a folder: give a folder (it is created when missing)") from exc
    except PermissionError as exc:
        raise UsageError(f"--workdir {workdir} is not writable: cannot create {lock_path(workdir)}") from exc


def _write_record(fd: int, record: dict[str, Any]) -> None:
    # the lock is on this inode: the record is rewritten in place, never renamed over it;
    # readers tolerate a half-written record (they report "not written yet")
    data = (json.dumps(record) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextlib.contextmanager
def workdir_lock(
    workdir: Path | str,
    command: str,
    wait: bool = True,
    log: Callable[[str], None] = print,
) -> Iterator[dict[str, Any]]:
    """Hold the writer lock of ``workdir`` for the ``with`` block.

    Args:
        workdir: the imgflow work folder (created when missing).
        command: what this writer does, for the holder record (``imgflow train data``).
        wait: wait for the current holder (one message saying who it is); when False,
            raise :class:`~imgflow.tasks.errors.LockHeld` at once.
        log: where the waiting and stale-lock messages go.

    Yields:
        The holder record written (``pid``, ``command``, ``host``, ``since``).

    Raises:
        LockHeld: ``wait`` is False and another process holds the lock (exit 2).
        UsageError: the workdir is a file or not writable.
    """
    workdir = Path(workdir)
    key = str(workdir.resolve())
    with _held_guard:
        if _held.get(key):
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield read_holder(workdir) or {}
        finally:
            with _held_guard:
                _held[key] -= 1
        return

    fd = _open_lock_file(workdir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = describe_holder(read_holder(workdir))
            if not wait:
                raise LockHeld(
                    f"--workdir {workdir} is in use by another imgflow writer: {holder}; wait for it to finish "
                    "(run again without --no-wait to wait), or use another --workdir"
                ) from None
            log(f"waiting for the lock on {workdir}: held by {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        stale = read_holder(workdir)
        if stale and stale.get("pid") != os.getpid():
            # we hold the flock, so whoever wrote this record has died without releasing it
            log(f"broke a stale lock on {workdir} left by {describe_holder(stale)}, which is no longer running")
        record = {
            "pid": os.getpid(),
            "command": command,
            "host": socket.gethostname(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_record(fd, record)
        with _held_guard:
            _held[key] = 1
        try:
            yield record
        finally:
            with _held_guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
