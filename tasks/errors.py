"""One error hierarchy: what the user can act on, and which exit code it gets.

``ImgflowError`` is the root of every *expected* failure; nothing else is caught by the
command line, so an unexpected exception still shows its traceback (a bug to report).

- :class:`UsageError` (exit 2): a bad option, an unreadable or invalid input, an output
  path that cannot be written. Running again unchanged fails the same way.
- :class:`CheckFailed` (exit 1): the pipeline ran and a check failed (unusable data,
  a disk that filled up while training, a rejected model).

Retries skip every ``ImgflowError`` (a logic error fails the same way every time).
The existing classes keep their ``ValueError``/``RuntimeError`` bases so callers that
catch those still work.
"""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_OK, EXIT_FAILED_CHECK, EXIT_USAGE = 0, 1, 2

#: ``OSError`` numbers that mean "the disk (or the file size limit) is full"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})


class ImgflowError(Exception):
    """An expected failure with a message that names the file or option and the fix."""

    exit_code = EXIT_FAILED_CHECK


class UsageError(ImgflowError):
    """Bad option, unreadable or invalid input, or an output path problem (exit 2)."""

    exit_code = EXIT_USAGE


class CheckFailed(ImgflowError):
    """The pipeline ran and failed a check (exit 1)."""

    exit_code = EXIT_FAILED_CHECK


class OptionError(UsageError, ValueError):
    """An option value that cannot work (out of range, wrong kind)."""


class DiskFullError(CheckFailed, OSError):
    """A write failed because the disk, a quota or the file size limit is full."""


class LockHeld(UsageError):
    """Another writer holds the workdir lock and the caller asked not to wait."""


def is_disk_full(exc: BaseException) -> bool:
    """True for an ``OSError`` (or an h5py error wrapping one) that says the disk is full."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and ("file too large" in text or "no space left" in text or "disk quota" in text)


def disk_full(exc: BaseException, path: Path | str, needed_bytes: int | None = None) -> DiskFullError:
    """A :class:`DiskFullError` naming ``path`` and the space needed, from the ``OSError``."""
    where = getattr(exc, "filename", None) or path
    need = f"; it needs about {format_bytes(needed_bytes)} free" if needed_bytes else ""
    error = DiskFullError(
        f"the disk is full writing {where}{need}: free space on that disk (or choose another --workdir) and run "
        "the same command again, it resumes from the last complete backup"
    )
    error.errno = getattr(exc, "errno", None) or errno.ENOSPC
    return error


def format_bytes(count: int) -> str:
    """``1536`` -> ``1.5 KiB``; for messages."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def describe_os_error(exc: OSError, what: str = "") -> str:
    """One line for an ``OSError`` a user can act on: the path, what went wrong, the fix."""
    path = exc.filename or "a file"
    label = f"{what} {path}".strip()
    if isinstance(exc, IsADirectoryError):
        return f"{label} is a directory: give a file name (for example {Path(str(path)) / 'out'}.csv)"
    if isinstance(exc, NotADirectoryError):
        return f"{label}: a part of this path is a file, not a folder: choose another path"
    if isinstance(exc, PermissionError):
        return f"{label} is not writable (permission denied): choose a writable path or fix its permissions"
    if isinstance(exc, FileNotFoundError):
        return f"{label} does not exist: check the path"
    if isinstance(exc, FileExistsError):
        return f"{label} already exists and is in the way: move it or choose another path"
    if exc.errno in DISK_FULL_ERRNOS:
        return f"the disk is full writing {path}: free space on that disk or choose another path"
    if exc.errno == errno.EROFS:
        return f"{label} is on a read-only file system: choose a writable path"
    return f"{label}: {exc.strerror or exc}"
