"""Typed records: one validating reader each for the manifest and the model metadata, one builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgflow.tasks import registry
from imgflow.tasks.records import (
    DEFAULT_ASPECT,
    EvaluationSummary,
    Manifest,
    REQUIRED_METADATA_KEYS,
    ManifestError,
    ModelMetadata,
    read_manifest,
    read_model_metadata,
)

MANIFEST = {
    "class_names": ["cats", "dogs"],
    "image_size": 32,
    "aspect": "crop",
    "encoding": "png",
    "jpeg_quality": None,
    "fingerprint": "f" * 64,
    "data_fingerprint": "d" * 64,
    "code_version": "0.1.0+fmt1",
    "created": "2026-01-01T00:00:00+00:00",
    "data_dir": "/data",
    "val_dir": None,
    "splits": {
        "train": {"count": 5, "per_class": {"cats": 2, "dogs": 3},
                  "shards": [{"file": "train-00000-of-00001.tfrecord", "records": 5, "bytes": 900}]},
        "val": {"count": 2, "per_class": {"cats": 1, "dogs": 1},
                "shards": [{"file": "val-00000-of-00001.tfrecord", "records": 2, "bytes": 400}]},
    },
}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------ manifest


def test_manifest_reads_typed_and_round_trips_the_file(tmp_path):
    path = _write(tmp_path / "manifest.json", {**MANIFEST, "background": "white"})
    manifest = read_manifest(path)
    assert manifest.class_names == ["cats", "dogs"] and manifest.image_size == 32 and manifest.aspect == "crop"
    assert manifest.split("train").count == 5 and manifest.split("val").shards[0].bytes == 400
    assert manifest.split("test").count == 0  # a split the manifest does not have is empty
    # the dict tasks pass is the file, unknown keys of a newer writer included
    assert manifest.to_dict() == {**MANIFEST, "background": "white"}


def test_manifest_defaults_come_from_the_record(tmp_path):
    old = {k: v for k, v in MANIFEST.items() if k != "aspect"}
    manifest = read_manifest(_write(tmp_path / "manifest.json", old))
    assert manifest.aspect == DEFAULT_ASPECT == "squash"
    assert manifest.to_dict()["aspect"] == "squash"
    assert "aspect" not in old  # the reader filled it in, not the caller


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoding": "gif"}, r"'encoding': input should be 'jpeg', 'png' or 'raw', found 'gif'"),
        ({"image_size": "32"}, r"'image_size': input should be a valid integer, found '32'"),
        ({"class_names": []}, r"'class_names': list should have at least 1 item"),
        ({"splits": None}, r"'splits': input should be a valid dictionary"),
        ({"splits": {"train": {"count": 1, "shards": [{"file": "a.tfrecord"}]}}}, r"'splits.train.shards.0.records': missing"),
    ],
)
def test_bad_manifest_names_file_and_field(tmp_path, change, message):
    path = _write(tmp_path / "manifest.json", {**MANIFEST, **change})
    with pytest.raises(ManifestError, match=message) as caught:
        read_manifest(path)
    assert str(caught.value).startswith(str(path)) and "imgflow preprocess" in str(caught.value)
    assert isinstance(caught.value, ValueError)  # a bad input, never retried


def test_missing_or_unreadable_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFRecord manifest here; run `imgflow preprocess` first"):
        read_manifest(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match="cannot read the TFRecord manifest as JSON"):
        read_manifest(_write(tmp_path / "a" / "manifest.json", "{not json"))
    with pytest.raises(ManifestError, match="expected the TFRecord manifest as a JSON object, found list"):
        read_manifest(_write(tmp_path / "b" / "manifest.json", [1, 2]))


# ------------------------------------------------------------------ model metadata


def _meta(**change) -> dict:
    return {"run_id": "r1", "class_names": ["a", "b"], "image_size": 8, "metrics": {"val_accuracy": 0.9},
            "fingerprint": "fp", "config": {"epochs": 1}, "versions": {"keras": "3"},
            "created": "2026-01-01T00:00:00+00:00", "healthy": True, **change}


def test_metadata_minimal_file_gets_defaults_and_keeps_its_keys(tmp_path):
    _write(tmp_path / "metadata.json", {"class_names": ["a", "b"], "image_size": 8, "calibration": {"t": 1.5}})
    record = read_model_metadata(tmp_path)
    assert record.aspect == "squash" and record.run_id is None and record.healthy is None
    # the dict has the file's keys plus the real defaults, and no invented None values
    assert registry.read_metadata(tmp_path) == {
        "class_names": ["a", "b"], "image_size": 8, "aspect": "squash", "calibration": {"t": 1.5},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_names": ["a", 2]}, r"'class_names.1': input should be a valid string, found 2"),
        ({"class_names": []}, r"'class_names': list should have at least 1 item"),
        ({"image_size": "8"}, r"'image_size': input should be a valid integer, found '8'"),
        ({"image_size": True}, r"'image_size': input should be a valid integer, found True"),
        ({"image_size": 0}, r"'image_size': input should be greater than or equal to 1, found 0"),
        ({"aspect": "stretch"}, r"'aspect': input should be 'squash', 'crop' or 'pad', found 'stretch'"),
        ({"healthy": "maybe"}, r"'healthy': input should be a valid boolean"),
    ],
)
def test_bad_metadata_names_file_and_field(tmp_path, change, message):
    path = _write(tmp_path / "metadata.json", _meta(**change))
    with pytest.raises(registry.RegistryError, match=message) as caught:
        read_model_metadata(tmp_path)
    assert str(caught.value).startswith(str(path))
    with pytest.raises(registry.RegistryError, match=message):
        registry.read_metadata(tmp_path)  # the wrapper other modules call goes through the same reader


def test_metadata_missing_or_not_an_object(tmp_path):
    with pytest.raises(registry.RegistryError, match="expected a model directory with metadata.json, found none"):
        read_model_metadata(tmp_path)
    _write(tmp_path / "metadata.json", "[]")
    with pytest.raises(registry.RegistryError, match="expected the model metadata as a JSON object, found list"):
        read_model_metadata(tmp_path)
    _write(tmp_path / "metadata.json", "{")
    with pytest.raises(registry.RegistryError, match="cannot read the model metadata as JSON"):
        read_model_metadata(tmp_path)
    assert not registry.is_complete(tmp_path)


def test_prediction_reader_is_the_registry_reader(tmp_path):
    from imgflow.tasks import prediction

    _write(tmp_path / "metadata.json", _meta())
    with pytest.raises(FileNotFoundError, match="expected model.keras in it"):
        prediction.read_metadata(tmp_path)
    (tmp_path / "model.keras").write_bytes(b"x")
    assert prediction.read_metadata(tmp_path) == registry.read_metadata(tmp_path)
    assert prediction.read_metadata(tmp_path)["aspect"] == "squash"


def test_write_metadata_checks_types_and_required_keys(tmp_path):
    with pytest.raises(registry.RegistryError, match="missing key"):
        registry.write_metadata(tmp_path, {"run_id": "x"})
    with pytest.raises(registry.RegistryError, match="'image_size': input should be a valid integer"):
        registry.write_metadata(tmp_path, _meta(image_size="big"))
    assert not (tmp_path / "metadata.json").exists()  # nothing half-checked is written
    registry.write_metadata(tmp_path, _meta(promotion={"promoted": True}))
    assert registry.is_complete(tmp_path) is False  # no model.keras yet
    (tmp_path / "model.keras").write_bytes(b"x")
    assert registry.is_complete(tmp_path) is True


def test_build_metadata_is_the_one_builder(tmp_path):
    manifest = Manifest.model_validate({**MANIFEST, "background": "white", "code_only": 1})
    summary = {
        "class_names": ["cats", "dogs"], "image_size": 32, "aspect": "crop", "diagnosis": {"healthy": True},
        "device_plan": {"precision": "float32"}, "best_epoch": 3, "epochs_run": 5, "stopped_early": True,
        "history": [1, 2, 3],  # fit details stay in train_summary.json
    }
    previous = {"created": "2025-12-31T23:59:59+00:00"}
    meta = registry.build_metadata("run-1", summary, manifest, tmp_path / "manifest.json", {"epochs": 5},
                                   {"val_accuracy": 0.75}, tmp_path / "data", None, previous)
    assert set(REQUIRED_METADATA_KEYS) <= set(meta)
    assert meta["run_id"] == "run-1" and meta["class_names"] == ["cats", "dogs"] and meta["image_size"] == 32
    assert meta["aspect"] == "crop" and meta["fingerprint"] == "f" * 64 and meta["data_fingerprint"] == "d" * 64
    assert meta["created"] == "2025-12-31T23:59:59+00:00"  # a resumed run keeps its creation time
    assert meta["healthy"] is True and meta["metrics"] == {"val_accuracy": 0.75} and meta["config"] == {"epochs": 5}
    assert meta["best_epoch"] == 3 and meta["epochs_run"] == 5 and meta["stopped_early"] is True
    assert "history" not in meta and meta["resumed"] is False and meta["val_dir"] is None
    assert meta["background"] == "white" and "code_only" not in meta  # how the shards were made
    assert meta["data_dir"] == str((tmp_path / "data").resolve()) and "python" in meta["versions"]
    registry.write_metadata(tmp_path, meta)
    assert read_model_metadata(tmp_path).to_dict() == json.loads((tmp_path / "metadata.json").read_text())
    unhealthy = registry.build_metadata("run-2", {**summary, "diagnosis": {"healthy": False}}, manifest,
                                        tmp_path / "manifest.json", {}, {}, tmp_path)
    assert unhealthy["healthy"] is False and unhealthy["created"] != previous["created"]


def test_model_metadata_record_is_json_able():
    record = ModelMetadata.model_validate(_meta(extra_key=[1, 2]))
    assert json.loads(json.dumps(record.to_dict())) == {**_meta(extra_key=[1, 2]), "aspect": "squash"}


# ------------------------------------------------------------------ evaluation summary


def test_evaluation_summary_keeps_the_small_record():
    result = {"out_dir": "/o", "accuracy": 0.5, "count": 4, "skipped": 1, "loss": 0.7, "report_html": "/o/r.html",
              "confusion_matrix": [[1, 1], [1, 1]], "plots": {"x": "/o/x.png"}, "comparison": {"decision": "promote"}}
    summary = EvaluationSummary.from_result(result, keep=("plots",))
    assert summary.accuracy == 0.5 and summary.comparison == {"decision": "promote"}
    data = summary.to_dict()
    assert "confusion_matrix" not in data and data["plots"] == {"x": "/o/x.png"} and data["skipped"] == 1
    with pytest.raises(ValueError, match="'accuracy': missing"):
        EvaluationSummary.from_result({"out_dir": "/o", "count": 1})
    with pytest.raises(ValueError, match="'count': input should be greater than or equal to 0"):
        EvaluationSummary.from_result({"out_dir": "/o", "accuracy": 1.0, "count": -1})


def test_nested_defaults_are_filled_in(tmp_path):
    bare = {**MANIFEST, "splits": {"train": {"count": 1, "shards": [{"file": "t.tfrecord", "records": 1}]}}}
    data = read_manifest(_write(tmp_path / "manifest.json", bare)).to_dict()
    assert data["splits"]["train"]["per_class"] == {}  # a split's default, filled in by the record
    assert data["splits"]["train"]["shards"] == [{"file": "t.tfrecord", "records": 1}]  # no invented "bytes": null
