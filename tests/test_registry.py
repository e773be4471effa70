"""Registry: deterministic run ids, run directory states, promotion, champion resolution."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from imgflow.tasks import registry
from imgflow.tasks.atomic import write_json


def _meta(run_id="r1", acc=0.9, healthy=True, fingerprint="fp", classes=("a", "b")) -> dict:
    return {
        "run_id": run_id,
        "class_names": list(classes),
        "image_size": 8,
        "metrics": {"val_accuracy": acc},
        "fingerprint": fingerprint,
        "config": {"epochs": 1},
        "versions": {"keras": "3"},
        "created": registry.now_iso(),
        "healthy": healthy,
    }


def test_run_id_is_deterministic_and_follows_data_and_config():
    config = {"epochs": 5, "image_size": 32, "seed": 1, "dask_address": None}
    first = registry.run_id_for("abc", config, "default")
    assert first == registry.run_id_for("abc", dict(reversed(list(config.items()))), "default")
    assert first.startswith("default-") and len(first) == len("default-") + 12
    assert registry.run_id_for("abd", config, "default") != first
    assert registry.run_id_for("abc", {**config, "epochs": 6}, "default") != first
    # where the work runs does not change what is trained
    assert registry.run_id_for("abc", {**config, "dask_address": "tcp://x:8786"}, "default") == first
    assert registry.run_id_for("abc", config, "My Builder!").startswith("my_builder-")


def _finish(model_dir, run_id):
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.keras").write_bytes(b"x")
    write_json(model_dir / "metadata.json", {**_meta(run_id), "promotion": {"promoted": True}})


def test_allocate_run_dir_new_resume_done_and_forced(tmp_path):
    run_id, model_dir, state = registry.allocate_run_dir(tmp_path, "m-1")
    assert (run_id, state) == ("m-1", "new") and model_dir == tmp_path / "models" / "m-1"
    (model_dir / "backup").mkdir(parents=True)  # killed mid-fit
    assert registry.allocate_run_dir(tmp_path, "m-1") == ("m-1", model_dir, "resume")
    assert registry.allocate_run_dir(tmp_path, "m-1", force=True)[2] == "resume"  # never abandon a half run
    # model written, metadata written, but promotion not decided yet: still resumable
    (model_dir / "model.keras").write_bytes(b"x")
    write_json(model_dir / "metadata.json", _meta("m-1"))
    assert not registry.is_complete(model_dir)
    assert registry.allocate_run_dir(tmp_path, "m-1")[2] == "resume"
    _finish(model_dir, "m-1")
    assert registry.is_complete(model_dir)
    assert registry.allocate_run_dir(tmp_path, "m-1") == ("m-1", model_dir, "done")
    assert registry.allocate_run_dir(tmp_path, "m-1", force=True) == ("m-1-2", tmp_path / "models" / "m-1-2", "new")
    (tmp_path / "models" / "m-1-2").mkdir()
    assert registry.allocate_run_dir(tmp_path, "m-1", force=True)[:2] == ("m-1-2", tmp_path / "models" / "m-1-2")
    _finish(tmp_path / "models" / "m-1-2", "m-1-2")
    assert registry.allocate_run_dir(tmp_path, "m-1") [:3] == ("m-1-2", tmp_path / "models" / "m-1-2", "done")
    assert registry.allocate_run_dir(tmp_path, "m-1", force=True)[0] == "m-1-3"


@pytest.mark.parametrize(
    ("candidate", "champion", "other_val", "promoted", "needle"),
    [
        (_meta(healthy=False), None, None, False, "not healthy"),
        (_meta(acc=0.5), None, None, True, "first healthy model"),
        (_meta("new", acc=0.895), _meta("old", acc=0.9), None, True, "tolerance 0.01"),
        (_meta("new", acc=0.85), _meta("old", acc=0.9), None, False, "worse than champion old (0.9000)"),
        # another validation set: the champion's score on the candidate's set counts
        (_meta("new", acc=0.85, fingerprint="f2"), _meta("old", acc=0.99), 0.80, True, "0.8000"),
        (_meta("new", acc=0.85, fingerprint="f2"), _meta("old", acc=0.5), 0.95, False, "(0.9500)"),
        (_meta("new", classes=("a", "c")), _meta("old", acc=1.0), None, True, "class list changed"),
    ],
)
def test_promotion_decision(candidate, champion, other_val, promoted, needle):
    decision, reason = registry.promotion_decision(candidate, champion, 0.01, other_val)
    assert decision is promoted
    assert needle in reason
    assert reason.startswith("promoted" if promoted else "rejected")


def _tiny_model_dir(path):
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, outputs)
    path.mkdir(parents=True)
    model.save(path / "model.keras")
    registry.write_metadata(path, _meta(path.name))
    return model


def test_promote_resolve_and_load_champion(tmp_path):
    workdir = tmp_path / "work"
    model_dir = workdir / "models" / "r1"
    model = _tiny_model_dir(model_dir)
    with pytest.raises(registry.RegistryError, match="no model was promoted in workdir"):
        registry.resolve_model_dir("champion", workdir)
    pointer = registry.promote(workdir, model_dir, registry.read_metadata(model_dir))
    assert json.loads((workdir / "champion.json").read_text()) == pointer
    assert pointer["run_id"] == "r1" and pointer["val_accuracy"] == 0.9
    assert registry.resolve_model_dir("champion", workdir) == model_dir.resolve()
    assert registry.resolve_model_dir("r1", workdir) == model_dir.resolve()  # a run id
    assert registry.resolve_model_dir(model_dir, workdir) == model_dir.resolve()
    loaded, metadata = registry.load_model_dir(registry.resolve_model_dir("champion", workdir))
    assert metadata["class_names"] == ["a", "b"]
    x = np.full((1, 8, 8, 3), 128, dtype="float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert not list(workdir.glob(".tmp-*"))  # atomic writes leave nothing behind


def test_bad_model_directories_are_named(tmp_path):
    with pytest.raises(registry.RegistryError, match="expected a model directory holding model.keras"):
        registry.resolve_model_dir(tmp_path, tmp_path)
    with pytest.raises(registry.RegistryError, match="found none"):
        registry.read_metadata(tmp_path)
    with pytest.raises(registry.RegistryError, match="missing key"):
        registry.write_metadata(tmp_path, {"run_id": "x"})


def test_library_versions_name_keras():
    versions = registry.library_versions()
    assert versions["keras"] == keras.__version__
    assert "python" in versions
