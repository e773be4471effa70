"""Preflight: static checks of a model on one real batch before the first epoch (seconds).

Measures the value range reaching the first trainable layer, the output layer's units
and what its outputs look like against the loss, the loss at step 0 against ln(K), the
batch's labels and, optionally, whether a copy of the model can overfit the batch. Also
reads the :class:`~imgflow.tasks.doctor.facts.RunFacts` of a model (input scaling, head,
loss, optimizer), from which all advice is built.

Everything is Keras 3 and NumPy (``keras.ops`` for the maths on model outputs), so the
same checks run on the TensorFlow and JAX backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from imgflow.tasks.doctor.facts import RunFacts, fix_head, fix_inputs, fix_learning_rate, join
from imgflow.tasks.doctor.findings import chance_loss, make_finding
from imgflow.tasks.inference import predict_outputs

_NORMALIZING_LAYERS = ("Rescaling", "Normalization", "BatchNormalization", "LayerNormalization", "GroupNormalization")
_SCALING_LAYERS = ("Rescaling", "Normalization")


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


def _scaling_layer(model: Any) -> str | None:
    """Name of the first Rescaling/Normalization layer (searching nested models), or None."""
    for layer in getattr(model, "layers", None) or []:
        if type(layer).__name__ in _SCALING_LAYERS:
            return layer.name
        inner = _scaling_layer(layer)
        if inner:
            return inner
    return None


def _optimizer_facts(model: Any) -> tuple[str | None, float | None]:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None, None
    name = type(optimizer).__name__.lower()
    if "loss" in name and hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer (mixed precision)
        optimizer = optimizer.inner_optimizer
        name = type(optimizer).__name__.lower()
    return name, configured_learning_rate(optimizer)


def configured_learning_rate(optimizer: Any) -> float | None:
    """The rate the user set: a schedule's peak (warm-up target, else initial rate), else the rate.

    During a warm-up the optimizer's current rate is a small fraction of the configured
    one; advice must name the number in the user's config.
    """
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        try:
            config = schedule.get_config()
            peak = config.get("warmup_target") or config.get("initial_learning_rate")
            if peak is not None:
                return float(peak)
        except Exception:  # a user schedule without a config: evaluate it below
            pass
    try:
        lr = optimizer.learning_rate
        if callable(lr) and not hasattr(lr, "numpy"):
            lr = lr(0)
        return float(_to_numpy(lr))
    except Exception:  # a schedule that cannot be evaluated at step 0
        try:
            return float(optimizer.get_config()["learning_rate"]["config"]["initial_learning_rate"])
        except Exception:
            return None


def model_facts(
    model: Any,
    num_classes: int | None = None,
    batch_size: int | None = None,
    class_counts: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> RunFacts:
    """Read what a (compiled) model has: input scaling, head activation, loss, optimizer.

    Args:
        model: a Keras model (compiled or not; optimizer and loss facts need it compiled).
        num_classes: number of classes (default: the model's output units).
        batch_size: images per training step, when known.
        class_counts: training images per class, in label order.
        class_names: class names in label order.

    Returns:
        The facts advice is built from.
    """
    activation, head = _head_activation(model)
    scaling = _scaling_layer(model)
    optimizer, lr = _optimizer_facts(model)
    if num_classes is None:
        try:
            num_classes = int(model.outputs[0].shape[-1])
        except Exception:
            num_classes = 0
    loss = getattr(model, "loss", None)
    return RunFacts(
        input_scaling=scaling is not None,
        scaling_layer=scaling,
        head_activation=activation or "linear",
        head_layer=head,
        from_logits=_loss_from_logits(model) if loss is not None else None,
        optimizer=optimizer,
        learning_rate=lr,
        batch_size=batch_size,
        class_counts=tuple(int(c) for c in class_counts or ()),
        class_names=tuple(class_names or ()),
        num_classes=int(num_classes),
    )


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
    # ~80 lines: one decision table over the same measured outputs (units, logits vs
    # probabilities, negative/zero outputs, row sums); split up, the thresholds would scatter
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


def check_initial_loss(
    outputs: np.ndarray, labels: np.ndarray, num_classes: int, from_logits: bool, facts: RunFacts | None = None
) -> list[dict[str, Any]]:
    """``nan_loss`` / ``initial_loss_high``: the loss at step 0 against ln(K)."""
    facts = facts or RunFacts(num_classes=num_classes)
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
                "images; " + join([fix_inputs(facts)], "") + ("; " if fix_inputs(facts) else "")
                + "check custom layers for division by zero or log of 0",
            )
        ]
    if loss > 3.0 * chance:
        return [
            make_finding(
                "initial_loss_high",
                "warning",
                {"initial_loss": loss, "chance_loss": chance, "ratio": loss / chance},
                f"the loss before training is {loss:.3g}, {loss / chance:.1f}x the chance level ln({num_classes}) = "
                f"{chance:.3f}: logits are exploding; "
                + join([fix_inputs(facts)], "the inputs are scaled, so check the weight initialisation (keep the "
                       "Keras defaults) and any layer that multiplies activations"),
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
    model: Any, images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int, facts: RunFacts | None = None
) -> list[dict[str, Any]]:
    """``cannot_overfit_batch``: a copy of the model trains ``steps`` steps on one batch.

    The model passed in is not changed: a clone with the same weights, optimizer settings
    and loss is trained.
    """
    facts = facts or model_facts(model, num_classes)
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
            + join([fix_inputs(facts), fix_learning_rate(facts)], ""))]
    if drop < 0.02 and last > 0.1 * chance:
        return [make_finding(
            "cannot_overfit_batch", "critical", evidence,
            f"{steps} steps on one batch moved the loss only from {first:.3g} to {last:.3g}: the model cannot "
            "learn even one batch; " + join([fix_head(facts), fix_inputs(facts)],
                                            "raise the learning rate, or check custom layers that stop gradients"))]
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


def preflight(
    model: Any, images: Any, labels: Any, num_classes: int, overfit_steps: int = 0, facts: RunFacts | None = None
) -> list[dict[str, Any]]:
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
        facts: the run's facts for the advice (read from the model when None).

    Returns:
        A list of findings (empty when everything looks right).
    """
    x = _as_images(images)
    y = _as_labels(labels)
    facts = facts or model_facts(model, num_classes)
    findings = check_labels(y, num_classes)
    findings += check_input_range(model, x)
    outputs = predict_outputs(model, x)[0]
    outputs = outputs.reshape(len(outputs), -1) if outputs.ndim != 2 else outputs
    findings += check_output_layer(model, outputs, num_classes)
    if not any(f["code"] == "labels_out_of_range" for f in findings):
        # the loss the optimizer sees at step 0 is a training-mode one (BatchNorm uses the
        # batch statistics, not its still-initial moving averages)
        train_outputs = _training_mode_outputs(model, x)
        findings += check_initial_loss(train_outputs, y, num_classes, _loss_from_logits(model), facts)
    if overfit_steps > 0 and not any(f["severity"] == "critical" and f["code"] in {"output_units_mismatch", "labels_out_of_range"} for f in findings):
        findings += check_overfit_batch(model, x, y, num_classes, overfit_steps, facts)
    return findings
