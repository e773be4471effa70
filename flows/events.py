"""imgflow's Prefect events: one place that names them, builds their payloads and emits them.

Every event has a *resource* (what it is about) and *related* resources, so an
automation or a deployment trigger can match one workdir, one model or one inbox:

==============================  ====================================  ==========================
event                           resource ``prefect.resource.id``      related (role)
==============================  ====================================  ==========================
``imgflow.model.promoted``      ``imgflow.model.<model dir>``         ``imgflow.workdir.<dir>`` (workdir)
``imgflow.model.rejected``      ``imgflow.model.<model dir>``         workdir
``imgflow.dataset.unusable``    ``imgflow.dataset.<DATA_DIR>``        workdir
``imgflow.predictions.written`` ``imgflow.inbox.<INPUT_DIR>``         workdir, model (model)
``imgflow.inbox.drift``         ``imgflow.inbox.<INPUT_DIR>``         workdir, model
``imgflow.inbox.changed``       ``imgflow.inbox.<INBOX>``             -
==============================  ====================================  ==========================

Paths are absolute. Each resource also carries the labels ``prefect.resource.name``
(the folder's name) and ``imgflow.path`` (the absolute path), so a trigger template can
pass ``{{ event.resource['imgflow.path'] }}`` on as a flow parameter. The payloads are
documented on each builder below and in README.md ("Events").

Emitting never fails the caller: without a reachable API (a plain ``python`` call
with no Prefect server) an event is dropped with one debug line; Prefect's own
events client buffers and retries a server that blips. Nothing heavy is imported here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_PROMOTED = "imgflow.model.promoted"
MODEL_REJECTED = "imgflow.model.rejected"
DATASET_UNUSABLE = "imgflow.dataset.unusable"
PREDICTIONS_WRITTEN = "imgflow.predictions.written"
INBOX_DRIFT = "imgflow.inbox.drift"
INBOX_CHANGED = "imgflow.inbox.changed"
ALL_EVENTS = (MODEL_PROMOTED, MODEL_REJECTED, DATASET_UNUSABLE, PREDICTIONS_WRITTEN, INBOX_DRIFT, INBOX_CHANGED)

MAX_LISTED = 20  # file names / problems listed in a payload; counts are always complete


def _abs(path: Path | str) -> str:
    return str(Path(path).expanduser().resolve())


def resource(kind: str, path: Path | str, role: str | None = None) -> dict[str, str]:
    """The Prefect resource of one imgflow folder.

    Args:
        kind: ``workdir``, ``model``, ``dataset`` or ``inbox``.
        path: the folder (made absolute).
        role: set ``prefect.resource.role`` (for a related resource).

    Returns:
        ``{"prefect.resource.id": "imgflow.<kind>.<abs path>", "prefect.resource.name": <folder name>,
        "imgflow.path": <abs path>}`` (+ the role).
    """
    absolute = _abs(path)
    labels = {
        "prefect.resource.id": f"imgflow.{kind}.{absolute}",
        "prefect.resource.name": Path(absolute).name or absolute,
        "imgflow.path": absolute,
    }
    if role:
        labels["prefect.resource.role"] = role
    return labels


def emit(event: str, primary: Mapping[str, str], payload: Mapping[str, Any],
         related: Sequence[Mapping[str, str]] = ()) -> Any:
    """Send one event through ``prefect.events.emit_event``; never raises.

    Returns:
        The ``prefect.events.Event`` sent, or None when it could not be sent.
    """
    if event not in ALL_EVENTS:
        raise ValueError(f"event {event!r}: expected one of {', '.join(ALL_EVENTS)}")
    try:
        from prefect.events import emit_event

        return emit_event(event=event, resource=dict(primary), related=[dict(r) for r in related],
                          payload=dict(payload))
    except Exception as exc:  # noqa: BLE001 - an event must never fail a training or a prediction
        logger.debug("event %s not sent: %s", event, exc)
        return None


# ----------------------------------------------------------------- payload builders (pure)

def promotion_payload(result: Mapping[str, Any], root_cause: str | None = None) -> dict[str, Any]:
    """Payload of ``imgflow.model.promoted`` / ``imgflow.model.rejected`` from a training summary.

    Returns:
        ``{"run_id", "model_dir", "val_accuracy", "healthy", "reason", "root_cause", "champion_dir",
        "per_class_recall"}``; ``root_cause`` is the code of the doctor's first finding
        (``loss_at_chance`` ...) or None when it found nothing.
    """
    findings = list(result.get("findings") or [])
    cause = root_cause if root_cause is not None else (findings[0].get("code") if findings else None)
    return {
        "run_id": result.get("run_id"),
        "model_dir": result.get("model_dir"),
        "val_accuracy": result.get("val_accuracy"),
        "healthy": bool(result.get("healthy")),
        "reason": str(result.get("reason", "")),
        "root_cause": cause,
        "champion_dir": result.get("champion_dir"),
        "per_class_recall": dict(result.get("per_class_recall") or {}),
    }


def unusable_payload(report: Mapping[str, Any], message: str = "") -> dict[str, Any]:
    """Payload of ``imgflow.dataset.unusable`` from a validation report.

    Returns:
        ``{"message", "classes" (name -> usable images), "errors", "warnings",
        "codes" (problem code -> count), "problems" (first 20: path, code, message)}``.
    """
    problems = list(report.get("problems") or [])
    codes: dict[str, int] = {}
    for problem in problems:
        codes[problem.get("code", "?")] = codes.get(problem.get("code", "?"), 0) + 1
    errors = [p for p in problems if p.get("severity") == "error"]
    return {
        "message": message,
        "classes": dict(report.get("classes") or {}),
        "errors": len(errors),
        "warnings": len(problems) - len(errors),
        "codes": codes,
        "problems": [{k: p.get(k) for k in ("path", "code", "message")} for p in (errors or problems)[:MAX_LISTED]],
    }


def predictions_payload(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Payload of ``imgflow.predictions.written`` from a ``batch_predict`` summary.

    Returns:
        ``{"csv" (absolute path), "rows", "errors", "predicted" (files predicted by this run), "label_counts",
        "unknown", "unknown_share", "model_dir"}``; ``unknown``/``unknown_share`` are 0 when the
        model has no novelty statistics (no file is flagged unknown).
    """
    rows = int(summary.get("rows") or 0)
    unknown = int(summary.get("unknown") or 0)
    return {
        "csv": _abs(summary["csv"]) if summary.get("csv") else None,
        "rows": rows,
        "errors": int(summary.get("errors") or 0),
        "predicted": int(summary.get("predicted") or 0),
        "label_counts": dict(summary.get("label_counts") or {}),
        "unknown": unknown,
        "unknown_share": round(unknown / rows, 4) if rows else 0.0,
        "model_dir": summary.get("model_dir"),
    }


# ----------------------------------------------------------------- emitters

def model_decided(workdir: Path | str, result: Mapping[str, Any]) -> Any:
    """Emit ``imgflow.model.promoted`` or ``imgflow.model.rejected`` for a finished (not reused) training run."""
    name = MODEL_PROMOTED if result.get("promoted") else MODEL_REJECTED
    return emit(name, resource("model", result["model_dir"]), promotion_payload(result),
                [resource("workdir", workdir, "workdir")])


def dataset_unusable(workdir: Path | str, data_dir: Path | str, report: Mapping[str, Any], message: str = "") -> Any:
    """Emit ``imgflow.dataset.unusable`` for DATA_DIR (payload: :func:`unusable_payload`)."""
    return emit(DATASET_UNUSABLE, resource("dataset", data_dir), unusable_payload(report, message),
                [resource("workdir", workdir, "workdir")])


def predictions_written(workdir: Path | str, input_dir: Path | str, summary: Mapping[str, Any]) -> Any:
    """Emit ``imgflow.predictions.written`` for INPUT_DIR (payload: :func:`predictions_payload`)."""
    related = [resource("workdir", workdir, "workdir")]
    if summary.get("model_dir"):
        related.append(resource("model", summary["model_dir"], "model"))
    return emit(PREDICTIONS_WRITTEN, resource("inbox", input_dir), predictions_payload(summary), related)


def inbox_drift(workdir: Path | str, input_dir: Path | str, drift: Mapping[str, Any],
                model_dir: Path | str | None = None, report_path: Path | str | None = None) -> Any:
    """Emit ``imgflow.inbox.drift`` when a drift report says ``drift: true`` (batch prediction calls this).

    Args:
        workdir: the imgflow work folder.
        input_dir: the inbox the report is about.
        drift: the ``<name>.drift.json`` content (top-level ``drift`` boolean, per-property distances,
            unknown share); sent as the payload with ``report`` (its path) added.
        model_dir: the model that predicted the inbox.
        report_path: where the drift report was written.

    Returns:
        The event, or None when ``drift`` is false (nothing is sent) or it could not be sent.
    """
    if not drift.get("drift"):
        return None
    payload = dict(drift)
    payload["report"] = _abs(report_path) if report_path else None
    related = [resource("workdir", workdir, "workdir")]
    if model_dir:
        related.append(resource("model", model_dir, "model"))
    return emit(INBOX_DRIFT, resource("inbox", input_dir), payload, related)


def inbox_changed(inbox: Path | str, change: Mapping[str, Any]) -> Any:
    """Emit ``imgflow.inbox.changed`` (payload: ``imgflow.tasks.watch.InboxChange.payload()``)."""
    return emit(INBOX_CHANGED, resource("inbox", inbox), change)
