"""Classification metrics of model outputs against true labels: pure functions on arrays.

Counts, accuracy, precision/recall/F1 per class and averaged, the confusion matrix,
top-k accuracy, cross-entropy, the expected calibration error with its reliability
bins, and one sentence per class. Rows whose model outputs are not finite (NaN or inf,
e.g. a diverged run) never crash: they get no prediction, count as wrong, and
``non_finite_outputs`` says how many there were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from imgflow.tasks.errors import UsageError

#: equal-width confidence bins of the expected calibration error and the reliability diagram
CALIBRATION_BINS = 10


class EvaluationError(UsageError, ValueError):
    """Input that cannot be evaluated (no images, unknown classes, bad model directory)."""


def as_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, bool]:
    """Model outputs as row-stochastic probabilities; True when a softmax had to be applied.

    A model whose last layer has no softmax returns logits; the log loss and the
    calibration error need probabilities, and the report says the softmax was missing.
    Rows holding NaN or inf become uniform rows here; :func:`finite_rows` tells them apart.

    Args:
        outputs: model outputs, shape [N, K].

    Returns:
        (float64 probabilities [N, K], whether a softmax was applied to the finite rows).

    Raises:
        EvaluationError: the outputs are not a 2-D array.
    """
    from imgflow.tasks.inference import as_probabilities as _normalise

    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2:
        raise EvaluationError(f"model outputs: expected a 2-D array [images, classes], found shape {out.shape}")
    finite = finite_rows(out)
    if finite.all():
        return _normalise(out)
    probs = np.full(out.shape, 1.0 / max(out.shape[1], 1), dtype=np.float64)
    were_logits = False
    if finite.any():
        probs[finite], were_logits = _normalise(out[finite])
    return probs, were_logits


def finite_rows(outputs: np.ndarray) -> np.ndarray:
    """Boolean mask [N]: True where every output of the row is a finite number."""
    out = np.asarray(outputs, dtype=np.float64)
    return np.isfinite(out).all(axis=1) if out.ndim == 2 else np.isfinite(out)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # bin i holds (i/bins, (i+1)/bins]; searchsorted on the inner edges avoids 0.7 * 10 = 7.000000000000001
    edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.clip(np.searchsorted(edges, confidence, side="left"), 0, bins - 1)


def _ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    if confidence.size == 0:
        return 0.0
    index = _bin_index(confidence, bins)
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].astype(np.float64).mean() - confidence[mask].mean())
    return float(ece)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Expected calibration error of the top-1 confidence over equal-width bins.

    ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.

    Args:
        labels: true class indices, shape [N].
        probabilities: class probabilities, shape [N, K].
        bins: number of equal-width confidence bins on [0, 1].

    Returns:
        The ECE in [0, 1]; 0.0 for an empty set.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if labels.size == 0:
        return 0.0
    return _ece(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, bins)


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS) -> list[dict[str, Any]]:
    """Per-bin count, accuracy and mean confidence of the top-1 predictions (the reliability diagram).

    Args:
        labels: true class indices, shape [N].
        probabilities: class probabilities, shape [N, K].
        bins: equal-width confidence bins on [0, 1].

    Returns:
        One ``{"low", "high", "count", "accuracy", "confidence"}`` per bin; accuracy and
        confidence are None for an empty bin.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if labels.size == 0:
        return _bins_of(np.zeros(0), np.zeros(0, dtype=bool), bins)
    return _bins_of(probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, bins)


def _bins_of(confidence: np.ndarray, correct: np.ndarray, bins: int) -> list[dict[str, Any]]:
    index = _bin_index(confidence, bins)
    rows = []
    for b in range(bins):
        mask = index == b
        rows.append({
            "low": b / bins,
            "high": (b + 1) / bins,
            "count": int(mask.sum()),
            "accuracy": float(correct[mask].mean()) if mask.any() else None,
            "confidence": float(confidence[mask].mean()) if mask.any() else None,
        })
    return rows


def _prf(cm: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 per class from a confusion matrix (0 where undefined, as sklearn's zero_division=0).

    ``support`` counts every image of the class, also those without a prediction.
    """
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support.astype(np.float64), out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return precision, recall, f1


def compute_metrics(
    labels: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    top_k: int | None = None,
    calibration_bins: int = CALIBRATION_BINS,
) -> dict[str, Any]:
    """Classification metrics of predicted probabilities against true labels.

    Rows with a NaN or inf output get no prediction: they count as wrong in every
    accuracy and recall, appear in no confusion-matrix column, and enter the loss and
    the calibration figures as a uniform guess.

    Args:
        labels: true class indices in ``class_names`` order, shape [N].
        probabilities: model outputs, shape [N, K]; logits are turned into
            probabilities with a softmax (and ``outputs_were_logits`` is set).
        class_names: the model's class names; index = label.
        top_k: k of the top-k accuracy, reported only when K > 2 (default
            ``min(5, K - 1)``).
        calibration_bins: bins of the expected calibration error.

    Returns:
        A JSON-able dict: ``count``, ``accuracy``, ``loss`` (mean cross-entropy),
        ``macro``/``weighted`` precision, recall and F1, ``per_class`` (name ->
        precision, recall, f1, support), ``confusion_matrix`` (rows = true class,
        columns = predicted, model class order), ``confusion_matrix_normalized``
        (each row divided by its support), ``top_k_accuracy`` and ``top_k`` (K > 2),
        ``expected_calibration_error``, ``reliability`` (per-bin accuracy and
        confidence), ``prediction_distribution`` (name -> predicted count),
        ``most_confused`` (off-diagonal cells, largest first), ``chance_accuracy``,
        ``majority_accuracy``, ``mean_confidence``, ``non_finite_outputs`` (rows with
        NaN/inf outputs) and ``class_notes`` (a sentence per class).

    Raises:
        EvaluationError: shapes that do not match the class list, or labels out of range.
    """
    # Long on purpose: every figure comes from the one confusion matrix and prediction vector
    # built here, so no two numbers in the report can disagree; half of it is the docstring.
    class_names = [str(name) for name in class_names]
    k_classes = len(class_names)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    raw = np.asarray(probabilities, dtype=np.float64)
    probs, were_logits = as_probabilities(raw)
    if probs.shape != (y.size, k_classes):
        raise EvaluationError(
            f"probabilities: expected shape ({y.size}, {k_classes}) for {y.size} labels and "
            f"{k_classes} classes {class_names}, found {probs.shape}"
        )
    if y.size == 0:
        raise EvaluationError("no images to evaluate: the label list is empty")
    if y.min() < 0 or y.max() >= k_classes:
        raise EvaluationError(f"labels: expected indices in 0..{k_classes - 1}, found {int(y.min())}..{int(y.max())}")

    finite = finite_rows(raw)
    pred = np.where(finite, probs.argmax(axis=1), -1)  # -1: no prediction
    correct = pred == y
    cm = np.zeros((k_classes, k_classes), dtype=np.int64)
    np.add.at(cm, (y[finite], pred[finite]), 1)
    support = np.bincount(y, minlength=k_classes)
    cm_norm = np.divide(cm, support[:, None], out=np.zeros(cm.shape, dtype=np.float64), where=support[:, None] > 0)
    precision, recall, f1 = _prf(cm, support)
    weights = support / support.sum()
    averages = {
        "macro": {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())},
        "weighted": {"precision": float(precision @ weights), "recall": float(recall @ weights), "f1": float(f1 @ weights)},
    }
    clipped = np.clip(probs, 1e-15, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    loss = float(-np.log(clipped[np.arange(y.size), y]).mean())
    confidence = np.where(finite, probs.max(axis=1), 1.0 / k_classes)

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    predicted_counts = cm.sum(axis=0)
    confused = [
        {
            "true": class_names[i],
            "predicted": class_names[j],
            "count": int(cm[i, j]),
            "fraction_of_true": float(cm[i, j] / support[i]),
        }
        for i in range(k_classes)
        for j in range(k_classes)
        if i != j and cm[i, j] > 0
    ]
    confused.sort(key=lambda row: (-row["count"], -row["fraction_of_true"], row["true"], row["predicted"]))

    metrics: dict[str, Any] = {
        "class_names": class_names,
        "count": int(y.size),
        "accuracy": float(correct.mean()),
        "loss": loss,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": [[round(float(v), 6) for v in row] for row in cm_norm],
        "expected_calibration_error": _ece(confidence, correct, calibration_bins),
        "reliability": _bins_of(confidence, correct, calibration_bins),
        "mean_confidence": float(confidence.mean()),
        "prediction_distribution": {name: int(predicted_counts[i]) for i, name in enumerate(class_names)},
        "most_confused": confused[:10],
        "chance_accuracy": 1.0 / k_classes,
        "majority_accuracy": float(support.max() / y.size),
        "outputs_were_logits": were_logits,
        "non_finite_outputs": int((~finite).sum()),
    }
    if k_classes > 2:
        k = top_k if top_k is not None else min(5, k_classes - 1)
        # rank of the true class among the scores; a tie counts in the label's favour, as sklearn's
        true_score = probs[np.arange(y.size), y]
        rank = (probs > true_score[:, None]).sum(axis=1)
        metrics["top_k"] = int(k)
        metrics["top_k_accuracy"] = float(((rank < k) & finite).mean())
    metrics["class_notes"] = class_notes(metrics)
    return metrics


def class_notes(metrics: dict[str, Any]) -> dict[str, str]:
    """One sentence per class, e.g. ``"seven: recall 0.71, most often mistaken for one (12 of 42)"``.

    Args:
        metrics: the dict :func:`compute_metrics` returns (``class_names``,
            ``per_class``, ``confusion_matrix``, ``prediction_distribution``).

    Returns:
        Class name -> note.
    """
    names = metrics["class_names"]
    cm = np.asarray(metrics["confusion_matrix"])
    notes: dict[str, str] = {}
    total = int(metrics.get("count", cm.sum()))
    for i, name in enumerate(names):
        row = metrics["per_class"][name]
        support = row["support"]
        predicted = metrics["prediction_distribution"][name]
        if support == 0:
            notes[name] = (
                f"{name}: no images of this class in the evaluated data; "
                f"predicted for {predicted} of {total} images."
            )
            continue
        text = f"{name}: recall {row['recall']:.2f}, precision {row['precision']:.2f}"
        off = cm[i].copy()
        off[i] = 0
        unpredicted = support - int(cm[i].sum())
        if off.sum() == 0 and unpredicted == 0:
            text += f", all {support} recognised"
        elif off.sum() > 0:
            j = int(off.argmax())
            text += f", most often mistaken for {names[j]} ({int(off[j])} of {support})"
        if unpredicted:
            text += f", {unpredicted} of {support} got non-finite (NaN/inf) model outputs"
        if predicted == total and total > 0:
            text += f"; the model predicts {name} for every image (collapsed to one class)"
        elif predicted == 0:
            text += "; the model never predicts this class"
        else:
            column = cm[:, i].copy()
            column[i] = 0
            if column.sum() > 0:
                j = int(column.argmax())
                text += f"; {int(column.sum())} images of other classes were called {name}, most of them {names[j]} ({int(column[j])})"
        notes[name] = text + "."
    return notes


def per_class_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-class metrics as table rows (class, precision, recall, f1, support, predicted)."""
    return [
        {
            "class": name,
            "precision": round(metrics["per_class"][name]["precision"], 4),
            "recall": round(metrics["per_class"][name]["recall"], 4),
            "f1": round(metrics["per_class"][name]["f1"], 4),
            "support": metrics["per_class"][name]["support"],
            "predicted": metrics["prediction_distribution"][name],
        }
        for name in metrics["class_names"]
    ]
