"""flows/preprocessing.py: the preprocess flow on a Prefect test server (thread pool and Dask)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imgflow.flows.config import ImgflowConfig
from imgflow.tasks import tfrecords
from imgflow.tasks.dataset import DatasetUnusable
from tests.imagefactory import make_class_folder

CONFIG = ImgflowConfig.from_flat({"image_size": 32, "val_fraction": 0.2})


def _records_by_name(manifest_path: str) -> dict[str, tuple[str, int]]:
    manifest = json.loads(Path(manifest_path).read_text())
    out = {}
    for split in ("train", "val"):
        for shard in manifest["splits"][split]["shards"]:
            records = tfrecords.read_records(Path(manifest_path).parent / shard["file"])
            assert len(records) == shard["records"]
            out.update({r["filename"]: (split, r["label"]) for r in records})
    return out


def _task_states(flow_run_id, prefix: str, expected: int) -> list[str]:
    """The final state names of a flow run's tasks, once the server has recorded ``expected`` of them.

    The server records task runs and their states from events, a moment after the flow
    returns, and not all at once (a busy CI run once read 2 of 4).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
            states = [run.state for run in runs if run.name.startswith(prefix)]
            recorded = len(states) >= expected and all(state is not None and state.is_final() for state in states)
            if recorded or time.monotonic() > deadline:
                return sorted(state.name if state else "None" for state in states)
            time.sleep(0.2)


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_flow_writes_shards_then_reuses_them(prefect_server, digits_dir, tmp_path):
    from imgflow.flows.preprocessing import preprocess_flow

    work = tmp_path / "work"
    first = preprocess_flow(digits_dir, workdir=work, config=CONFIG)
    assert first["cached"] is False
    assert first["counts"]["train"] + first["counts"]["val"] == 180 and first["counts"]["val"] > 0
    assert first["validation"]["usable"] is True
    assert first["validation"]["report_path"] == str(work / "validation.json")
    manifest_path = Path(first["manifest"])
    assert manifest_path.parent.parent == work / "tfrecords"
    manifest = json.loads(manifest_path.read_text())
    assert first["shards"] == sum(len(manifest["splits"][s]["shards"]) for s in ("train", "val"))
    assert manifest["class_names"] == ["one", "seven", "zero"]
    records = _records_by_name(first["manifest"])
    assert len(records) == 180
    assert all(manifest["class_names"][label] == name.split("/")[0] for name, (_, label) in records.items())

    before = _mtimes(manifest_path.parent)
    second = preprocess_flow(digits_dir, workdir=work, config=CONFIG)
    assert second["cached"] is True
    assert {k: v for k, v in second.items() if k != "validation"} == {
        k: (True if k == "cached" else v) for k, v in first.items() if k != "validation"
    }
    assert _mtimes(manifest_path.parent) == before  # every shard, the plan and the manifest untouched

    # a lost manifest: the shards already in place are kept (Prefect cache / resume), the manifest comes back
    manifest_path.unlink()
    shards_before = {k: v for k, v in before.items() if k.endswith(".tfrecord")}
    state = preprocess_flow(digits_dir, workdir=work, config=CONFIG, return_state=True)
    third = state.result()
    assert third["cached"] is False and third["manifest"] == first["manifest"]
    shard_states = _task_states(state.state_details.flow_run_id, "write-shard", first["shards"])
    assert shard_states == ["Cached"] * first["shards"]  # Prefect cache key: no shard task body ran
    assert {k: v for k, v in _mtimes(manifest_path.parent).items() if k.endswith(".tfrecord")} == shards_before

    # an option change builds a new set beside the old one
    bigger = preprocess_flow(digits_dir, workdir=work, config=ImgflowConfig.from_flat({"image_size": 40, "val_fraction": 0.2}))
    assert bigger["cached"] is False and Path(bigger["manifest"]).parent != manifest_path.parent
    assert json.loads(Path(bigger["manifest"]).read_text())["image_size"] == 40
    assert _records_by_name(bigger["manifest"]) == records  # same split and labels: seeded by path


def test_flow_refuses_unusable_data(prefect_server, tmp_path):
    from imgflow.flows.preprocessing import preprocess_flow

    data = make_class_folder(tmp_path / "data", {"only": 5}, size=16)
    with pytest.raises(DatasetUnusable, match="validation found the data unusable.*validation.json"):
        preprocess_flow(data, workdir=tmp_path / "work", config=CONFIG)
    assert not (tmp_path / "work" / "tfrecords").exists()


def test_flow_with_val_dir(prefect_server, tmp_path):
    from imgflow.flows.preprocessing import preprocess_flow

    data = make_class_folder(tmp_path / "data", {"a": 6, "b": 6}, size=16)
    val = make_class_folder(tmp_path / "val", {"a": 3, "b": 2}, size=16, seed=3)
    result = preprocess_flow(data, val_dir=val, workdir=tmp_path / "work", config=CONFIG)
    assert result["counts"] == {"train": 12, "val": 5}
    by_name = _records_by_name(result["manifest"])
    assert sorted(n for n, (split, _) in by_name.items() if split == "val") == [
        "a/a_000.png", "a/a_001.png", "a/a_002.png", "b/b_000.png", "b/b_001.png"
    ]


def test_flow_fans_out_on_a_dask_cluster(prefect_server, tmp_path):
    from distributed import LocalCluster

    from imgflow.flows.preprocessing import preprocess_flow

    data = make_class_folder(tmp_path / "data", {"a": 10, "b": 10, "c": 10}, size=16)
    local = preprocess_flow(data, workdir=tmp_path / "local", config=CONFIG)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        config = ImgflowConfig.from_flat({"image_size": 32, "val_fraction": 0.2, "dask_address": cluster.scheduler_address})
        on_dask = preprocess_flow(data, workdir=tmp_path / "dask", config=config)
        # the shard tasks went through the cluster's scheduler and were computed by its workers
        prefix = cluster.scheduler.task_prefixes["write_shard_task"]
        assert prefix.all_durations.get("compute", 0) > 0
    assert on_dask["cached"] is False and on_dask["counts"] == local["counts"]
    manifest = json.loads(Path(on_dask["manifest"]).read_text())
    assert len(manifest["splits"]["train"]["shards"]) >= 2  # at least one shard per worker
    assert _records_by_name(on_dask["manifest"]) == _records_by_name(local["manifest"])


def test_unchanged_rerun_reuses_the_report_without_a_validation_run(prefect_server, shapes_dir, tmp_path, monkeypatch):
    import os

    import imgflow.flows.validation
    from imgflow.flows.preprocessing import preprocess_flow

    work = tmp_path / "work"
    first = preprocess_flow(shapes_dir, workdir=work, config=CONFIG)
    calls = []
    real = imgflow.flows.validation.validate_flow
    monkeypatch.setattr(imgflow.flows.validation, "validate_flow", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = preprocess_flow(shapes_dir, workdir=work, config=CONFIG)
    assert calls == [] and second["cached"] is True
    assert second["validation"] == first["validation"] and second["manifest"] == first["manifest"]

    victim = shapes_dir / "cats" / "cats_001.png"
    stamp = victim.stat().st_mtime_ns + 10**9
    os.utime(victim, ns=(stamp, stamp))  # same bytes, new time: the report must be re-checked
    third = preprocess_flow(shapes_dir, workdir=work, config=CONFIG)
    assert calls == [1] and third["validation"]["classes"] == first["validation"]["classes"]
