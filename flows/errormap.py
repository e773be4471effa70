"""The one place an expected failure becomes ``imgflow: <message>`` and an exit code.

Every command of the ``imgflow`` CLI runs inside :func:`map_errors` (through
:class:`ImgflowGroup`), so ``main()`` and ``typer.testing.CliRunner`` behave alike:
a :class:`~imgflow.tasks.errors.UsageError` exits 2, a
:class:`~imgflow.tasks.errors.CheckFailed` exits 1, an ``OSError`` on a path exits 2
(1 for a full disk), anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, Optional

import click
import typer
from typer.core import TyperGroup

from imgflow.tasks.errors import EXIT_FAILED_CHECK, EXIT_USAGE, ImgflowError, describe_os_error, is_disk_full

def fail(message: str, code: int) -> NoReturn:
    """Print ``imgflow: message`` on stderr, as one line, and exit with ``code``."""
    message = " ".join(str(message).split())  # a YAML or Keras error may span lines
    typer.echo(f"imgflow: {message}", err=True)
    raise typer.Exit(code)



DEBUG_ENV = "IMGFLOW_DEBUG"


def debug_requested(ctx: click.Context | None = None) -> bool:
    """True when ``--debug`` was given or ``IMGFLOW_DEBUG`` is set to a true value."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(ctx is not None and ctx.meta.get("imgflow.debug"))


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of an expected failure (None for a bug, which keeps its traceback)."""
    if isinstance(exc, ImgflowError):
        return exc.exit_code
    if isinstance(exc, OSError):
        # a full disk means the pipeline ran and could not finish; any other OSError is a
        # path the user gave that cannot be read or written
        return EXIT_FAILED_CHECK if is_disk_full(exc) else EXIT_USAGE
    return None


def message_for(exc: BaseException, outputs: tuple[Path, ...] = ()) -> str:
    """The one line a user reads for an expected failure.

    Args:
        exc: the exception.
        outputs: where the command writes (workdir, ``--out``): named when a full disk
            gives an ``OSError`` without a file name (a failed ``write`` has none).
    """
    if isinstance(exc, OSError) and not isinstance(exc, ImgflowError):
        if exc.filename is not None:
            return describe_os_error(exc)
        if is_disk_full(exc):
            where = " or ".join(str(p) for p in outputs) or "the output folder"
            return (f"the disk is full writing to {where} ({exc.strerror or exc}): free space there or choose "
                    "another --workdir/--out, and run the same command again")
    return str(exc) or type(exc).__name__


def note_outputs(*paths: Optional[Path]) -> None:
    """Record where the running command writes, for the message of a full disk."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta["imgflow.outputs"] = tuple(p for p in paths if p is not None)


_expected_quiet = False


def _quiet_record_factory(factory: Any) -> Any:
    """Wrap the log record factory: expected failures are logged without their traceback.

    Prefect logs a failed task or flow run with its traceback; for an error the user can
    act on that buries the one line that matters. ``--debug`` keeps the tracebacks.
    """

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        info = record.exc_info
        if _expected_quiet and info and info[1] is not None and exit_code_for(info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return record

    make.imgflow_quiet = True  # type: ignore[attr-defined]
    return make


@contextlib.contextmanager
def map_errors(ctx: click.Context | None = None) -> Iterator[None]:
    """The one place expected failures become ``imgflow: <message>`` and an exit code.

    :class:`~imgflow.tasks.errors.UsageError` exits 2, :class:`~imgflow.tasks.errors.CheckFailed`
    exits 1, an ``OSError`` on a path exits 2 (1 for a full disk). Anything else is a bug
    and keeps its traceback. ``--debug`` or ``IMGFLOW_DEBUG=1`` prints the traceback of an
    expected failure too, before its line.
    """
    global _expected_quiet
    if not getattr(logging.getLogRecordFactory(), "imgflow_quiet", False):
        logging.setLogRecordFactory(_quiet_record_factory(logging.getLogRecordFactory()))
    _expected_quiet = not debug_requested(ctx)
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped below, or re-raised unchanged
        code = exit_code_for(exc)
        if code is None:
            raise
        if debug_requested(ctx):
            traceback.print_exception(exc, file=sys.stderr)
        fail(message_for(exc, ctx.meta.get("imgflow.outputs", ()) if ctx is not None else ()), code)
    finally:
        _expected_quiet = False


class ImgflowGroup(TyperGroup):
    """Runs every command inside :func:`map_errors`, so ``main()`` and ``CliRunner`` map alike."""

    def invoke(self, ctx: click.Context) -> Any:
        with map_errors(ctx):
            return super().invoke(ctx)
