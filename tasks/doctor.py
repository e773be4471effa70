"""Training doctor: preflight checks, training monitors and a diagnosis in words and numbers.

The classic failure this module exists for: a CNN on a 3-class folder dataset "stuck at
33.33% accuracy, predicting only one class". The usual root causes are raw 0-255 pixels
reaching the first conv/dense layer (exploding activations, NaN loss with SGD), an output
layer whose activation does not produce probabilities (a ReLU head gives all-zero outputs
and zero gradient), or an output layer with the wrong number of units. Each check here
measures something on real data and reports the numbers (``evidence``) with a sentence
that names the layer and the fix (``advice``).

Everything is Keras 3 and NumPy (``keras.ops`` for the maths on model outputs), so the
same checks run on the TensorFlow and JAX backends.

A finding is ``{"code", "severity": critical|warning|info, "evidence": {name: number},
"advice": str}`` plus, where one layer is concerned, ``"layer": name``. A diagnosis is
``{"healthy": bool, "findings": [...]}`` (see :func:`diagnose`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from imgflow.tasks.atomic import write_json
from imgflow.tasks.inference import predict_outputs

SEVERITIES = ("critical", "warning", "info")

# Root causes are listed before the symptoms they explain (same severity): a reader sees
# "bad_output_activation" above the "single_class_collapse" it caused.
CODE_ORDER = (
    "labels_out_of_range",
    "output_units_mismatch",
    "bad_output_activation",
    "unnormalized_input",
    "initial_loss_high",
    "cannot_overfit_batch",
    "nan_loss",
    "dead_relu",
    "loss_frozen",
    "loss_at_chance",
    "single_class_collapse",
    "majority_class_only",
    "learning_rate_too_high",
    "learning_rate_too_low",
    "overfitting",
    "batch_label_skew",
    "overfit_check_skipped",
)

# Codes that mean "this training run did not learn"; when one of them is critical, the
# preflight warnings that explain it (raw inputs, sigmoid head) become part of the failure.
FAILURE_CODES = frozenset(
    {"nan_loss", "loss_at_chance", "single_class_collapse", "majority_class_only", "loss_frozen", "cannot_overfit_batch"}
)
ROOT_CAUSE_CODES = frozenset({"unnormalized_input", "bad_output_activation", "initial_loss_high", "dead_relu"})

_NORMALIZING_LAYERS = ("Rescaling", "Normalization", "BatchNormalization", "LayerNormalization", "GroupNormalization")


# --------------------------------------------------------------------------- helpers


def _number(value: Any) -> float | int | None:
    """A JSON-safe number: numpy scalars become Python numbers, NaN/inf become None."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, 6)


def make_finding(
    code: str, severity: str, evidence: Mapping[str, Any], advice: str, layer: str | None = None
) -> dict[str, Any]:
    """Build one finding dict with JSON-safe evidence numbers.

    Args:
        code: stable identifier such as ``nan_loss``.
        severity: ``critical``, ``warning`` or ``info``.
        evidence: the measured numbers the finding rests on (non-finite values become null).
        advice: one sentence a person can act on, naming the layer and the fix.
        layer: the layer concerned, if any.

    Returns:
        The finding: ``{"code", "severity", "evidence", "advice"}`` (+ ``"layer"``).
    """
    if severity not in SEVERITIES:
        raise ValueError(f"finding {code!r}: severity must be one of {SEVERITIES}, got {severity!r}")
    out: dict[str, Any] = {
        "code": code,
        "severity": severity,
        "evidence": {str(k): _number(v) for k, v in evidence.items()},
        "advice": advice,
    }
    if layer is not None:
        out["layer"] = layer
    return out


def chance_loss(num_classes: int) -> float:
    """Cross-entropy of a uniform guess over ``num_classes`` classes: ln(K)."""
    return math.log(max(int(num_classes), 2))


def _to_numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


def _as_images(images: Any) -> np.ndarray:
    return _to_numpy(images).astype("float32")


def _as_labels(labels: Any) -> np.ndarray:
    arr = _to_numpy(labels)
    if arr.ndim > 1 and arr.shape[-1] > 1:  # one-hot labels
        arr = arr.argmax(axis=-1)
    return arr.reshape(-1).astype("int64")


def _activation_name(layer: Any) -> str | None:
    """Name of the activation a layer applies (``relu``, ``softmax``...), or None."""
    cls = type(layer).__name__
    if cls == "ReLU":
        return "relu"
    if cls == "Softmax":
        return "softmax"
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    name = getattr(act, "__name__", None) or type(act).__name__
    return str(name).lower()


def _output_layer(model: Any) -> Any:
    """The last layer of a model (descending into a nested model at the end)."""
    layers = getattr(model, "layers", None) or []
    if not layers:
        return model
    last = layers[-1]
    # an Activation/Softmax layer after a linear Dense is the head's activation
    if getattr(last, "layers", None):
        return _output_layer(last)
    return last


def _head_activation(model: Any) -> tuple[str | None, str]:
    """(activation name, layer name) of the model's output: a trailing Activation/Softmax
    layer counts, otherwise the activation of the last layer."""
    last = _output_layer(model)
    return _activation_name(last), getattr(last, "name", "output")


def _loss_from_logits(model: Any) -> bool:
    """Whether the model's compiled loss expects logits (False when not compiled)."""
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, str):
        return False
    flag = getattr(loss, "from_logits", None)
    if flag is None:
        try:
            flag = loss.get_config().get("from_logits")
        except Exception:  # a plain function or a custom loss without config
            flag = None
    return bool(flag)


def _model_inputs(model: Any) -> Any:
    """The model's symbolic inputs: one tensor for a single-input model (so a plain
    array can be fed without a structure warning), the list otherwise."""
    inputs = model.inputs
    return inputs[0] if len(inputs) == 1 else inputs


def _first_weighted_input(model: Any, images: np.ndarray) -> tuple[str, np.ndarray, bool] | None:
    """Find the first layer with trainable weights and the values that reach it.

    Returns:
        (layer name, input values, normalizing) where ``normalizing`` says the layer
        itself normalises (BatchNormalization...), or None when the model cannot be traced.
    """
    layers = list(getattr(model, "layers", None) or [])
    for layer in layers:
        if not layer.trainable_weights:
            continue
        normalizing = type(layer).__name__ in _NORMALIZING_LAYERS
        try:
            if layer is layers[0]:
                values = images
            else:
                probe = keras.Model(_model_inputs(model), layer.input)
                values = predict_outputs(probe, images)[0]
        except Exception:
            return None
        if getattr(layer, "layers", None) and not normalizing:  # a nested model: look inside it
            inner = _first_weighted_input(layer, values)
            return inner if inner is not None else (layer.name, values, False)
        return layer.name, values, normalizing
    return None


def _has_rescaling(model: Any) -> bool:
    for layer in getattr(model, "layers", None) or []:
        if type(layer).__name__ in _NORMALIZING_LAYERS or _has_rescaling(layer):
            return True
    return False


# --------------------------------------------------------------------------- static checks


def check_input_range(model: Any, images: Any) -> list[dict[str, Any]]:
    """``unnormalized_input``: the value range reaching the first trainable layer.

    Raw 0-255 pixels reaching a conv/dense layer make activations and logits hundreds of
    times too large; SGD then diverges (NaN) and even Adam starts far from chance.
    """
    x = _as_images(images)
    traced = _first_weighted_input(model, x)
    if traced is None:
        if _has_rescaling(model):
            return []
        layer_name, values, normalizing = "the first layer", x, False
    else:
        layer_name, values, normalizing = traced
    if normalizing:
        return []
    values = values.astype("float64")
    lo, hi = float(values.min()), float(values.max())
    std, absmax = float(values.std()), max(abs(lo), abs(hi))
    if std <= 3.0 and absmax <= 20.0:
        return []
    return [
        make_finding(
            "unnormalized_input",
            "warning",
            {"input_min": lo, "input_max": hi, "input_mean": float(values.mean()), "input_std": std},
            f"inputs reach {layer_name} in [{lo:.0f}, {hi:.0f}] (std {std:.1f}); add `Rescaling(1/255)` "
            "as the first layer of the model (or use a built-in model, which has it) so it sees values in [0, 1]",
            layer=layer_name,
        )
    ]


def check_output_layer(model: Any, outputs: np.ndarray, num_classes: int) -> list[dict[str, Any]]:
    """``output_units_mismatch`` and ``bad_output_activation`` from the model's real outputs."""
    findings: list[dict[str, Any]] = []
    activation, head = _head_activation(model)
    units = int(outputs.shape[-1]) if outputs.ndim >= 2 else 1
    if units != num_classes:
        findings.append(
            make_finding(
                "output_units_mismatch",
                "critical",
                {"output_units": units, "num_classes": num_classes},
                f"the output layer {head} has {units} units but the data has {num_classes} classes; "
                f"end the model with `Dense({num_classes}, activation='softmax')`",
                layer=head,
            )
        )
    from_logits = _loss_from_logits(model)
    flat = outputs.reshape(len(outputs), -1).astype("float64")
    row_sums = flat.sum(axis=1)
    sum_dev = float(np.abs(row_sums - 1.0).mean())
    out_min, out_max = float(flat.min()), float(flat.max())
    zero_frac = float((flat <= 0.0).mean())
    zero_rows = float((row_sums <= 0.0).mean())
    evidence = {
        "row_sum_mean": float(row_sums.mean()),
        "row_sum_deviation": sum_dev,
        "output_min": out_min,
        "output_max": out_max,
        "zero_output_fraction": zero_frac,
        "zero_row_fraction": zero_rows,
        "loss_from_logits": int(from_logits),
    }
    act = activation or "linear"
    if from_logits:
        # logits expected: a softmax/sigmoid head squashes them a second time
        if out_min >= 0.0 and out_max <= 1.0 and sum_dev < 0.01:
            findings.append(
                make_finding(
                    "bad_output_activation",
                    "warning",
                    evidence,
                    f"the output layer {head} already outputs probabilities (rows sum to {row_sums.mean():.3f}) "
                    "but the loss has from_logits=True; use a linear head with from_logits=True, "
                    "or a softmax head with from_logits=False",
                    layer=head,
                )
            )
        return findings
    if not np.all(np.isfinite(flat)):
        return findings  # nan/inf outputs are reported by the loss checks
    # rows of non-negative outputs that sum to 1 are probabilities (a softmax head), even
    # when saturated logits round some of them to 0: initial_loss_high reports that case
    if out_min < 0.0 or (sum_dev >= 0.01 and zero_frac >= 0.05):
        why = (
            f"{zero_frac:.0%} of its outputs are exactly 0 (a class with output 0 has probability 0, loss "
            "-ln(1e-7) = 16.1 and no gradient through the unit)"
            if out_min >= 0.0
            else f"it outputs negative values (min {out_min:.3g}), which are not probabilities"
        )
        findings.append(
            make_finding(
                "bad_output_activation",
                "critical",
                evidence,
                f"the output layer {head} uses a {act} activation with a probability loss: {why}; "
                f"use `Dense({num_classes}, activation='softmax')` as the output layer",
                layer=head,
            )
        )
    elif sum_dev >= 0.01:
        findings.append(
            make_finding(
                "bad_output_activation",
                "warning",
                evidence,
                f"the output layer {head} uses a {act} activation: its outputs sum to {row_sums.mean():.3f} per "
                "image instead of 1, so they are not class probabilities (confidences are wrong and the loss "
                f"renormalises them); use `Dense({num_classes}, activation='softmax')` as the output layer",
                layer=head,
            )
        )
    return findings


def _loss_values(outputs: np.ndarray, labels: np.ndarray, from_logits: bool) -> np.ndarray:
    losses = keras.losses.sparse_categorical_crossentropy(
        ops.convert_to_tensor(labels.astype("int32")),
        ops.convert_to_tensor(outputs.astype("float32")),
        from_logits=from_logits,
    )
    return _to_numpy(losses).astype("float64")


def check_initial_loss(outputs: np.ndarray, labels: np.ndarray, num_classes: int, from_logits: bool) -> list[dict[str, Any]]:
    """``nan_loss`` / ``initial_loss_high``: the loss at step 0 against ln(K)."""
    if outputs.shape[-1] != num_classes:
        return []
    losses = _loss_values(outputs, labels[: len(outputs)], from_logits)
    chance = chance_loss(num_classes)
    loss = float(losses.mean())
    if not math.isfinite(loss):
        return [
            make_finding(
                "nan_loss",
                "critical",
                {"nonfinite_fraction": float((~np.isfinite(losses)).mean()), "chance_loss": chance},
                "the loss is NaN/inf before any training step: the model outputs are not finite on real "
                "images; add `Rescaling(1/255)` as the first layer and check custom layers for division by zero",
            )
        ]
    if loss > 3.0 * chance:
        return [
            make_finding(
                "initial_loss_high",
                "warning",
                {"initial_loss": loss, "chance_loss": chance, "ratio": loss / chance},
                f"the loss before training is {loss:.3g}, {loss / chance:.1f}x the chance level ln({num_classes}) = "
                f"{chance:.3f}: logits are exploding; normalise the inputs (`Rescaling(1/255)` first) and keep "
                "default weight initialisation",
            )
        ]
    return []


def check_labels(labels: np.ndarray, num_classes: int) -> list[dict[str, Any]]:
    """``labels_out_of_range`` and ``batch_label_skew`` for one batch of labels."""
    findings = []
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        findings.append(
            make_finding(
                "labels_out_of_range",
                "critical",
                {"bad_labels": int(bad.sum()), "label_min": int(labels.min()), "label_max": int(labels.max()),
                 "num_classes": num_classes},
                f"labels must be integers in [0, {num_classes - 1}] but the batch holds "
                f"{int(labels.min())}..{int(labels.max())}; rebuild the TFRecords or fix the label mapping",
            )
        )
        return findings
    counts = np.bincount(labels, minlength=num_classes)
    present = int((counts > 0).sum())
    max_share = float(counts.max() / max(len(labels), 1))
    if num_classes > 1 and present == 1 and len(labels) >= 2 * num_classes:
        findings.append(
            make_finding(
                "batch_label_skew",
                "warning",
                {"batch_size": len(labels), "classes_in_batch": present, "num_classes": num_classes,
                 "max_class_share": max_share},
                f"all {len(labels)} images of a training batch have the same label: the input pipeline is "
                "not shuffled; shuffle the training data (a shuffle buffer larger than one class)",
            )
        )
    return findings


def check_overfit_batch(
    model: Any, images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int
) -> list[dict[str, Any]]:
    """``cannot_overfit_batch``: a copy of the model trains ``steps`` steps on one batch.

    The model passed in is not changed: a clone with the same weights, optimizer settings
    and loss is trained.
    """
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None:
            optimizer = type(optimizer).from_config(optimizer.get_config())
        else:
            optimizer = keras.optimizers.Adam(1e-3)
        clone.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=_loss_from_logits(model)),
        )
    except Exception as exc:  # subclassed models without get_config cannot be cloned
        return [
            make_finding(
                "overfit_check_skipped",
                "info",
                {"steps": steps},
                f"the overfit-one-batch check was skipped: the model could not be cloned ({type(exc).__name__})",
            )
        ]
    y = labels.astype("int32")
    # losses in training mode, as train_on_batch reports them before each update: an
    # inference-mode loss would judge BatchNorm's not-yet-warmed moving statistics instead
    losses: list[float] = []
    for _ in range(max(steps, 2)):
        losses.append(float(np.asarray(clone.train_on_batch(images, y)).reshape(-1)[0]))
        if not math.isfinite(losses[-1]):
            break
    first = losses[0]
    tail = losses[-3:]
    last = float(np.mean(tail)) if all(math.isfinite(v) for v in tail) else float("nan")
    chance = chance_loss(num_classes)
    drop = (first - last) / first if math.isfinite(first) and math.isfinite(last) and first > 0 else 0.0
    evidence = {"steps": steps, "initial_loss": first, "final_loss": last, "relative_drop": drop,
                "chance_loss": chance, "batch_size": len(y)}
    if not math.isfinite(last):
        return [make_finding(
            "cannot_overfit_batch", "critical", evidence,
            f"training on a single batch makes the loss NaN/inf within {steps} steps: the updates explode; "
            "normalise the inputs (`Rescaling(1/255)` first) or lower the learning rate 10x")]
    if drop < 0.02 and last > 0.1 * chance:
        return [make_finding(
            "cannot_overfit_batch", "critical", evidence,
            f"{steps} steps on one batch moved the loss only from {first:.3g} to {last:.3g}: the model cannot "
            "learn even one batch; check the output activation (softmax), input scaling and learning rate")]
    if drop < 0.3 and last > 0.1 * chance:
        return [make_finding(
            "cannot_overfit_batch", "warning", evidence,
            f"{steps} steps on one batch only lowered the loss from {first:.3g} to {last:.3g} "
            f"({drop:.0%}); the learning rate may be too low or the model too constrained")]
    return []


def _training_mode_outputs(model: Any, images: np.ndarray, limit: int = 64) -> np.ndarray:
    """Outputs of ``model(images, training=True)`` on up to ``limit`` images, leaving the
    model's non-trainable state (BatchNorm moving averages, seed generators) as it was."""
    state = [_to_numpy(v) for v in model.non_trainable_variables]
    try:
        out = model(images[:limit], training=True)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return _to_numpy(out).astype("float32").reshape(len(images[:limit]), -1)
    finally:
        for variable, value in zip(model.non_trainable_variables, state):
            variable.assign(value)


def preflight(model: Any, images: Any, labels: Any, num_classes: int, overfit_steps: int = 0) -> list[dict[str, Any]]:
    """Check a model on one real batch before the first epoch (seconds).

    Measures the value range reaching the first trainable layer, the output layer's
    units and what its outputs look like (probabilities or not) against the loss, the
    loss at step 0 against ln(K), the batch's labels and, optionally, whether a copy of
    the model can overfit this one batch.

    Args:
        model: a built Keras model taking raw images (compiled or not; the loss's
            ``from_logits`` is read from it when compiled).
        images: one batch of images as the model takes them (uint8 or float, 0-255).
        labels: integer class labels of the batch (or one-hot).
        num_classes: number of classes in the dataset.
        overfit_steps: when > 0, train a clone of the model this many steps on the batch
            (``cannot_overfit_batch``); the model itself is never changed.

    Returns:
        A list of findings (empty when everything looks right).
    """
    x = _as_images(images)
    y = _as_labels(labels)
    findings = check_labels(y, num_classes)
    findings += check_input_range(model, x)
    outputs = predict_outputs(model, x)[0]
    outputs = outputs.reshape(len(outputs), -1) if outputs.ndim != 2 else outputs
    findings += check_output_layer(model, outputs, num_classes)
    if not any(f["code"] == "labels_out_of_range" for f in findings):
        # the loss the optimizer sees at step 0 is a training-mode one (BatchNorm uses the
        # batch statistics, not its still-initial moving averages)
        train_outputs = _training_mode_outputs(model, x)
        findings += check_initial_loss(train_outputs, y, num_classes, _loss_from_logits(model))
    if overfit_steps > 0 and not any(f["severity"] == "critical" and f["code"] in {"output_units_mismatch", "labels_out_of_range"} for f in findings):
        findings += check_overfit_batch(model, x, y, num_classes, overfit_steps)
    return findings


# --------------------------------------------------------------------------- monitor


class DoctorMonitor(keras.callbacks.Callback):
    """Watches a ``fit`` for the ways a classifier fails to learn, and stops it when it has.

    Per batch: ``nan_loss`` (stops at once). Per epoch, on a fixed probe batch and the
    epoch logs: ``loss_at_chance``, ``loss_frozen``, ``single_class_collapse``,
    ``majority_class_only`` (critical after ``patience`` epochs of evidence, or when the
    run ends in that state; they set ``model.stop_training``), ``dead_relu`` per layer,
    ``overfitting`` and learning-rate hints (warnings, never stop). At the start of
    training the probe batch is also used for the static input-range and output-layer
    checks, so the monitor explains a failure on its own.

    Attributes:
        findings: the latest finding per code (and layer), as dicts.
        epoch_records: per-epoch numbers the checks used (loss, probe shares...).
    """

    def __init__(
        self,
        probe_images: Any,
        probe_labels: Any,
        num_classes: int,
        class_counts: Mapping[str, int] | Sequence[int] | None = None,
        *,
        patience: int = 3,
        chance_tolerance: float = 0.02,
        collapse_share: float = 0.95,
        majority_tolerance: float = 0.01,
        dead_fraction: float = 0.5,
        frozen_tolerance: float = 1e-3,
        static_checks: bool = True,
    ) -> None:
        """Args:
            probe_images: a fixed batch of (validation) images, raw as the model takes them.
            probe_labels: their integer labels.
            num_classes: number of classes K.
            class_counts: training images per class in label order (a mapping name -> count
                in label order, or a sequence); gives the majority share.
            patience: epochs a failure must persist before it is critical and stops training.
            chance_tolerance: relative distance of the loss from ln(K) that counts as chance.
            collapse_share: share of probe predictions in one class that counts as collapse.
            majority_tolerance: accuracy within this of the majority share counts as majority-only.
            dead_fraction: share of never-active units that makes a ReLU layer dead (warning).
            frozen_tolerance: relative loss change per epoch below which the loss is frozen.
            static_checks: run the input-range and output-layer checks at train begin.
        """
        super().__init__()
        self.probe_images = _as_images(probe_images)
        self.probe_labels = _as_labels(probe_labels)
        self.num_classes = int(num_classes)
        if isinstance(class_counts, Mapping):
            counts = [int(v) for v in class_counts.values()]
        elif class_counts is not None:
            counts = [int(v) for v in class_counts]
        else:
            counts = np.bincount(self.probe_labels, minlength=self.num_classes).tolist()
        self.class_counts = counts
        self.majority_share = max(counts) / max(sum(counts), 1)
        self.probe_majority_share = float(
            np.bincount(self.probe_labels, minlength=self.num_classes).max() / max(len(self.probe_labels), 1)
        )
        self.patience = int(patience)
        self.chance_tolerance = chance_tolerance
        self.collapse_share = collapse_share
        self.majority_tolerance = majority_tolerance
        self.dead_fraction = dead_fraction
        self.frozen_tolerance = frozen_tolerance
        self.static_checks = static_checks
        self.chance = chance_loss(self.num_classes)
        self.findings: list[dict[str, Any]] = []
        self.epoch_records: list[dict[str, float]] = []
        self._index: dict[tuple[str, str | None], int] = {}
        self._probe_model: Any = None
        self._relu_layers: list[str] = []
        self._epoch = 0
        self._last_finite_loss: float | None = None
        self._stopped_for_nan = False

    # -- bookkeeping
    def _report(self, finding: dict[str, Any], stop: bool = False) -> None:
        key = (finding["code"], finding.get("layer"))
        if key in self._index:
            old = self.findings[self._index[key]]
            # never downgrade: a critical seen earlier stays critical
            if SEVERITIES.index(old["severity"]) < SEVERITIES.index(finding["severity"]):
                finding = {**finding, "severity": old["severity"]}
            self.findings[self._index[key]] = finding
        else:
            self._index[key] = len(self.findings)
            self.findings.append(finding)
        if stop and finding["severity"] == "critical" and self.model is not None:
            self.model.stop_training = True

    def _drop(self, code: str, layer: str | None = None) -> None:
        """Forget a warning that no longer holds (a critical finding is kept)."""
        key = (code, layer)
        if key in self._index and self.findings[self._index[key]]["severity"] != "critical":
            self.findings.pop(self._index[key])
            self._index = {(f["code"], f.get("layer")): i for i, f in enumerate(self.findings)}

    # -- keras hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        self._build_probe_model()
        if self.static_checks and len(self.probe_images):
            try:
                for finding in check_input_range(self.model, self.probe_images):
                    self._report(finding)
                outputs = predict_outputs(self.model, self.probe_images)[0]
                outputs = outputs.reshape(len(outputs), -1)
                for finding in check_output_layer(self.model, outputs, self.num_classes):
                    self._report(finding)
            except Exception:  # static checks are a bonus here; preflight reports them properly
                pass

    def _build_probe_model(self) -> None:
        """One functional model giving the output and every ReLU layer's activations."""
        self._probe_model, self._relu_layers = None, []
        try:
            # the output layer is judged by bad_output_activation, not here
            head = _output_layer(self.model)
            relu = [
                layer for layer in self.model.layers
                if _activation_name(layer) == "relu" and not getattr(layer, "layers", None) and layer is not head
            ]
            outputs = list(self.model.outputs) + [layer.output for layer in relu]
            self._probe_model = keras.Model(_model_inputs(self.model), outputs)
            self._relu_layers = [layer.name for layer in relu]
        except Exception:  # subclassed model: predictions only
            self._probe_model = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not logs or "loss" not in logs or self._stopped_for_nan:
            return
        loss = float(np.asarray(logs["loss"]))
        if math.isfinite(loss):
            self._last_finite_loss = loss
            return
        self._stopped_for_nan = True
        self._report(
            make_finding(
                "nan_loss",
                "critical",
                {"epoch": self._epoch + 1, "batch": batch + 1,
                 "last_finite_loss": self._last_finite_loss if self._last_finite_loss is not None else float("nan"),
                 "chance_loss": self.chance, "learning_rate": self._learning_rate()},
                f"the training loss became NaN/inf at epoch {self._epoch + 1}, batch {batch + 1}: the updates "
                "exploded; add `Rescaling(1/255)` as the first layer if the model sees raw pixels, and lower "
                "the learning rate 10x (or use Adam)",
            ),
            stop=True,
        )

    def _learning_rate(self) -> float:
        try:
            return float(_to_numpy(self.model.optimizer.learning_rate))
        except Exception:
            return float("nan")

    def _probe(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self._probe_model is not None:
            outs = predict_outputs(self._probe_model, self.probe_images)
            return outs[0], dict(zip(self._relu_layers, outs[1:]))
        return predict_outputs(self.model, self.probe_images)[0], {}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        loss = float(np.asarray(logs.get("loss", float("nan"))))
        if self._stopped_for_nan or not math.isfinite(loss):
            if not self._stopped_for_nan:
                self.on_train_batch_end(-1, {"loss": loss})
            return
        record: dict[str, float] = {"epoch": epoch + 1, "loss": loss}
        for key in ("accuracy", "sparse_categorical_accuracy", "acc"):
            if key in logs:
                record["accuracy"] = float(np.asarray(logs[key]))
                break
        if "val_loss" in logs:
            record["val_loss"] = float(np.asarray(logs["val_loss"]))
        if len(self.probe_images):
            outputs, relu_acts = self._probe()
            outputs = outputs.reshape(len(outputs), -1)
            if np.all(np.isfinite(outputs)) and outputs.shape[-1] >= 1:
                preds = outputs.argmax(axis=-1)
                shares = np.bincount(preds, minlength=outputs.shape[-1]) / len(preds)
                record["top_class_share"] = float(shares.max())
                record["top_class"] = int(shares.argmax())
                record["probe_accuracy"] = float((preds == self.probe_labels[: len(preds)]).mean())
        else:
            relu_acts = {}
        self.epoch_records.append(record)
        self._check_dead_relu(relu_acts)
        self._check_chance(final=False)
        self._check_frozen(final=False)
        self._check_collapse(final=False)
        self._check_majority(final=False)
        self._check_overfitting()
        self._check_learning_rate()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._stopped_for_nan or not self.epoch_records:
            return
        # the run ended in a failed state: the final model is unusable even if the evidence
        # is shorter than `patience` epochs
        self._check_chance(final=True)
        self._check_frozen(final=True)
        self._check_collapse(final=True)
        self._check_majority(final=True)

    # -- per-epoch checks
    def _streak(self, predicate) -> int:
        n = 0
        for record in reversed(self.epoch_records):
            if not predicate(record):
                break
            n += 1
        return n

    def _severity(self, streak: int, final: bool) -> str | None:
        if streak >= self.patience or (final and streak >= 1):
            return "critical"
        return None

    def _check_chance(self, final: bool) -> None:
        tol = self.chance_tolerance * self.chance
        streak = self._streak(lambda r: abs(r["loss"] - self.chance) <= tol)
        severity = self._severity(streak, final)
        if severity:
            loss = self.epoch_records[-1]["loss"]
            self._report(make_finding(
                "loss_at_chance", severity,
                {"loss": loss, "chance_loss": self.chance, "epochs": streak, "tolerance": tol},
                f"the training loss has stayed at {loss:.4f} = ln({self.num_classes}) for {streak} epoch(s): the "
                "model outputs the same probabilities for every image and learns nothing; check that inputs are "
                "scaled (`Rescaling(1/255)` first) and that the output layer is `Dense(K, activation='softmax')`",
            ), stop=True)

    def _check_frozen(self, final: bool) -> None:
        recs = self.epoch_records
        if len(recs) < 2:
            return
        window = recs[-min(len(recs), self.patience + 1):]
        losses = [r["loss"] for r in window]
        change = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses, losses[1:]))
        steps = len(window) - 1
        if change > self.frozen_tolerance or losses[-1] < 0.1 * self.chance:
            return
        if not (steps >= self.patience or final):
            return
        acc = recs[-1].get("accuracy", recs[-1].get("probe_accuracy"))
        stuck = acc is None or acc <= self.majority_share + 0.05
        evidence = {"loss": losses[-1], "max_relative_change": change, "epochs": steps + 1,
                    "chance_loss": self.chance, "accuracy": acc if acc is not None else float("nan"),
                    "majority_share": self.majority_share, "learning_rate": self._learning_rate()}
        if stuck:
            self._report(make_finding(
                "loss_frozen", "critical", evidence,
                f"the training loss has not moved from {losses[-1]:.4f} for {steps + 1} epochs: no gradient "
                "reaches the weights (a ReLU output layer whose outputs are 0, or dead ReLU layers); use "
                "`Dense(K, activation='softmax')` as the output layer and scale the inputs with `Rescaling(1/255)`",
            ), stop=True)
        else:
            self._report(make_finding(
                "loss_frozen", "warning", evidence,
                f"the training loss has plateaued at {losses[-1]:.4f} for {steps + 1} epochs; lower the learning "
                "rate (schedule `plateau` or `cosine`) to make further progress",
            ))

    def _check_collapse(self, final: bool) -> None:
        recs = self.epoch_records
        if "top_class_share" not in recs[-1] or self.probe_majority_share >= self.collapse_share:
            return
        streak = self._streak(lambda r: r.get("top_class_share", 0.0) >= self.collapse_share)
        if streak == 0:
            return
        last = recs[-1]
        acc = last.get("accuracy")
        evidence = {"top_class": last["top_class"], "top_class_share": last["top_class_share"],
                    "probe_accuracy": last["probe_accuracy"], "probe_size": len(self.probe_labels),
                    "epochs": streak, "train_accuracy": acc if acc is not None else float("nan"),
                    "majority_share": self.majority_share}
        learned = acc is not None and acc > self.majority_share + 0.05
        severity = self._severity(streak, final)
        if learned:
            # training-mode accuracy is fine but inference-mode predictions collapse: moving
            # statistics (BatchNorm) not warmed up, or train/inference differ; not a dead model
            if streak >= self.patience or final:
                self._report(make_finding(
                    "single_class_collapse", "warning", evidence,
                    f"in inference mode {last['top_class_share']:.0%} of the probe images are predicted as class "
                    f"{last['top_class']} although training accuracy is {acc:.1%}: BatchNormalization statistics "
                    "or dropout make inference differ from training; train more epochs or lower BatchNorm momentum",
                ))
            return
        if severity:
            self._report(make_finding(
                "single_class_collapse", severity, evidence,
                f"{last['top_class_share']:.0%} of the probe images are predicted as class {last['top_class']} for "
                f"{streak} epoch(s): the model has collapsed to one class; scale the inputs (`Rescaling(1/255)` "
                "first), use a softmax output layer, and lower the learning rate if the loss exploded",
            ), stop=True)

    def _check_majority(self, final: bool) -> None:
        if "accuracy" not in self.epoch_records[-1]:
            return
        streak = self._streak(
            lambda r: "accuracy" in r and abs(r["accuracy"] - self.majority_share) <= self.majority_tolerance
        )
        severity = self._severity(streak, final)
        if severity:
            acc = self.epoch_records[-1]["accuracy"]
            self._report(make_finding(
                "majority_class_only", severity,
                {"accuracy": acc, "majority_share": self.majority_share, "epochs": streak,
                 "num_classes": self.num_classes},
                f"training accuracy has been {acc:.2%}, the share of the largest class ({self.majority_share:.2%}), "
                f"for {streak} epoch(s): the model predicts one class for everything; fix the inputs/output layer "
                "first, and use class weights if the classes are very imbalanced",
            ), stop=True)

    def _check_dead_relu(self, acts: dict[str, np.ndarray]) -> None:
        for name, act in acts.items():
            if act.ndim < 2 or not np.all(np.isfinite(act)):
                continue
            per_unit = act.reshape(-1, act.shape[-1]).max(axis=0)
            dead = int((per_unit <= 0.0).sum())
            frac = dead / act.shape[-1]
            if frac >= self.dead_fraction:
                # a wholly dead layer passes no gradient at all; critical once it has lasted
                # `patience` epochs and the model has not learned past it (residual paths may)
                acc = self.epoch_records[-1].get("accuracy")
                learned = acc is not None and acc > self.majority_share + 0.05
                lasting = len(self.epoch_records) >= self.patience
                severity = "critical" if frac >= 1.0 and lasting and not learned else "warning"
                self._report(make_finding(
                    "dead_relu", severity,
                    {"dead_fraction": frac, "dead_units": dead, "units": int(act.shape[-1]),
                     "probe_size": len(self.probe_images), "epoch": len(self.epoch_records)},
                    f"{frac:.0%} of the ReLU units of {name} never activate on the probe images, so no gradient "
                    f"flows through them; scale the inputs (`Rescaling(1/255)`), lower the learning rate, or use "
                    "`LeakyReLU`/BatchNormalization before the activation",
                    layer=name,
                ))
            else:
                self._drop("dead_relu", name)

    def _check_overfitting(self) -> None:
        recs = [r for r in self.epoch_records if "val_loss" in r and math.isfinite(r["val_loss"])]
        if len(recs) < self.patience + 1:
            return
        best = min(range(len(recs)), key=lambda i: recs[i]["val_loss"])
        rising = len(recs) - 1 - best
        window = recs[best:]
        if rising >= self.patience and window[-1]["loss"] < window[0]["loss"] and all(
            b["val_loss"] >= a["val_loss"] for a, b in zip(window, window[1:])
        ):
            self._report(make_finding(
                "overfitting", "warning",
                {"best_val_loss": recs[best]["val_loss"], "best_epoch": recs[best]["epoch"],
                 "val_loss": window[-1]["val_loss"], "train_loss_at_best": window[0]["loss"],
                 "train_loss": window[-1]["loss"], "epochs_rising": rising},
                f"validation loss has risen from {recs[best]['val_loss']:.4f} (epoch {recs[best]['epoch']}) to "
                f"{window[-1]['val_loss']:.4f} while training loss kept falling: the model is memorising the "
                "training images; keep EarlyStopping with best-weight restore, add augmentation or dropout, "
                "or collect more data",
            ))

    def _check_learning_rate(self) -> None:
        losses = [r["loss"] for r in self.epoch_records]
        if len(losses) < 2:
            return
        lr = self._learning_rate()
        lowest = min(losses[:-1])
        # the loss climbs well above its best: steps overshoot
        if losses[-1] > 1.5 * lowest and losses[-1] > 0.1 * self.chance:
            self._report(make_finding(
                "learning_rate_too_high", "warning",
                {"loss": losses[-1], "lowest_loss": lowest, "ratio": losses[-1] / max(lowest, 1e-12),
                 "learning_rate": lr, "epoch": len(losses)},
                f"the training loss rose from {lowest:.4g} to {losses[-1]:.4g}: the learning rate ({lr:.3g}) is "
                "probably too high; divide it by 10 or use a `plateau`/`cosine` schedule",
            ))
            return
        # first-epoch loss far above chance: early steps exploded
        if losses[0] > 10.0 * self.chance and len(losses) == 2:
            self._report(make_finding(
                "learning_rate_too_high", "warning",
                {"first_epoch_loss": losses[0], "chance_loss": self.chance, "ratio": losses[0] / self.chance,
                 "learning_rate": lr},
                f"the first epoch's mean loss was {losses[0]:.3g}, {losses[0] / self.chance:.0f}x chance: the first "
                f"updates exploded; scale the inputs and/or lower the learning rate ({lr:.3g})",
            ))
            return
        n = min(len(losses), self.patience + 1)
        if n < self.patience + 1:
            return
        window = losses[-n:]
        per_epoch = (window[0] - window[-1]) / max(window[0], 1e-12) / (n - 1)
        if 0.0 < per_epoch < 0.01 and window[-1] > 0.5 * self.chance:
            self._report(make_finding(
                "learning_rate_too_low", "info",
                {"loss": window[-1], "relative_drop_per_epoch": per_epoch, "chance_loss": self.chance,
                 "learning_rate": lr},
                f"the training loss falls only {per_epoch:.2%} per epoch and is still {window[-1]:.4f}: the "
                f"learning rate ({lr:.3g}) may be too low; try 3-10x higher",
            ))


# --------------------------------------------------------------------------- diagnosis


def _sort_key(finding: Mapping[str, Any]) -> tuple[int, int, str]:
    code = finding["code"]
    rank = CODE_ORDER.index(code) if code in CODE_ORDER else len(CODE_ORDER)
    return SEVERITIES.index(finding["severity"]), rank, str(finding.get("layer") or "")


def diagnose(findings: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge findings into a diagnosis: deduplicated, most severe first, root causes first.

    Findings with the same code and layer are merged (the most severe wins; on a tie the
    later one, which has the newer evidence). When training failed (a critical
    ``nan_loss``, ``loss_at_chance``, ``loss_frozen``, ``single_class_collapse``,
    ``majority_class_only`` or ``cannot_overfit_batch``), the warnings that explain it
    (``unnormalized_input``, ``bad_output_activation``, ``initial_loss_high``, ``dead_relu``)
    become critical too, with ``evidence.training_failed = 1``, so the root cause is listed
    first; where training worked they stay warnings.

    Args:
        findings: finding dicts from :func:`preflight` and :class:`DoctorMonitor`.

    Returns:
        ``{"healthy": bool, "findings": [...]}``; healthy means no critical finding.
    """
    merged: dict[tuple[str, str | None], dict[str, Any]] = {}
    for finding in findings:
        key = (finding["code"], finding.get("layer"))
        old = merged.get(key)
        if old is None or SEVERITIES.index(finding["severity"]) <= SEVERITIES.index(old["severity"]):
            merged[key] = {**finding, "evidence": dict(finding.get("evidence", {}))}
    failed = any(f["severity"] == "critical" and f["code"] in FAILURE_CODES for f in merged.values())
    if failed:
        for f in merged.values():
            if f["code"] in ROOT_CAUSE_CODES and f["severity"] == "warning":
                f["severity"] = "critical"
                f["evidence"]["training_failed"] = 1
                f["advice"] = "likely root cause of the failed training: " + f["advice"]
    ordered = sorted(merged.values(), key=_sort_key)
    return {"healthy": not any(f["severity"] == "critical" for f in ordered), "findings": ordered}


def summary_lines(diagnosis: Mapping[str, Any], limit: int = 3) -> list[str]:
    """The top findings as one line each (``CRITICAL nan_loss: advice``), for a terminal."""
    lines = []
    for finding in list(diagnosis.get("findings", []))[:limit]:
        lines.append(f"{finding['severity'].upper()} {finding['code']}: {finding['advice']}")
    return lines


def _format_number(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def findings_markdown(diagnosis: Mapping[str, Any]) -> str:
    """A Markdown section for the run report and the Prefect artifact."""
    findings = list(diagnosis.get("findings", []))
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in SEVERITIES}
    status = "healthy" if diagnosis.get("healthy", True) else "**unhealthy**"
    lines = [
        "## Training diagnosis",
        "",
        f"Status: {status} ({counts['critical']} critical, {counts['warning']} warning, {counts['info']} info)",
        "",
    ]
    if not findings:
        lines.append("No problems found: inputs, output layer and loss curve look right.")
        return "\n".join(lines) + "\n"
    lines += ["| severity | code | evidence | advice |", "|---|---|---|---|"]
    for f in findings:
        evidence = ", ".join(f"{k}={_format_number(v)}" for k, v in f.get("evidence", {}).items())
        advice = str(f.get("advice", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {f['severity']} | `{f['code']}` | {evidence} | {advice} |")
    return "\n".join(lines) + "\n"


def write_diagnosis(path: Path | str, diagnosis: Mapping[str, Any]) -> Path:
    """Write ``diagnosis.json`` atomically (``{"healthy", "findings"}``) and return its path."""
    return write_json(path, {"healthy": bool(diagnosis["healthy"]), "findings": list(diagnosis["findings"])})


# --------------------------------------------------------------------------- probe run


def probe_batch(
    dataset: Iterable[Any], max_images: int = 256, scan: int = 4096, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed probe of up to ``max_images`` (images, labels) from a batched ``(x, y)`` dataset.

    The images are a seeded sample spread over the first ``scan`` images, not just the
    head: an evaluation-order split is often sorted by class, and a probe of one class
    would look like a collapse onto it.
    """
    xs, ys, n = [], [], 0
    for x, y in dataset:
        x, y = _to_numpy(x), _as_labels(y)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= max(scan, max_images):
            break
    if not xs:
        raise ValueError("probe_batch: the dataset yielded no batches (expected (images, labels) batches)")
    images, labels = np.concatenate(xs), np.concatenate(ys)
    pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_images])
    return images[pick], labels[pick]


def run_doctor(
    model: Any,
    train_data: Any,
    val_data: Any | None,
    num_classes: int,
    class_counts: Mapping[str, int] | Sequence[int] | None = None,
    epochs: int = 3,
    overfit_steps: int = 20,
    probe_size: int = 256,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Preflight plus a short probe training of a compiled model; returns a diagnosis.

    Training is skipped when preflight finds a critical problem (it would only confirm it).

    Args:
        model: a compiled Keras model taking raw images.
        train_data: batched ``(images, labels)`` training dataset (tf.data or any iterable).
        val_data: batched validation dataset for the probe batch and val loss, or None.
        num_classes: number of classes.
        class_counts: training images per class in label order.
        epochs: probe training epochs.
        overfit_steps: steps of the overfit-one-batch check (0 to skip).
        probe_size: images in the fixed probe batch.
        steps_per_epoch: limit the batches per probe epoch (None: the whole dataset).

    Returns:
        The diagnosis (see :func:`diagnose`) plus ``"epochs_run"`` and ``"history"``.
    """
    images, labels = probe_batch(train_data, max_images=64)
    findings = preflight(model, images, labels, num_classes, overfit_steps=overfit_steps)
    history: dict[str, list[float]] = {}
    epochs_run = 0
    if not any(f["severity"] == "critical" for f in findings):
        probe_x, probe_y = probe_batch(val_data if val_data is not None else train_data, max_images=probe_size)
        monitor = DoctorMonitor(probe_x, probe_y, num_classes, class_counts, static_checks=False)
        result = model.fit(
            train_data,
            validation_data=val_data,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
            callbacks=[monitor],
            verbose=0,
        )
        history = {k: [float(v) for v in vals] for k, vals in result.history.items()}
        epochs_run = len(next(iter(history.values()), []))
        findings += monitor.findings
    diagnosis = diagnose(findings)
    return {**diagnosis, "epochs_run": epochs_run, "history": history}


def check_model(
    model_ref: str,
    manifest_path: Path | str,
    out_dir: Path | str,
    options: Any = None,
    workdir: Path | str = Path("imgflow-work"),
    epochs: int = 3,
    overfit_steps: int = 20,
    probe_size: int = 256,
) -> dict[str, Any]:
    """Build (or load) a model, run preflight and a short probe training on preprocessed data.

    Args:
        model_ref: a built-in model name, ``package.module:function``, a model directory
            or ``champion``.
        manifest_path: ``manifest.json`` of the preprocessed data.
        out_dir: where ``diagnosis.json`` and ``diagnosis.md`` are written.
        options: ``imgflow.flows.config.TrainOptions`` (defaults when None): optimizer, learning
            rate, batch size, architecture, seed.
        workdir: workdir holding the champion (for ``champion``).
        epochs: probe training epochs.
        overfit_steps: steps of the overfit-one-batch check (0 to skip).
        probe_size: images in the fixed probe batch.

    Returns:
        ``{"healthy", "findings", "epochs_run", "history", "model", "diagnosis_path",
        "markdown_path"}``.
    """
    from imgflow.tasks.options import TrainOptions
    from imgflow.tasks import models, tfrecords
    from imgflow.tasks.atomic import read_json, write_text

    options = options or TrainOptions()
    manifest = read_json(manifest_path)
    class_names = list(manifest["class_names"])
    image_size = int(manifest["image_size"])
    num_classes = len(class_names)
    keras.utils.set_random_seed(options.seed)
    model = _load_or_build(model_ref, image_size, num_classes, options, Path(workdir))
    models.compile_model(model, options.optimizer, options.learning_rate)
    train_ds = tfrecords.make_dataset(manifest_path, "train", options.batch_size, training=True, seed=options.seed)
    val_count = int(manifest["splits"].get("val", {}).get("count", 0))
    val_ds = (
        tfrecords.make_dataset(manifest_path, "val", options.batch_size, training=False, seed=options.seed)
        if val_count
        else None
    )
    per_class = manifest["splits"]["train"].get("per_class", {})
    class_counts = [int(per_class.get(name, 0)) for name in class_names]
    result = run_doctor(model, train_ds, val_ds, num_classes, class_counts, epochs=epochs,
                        overfit_steps=overfit_steps, probe_size=probe_size)
    out_dir = Path(out_dir)
    diagnosis = {"healthy": result["healthy"], "findings": result["findings"]}
    diagnosis_path = write_diagnosis(out_dir / "diagnosis.json", diagnosis)
    markdown_path = write_text(out_dir / "diagnosis.md", findings_markdown(diagnosis))
    history = {k: [_number(v) for v in vals] for k, vals in result["history"].items()}
    return {**diagnosis, "epochs_run": result["epochs_run"], "history": history, "model": model_ref,
            "diagnosis_path": str(diagnosis_path), "markdown_path": str(markdown_path)}


def _load_or_build(model_ref: str, image_size: int, num_classes: int, options: Any, workdir: Path) -> Any:
    """A model directory (or ``champion``) is loaded; anything else goes to the model builders."""
    if model_ref == "champion" or Path(model_ref).is_dir():
        from imgflow.tasks.registry import load_model_dir, resolve_model_dir

        model, metadata = load_model_dir(resolve_model_dir(model_ref, workdir))
        size = metadata.get("image_size")
        if size is not None and int(size) != image_size:
            raise ValueError(
                f"model {model_ref}: it takes {size} px images but the data was preprocessed at {image_size} px; "
                f"run the doctor with --image-size {size}"
            )
        return model
    from imgflow.tasks.models import build_model

    return build_model(model_ref, image_size, num_classes, options.architecture, options.augment,
                       options.weights, options.seed)
