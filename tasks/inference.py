"""Inference over in-memory image arrays (traced once per model and batch shape), and its outputs as probabilities."""

from __future__ import annotations

from typing import Any

import numpy as np


def predict_outputs(model: Any, images: np.ndarray, batch_size: int = 64) -> list[np.ndarray]:
    """Run ``model`` in inference mode over ``images`` in batches; one float32 array per model output.

    ``predict_on_batch`` traces the inference function once and reuses it, so a callback
    that probes every epoch costs milliseconds, not an eager pass through the model. Every
    short batch is padded to ``batch_size`` so every call has the same shape and
    nothing is traced again (TensorFlow warns about repeated retracing otherwise).
    """
    from keras import ops

    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        count = len(chunk)
        if count < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - count, axis=0)])
        out = model.predict_on_batch(chunk)
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        chunks.append([np.asarray(ops.convert_to_numpy(o))[:count].astype("float32") for o in outs])
    return [np.concatenate([c[i] for c in chunks], axis=0) for i in range(len(chunks[0]))]


def as_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, bool]:
    """2-D model outputs as float64 class probabilities whose rows sum to 1; True when softmax was applied.

    Outputs that already look like probabilities (non-negative, rows summing to 1 within
    1e-3) are only renormalised; anything else (logits: a model without a softmax head)
    goes through a numerically stable softmax.
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.shape[0] == 0:
        return out, False
    if out.min() < 0 or np.abs(out.sum(axis=1) - 1.0).max() > 1e-3:
        exp = np.exp(out - out.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True), True
    return out / out.sum(axis=1, keepdims=True), False


def predict(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The first (usually only) output of :func:`predict_outputs`."""
    return predict_outputs(model, np.asarray(images, dtype=np.float32), batch_size)[0]


def to_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs as float64 class probabilities whose rows sum to 1.

    Outputs that already look like probabilities (non-negative, rows summing to 1
    within 1e-3) are only renormalised; anything else (logits) goes through softmax.
    """
    out = np.asarray(outputs)
    return as_probabilities(out.reshape(out.shape[0], -1))[0]


def run_batch(model: Any, x: np.ndarray, n_classes: int, lock: Any,
              novelty: Any = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One model call on a batch: (probabilities, novelty or None, unknown or None).

    With novelty statistics (:class:`imgflow.tasks.novelty.NoveltyModel`) the
    two-output model gives the class outputs and the penultimate features in the same
    pass, and the probabilities are temperature-calibrated.

    Raises:
        ValueError: the model's output width is not ``n_classes``, or a plain model has several outputs.
    """
    if novelty is not None:
        from imgflow.tasks.novelty import split_outputs

        predictor = novelty.predictor(model)
        with lock:
            raw = predictor.predict_on_batch(x)
        outputs, features = split_outputs(raw, len(x))
        _check_width(outputs.shape[1], n_classes)
        return novelty.score(features, outputs)
    with lock:
        raw = model.predict_on_batch(x)
    if isinstance(raw, (list, tuple, dict)):
        raise ValueError("model: expected one output tensor of class scores, found several outputs")
    probs = to_probabilities(raw)
    _check_width(probs.shape[1], n_classes)
    return probs, None, None


def _check_width(width: int, n_classes: int) -> None:
    if width != n_classes:
        raise ValueError(f"model: expected {n_classes} outputs (class_names in metadata.json), found {width}")
