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


def test_a_handed_over_model_is_loaded_as_it_is_until_its_file_changes(tmp_path):
    model_dir = tmp_path / "models" / "r1"
    trained = _tiny_model_dir(model_dir)
    try:
        registry.hand_over_saved_model(model_dir / "model.keras", trained)
        loaded, metadata = registry.load_model_dir(model_dir)
        assert loaded is trained and metadata["run_id"] == "r1"
        assert registry.load_model_dir(tmp_path / "models" / ".." / "models" / "r1")[0] is trained  # same file

        other = keras.Model.from_config(trained.get_config())  # another model put in its place, as save_model does
        other.save(tmp_path / "other.keras")
        (tmp_path / "other.keras").replace(model_dir / "model.keras")
        reread, _ = registry.load_model_dir(model_dir)
        assert reread is not trained and reread is not other
        assert [w.shape for w in reread.get_weights()] == [w.shape for w in trained.get_weights()]

        registry.hand_over_saved_model(model_dir / "model.keras", other)
        assert registry.load_model_dir(model_dir)[0] is other
        registry.forget_saved_model()
        assert registry.load_model_dir(model_dir)[0] is not other
    finally:
        registry.forget_saved_model()


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


# --------------------------------------------------------------------------- the one promotion decision


def _eval(recalls: dict, supports: dict, accuracy: float, non_finite: int = 0) -> dict:
    """The parts of compute_metrics the promotion rule reads."""
    return {
        "accuracy": accuracy, "count": sum(supports.values()), "non_finite_outputs": non_finite,
        "per_class": {n: {"recall": recalls[n], "support": supports[n]} for n in recalls},
    }


def test_recall_gate_never_promotes_a_model_blind_to_a_class():
    candidate, champion = _meta("new", acc=0.5), _meta("old", acc=0.5)
    supports = {"a": 30, "b": 12}
    lopsided = _eval({"a": 1.0, "b": 0.0}, supports, accuracy=30 / 42)
    balanced = _eval({"a": 0.6, "b": 0.5}, supports, accuracy=24 / 42)
    # the candidate is more accurate, and the tolerance is huge: still rejected, naming the class
    promoted, reason = registry.promotion_decision(candidate, champion, 1.0, candidate_metrics=lopsided,
                                                   champion_metrics=balanced)
    assert promoted is False
    assert reason.startswith("rejected: the candidate never recognises class 'b' (recall 0 on 12 validation images)")
    assert "champion old does (recall 0.5000)" in reason
    # a class with fewer images than the gate is not gated; the gate is configurable
    small = _eval({"a": 1.0, "b": 0.0}, {"a": 30, "b": 9}, accuracy=30 / 39)
    assert registry.promotion_decision(candidate, champion, 0.01, candidate_metrics=small,
                                       champion_metrics=balanced)[0] is True
    assert registry.promotion_decision(candidate, champion, 0.01, candidate_metrics=lopsided, champion_metrics=balanced,
                                       min_class_images_for_recall_gate=13)[0] is True
    # a champion that does not see the class either: accuracy decides
    blind_too = _eval({"a": 0.7, "b": 0.0}, supports, accuracy=21 / 42)
    assert registry.promotion_decision(candidate, champion, 0.01, candidate_metrics=lopsided,
                                       champion_metrics=blind_too)[0] is True
    # same validation set, champion not re-scored: its stored per-class recall counts
    stored = {**champion, "metrics": {"val_accuracy": 0.5, "per_class_recall": {"a": 0.6, "b": 0.25}}}
    promoted, reason = registry.promotion_decision(candidate, stored, 1.0, candidate_metrics=lopsided)
    assert promoted is False and "class 'b'" in reason and "(recall 0.2500)" in reason
    # no champion: nothing to lose against
    assert registry.promotion_decision(candidate, None, 0.01, candidate_metrics=lopsided)[0] is True


def test_non_finite_outputs_are_never_promoted_and_decide_carries_the_decision():
    broken = _eval({"a": 0.0, "b": 0.0}, {"a": 5, "b": 5}, accuracy=0.0, non_finite=10)
    decision = registry.decide(_meta("new"), broken, None, None, 0.01)
    assert decision["promote"] is False and decision["decision"] == "reject"
    assert decision["reason"] == ("rejected: the model gave NaN or infinite outputs for 10 of 10 validation images "
                                  "(a diverged training: lower the learning rate, scale the inputs)")
    good = _eval({"a": 1.0, "b": 0.8}, {"a": 5, "b": 5}, accuracy=0.9)
    worse = _eval({"a": 0.6, "b": 0.6}, {"a": 5, "b": 5}, accuracy=0.6)
    decision = registry.decide(_meta("new"), worse, _meta("old"), good, 0.01)
    assert decision == {
        "promote": False, "decision": "keep champion", "champion_run_id": "old", "tolerance": 0.01,
        "reason": "rejected: val accuracy 0.6000 is worse than champion old (0.9000) by more than the tolerance 0.01; "
                  "both scored on the same 10 images",
    }
    assert registry.decide(_meta("new"), good, _meta("old"), worse, 0.01)["decision"] == "promote"


def test_champion_dir_and_promote_task_act_on_the_decision(tmp_path):
    from imgflow.flows.training import promote_task

    workdir = tmp_path / "work"
    assert registry.champion_dir(workdir) is None
    first, second = workdir / "models" / "r1", workdir / "models" / "r2"
    _tiny_model_dir(first)
    _tiny_model_dir(second)
    result = promote_task.fn(str(workdir), str(first), {"promote": True, "reason": "promoted: first", "champion_run_id": None})
    assert result == {"promoted": True, "reason": "promoted: first"}
    assert registry.champion_dir(workdir) == first.resolve()
    assert registry.read_metadata(first)["promotion"]["reason"] == "promoted: first"
    # a decision taken against no champion does not overwrite the champion promoted since
    result = promote_task.fn(str(workdir), str(second), {"promote": True, "reason": "promoted: x", "champion_run_id": None})
    assert result["promoted"] is False and "champion changed to r1" in result["reason"]
    assert registry.read_champion(workdir)["run_id"] == "r1"
    rejected = promote_task.fn(str(workdir), str(second), {"promote": False, "reason": "rejected: worse",
                                                           "champion_run_id": "r1"})
    assert rejected == {"promoted": False, "reason": "rejected: worse"}
    assert registry.read_metadata(second)["promotion"]["promoted"] is False
    promote_task.fn(str(workdir), str(second), {"promote": True, "reason": "promoted: better", "champion_run_id": "r1"})
    assert registry.read_champion(workdir)["run_id"] == "r2"
    # a pointer at a deleted model directory is no champion
    (second / "model.keras").unlink()
    assert registry.champion_dir(workdir) is None


def test_atomic_writes_create_the_folder_get_plain_file_permissions_and_skip_a_stale_temporary_name(tmp_path, monkeypatch):
    import itertools
    import os

    from imgflow.tasks import atomic

    old = os.umask(0o022)
    try:
        monkeypatch.setattr(atomic, "_temporary_names", itertools.count())
        stale = tmp_path / "new" / f".tmp-out.json.{os.getpid()}-0.json"  # what a killed process of this pid left
        stale.parent.mkdir()
        stale.write_text("half")
        target = write_json(tmp_path / "new" / "out.json", {"a": 1}, durable=False)
        assert atomic.read_json(target) == {"a": 1}
        assert oct(target.stat().st_mode & 0o777) == "0o644"  # as a plain open gives, not mkstemp's 0o600
        assert stale.read_text() == "half"  # never overwritten; the next name was used
        assert sorted(p.name for p in target.parent.iterdir()) == [stale.name, "out.json"]
        deeper = write_json(tmp_path / "a" / "b" / "c.json", [1])  # missing folders are created
        assert atomic.read_json(deeper) == [1]
        with pytest.raises(RuntimeError):
            with atomic.atomic_open(tmp_path / "a" / "b" / "c.json") as handle:
                handle.write("[2]")
                raise RuntimeError("writer failed")
        assert atomic.read_json(deeper) == [1] and not list((tmp_path / "a" / "b").glob(".tmp-*"))
    finally:
        os.umask(old)
