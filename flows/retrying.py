"""Retry policy helpers: retry what can fail transiently, never a logic error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imgflow.tasks.errors import ImgflowError


def retry_unless(*permanent: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A Prefect ``retry_condition_fn`` that retries unless the failure is one of ``permanent``.

    Errors such as a missing data folder or an invalid option will fail the same way
    every time; retrying them only delays the message the user needs. Every
    :class:`~imgflow.tasks.errors.ImgflowError` is permanent whatever ``permanent`` lists.
    """
    permanent = (ImgflowError, *permanent)

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except BaseException:  # noqa: BLE001 - any other failure may be transient
            return True
        return True

    return should_retry
