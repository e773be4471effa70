"""The ``gpu`` tag of the tasks that hold a GPU, and the concurrency limit it answers to.

``prefect concurrency-limit create gpu 1`` keeps two trainings off one GPU: Prefect asks
the server for a slot of *every* tag a task run carries. That request is a write
transaction; on a SQLite server busy writing the run's logs and events it is answered
503 and the client backs off 2 s, then 4 s, before it learns that no limit exists —
seconds added to each of the three GPU tasks of ``imgflow train``. So the tasks carry the
tag where the server has a ``gpu`` limit, and run without it where it has none.
"""

from __future__ import annotations

import logging
from typing import Any

GPU_TAG = "gpu"
_UNKNOWN = object()  # the server could not be asked

logger = logging.getLogger(__name__)


def _read_limit(tag: str) -> Any:
    """The server's tag concurrency limit for ``tag``; None when there is none; ``_UNKNOWN`` when it cannot tell."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            return client.read_concurrency_limit_by_tag(tag)
    except ObjectNotFound:
        return None
    except Exception as exc:  # noqa: BLE001 - only a tag and a log line depend on it
        logger.debug("could not read the %r concurrency limit: %s", tag, exc)
        return _UNKNOWN


def as_gpu_task(task: Any, tag: str = GPU_TAG) -> Any:
    """``task`` with its ``gpu`` tag where the server limits that tag (or cannot tell), else without it.

    Read right before the task runs: a limit created later applies from the next task on.
    """
    if tag not in getattr(task, "tags", ()) or _read_limit(tag) is not None:
        return task  # also a plain function standing in for the task (a test's stub)
    return task.with_options(tags=set(task.tags) - {tag})


def log_gpu_slot_wait(logger: Any, tag: str = GPU_TAG) -> bool:
    """Log a line when the ``gpu`` tag concurrency limit is full, so a run waiting for it says why.

    Returns:
        True when every slot is taken (training will wait for one).
    """
    limit = _read_limit(tag)
    if limit is None or limit is _UNKNOWN:
        return False
    holders = list(limit.active_slots or [])
    if limit.concurrency_limit is not None and len(holders) >= limit.concurrency_limit:
        logger.info("waiting for the %r concurrency slot (limit %d, held by task runs %s); training starts when "
                    "one frees", tag, limit.concurrency_limit, ", ".join(str(h) for h in holders))
        return True
    return False
