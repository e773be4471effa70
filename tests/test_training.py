"""Training: device plan, class weights, fit with outputs, resume from BackupAndRestore."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from imgflow.flows.config import TrainOptions
from imgflow.tasks import plots, training
from imgflow.tasks.models import build_model
from tests.imagefactory import digit_images
from tests.modelfactory import Crash as _Crash


# ----------------------------------------------------------------------------- device plan


def test_plan_cpu_only_keeps_float32_without_xla():
    plan = training.plan_devices([], batch_size=32)
    assert plan["precision"] == "float32" and plan["jit_compile"] is False
    assert plan["strategy"] == "default" and plan["global_batch_size"] == 32
    assert plan["devices"] == ["CPU"]
    assert "CPU (no GPU visible)" in plan["log"] and "precision float32" in plan["log"]


def test_plan_one_gpu_uses_mixed_precision_and_xla():
    plan = training.plan_devices(["/physical_device:GPU:0"], batch_size=32)
    assert plan["precision"] == "mixed_float16" and plan["jit_compile"] is True
    assert plan["strategy"] == "default" and plan["replicas"] == 1
    assert "1 GPU(s)" in plan["log"] and "XLA on" in plan["log"]


def test_plan_several_gpus_mirror_and_scale_the_batch():
    gpus = [f"/physical_device:GPU:{i}" for i in range(4)]
    plan = training.plan_devices(gpus, batch_size=16)
    assert plan["strategy"] == "mirrored" and plan["replicas"] == 4
    assert plan["global_batch_size"] == 64
    assert "global batch 64" in plan["log"]
    # MirroredStrategy is a TensorFlow thing: on JAX the default (one device) plan applies
    assert training.plan_devices(gpus, batch_size=16, backend="jax")["strategy"] == "default"


def test_plan_options_override_auto():
    plan = training.plan_devices(["gpu0"], mixed_precision="off", jit_compile="off")
    assert plan["precision"] == "float32" and plan["jit_compile"] is False
    plan = training.plan_devices([], mixed_precision="on", jit_compile="on")
    assert plan["precision"] == "mixed_float16" and plan["jit_compile"] is True
    with pytest.raises(ValueError, match="mixed_precision: expected auto, on or off, found 'yes'"):
        training.plan_devices([], mixed_precision="yes")


def test_detect_gpus_on_this_machine_matches_tensorflow():
    assert training.detect_gpus() == [d.name for d in tf.config.list_physical_devices("GPU")]


def test_class_weights_only_when_imbalanced():
    assert training.class_weights_for([50, 50, 45]) is None  # auto: balanced enough
    weights = training.class_weights_for([90, 30, 30])
    assert weights == pytest.approx({0: 150 / 270, 1: 150 / 90, 2: 150 / 90})
    assert training.class_weights_for([90, 30, 30], "off") is None
    assert training.class_weights_for([10, 10], "on") == pytest.approx({0: 1.0, 1: 1.0})


# ----------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def digits_data():
    """Real digits 0/1/7 at 32 px, shuffled once: (train x, train y, val x, val y)."""
    pairs = digit_images([0, 1, 7], per_class=70, size=32)
    order = np.random.default_rng(0).permutation(len(pairs))
    x = np.stack([pairs[i][1] for i in order])
    y = np.array([[0, 1, 7].index(pairs[i][0]) for i in order], dtype="int32")
    return x[:165], y[:165], x[165:], y[165:]


def _datasets(data, batch=32):
    x, y, vx, vy = data
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(256, seed=1).batch(batch)
    val = tf.data.Dataset.from_tensor_slices((vx, vy)).batch(batch)
    return train, val


def test_fit_default_model_learns_digits_and_writes_outputs(tmp_path, digits_data, monkeypatch):
    monkeypatch.setattr(plots, "_warm_up", None)
    keras.utils.set_random_seed(3)
    train, val = _datasets(digits_data)
    model = build_model("default", 32, 3)
    options = TrainOptions(epochs=6, early_stopping_patience=6)
    logs: list[str] = []
    vx, vy = digits_data[2], digits_data[3]
    result = training.fit_model(
        model, train, val, tmp_path, options, [55, 55, 55], probe=(vx[:32], vy[:32]), log=logs.append
    )
    accuracy = float(np.mean(np.argmax(model.predict(vx, verbose=0), axis=1) == vy))
    assert accuracy >= 0.85, result  # chance is 0.33; 36 steps of warm-up and cosine decay
    assert result["epochs_run"] == 6 and result["initial_epoch"] == 0 and not result["resumed"]
    history = training.read_history(tmp_path)
    assert [int(r["epoch"]) for r in history] == list(range(6))
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "seconds"} <= set(history[0])
    assert all(r["seconds"] > 0 for r in history)
    assert (tmp_path / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots._warm_up is not None and not plots._warm_up.is_alive()  # matplotlib imported during fit
    assert (tmp_path / "checkpoints" / "best.weights.h5").is_file()
    assert list((tmp_path / "logs").rglob("*tfevents*"))  # TensorBoard
    assert not (tmp_path / "backup").exists()  # removed once fit finished
    diagnosis = training.read_json(tmp_path / "diagnosis.json")
    assert diagnosis["healthy"] is True
    assert not [f for f in diagnosis["findings"] if f["severity"] == "critical"]
    assert sum(line.startswith("epoch ") for line in logs) == 6
    assert logs[-2].startswith("epoch 6/6") and "val_accuracy" in logs[-2]
    # the kept epoch is the best by val_accuracy (the default monitor), said out loud
    best = max(history, key=lambda r: r["val_accuracy"])
    assert result["monitor"] == "val_accuracy" and result["best_epoch"] == int(best["epoch"]) + 1
    assert result["best_value"] == pytest.approx(best["val_accuracy"])
    assert result["stopped_early"] is False and result["stop_reason"] == "ran all 6 epochs"
    assert logs[-1] == result["outcome"] and logs[-1].startswith(f"kept the weights of epoch {result['best_epoch']} of 6")
    # and those weights are what the model holds now
    kept = model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    assert kept == pytest.approx(best["val_accuracy"], abs=1e-6)


def _rows(values, monitor="val_accuracy"):
    return [{"epoch": i, monitor: v} for i, v in enumerate(values)]


def test_training_outcome_says_which_epoch_was_kept_and_why_it_stopped():
    ran_all = training.training_outcome(_rows([0.5, 0.8, 0.7]), "val_accuracy", 3, 5)
    assert ran_all["best_epoch"] == 2 and ran_all["best_value"] == 0.8 and not ran_all["stopped_early"]
    assert ran_all["sentence"] == "kept the weights of epoch 2 of 3 (best val_accuracy 0.8000); ran all 3 epochs"

    early = training.training_outcome(_rows([0.5, 0.83, 0.8, 0.8, 0.81, 0.82]), "val_accuracy", 20, 4,
                                      kept_epoch=2, stopped_early=True)
    assert early["epochs_run"] == 6 and early["epochs_planned"] == 20
    assert early["stop_reason"] == "val_accuracy did not improve for 4 epochs"
    assert early["sentence"] == ("kept the weights of epoch 2 of 6 (best val_accuracy 0.8300); "
                                 "stopped early after epoch 6 of 20: val_accuracy did not improve for 4 epochs")

    last = training.training_outcome(_rows([0.9, 0.5, 0.5]), "val_accuracy", 3, 2, kept_epoch=1, stopped_early=True)
    assert last["stopped_early"] is False and last["stop_reason"] == "ran all 3 epochs"

    by_loss = training.training_outcome(_rows([1.0, 0.4, 0.4, 0.6], "val_loss"), "val_loss", 4, 5)
    assert by_loss["best_epoch"] == 2  # the first of equal values, as Keras keeps it
    nan = training.training_outcome(_rows([0.5, 0.6]), "val_accuracy", 10, 5)
    assert nan["stop_reason"].startswith("stopped after 2 of 10 epochs")


def test_monitor_val_loss_keeps_the_lowest_loss_epoch_and_stops_early(tmp_path, digits_data):
    keras.utils.set_random_seed(4)
    train, val = _datasets(digits_data)
    # a learning rate far too high: val_loss cannot keep improving for long
    options = TrainOptions(epochs=8, early_stopping_patience=1, monitor="val_loss", learning_rate=0.3,
                           augment=False)
    model = build_model("default", 32, 3, augment=False)
    result = training.fit_model(model, train, val, tmp_path, options, [55, 55, 55], log=lambda _: None)
    history = training.read_history(tmp_path)
    assert result["monitor"] == "val_loss"
    assert result["best_epoch"] == int(min(history, key=lambda r: r["val_loss"])["epoch"]) + 1
    if result["stopped_early"]:
        assert result["epochs_run"] < 8 and "val_loss did not improve for" in result["stop_reason"]
        assert result["epochs_run"] - result["best_epoch"] >= 1
    else:
        assert result["epochs_run"] == 8



def test_fit_resumes_from_last_finished_epoch(tmp_path, digits_data):
    train, val = _datasets(digits_data)
    options = TrainOptions(epochs=4, early_stopping_patience=10, augment=False)
    keras.utils.set_random_seed(5)
    with pytest.raises(RuntimeError, match="worker lost"):
        training.fit_model(build_model("default", 32, 3, augment=False), train, val, tmp_path, options,
                           [55, 55, 55], log=lambda _: None, extra_callbacks=[_Crash(2)])
    assert training.backup_epoch(tmp_path) == 2
    assert [int(r["epoch"]) for r in training.read_history(tmp_path)] == [0, 1]

    # a fresh process would build a fresh model: the backup restores weights and epoch
    logs: list[str] = []
    fresh = build_model("default", 32, 3, augment=False)
    result = training.fit_model(fresh, train, val, tmp_path, options, [55, 55, 55], log=logs.append)
    assert result["resumed"] and result["initial_epoch"] == 2
    assert any("continuing at epoch 3" in line for line in logs)
    assert [line.split(" ")[1] for line in logs if line.startswith("epoch ")] == ["3/4", "4/4"]
    assert [int(r["epoch"]) for r in training.read_history(tmp_path)] == [0, 1, 2, 3]
    assert not (tmp_path / "backup").exists()


def test_history_rows_logged_past_the_backup_are_dropped(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss\n0,1.0\n1,0.8\n2,0.7\n")
    training._trim_history(tmp_path, 2)  # killed after CSVLogger, before the backup of epoch 3
    assert [int(r["epoch"]) for r in training.read_history(tmp_path)] == [0, 1]
    training._trim_history(tmp_path, 0)
    assert not (tmp_path / "history.csv").exists()


def test_history_reads_numbers_with_integer_epochs_and_trims_keeping_the_text_as_written(tmp_path):
    # an epoch logged twice (a resumed run) keeps its last row; NA is CSVLogger's missing metric
    (tmp_path / "history.csv").write_text(
        "epoch,loss,val_accuracy\n0,1.25,NA\n1,0.80000001,0.5\n1,0.79,0.55\n2,nan,0.6\n3,0.5,0.7\n")
    rows = training.read_history(tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1, 1, 2, 3] and all(type(r["epoch"]) is int for r in rows)
    assert rows[0]["loss"] == 1.25 and np.isnan(rows[0]["val_accuracy"]) and np.isnan(rows[3]["loss"])
    training._trim_history(tmp_path, 3)
    assert (tmp_path / "history.csv").read_text().splitlines() == [
        "epoch,loss,val_accuracy", "0,1.25,NA", "1,0.79,0.55", "2,nan,0.6"]
    (tmp_path / "history.csv").write_text("")
    assert training.read_history(tmp_path) == []


def test_save_model_is_atomic_and_loadable(tmp_path):
    model = build_model("default", 16, 2, architecture={"filters": [4]})
    target = training.save_model(model, tmp_path / "model.keras")
    assert target.is_file() and not list(tmp_path.glob(".tmp-*"))
    assert keras.saving.load_model(target, safe_mode=True).output_shape == (None, 2)


def test_critical_preflight_finding_skips_training(tmp_path, digits_data):
    """A model that cannot learn (no softmax before a probability loss) is not trained."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(x))  # linear outputs, loss expects probabilities
    train, val = _datasets(digits_data)
    logs: list[str] = []
    vx, vy = digits_data[2], digits_data[3]
    result = training.fit_model(model, train, val, tmp_path, TrainOptions(epochs=3), [55, 55, 55],
                                probe=(vx[:32], vy[:32]), log=logs.append)
    assert result["epochs_run"] == 0 and result["diagnosis"]["healthy"] is False
    codes = {f["code"] for f in result["diagnosis"]["findings"] if f["severity"] == "critical"}
    assert "bad_output_activation" in codes
    assert any("not training" in line for line in logs)
    assert training.read_json(tmp_path / "diagnosis.json")["healthy"] is False
    assert training.read_history(tmp_path) == []  # the model folder still has its history.csv: no epochs


# ----------------------------------------------------------------------------- determinism and resume


def _seeded_fit(run_dir, data, epochs, extra_callbacks=None, augment=True):
    """One training as a fresh process would run it: seeds, new datasets, a new model."""
    from imgflow.tasks.resume import enable_determinism

    assert enable_determinism(11, on_gpu=False) is True
    train, val = _datasets(data)
    model = build_model("default", 32, 3, augment=augment, seed=11)
    options = TrainOptions(epochs=epochs, early_stopping_patience=10, augment=augment, seed=11)
    vx, vy = data[2], data[3]
    result = training.fit_model(model, train, val, run_dir, options, [55, 55, 55], probe=(vx[:32], vy[:32]),
                                log=lambda _: None, extra_callbacks=extra_callbacks)
    return model, result


def _max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a.get_weights(), b.get_weights()))


def test_same_seed_gives_identical_weights_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path, digits_data
):
    """CPU + op determinism + the same seed: bit-identical weights, interrupted or not (augmentation on)."""
    first, first_result = _seeded_fit(tmp_path / "a", digits_data, 4)
    second, _ = _seeded_fit(tmp_path / "b", digits_data, 4)
    assert _max_abs_diff(first, second) == 0.0
    assert all(np.array_equal(x, y) for x, y in zip(first.get_weights(), second.get_weights()))

    with pytest.raises(RuntimeError, match="worker lost"):
        _seeded_fit(tmp_path / "c", digits_data, 4, extra_callbacks=[_Crash(2)])
    resumed, resumed_result = _seeded_fit(tmp_path / "c", digits_data, 4)
    assert resumed_result["resumed"] and resumed_result["initial_epoch"] == 2
    assert _max_abs_diff(first, resumed) == 0.0
    history_a = training.read_history(tmp_path / "a")
    history_c = training.read_history(tmp_path / "c")
    for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert [r[column] for r in history_c] == [r[column] for r in history_a], column
    assert resumed_result["best_epoch"] == first_result["best_epoch"]
    assert (tmp_path / "c" / "checkpoints" / "best.weights.h5").read_bytes() != b""
# ----------------------------------------------------------------------------- learning-rate finder


def test_pick_learning_rate_from_a_range_test_curve():
    from imgflow.tasks.lr_finder import pick_learning_rate, smooth

    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    # a textbook curve: flat, falling steeply around 1e-3, lowest at ~1e-2, then exploding
    losses = [2.0 - 1.5 / (1 + math.exp(-4 * (math.log10(lr) + 3))) + (50 * (lr - 0.01) if lr > 0.01 else 0)
              for lr in lrs]
    pick = pick_learning_rate(lrs, losses)
    assert 5e-3 < pick["min_loss_lr"] < 2e-2
    assert 5e-4 < pick["steepest_lr"] < 2e-3
    assert pick["suggested"] == pytest.approx(max(pick["min_loss_lr"], pick["steepest_lr"]) / 10)
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected from the first step
    assert pick_learning_rate(lrs[:6], losses[:6])["suggested"] is None


def test_learning_rate_auto_runs_a_range_test_and_records_the_pick(tmp_path, digits_data):
    keras.utils.set_random_seed(6)
    train, val = _datasets(digits_data)
    model = build_model("default", 32, 3, augment=False)
    before = [w.copy() for w in model.get_weights()]
    logs: list[str] = []
    options = TrainOptions(epochs=1, learning_rate="auto")
    result = training.fit_model(model, train, val, tmp_path, options, [55, 55, 55], log=logs.append,
                                probe=(digits_data[2][:32], digits_data[3][:32]))
    finder = result["lr_finder"]
    lr_range = [f for f in result["diagnosis"]["findings"] if f["code"] == "lr_range"]
    assert len(lr_range) == 1 and lr_range[0]["evidence"]["suggested_lr"] == pytest.approx(finder["suggested"], rel=5e-3)  # 3 digits
    assert 1e-6 < finder["suggested"] < 1.0 and result["learning_rate"] == finder["suggested"]
    assert 10 <= finder["steps"] <= 100
    assert (tmp_path / "lr_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert training.read_json(tmp_path / "lr_finder.json")["suggested"] == finder["suggested"]
    assert any(line.startswith("learning_rate auto: range test over") for line in logs)
    # the sweep trained a copy: the model started its real training from its own initial weights
    assert float(model.optimizer.iterations) == len(list(train))
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # and then trained


def test_only_a_built_in_model_is_handed_to_the_next_steps_unread(tmp_path, shapes_dir, monkeypatch):
    """A user builder's model is read back in safe mode: one it refuses (a Lambda layer) stops the run."""
    import textwrap

    from imgflow.tasks import registry, tfrecords
    from imgflow.tasks.dataset import validate_dataset
    from imgflow.tasks.options import PreprocessOptions
    from imgflow.tasks.records import read_manifest

    (tmp_path / "lambda_builder.py").write_text(textwrap.dedent("""
        import keras

        def build(input_shape, num_classes):
            inputs = keras.Input(shape=input_shape)
            x = keras.layers.Lambda(lambda t: t / 255.0)(inputs)
            x = keras.layers.Flatten()(x)
            return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    prep = tfrecords.preprocess(validate_dataset(shapes_dir), PreprocessOptions(image_size=16, val_fraction=0.25),
                                tmp_path / "shards")
    try:
        for model, handed_over in (("default", True), ("lambda_builder:build", False)):
            run = tmp_path / model.replace(":", "-")
            registry.forget_saved_model()
            summary = training.train_from_manifest(prep["manifest"], run, TrainOptions(model=model, epochs=1, batch_size=8),
                                                   log=lambda _: None)
            assert bool(registry._saved_model) is handed_over, model
            registry.write_metadata(run, registry.build_metadata(run.name, summary, read_manifest(prep["manifest"]),
                                                                 prep["manifest"], {}, {}, shapes_dir))
            if not handed_over:
                with pytest.raises(registry.RegistryError, match="cannot be loaded safely"):
                    registry.load_model_dir(run)
    finally:
        registry.forget_saved_model()
