"""Take the workdir's writer lock around a flow (see :mod:`imgflow.tasks.locks`).

The lock is taken inside the flow run, so a flow started by a Prefect deployment or
worker is serialised exactly like one started by the CLI.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _log(message: str) -> None:
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:  # noqa: BLE001 - outside a run context: plain print
        print(message)


def with_workdir_lock(command: str, workdir_arg: str = "workdir", wait_arg: str = "wait_for_lock") -> Callable[[F], F]:
    """Decorate a flow function so it runs holding the lock of its ``workdir`` argument.

    The function must have a ``workdir`` parameter and a ``wait_for_lock: bool = True``
    parameter (False: raise :class:`~imgflow.tasks.errors.LockHeld`, exit 2, instead of
    waiting). Put this decorator under ``@flow``; the signature Prefect sees is unchanged.

    Args:
        command: what the writer does, for the holder record (``imgflow train``).
        workdir_arg: name of the workdir parameter.
        wait_arg: name of the wait parameter.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args: Any, **kwargs: Any) -> Any:
            from imgflow.tasks.locks import workdir_lock

            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            workdir = Path(bound.arguments[workdir_arg])
            wait = bool(bound.arguments.get(wait_arg, True))
            with workdir_lock(workdir, command, wait=wait, log=_log):
                return fn(*args, **kwargs)

        # Prefect validates parameters from the annotations; under `from __future__ import
        # annotations` they are strings that only resolve in the flow module's globals
        hints = typing.get_type_hints(fn)
        locked.__annotations__ = hints
        locked.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()],
            return_annotation=hints.get("return", signature.return_annotation),
        )
        return locked  # type: ignore[return-value]

    return decorate
