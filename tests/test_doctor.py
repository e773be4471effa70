"""Training doctor: each failure reproduced on real digits with a tiny model that has exactly it.

The models follow the user reports imgflow exists for: raw 0-255 inputs with SGD, a ReLU
output layer with Adam, a head with the wrong number of units, and the healthy variant
(``Rescaling(1/255)`` + softmax). 32 px images, a few epochs each.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from imgflow.tasks import doctor  # noqa: E402
from tests.imagefactory import digit_images  # noqa: E402

K = 3

# These reproductions follow TensorFlow's training dynamics: its cross-entropy takes the
# logits behind a softmax head, so raw inputs overflow to NaN with SGD and still train with
# Adam. On JAX (probabilities clipped instead) the same models fail differently; the
# doctor's checks themselves run on JAX (test_checks_run_on_the_jax_backend).
tf_dynamics = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow training dynamics")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """120 real digits 0/1/7 (labels 0/1/2), raw 0-255 uint8, shuffled."""
    labels = {0: 0, 1: 1, 7: 2}
    pairs = digit_images(labels, per_class=40)
    x = np.stack([p for _, p in pairs])
    y = np.array([labels[d] for d, _ in pairs], dtype="int32")
    order = np.random.default_rng(0).permutation(len(y))
    return x[order], y[order]


def _cnn(head: str = "softmax", rescale: bool = False, units: int = K, pool: bool = True, seed: int = 0):
    """The user's style of network, small: conv-relu x2 [-> pool] -> dense -> head."""
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((32, 32, 3))]
    if rescale:
        layers.append(keras.layers.Rescaling(1 / 255))
    layers += [keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.Conv2D(16, 3, activation="relu")]
    if pool:
        layers += [keras.layers.MaxPooling2D(), keras.layers.MaxPooling2D()]
    layers += [keras.layers.Flatten(), keras.layers.Dense(128 if not pool else 32, activation="relu"),
               keras.layers.Dense(units, activation=head)]
    return keras.Sequential(layers)


def _compile(model, optimizer):
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _fit(model, digits, epochs: int):
    x, y = digits
    monitor = doctor.DoctorMonitor(x[-48:], y[-48:], K, [40, 40, 40])
    history = model.fit(x.astype("float32"), y, epochs=epochs, batch_size=16, verbose=0, callbacks=[monitor])
    return monitor, history


def _codes(findings, severity=None):
    return {f["code"] for f in findings if severity is None or f["severity"] == severity}


def _get(findings, code):
    matches = [f for f in findings if f["code"] == code]
    assert matches, f"no {code} in {[f['code'] for f in findings]}"
    return matches[0]


# ----------------------------------------------------------------------------- failures


@tf_dynamics
def test_raw_inputs_with_sgd_nan_loss_stops_at_once_and_names_unnormalized_input(digits):
    x, y = digits
    model = _compile(_cnn(pool=False), keras.optimizers.SGD(0.01))
    pre = doctor.preflight(model, x[:32], y[:32], K)
    unnorm = _get(pre, "unnormalized_input")
    assert unnorm["severity"] == "warning"
    assert unnorm["evidence"]["input_max"] == 255.0 and unnorm["evidence"]["input_min"] == 0.0
    assert unnorm["layer"] == model.layers[0].name and model.layers[0].name in unnorm["advice"]
    assert "Rescaling(1/255)" in unnorm["advice"]
    assert _get(pre, "initial_loss_high")["evidence"]["ratio"] > 3

    monitor, history = _fit(model, digits, epochs=5)
    nan = _get(monitor.findings, "nan_loss")
    assert nan["severity"] == "critical"
    assert nan["evidence"]["epoch"] == 1
    assert len(history.history["loss"]) == 1  # stopped in the first epoch, not after 5
    assert model.stop_training is True

    diagnosis = doctor.diagnose(pre + monitor.findings)
    assert diagnosis["healthy"] is False
    # training failed, so the raw inputs are part of the explanation: critical, listed first
    first = diagnosis["findings"][0]
    assert first["code"] == "unnormalized_input" and first["severity"] == "critical"
    assert first["evidence"]["training_failed"] == 1
    json.dumps(diagnosis, allow_nan=False)  # NaN never reaches the JSON


@tf_dynamics
def test_raw_inputs_that_still_train_keep_unnormalized_input_a_warning(digits):
    x, y = digits
    model = _compile(_cnn(), keras.optimizers.Adam(1e-3))
    pre = doctor.preflight(model, x[:32], y[:32], K)
    monitor, history = _fit(model, digits, epochs=4)
    assert history.history["accuracy"][-1] > 0.9
    diagnosis = doctor.diagnose(pre + monitor.findings)
    assert diagnosis["healthy"] is True
    assert _get(diagnosis["findings"], "unnormalized_input")["severity"] == "warning"


@tf_dynamics
def test_relu_head_with_adam_bad_output_activation_and_collapse(digits):
    x, y = digits
    model = _compile(_cnn(head="relu"), keras.optimizers.Adam(1e-3))
    head = model.layers[-1].name
    pre = doctor.preflight(model, x[:32], y[:32], K)
    bad = _get(pre, "bad_output_activation")
    assert bad["severity"] == "critical" and bad["layer"] == head
    assert bad["evidence"]["zero_output_fraction"] >= 0.05
    assert head in bad["advice"] and "softmax" in bad["advice"]

    monitor, history = _fit(model, digits, epochs=8)
    assert len(history.history["loss"]) < 8  # stopped once the evidence was in
    critical = _codes(monitor.findings, "critical")
    assert "single_class_collapse" in critical
    assert critical & {"loss_at_chance", "loss_frozen"}
    collapse = _get(monitor.findings, "single_class_collapse")
    assert collapse["evidence"]["top_class_share"] >= 0.95
    assert collapse["evidence"]["epochs"] >= 3
    diagnosis = doctor.diagnose(pre + monitor.findings)
    assert diagnosis["healthy"] is False
    assert diagnosis["findings"][0]["code"] == "bad_output_activation"


def test_wrong_output_units(digits):
    x, y = digits
    model = _compile(_cnn(rescale=True, units=5), keras.optimizers.Adam(1e-3))
    finding = _get(doctor.preflight(model, x[:32], y[:32], K), "output_units_mismatch")
    assert finding["severity"] == "critical"
    assert finding["evidence"] == {"output_units": 5, "num_classes": 3}
    assert "Dense(3, activation='softmax')" in finding["advice"]


def test_sigmoid_head_is_a_warning_and_linear_head_critical(digits):
    x, y = digits
    sigmoid = _compile(_cnn(head="sigmoid", rescale=True), "adam")
    finding = _get(doctor.preflight(sigmoid, x[:32], y[:32], K), "bad_output_activation")
    assert finding["severity"] == "warning"
    assert abs(finding["evidence"]["row_sum_mean"] - 1.0) > 0.01
    linear = _compile(_cnn(head=None, rescale=True, seed=1), "adam")
    finding = _get(doctor.preflight(linear, x[:32], y[:32], K), "bad_output_activation")
    assert finding["severity"] == "critical" and finding["evidence"]["output_min"] < 0
    # a linear head is right when the loss takes logits
    logits = _cnn(head=None, rescale=True, seed=1)
    logits.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert "bad_output_activation" not in _codes(doctor.preflight(logits, x[:32], y[:32], K))


def test_healthy_model_has_no_critical_finding(digits):
    x, y = digits
    model = _compile(_cnn(rescale=True), keras.optimizers.Adam(1e-3))
    pre = doctor.preflight(model, x[:32], y[:32], K, overfit_steps=15)
    assert pre == []
    monitor, history = _fit(model, digits, epochs=4)
    assert history.history["accuracy"][-1] > 0.95
    diagnosis = doctor.diagnose(pre + monitor.findings)
    assert diagnosis["healthy"] is True
    assert not _codes(diagnosis["findings"], "critical")
    assert monitor.epoch_records[-1]["top_class_share"] < 0.6
    assert monitor.epoch_records[-1]["probe_accuracy"] > 0.9


def test_cannot_overfit_batch_when_nothing_can_move(digits):
    x, y = digits
    model = _compile(_cnn(rescale=True), keras.optimizers.SGD(learning_rate=1e-9))
    finding = _get(doctor.preflight(model, x[:32], y[:32], K, overfit_steps=5), "cannot_overfit_batch")
    assert finding["severity"] == "critical"
    assert finding["evidence"]["relative_drop"] < 0.02
    before = [w.copy() for w in model.get_weights()]
    doctor.preflight(model, x[:32], y[:32], K, overfit_steps=3)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the model is untouched


def test_dead_relu_layer_is_named(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
        keras.layers.Dense(8, activation="relu", name="alive"),
        keras.layers.Dense(16, activation="relu", bias_initializer=keras.initializers.Constant(-100.0), name="hidden"),
        keras.layers.Dense(K, activation="softmax"),
    ])
    _compile(model, "adam")
    monitor, _ = _fit(model, digits, epochs=3)
    dead = [f for f in monitor.findings if f["code"] == "dead_relu"]
    assert [f["layer"] for f in dead] == ["hidden"]
    assert dead[0]["evidence"]["dead_fraction"] == 1.0 and dead[0]["evidence"]["units"] == 16
    assert "hidden" in dead[0]["advice"]
    assert dead[0]["severity"] == "critical"


def test_labels_checks():
    images = np.zeros((12, 32, 32, 3), "uint8")
    model = _compile(_cnn(rescale=True), "adam")
    bad = _get(doctor.preflight(model, images, np.full(12, 4), K), "labels_out_of_range")
    assert bad["severity"] == "critical" and bad["evidence"]["label_max"] == 4
    skew = _get(doctor.preflight(model, images, np.zeros(12, "int32"), K), "batch_label_skew")
    assert skew["severity"] == "warning" and skew["evidence"]["classes_in_batch"] == 1


# ----------------------------------------------------------------------------- monitor logic on recorded logs


class _Stub:
    """Just enough of a model for the callback's epoch logic (no probe images)."""

    stop_training = False
    optimizer = None


def _replay(losses, accuracy=None, val_losses=None, counts=(40, 40, 40), patience=3):
    monitor = doctor.DoctorMonitor(np.zeros((0, 32, 32, 3)), np.zeros(0, "int32"), K, list(counts), patience=patience)
    monitor.set_model(_Stub())
    for epoch, loss in enumerate(losses):
        logs = {"loss": loss}
        if accuracy is not None:
            logs["accuracy"] = accuracy[epoch]
        if val_losses is not None:
            logs["val_loss"] = val_losses[epoch]
        monitor.on_epoch_end(epoch, logs)
    return monitor


def test_loss_at_chance_needs_the_evidence_of_several_epochs():
    chance = math.log(3)
    two = _replay([chance + 0.003, chance - 0.002])
    assert "loss_at_chance" not in _codes(two.findings) and not two.model.stop_training
    three = _replay([chance + 0.003, chance - 0.002, chance + 0.001])
    finding = _get(three.findings, "loss_at_chance")
    assert finding["severity"] == "critical" and finding["evidence"]["epochs"] == 3
    assert three.model.stop_training is True
    # the same number of epochs at a loss well away from ln(3) is not chance
    assert "loss_at_chance" not in _codes(_replay([1.3, 1.2, 1.25]).findings)


def test_majority_class_only_uses_the_class_shares():
    imbalanced = (80, 10, 10)  # majority share 0.8
    stuck = _replay([0.7, 0.69, 0.68], accuracy=[0.8, 0.8, 0.8], counts=imbalanced)
    finding = _get(stuck.findings, "majority_class_only")
    assert finding["severity"] == "critical" and finding["evidence"]["majority_share"] == 0.8
    # 80% accuracy on balanced data is not "majority only"
    assert "majority_class_only" not in _codes(_replay([0.7, 0.6, 0.5], accuracy=[0.8, 0.8, 0.8]).findings)


def test_overfitting_is_a_warning_and_never_stops():
    monitor = _replay([1.0, 0.7, 0.5, 0.3, 0.2], accuracy=[0.5, 0.7, 0.8, 0.9, 0.95],
                      val_losses=[0.9, 0.8, 0.85, 0.9, 1.0])
    finding = _get(monitor.findings, "overfitting")
    assert finding["severity"] == "warning"
    assert finding["evidence"]["best_epoch"] == 2 and finding["evidence"]["val_loss"] == 1.0
    assert monitor.model.stop_training is False
    assert "overfitting" not in _codes(_replay([1.0, 0.7, 0.5, 0.3, 0.2], val_losses=[0.9, 0.8, 0.7, 0.6, 0.5]).findings)


def test_learning_rate_hints_from_the_loss_curve():
    rising = _replay([0.8, 0.5, 0.9], accuracy=[0.6, 0.7, 0.6])
    high = _get(rising.findings, "learning_rate_too_high")
    assert high["severity"] == "warning" and high["evidence"]["ratio"] == pytest.approx(1.8)
    slow = _replay([1.05, 1.045, 1.04, 1.035], accuracy=[0.4, 0.41, 0.42, 0.43])
    assert _get(slow.findings, "learning_rate_too_low")["severity"] == "info"


def test_frozen_loss_with_real_learning_is_only_a_plateau_warning():
    frozen = _replay([0.5, 0.5, 0.5, 0.5], accuracy=[0.34, 0.34, 0.34, 0.34])
    assert _get(frozen.findings, "loss_frozen")["severity"] == "critical"
    plateau = _replay([0.5, 0.5, 0.5, 0.5], accuracy=[0.85, 0.85, 0.85, 0.85])
    assert _get(plateau.findings, "loss_frozen")["severity"] == "warning"
    assert plateau.model.stop_training is False


# ----------------------------------------------------------------------------- diagnosis


def test_diagnose_deduplicates_sorts_and_writes(tmp_path):
    findings = [
        doctor.make_finding("overfitting", "warning", {"val_loss": 1.0}, "w"),
        doctor.make_finding("single_class_collapse", "warning", {"top_class_share": 0.96}, "early"),
        doctor.make_finding("single_class_collapse", "critical", {"top_class_share": 1.0}, "late"),
        doctor.make_finding("bad_output_activation", "warning", {"row_sum_mean": 1.4}, "sigmoid", layer="out"),
        doctor.make_finding("learning_rate_too_low", "info", {"learning_rate": 1e-5}, "i"),
        doctor.make_finding("nan_loss", "critical", {"last_finite_loss": float("nan")}, "n"),
    ]
    diagnosis = doctor.diagnose(findings)
    assert diagnosis["healthy"] is False
    assert [f["code"] for f in diagnosis["findings"]] == [
        "bad_output_activation", "nan_loss", "single_class_collapse", "overfitting", "learning_rate_too_low"]
    assert [f["severity"] for f in diagnosis["findings"]] == ["critical", "critical", "critical", "warning", "info"]
    assert _get(diagnosis["findings"], "single_class_collapse")["advice"] == "late"
    assert _get(diagnosis["findings"], "nan_loss")["evidence"]["last_finite_loss"] is None

    path = doctor.write_diagnosis(tmp_path / "run" / "diagnosis.json", diagnosis)
    loaded = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert loaded == diagnosis
    assert not list(path.parent.glob(".tmp-*"))

    markdown = doctor.findings_markdown(diagnosis)
    assert "**unhealthy** (3 critical, 1 warning, 1 info)" in markdown
    assert "| critical | `bad_output_activation` | row_sum_mean=1.4, training_failed=1 |" in markdown
    assert doctor.summary_lines(diagnosis, limit=2)[0].startswith("CRITICAL bad_output_activation: likely root cause")

    healthy = doctor.diagnose([doctor.make_finding("overfitting", "warning", {"val_loss": 1.0}, "w")])
    assert healthy["healthy"] is True
    assert "Status: healthy" in doctor.findings_markdown(healthy)


def test_make_finding_rejects_unknown_severity():
    with pytest.raises(ValueError, match="severity"):
        doctor.make_finding("x", "fatal", {}, "advice")


# ----------------------------------------------------------------------------- other backend


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_checks_run_on_the_jax_backend(tmp_path):
    script = textwrap.dedent(
        """
        import json, numpy as np, keras
        assert keras.backend.backend() == "jax"
        from imgflow.tasks import doctor
        from tests.imagefactory import digit_images
        pairs = digit_images([0, 1, 7], per_class=20)
        x = np.stack([p for _, p in pairs]); y = np.array([{0: 0, 1: 1, 7: 2}[d] for d, _ in pairs])
        model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(8, 3, activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(3, activation="relu")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        pre = doctor.preflight(model, x, y, 3)
        monitor = doctor.DoctorMonitor(x[:30], y[:30], 3, [20, 20, 20])
        model.fit(x.astype("float32"), y, epochs=2, batch_size=16, verbose=0, callbacks=[monitor])
        print(json.dumps(doctor.diagnose(pre + monitor.findings)))
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    diagnosis = json.loads(done.stdout.strip().splitlines()[-1])
    codes = {f["code"]: f["severity"] for f in diagnosis["findings"]}
    assert codes["bad_output_activation"] == "critical"
    assert "unnormalized_input" in codes


# ----------------------------------------------------------------------------- flow and command


def relu_head_builder(input_shape, num_classes):
    """A user builder in the style of the original report: raw inputs and a ReLU output layer."""
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(num_classes, activation="relu", name="user_head"),
    ])


def healthy_builder(input_shape, num_classes):
    """The same network done right: Rescaling(1/255) first and a softmax head."""
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])


def test_doctor_flow_on_a_healthy_user_model(prefect_server, digits_dir, tmp_path):
    from imgflow.flows.config import ImgflowConfig
    from imgflow.flows.doctor import doctor_flow

    config = ImgflowConfig.from_flat({"image_size": 32, "batch_size": 16, "seed": 1})
    result = doctor_flow("tests.test_doctor:healthy_builder", digits_dir, workdir=tmp_path / "w", config=config,
                         epochs=3, overfit_steps=10)
    assert result["healthy"] is True
    assert not [f for f in result["findings"] if f["severity"] == "critical"]
    assert result["epochs_run"] == 3
    assert result["history"]["accuracy"][-1] > 0.9
    saved = json.loads(Path(result["diagnosis_path"]).read_text())
    assert saved == {"healthy": True, "findings": result["findings"]}
    assert Path(result["markdown_path"]).read_text().startswith("## Training diagnosis")
    assert Path(result["diagnosis_path"]).parent.parent == tmp_path / "w" / "doctor"


def test_doctor_command_exits_1_and_names_the_relu_head(prefect_server, digits_dir, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    result = CliRunner().invoke(app, ["doctor", "tests.test_doctor:relu_head_builder", str(digits_dir),
                                      "--workdir", str(tmp_path / "w"), "--image-size", "32"])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert "bad_output_activation" in last and "user_head" in last
    saved = json.loads(next((tmp_path / "w" / "doctor").glob("*/diagnosis.json")).read_text())
    assert saved["healthy"] is False
    codes = {f["code"]: f["severity"] for f in saved["findings"]}
    assert codes["bad_output_activation"] == "critical"
    assert "unnormalized_input" in codes


# ----------------------------------------------------------------------------- monitor records


def test_monitor_records_per_class_predictions_and_reports_a_class_never_predicted():
    """A fixed model that tells classes 0 and 1 apart but never answers 2: the monitor's
    probe record carries the per-class counts and the end-of-run rule names the class."""
    from imgflow.tasks.doctor import RunFacts

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(K, activation="softmax", name="head")])
    model.layers[-1].set_weights([np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], "float32"),
                                  np.array([0.0, 0.0, -50.0], "float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    x = np.array([[1, 0]] * 15 + [[0, 1]] * 15 + [[0.6, 0.4]] * 12, "float32")
    y = np.array([0] * 15 + [1] * 15 + [2] * 12, "int32")
    monitor = doctor.DoctorMonitor(x, y, K, {"cats": 40, "dogs": 40, "owls": 40}, static_checks=False,
                                   facts=RunFacts(batch_size=16))
    monitor.set_model(model)
    monitor.on_train_begin()
    for epoch, acc in enumerate([0.55, 0.62, 0.66]):
        monitor.on_epoch_end(epoch, {"loss": 0.9 - 0.1 * epoch, "accuracy": acc})
    assert "class_never_predicted" not in _codes(monitor.findings)  # judged when the run ends
    record = monitor.epoch_records[-1]
    assert record["pred_counts"] == [27, 15, 0] and record["label_counts"] == [15, 15, 12]
    assert record["class_hits"] == [15, 15, 0] and record["lr"] == pytest.approx(0.01)
    monitor.on_train_end()
    finding = _get(monitor.findings, "class_never_predicted")
    assert finding["severity"] == "warning" and finding["evidence"]["class_index"] == 2
    assert finding["evidence"]["predicted"] == 0 and finding["evidence"]["probe_images"] == 12
    assert "'owls' (class 2)" in finding["advice"]
    # the facts read off the model at train begin, with those given
    facts = monitor.thresholds.facts
    assert (facts.optimizer, facts.learning_rate, facts.head_activation, facts.batch_size) == ("sgd", pytest.approx(0.01), "softmax", 16)
    assert facts.input_scaling is False and facts.class_names == ("cats", "dogs", "owls")
    assert "underfitting" in _codes(monitor.findings)  # 66% and rising 5.5% an epoch at the end


def test_model_facts_of_a_builtin_model_keep_rescaling_and_softmax_out_of_the_advice(digits):
    from imgflow.tasks.models import build_model, compile_model

    model = compile_model(build_model("default", 32, K, augment=False, seed=0), "adam", 0.5)
    facts = doctor.model_facts(model, K, batch_size=32, class_counts=[40, 40, 40])
    assert facts.input_scaling is True and facts.scaling_layer == "rescale"
    assert (facts.head_activation, facts.head_layer, facts.from_logits) == ("softmax", "predictions", False)
    assert facts.optimizer == "adam" and facts.learning_rate == pytest.approx(0.5) and facts.lr_ratio == pytest.approx(500)
    x, y = digits
    assert doctor.preflight(model, x[:32], y[:32], K, facts=facts) == []


def test_model_facts_see_through_the_mixed_precision_loss_scale_optimizer():
    from imgflow.tasks.models import build_model, compile_model

    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = compile_model(build_model("default", 32, K, augment=False, seed=0), "sgd", 0.02)
    finally:
        keras.config.set_dtype_policy(previous)
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    facts = doctor.model_facts(model, K)
    assert facts.optimizer == "sgd" and facts.learning_rate == pytest.approx(0.02) and facts.lr_ratio == pytest.approx(2)
