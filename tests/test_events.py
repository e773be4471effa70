"""imgflow's Prefect events: names, resources, payloads, and the flows that emit them."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.testing.fixtures import asserting_events_worker  # noqa: F401 - pytest fixture

from imgflow.flows import events
from tests.imagefactory import make_class_folder


def sent(worker, name: str) -> list:
    worker.drain()
    return [e for e in worker._client.events if e.event == name]


def test_resource_labels_name_the_folder(tmp_path):
    labels = events.resource("model", tmp_path / "models" / "run-1", role="model")
    absolute = str((tmp_path / "models" / "run-1").resolve())
    assert labels == {
        "prefect.resource.id": f"imgflow.model.{absolute}",
        "prefect.resource.name": "run-1",
        "imgflow.path": absolute,
        "prefect.resource.role": "model",
    }


def test_unknown_event_name_is_refused():
    with pytest.raises(ValueError, match="imgflow.model.promoted"):
        events.emit("imgflow.model.promotedd", {"prefect.resource.id": "x"}, {})


def test_promotion_payload_carries_reason_root_cause_and_recall():
    result = {"run_id": "r1", "model_dir": "/w/models/r1", "val_accuracy": 0.333, "healthy": False,
              "reason": "rejected: unhealthy", "champion_dir": None,
              "findings": [{"code": "loss_at_chance", "severity": "critical"}, {"code": "overfitting"}],
              "per_class_recall": {"a": 1.0, "b": 0.0}}
    payload = events.promotion_payload(result)
    assert payload["root_cause"] == "loss_at_chance"
    assert payload["reason"] == "rejected: unhealthy"
    assert payload["per_class_recall"] == {"a": 1.0, "b": 0.0}
    assert events.promotion_payload({**result, "findings": []})["root_cause"] is None


def test_predictions_payload_unknown_share():
    payload = events.predictions_payload({"csv": "x.csv", "rows": 8, "errors": 1, "predicted": 3,
                                          "label_counts": {"a": 7}, "unknown": 2})
    assert (payload["rows"], payload["predicted"], payload["unknown"], payload["unknown_share"]) == (8, 3, 2, 0.25)
    assert payload["csv"] == str(Path("x.csv").resolve())
    assert events.predictions_payload({"rows": 0})["unknown_share"] == 0.0
    assert events.predictions_payload({"rows": 5})["unknown"] == 0  # no novelty column yet: 0, not absent


def test_model_decided_emits_promoted_or_rejected(prefect_server, asserting_events_worker, tmp_path):  # noqa: F811
    workdir, model_dir = tmp_path / "w", tmp_path / "w" / "models" / "r1"
    base = {"run_id": "r1", "model_dir": str(model_dir), "val_accuracy": 0.9, "healthy": True,
            "reason": "promoted: first model", "findings": []}
    events.model_decided(workdir, {**base, "promoted": True})
    events.model_decided(workdir, {**base, "promoted": False, "reason": "rejected: worse",
                                   "findings": [{"code": "underfitting"}]})
    promoted, rejected = sent(asserting_events_worker, events.MODEL_PROMOTED), sent(asserting_events_worker, events.MODEL_REJECTED)
    assert len(promoted) == 1 and len(rejected) == 1
    assert promoted[0].resource.id == f"imgflow.model.{model_dir.resolve()}"
    assert promoted[0].payload["reason"] == "promoted: first model"
    assert rejected[0].payload["root_cause"] == "underfitting"
    related = {r.role: r.id for r in rejected[0].related}
    assert related == {"workdir": f"imgflow.workdir.{workdir.resolve()}"}


def test_drift_is_sent_only_when_there_is_drift(prefect_server, asserting_events_worker, tmp_path):  # noqa: F811
    assert events.inbox_drift(tmp_path, tmp_path / "inbox", {"drift": False}) is None
    events.inbox_drift(tmp_path, tmp_path / "inbox", {"drift": True, "unknown_share": 0.4},
                       report_path=tmp_path / "inbox.drift.json")
    (event,) = sent(asserting_events_worker, events.INBOX_DRIFT)
    assert event.payload["unknown_share"] == 0.4
    assert event.payload["report"] == str((tmp_path / "inbox.drift.json").resolve())


def test_unusable_dataset_emits_an_event(prefect_server, asserting_events_worker, tmp_path):  # noqa: F811
    from imgflow.flows.validation import validate_flow

    data = make_class_folder(tmp_path / "data", {"only": 5})
    summary = validate_flow(data, workdir=tmp_path / "w")
    assert summary["usable"] is False
    (event,) = sent(asserting_events_worker, events.DATASET_UNUSABLE)
    assert event.resource.id == f"imgflow.dataset.{Path(data).resolve()}"
    assert event.payload["classes"] == {"only": 5}
    assert event.payload["codes"]["too_few_classes"] == 1
    assert event.payload["errors"] >= 1


# ------------------------------------------------------------------ the inbox watcher

def test_watcher_reports_a_settled_change_once(tmp_path):
    from imgflow.tasks.watch import InboxWatcher

    watcher = InboxWatcher(settle_s=20)
    assert watcher.step({"a.png": (10, 1)}, 0) is None  # baseline: files already there are not news
    assert watcher.step({"a.png": (10, 1), "b.png": (5, 2)}, 10) is None  # b arrives: settling
    assert watcher.step({"a.png": (10, 1), "b.png": (9, 3)}, 20) is None  # b still growing
    assert watcher.step({"a.png": (10, 1), "b.png": (9, 3)}, 30) is None  # stable for 10 s only
    change = watcher.step({"a.png": (10, 1), "b.png": (9, 3)}, 40)
    assert (change.added, change.changed, change.removed, change.total) == (["b.png"], [], [], 2)
    assert watcher.step({"a.png": (10, 1), "b.png": (9, 3)}, 90) is None  # reported once
    watcher.step({"a.png": (11, 5)}, 100)
    change = watcher.step({"a.png": (11, 5)}, 130)
    assert change.payload()["changed_files"] == ["a.png"] and change.payload()["removed"] == 1


def test_run_watch_emits_inbox_changed(prefect_server, asserting_events_worker, tmp_path):  # noqa: F811
    from imgflow.flows.watch import run_watch
    from tests.imagefactory import solid_image

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    solid_image().save(inbox / "old.png")
    polls = []

    def sleep(seconds):  # files arrive after the first poll, then the inbox stays still
        polls.append(seconds)
        if len(polls) == 1:
            (inbox / "sub").mkdir()
            solid_image(seed=1).save(inbox / "sub" / "new.png")
            (inbox / ".hidden.png").write_bytes(b"x")

    lines = []
    reported = run_watch(inbox, interval_s=5, settle_s=10, max_polls=6, sleep=sleep, log=lines.append)
    assert reported == 1
    assert lines == [f"{inbox}: 1 added, 0 changed, 0 removed (2 files)"]
    (event,) = sent(asserting_events_worker, events.INBOX_CHANGED)
    assert event.resource.id == f"imgflow.inbox.{inbox.resolve()}"
    assert event.payload["added_files"] == ["sub/new.png"] and event.payload["files"] == 2


def test_watch_refuses_a_missing_inbox_and_bad_intervals(tmp_path):
    from imgflow.flows.watch import run_watch

    with pytest.raises(FileNotFoundError, match="INBOX .*missing: expected a folder to watch, found nothing there"):
        run_watch(tmp_path / "missing", max_polls=1)
    with pytest.raises(ValueError, match="interval_s: expected seconds > 0, found 0"):
        run_watch(tmp_path, interval_s=0, max_polls=1)
