"""Evaluation: what the classifier learned and what it did not.

Pure functions on arrays (metrics with scikit-learn, plots with matplotlib's Agg
canvas, Grad-CAM / occlusion saliency with Keras) and the two entry points that
wire them to a model directory:

- :func:`evaluate_split` reads a split of the TFRecord shards (the pipeline's
  evaluate step), and
- :func:`evaluate_folder` reads any class-folder directory (``imgflow evaluate``).

Both write ``metrics.json``, ``report.html`` (self-contained, images embedded),
``report.md`` and the PNG plots, and compare against a champion when one is given.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.tasks.atomic import atomic_open, read_json, write_json, write_text
from imgflow.tasks.dataset import is_hidden

log = logging.getLogger(__name__)

#: equal-width confidence bins of the expected calibration error and the reliability diagram
CALIBRATION_BINS = 10
#: how many highest-loss images the gallery shows
GALLERY_SIZE = 16
#: correct and wrong examples per class in the saliency view (each)
SALIENCY_PER_CLASS = 2
#: classes shown in the saliency view (the worst recall first)
SALIENCY_MAX_CLASSES = 8
#: most-confused pairs plotted, and examples per pair
CONFUSED_PAIRS = 3
CONFUSED_EXAMPLES = 6
#: files listed by name in the report when unreadable
SKIPPED_LISTED = 50

# Keras layers that transform the input but learn nothing: never a Grad-CAM target.
_PREPROCESSING_LAYERS = (
    "Rescaling", "Normalization", "Resizing", "CenterCrop", "InputLayer",
    "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
    "RandomBrightness", "RandomCrop", "RandomHeight", "RandomWidth", "AutoContrast",
    "RandAugment", "RandomColorJitter", "RandomGrayscale", "RandomHue", "RandomSaturation",
    "RandomSharpness", "RandomShear", "RandomPerspective", "RandomInvert", "RandomPosterization",
    "RandomErasing", "RandomGaussianBlur", "RandomElasticTransform", "Equalization", "Solarization",
    "MixUp", "CutMix", "Pipeline", "AugMix",
)


class EvaluationError(ValueError):
    """Input that cannot be evaluated (no images, unknown classes, bad model directory)."""


class SaliencyUnavailable(RuntimeError):
    """Grad-CAM cannot run on this model (no conv layer, no gradients on this backend)."""


# --------------------------------------------------------------------------- metrics


def _as_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, bool]:
    """Model outputs as row-stochastic probabilities; True when a softmax had to be applied.

    A model whose last layer has no softmax returns logits; sklearn's log loss and the
    calibration error need probabilities, and the report says the softmax was missing.
    """
    from imgflow.tasks.inference import as_probabilities

    out = np.asarray(outputs)
    if out.ndim != 2:
        raise EvaluationError(f"model outputs: expected a 2-D array [images, classes], found shape {out.shape}")
    return as_probabilities(out)


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    # bin i holds (i/bins, (i+1)/bins]; searchsorted on the inner edges avoids 0.7 * 10 = 7.000000000000001
    edges = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    return np.clip(np.searchsorted(edges, confidence, side="left"), 0, bins - 1)


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
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = _bin_index(confidence, bins)
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def _reliability_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> list[dict[str, float]]:
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
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


def compute_metrics(
    labels: Sequence[int] | np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    top_k: int | None = None,
    calibration_bins: int = CALIBRATION_BINS,
) -> dict[str, Any]:
    """Classification metrics of predicted probabilities against true labels.

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
        ``majority_accuracy``, ``mean_confidence`` and ``class_notes`` (a sentence per
        class).

    Raises:
        EvaluationError: shapes that do not match the class list, or labels out of range.
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        log_loss,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    class_names = [str(name) for name in class_names]
    k_classes = len(class_names)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    probs, were_logits = _as_probabilities(probabilities)
    if probs.shape != (y.size, k_classes):
        raise EvaluationError(
            f"probabilities: expected shape ({y.size}, {k_classes}) for {y.size} labels and "
            f"{k_classes} classes {class_names}, found {probs.shape}"
        )
    if y.size == 0:
        raise EvaluationError("no images to evaluate: the label list is empty")
    if y.min() < 0 or y.max() >= k_classes:
        raise EvaluationError(f"labels: expected indices in 0..{k_classes - 1}, found {int(y.min())}..{int(y.max())}")

    all_labels = list(range(k_classes))
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=all_labels)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.where(support[:, None] > 0, cm / np.maximum(support[:, None], 1), 0.0)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=all_labels, zero_division=0)
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, labels=all_labels, average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    clipped = np.clip(probs, 1e-15, 1.0)
    loss = float(log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), labels=all_labels))

    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    predicted_counts = np.bincount(pred, minlength=k_classes)
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
        "accuracy": float(accuracy_score(y, pred)),
        "loss": loss,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": [[round(float(v), 6) for v in row] for row in cm_norm],
        "expected_calibration_error": expected_calibration_error(y, probs, calibration_bins),
        "reliability": _reliability_bins(y, probs, calibration_bins),
        "mean_confidence": float(probs.max(axis=1).mean()),
        "prediction_distribution": {name: int(predicted_counts[i]) for i, name in enumerate(class_names)},
        "most_confused": confused[:10],
        "chance_accuracy": 1.0 / k_classes,
        "majority_accuracy": float(support.max() / y.size),
        "outputs_were_logits": were_logits,
    }
    if k_classes > 2:
        k = top_k if top_k is not None else min(5, k_classes - 1)
        metrics["top_k"] = int(k)
        metrics["top_k_accuracy"] = float(top_k_accuracy_score(y, probs, k=k, labels=all_labels))
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
    total = int(cm.sum())
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
        if off.sum() == 0:
            text += f", all {support} recognised"
        else:
            j = int(off.argmax())
            text += f", most often mistaken for {names[j]} ({int(off[j])} of {support})"
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


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # The object-oriented Figure needs no pyplot and no global backend: safe in threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png")
    return path


def plot_confusion_matrix(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> Path:
    """Confusion matrix as counts and row-normalised side by side (rows true, columns predicted).

    Args:
        confusion: K x K counts, rows = true class, columns = predicted class.
        class_names: the K class names in model order.
        path: PNG file to write (atomically).

    Returns:
        ``path``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    k = len(class_names)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    side = max(3.5, 0.55 * k + 2.0)
    fig = _figure(2 * side + 0.5, side)
    axes = fig.subplots(1, 2)
    annotate = k <= 25
    for ax, data, title, fmt in (
        (axes[0], cm, "Counts", "{:.0f}"),
        (axes[1], norm, "Row-normalised (recall)", "{:.2f}"),
    ):
        vmax = data.max() if data.max() > 0 else 1.0
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(title)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_xticks(range(k), labels=list(class_names), rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
        ax.set_yticks(range(k), labels=list(class_names))
        if annotate:
            for i in range(k):
                for j in range(k):
                    value = data[i, j]
                    ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=9,
                            color="white" if value > 0.6 * vmax else "black")
    return _save(fig, path)


def read_history(history_csv: Path) -> dict[str, list[float]]:
    """Columns of a Keras ``CSVLogger`` file as float lists (empty dict when absent or empty)."""
    path = Path(history_csv)
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key is None:
                continue
            try:
                columns.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                columns.setdefault(key, []).append(float("nan"))
    return columns


def plot_learning_curves(history_csv: Path, path: Path) -> Path | None:
    """Training and validation curves of every metric in a Keras ``history.csv``.

    Args:
        history_csv: CSV with an ``epoch`` column and metric columns (``loss``,
            ``val_loss``, ``accuracy`` ...), as ``keras.callbacks.CSVLogger`` writes it.
        path: PNG file to write.

    Returns:
        ``path``, or None when the file is missing or holds no metric column.
    """
    history = read_history(history_csv)
    if not history:
        return None
    n = max(len(v) for v in history.values())
    epochs = [e + 1 for e in history.get("epoch", list(range(n)))]
    bases = [key for key in history if key not in ("epoch",) and not key.startswith("val_")
             and key not in ("learning_rate", "lr")]
    if not bases:
        return None
    bases.sort(key=lambda key: (key != "loss", key))
    extra = [key for key in ("learning_rate", "lr") if key in history]
    panels = bases + extra[:1]
    fig = _figure(4.2 * min(len(panels), 3), 3.2 * math.ceil(len(panels) / 3))
    axes = np.atleast_1d(fig.subplots(math.ceil(len(panels) / 3), min(len(panels), 3))).ravel()
    from matplotlib.ticker import MaxNLocator

    for ax, key in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.plot(epochs, history[key], marker="o", markersize=3, label=f"train {key}" if key not in extra else key)
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", markersize=3, label=f"val {key}")
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if key in extra:
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_reliability(labels: np.ndarray, probabilities: np.ndarray, path: Path, bins: int = CALIBRATION_BINS) -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the confidence histogram.

    Args:
        labels: true class indices, shape [N].
        probabilities: class probabilities, shape [N, K].
        path: PNG file to write.
        bins: equal-width confidence bins.

    Returns:
        ``path``.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    rows = _reliability_bins(labels, probabilities, bins)
    ece = expected_calibration_error(labels, probabilities, bins)
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    fig = _figure(8.5, 3.8)
    ax, hist = fig.subplots(1, 2)
    acc = [r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
    ax.bar(centers, acc, width=1 / bins, edgecolor="black", color="#4c72b0", alpha=0.85, label="accuracy")
    gap = [(r["confidence"] - r["accuracy"]) if r["accuracy"] is not None else 0.0 for r in rows]
    ax.bar(centers, gap, bottom=acc, width=1 / bins, edgecolor="#c44e52", facecolor="none",
           hatch="//", label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})")
    ax.legend(fontsize=8, loc="upper left")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    hist.hist([confidence[correct], confidence[~correct]], bins=edges, stacked=True,
              color=["#55a868", "#c44e52"], label=["correct", "wrong"])
    hist.set_xlabel("confidence")
    hist.set_ylabel("images")
    hist.set_title("Confidence of the predictions")
    hist.legend(fontsize=8)
    return _save(fig, path)


def plot_image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: Path,
    ncols: int = 4,
    title: str | None = None,
    colors: Sequence[str] | None = None,
) -> Path:
    """A grid of images with a caption under each (gallery, confused pairs).

    Args:
        images: uint8 HxWx3 (or HxW) arrays.
        captions: one caption per image (newlines allowed).
        path: PNG file to write.
        ncols: images per row.
        title: figure title.
        colors: caption colour per image (e.g. green for correct, red for wrong).

    Returns:
        ``path``.
    """
    n = max(len(images), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(2.3 * ncols, 2.6 * nrows + (0.4 if title else 0))
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for index, ax in enumerate(axes):
        ax.set_axis_off()
        if index < len(images):
            ax.imshow(np.asarray(images[index]).astype(np.uint8), interpolation="nearest")
            ax.set_title(captions[index], fontsize=8, color=(colors[index] if colors else "black"))
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_saliency(
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    captions: Sequence[str],
    path: Path,
    method: str | Sequence[str],
    ncols: int = 4,
    colors: Sequence[str] | None = None,
) -> Path:
    """Each image beside its saliency heatmap overlaid ("what did it look at").

    Args:
        images: uint8 HxWx3 arrays.
        heatmaps: float HxW maps in [0, 1], same spatial size as the images.
        captions: one caption per image.
        path: PNG file to write.
        method: ``"grad-cam"`` or ``"occlusion"``, or one of them per image (shown above each map).
        ncols: image/heatmap pairs per row.
        colors: caption colour per image.

    Returns:
        ``path``.
    """
    from matplotlib import colormaps

    cmap = colormaps["jet"]
    methods = [method] * len(images) if isinstance(method, str) else list(method)
    summary = method if isinstance(method, str) else " / ".join(sorted(set(methods)))
    n = max(len(images), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(3.6 * ncols, 2.2 * nrows + 0.4)
    axes = np.atleast_2d(fig.subplots(nrows, 2 * ncols))
    for index in range(nrows * ncols):
        ax_image, ax_map = axes[index // ncols, 2 * (index % ncols)], axes[index // ncols, 2 * (index % ncols) + 1]
        ax_image.set_axis_off()
        ax_map.set_axis_off()
        if index >= len(images):
            continue
        image = np.asarray(images[index]).astype(np.uint8)
        ax_image.imshow(image, interpolation="nearest")
        ax_image.set_title(captions[index], fontsize=7, color=(colors[index] if colors else "black"))
        ax_map.imshow(image, interpolation="nearest")
        heat = np.clip(np.asarray(heatmaps[index], dtype=np.float32), 0.0, 1.0)
        overlay = cmap(heat)
        overlay[..., 3] = 0.15 + 0.6 * heat  # an empty map leaves the image visible
        ax_map.imshow(overlay, interpolation="bilinear")
        ax_map.set_title(methods[index], fontsize=7)
    fig.suptitle(f"What the model looked at ({summary}; red = most important for the predicted class)", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- saliency


def find_gradcam_layer(model: Any) -> str | None:
    """Name of the last top-level layer with a spatial 4-D output (the last conv block).

    Preprocessing and augmentation layers (Rescaling, Random*) are skipped: a map
    over the input pixels says nothing about what the network learned. Pooling and
    dropout layers are skipped too; a nested backbone (``keras.applications``) counts
    as one layer whose output is its last conv map.

    Args:
        model: a built Keras functional or sequential model.

    Returns:
        The layer name, or None when the model has no such layer.
    """
    for layer in reversed(getattr(model, "layers", [])):
        kind = type(layer).__name__
        # pooling and dropout only coarsen or mask the last conv map: explain the map itself
        if kind in _PREPROCESSING_LAYERS or "Pooling" in kind or "Dropout" in kind:
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and (shape[1] is None or shape[1] > 1) and (shape[2] is None or shape[2] > 1):
            return layer.name
    return None


def _resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    resized = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))
    low, high = float(resized.min()), float(resized.max())
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


def grad_cam(model: Any, images: np.ndarray, class_indices: Sequence[int], layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM heatmaps of ``class_indices`` on the last conv layer (Selvaraju et al. 2017).

    Args:
        model: a Keras functional or sequential model taking raw 0-255 images.
        images: float or uint8 batch [N, H, W, 3].
        class_indices: the class to explain per image (usually the predicted one).
        layer_name: the conv layer; default :func:`find_gradcam_layer`.

    Returns:
        float32 [N, H, W] maps in [0, 1].

    Raises:
        SaliencyUnavailable: no conv layer, a backend without ``GradientTape``, a model
            whose layers cannot be rewired, or gradients that are all zero.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SaliencyUnavailable(f"Grad-CAM is implemented for the TensorFlow backend, found {keras.backend.backend()}")
    import tensorflow as tf

    layer_name = layer_name or find_gradcam_layer(model)
    if layer_name is None:
        raise SaliencyUnavailable("the model has no convolutional layer with a spatial output")
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    idx = tf.convert_to_tensor(np.asarray(class_indices, dtype=np.int32))
    # Explain the class score before the softmax: a confident softmax saturates to 1.0 in
    # float32 and its gradient vanishes. The activation is swapped only for this call.
    last = model.layers[-1] if getattr(model, "layers", None) else None
    softmax_head = last is not None and getattr(getattr(last, "activation", None), "__name__", "") == "softmax"
    original = getattr(last, "activation", None)
    if softmax_head:
        last.activation = keras.activations.linear
    try:
        features, grads = _cam_gradients(model, layer_name, x, idx)
    finally:
        if softmax_head:
            last.activation = original
    if grads is None:
        raise SaliencyUnavailable(f"no gradient flows from the output to layer {layer_name!r}")
    features = tf.cast(features, tf.float32).numpy()
    grads = tf.cast(grads, tf.float32).numpy()
    if not np.any(grads):
        raise SaliencyUnavailable("the gradients are all zero (saturated output)")
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.maximum((weights * features).sum(axis=-1), 0.0)
    height, width = x.shape[1], x.shape[2]
    return np.stack([_resize_map(cam, height, width) for cam in cams]).astype(np.float32)


def _cam_gradients(model: Any, layer_name: str, x: Any, idx: Any) -> tuple[Any, Any]:
    """(feature maps of ``layer_name``, gradient of the chosen class scores on them)."""
    import keras
    import tensorflow as tf

    if isinstance(model, keras.Sequential):
        # A reloaded Sequential model's rebuilt graph does not always connect layer.output
        # to model.output; running its layers one by one always does.
        names = [layer.name for layer in model.layers]
        split = names.index(layer_name) + 1
        with tf.GradientTape() as tape:
            features = x
            for layer in model.layers[:split]:
                features = layer(features, training=False)
            tape.watch(features)
            outputs = features
            for layer in model.layers[split:]:
                outputs = layer(outputs, training=False)
            scores = tf.gather(tf.cast(outputs, tf.float32), idx, batch_dims=1)
    else:
        try:
            grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.outputs[0]])
        except Exception as exc:  # subclassed models have no symbolic graph to rewire
            raise SaliencyUnavailable(f"cannot read layer {layer_name!r} of the model: {exc}") from exc
        with tf.GradientTape() as tape:
            features, outputs = grad_model(x, training=False)
            tape.watch(features)
            scores = tf.gather(tf.cast(outputs, tf.float32), idx, batch_dims=1)
    return features, tape.gradient(scores, features)


def occlusion_saliency(
    model: Any,
    images: np.ndarray,
    class_indices: Sequence[int],
    patch: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion sensitivity: how much the class probability drops when a patch is greyed out.

    Backend-agnostic (only ``model.predict``), works for any model.

    Args:
        model: a Keras model taking raw 0-255 images.
        images: batch [N, H, W, 3].
        class_indices: the class to explain per image.
        patch: occluding square side (default H // 6, at least 2).
        stride: step between patches (default patch // 2, at least 1).
        batch_size: occluded images per ``predict`` call.

    Returns:
        float32 [N, H, W] maps in [0, 1] (1 = occluding here hurts the class most).
    """
    from imgflow.tasks.inference import predict

    images = np.asarray(images, dtype=np.float32)
    n, height, width = images.shape[:3]
    patch = patch or max(2, height // 6)
    stride = stride or max(1, patch // 2)
    ys = list(range(0, max(height - patch, 0) + 1, stride))
    xs = list(range(0, max(width - patch, 0) + 1, stride))
    maps = np.zeros((n, height, width), dtype=np.float32)
    for i in range(n):
        image = images[i]
        fill = image.mean(axis=(0, 1))
        variants = [image]
        for y in ys:
            for x in xs:
                occluded = image.copy()
                occluded[y:y + patch, x:x + patch] = fill
                variants.append(occluded)
        outputs, _ = _as_probabilities(predict(model, np.stack(variants), batch_size=batch_size))
        scores = outputs[:, int(class_indices[i])]
        drop = scores[0] - scores[1:]
        total = np.zeros((height, width), dtype=np.float64)
        hits = np.zeros((height, width), dtype=np.float64)
        for value, (y, x) in zip(drop, ((y, x) for y in ys for x in xs)):
            total[y:y + patch, x:x + patch] += value
            hits[y:y + patch, x:x + patch] += 1
        heat = np.maximum(np.divide(total, hits, out=np.zeros_like(total), where=hits > 0), 0.0)
        maps[i] = heat / heat.max() if heat.max() > 0 else heat
    return maps


def saliency_maps(model: Any, images: np.ndarray, class_indices: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Grad-CAM where it can run, occlusion sensitivity otherwise.

    Grad-CAM keeps only positive evidence; an image whose map is empty (every weighted
    feature pointed away from the class) gets an occlusion map instead, so no panel of
    the report is blank.

    Args:
        model: a Keras model taking raw 0-255 images.
        images: batch [N, H, W, 3].
        class_indices: the class to explain per image.

    Returns:
        (maps [N, H, W] in [0, 1], methods) with one ``"grad-cam"`` or ``"occlusion"`` per image.
    """
    images = np.asarray(images, dtype=np.float32)
    try:
        maps = grad_cam(model, images, class_indices)
    except SaliencyUnavailable as exc:
        log.info("Grad-CAM unavailable (%s); using occlusion sensitivity", exc)
        return occlusion_saliency(model, images, class_indices), ["occlusion"] * len(images)
    methods = ["grad-cam"] * len(images)
    empty = [i for i in range(len(images)) if not maps[i].any()]
    if empty:
        maps[empty] = occlusion_saliency(model, images[empty], [class_indices[i] for i in empty])
        for i in empty:
            methods[i] = "occlusion"
    return maps, methods


# --------------------------------------------------------------------------- report


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


_PLOT_TITLES = {
    "confusion_matrix": "Confusion matrix (rows = true class, columns = predicted)",
    "learning_curves": "Learning curves (history.csv)",
    "reliability": "Calibration: reliability diagram",
    "gallery": "Highest-loss images",
    "confused_pairs": "Most-confused class pairs",
    "saliency": "What the model looked at",
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f6f7f9;color:#222}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{margin:0 0 4px 0;font-size:1.6em}h2{margin-top:32px;border-bottom:2px solid #dde;padding-bottom:4px}
.sub{color:#666;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:10px 16px;min-width:120px}
.card .v{font-size:1.5em;font-weight:600}.card .k{color:#666;font-size:.85em}
table{border-collapse:collapse;background:#fff;margin:8px 0}
th,td{border:1px solid #dde;padding:4px 10px;text-align:right}
th{background:#eef0f4}td.l,th.l{text-align:left}
.bad{color:#b00020;font-weight:600}.good{color:#1b7f3b;font-weight:600}
.critical{background:#fde2e4}.warning{background:#fff4d6}.info{background:#e8f1fb}
figure{background:#fff;border:1px solid #dde;border-radius:8px;padding:12px;margin:16px 0}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:#555;font-size:.9em;margin-top:6px}
ul.notes li{margin:4px 0}code{background:#eef0f4;padding:1px 4px;border-radius:3px}
"""


def _table_html(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1, row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes else ""
        cells = "".join(f'<td class="{"l" if i < left else ""}">{html.escape(_fmt(v))}</td>' for i, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _table_md(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


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


def summary_markdown(metrics: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    """A short markdown summary (headline numbers, per-class notes) for a Prefect artifact."""
    info = info or {}
    lines = [
        f"## Evaluation of `{info.get('run_id', 'model')}` on `{info.get('data', 'data')}`",
        "",
        f"- images: **{metrics['count']}** ({info.get('skipped_count', 0)} unreadable skipped)",
        f"- accuracy: **{metrics['accuracy']:.4f}** (chance {metrics['chance_accuracy']:.4f}, "
        f"majority class {metrics['majority_accuracy']:.4f})",
        f"- loss: {metrics['loss']:.4f}; macro F1: {metrics['macro']['f1']:.4f}; "
        f"ECE: {metrics['expected_calibration_error']:.4f}",
    ]
    if "top_k_accuracy" in metrics:
        lines.append(f"- top-{metrics['top_k']} accuracy: {metrics['top_k_accuracy']:.4f}")
    lines += ["", *[f"- {note}" for note in metrics["class_notes"].values()]]
    return "\n".join(lines)


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    plots: dict[str, Path] | None = None,
    diagnosis: dict[str, Any] | None = None,
    champion: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    skipped: Sequence[dict[str, str]] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md`` and a self-contained ``report.html``.

    Args:
        out_dir: output folder (created).
        metrics: :func:`compute_metrics` output (extra keys are kept in metrics.json).
        plots: plot name -> PNG path (``confusion_matrix``, ``learning_curves``,
            ``reliability``, ``gallery``, ``confused_pairs``, ``saliency`` ...); the
            PNGs are embedded in the HTML as base64 and linked from the markdown.
        diagnosis: the doctor's ``diagnosis.json`` content ({"healthy", "findings"}).
        champion: :func:`compare_models` output, shown side by side.
        info: context shown in the summary (``run_id``, ``data``, ``model_dir``,
            ``split``, ``saliency_method`` ...).
        skipped: unreadable files, ``{"path", "reason"}`` each.

    Returns:
        {"metrics_json", "report_html", "report_md"} -> written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {k: Path(v) for k, v in (plots or {}).items() if v is not None and Path(v).is_file()}
    info = dict(info or {})
    skipped = list(skipped or [])
    names = metrics["class_names"]

    document = dict(metrics)
    document["skipped"] = {"count": len(skipped), "files": skipped}
    document["plots"] = {k: v.name for k, v in plots.items()}
    if champion is not None:
        document["comparison"] = champion
    if diagnosis is not None:
        document["diagnosis"] = diagnosis
    document["info"] = info
    document.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    metrics_path = write_json(out_dir / "metrics.json", document)

    title = f"Evaluation of {info.get('run_id', 'model')}"
    acc = metrics["accuracy"]
    headline_cls = "bad" if acc <= metrics["majority_accuracy"] + 1e-9 else "good"
    cards = [
        ("images", metrics["count"]),
        ("accuracy", f"{acc:.3f}"),
        ("loss", f"{metrics['loss']:.3f}"),
        ("macro F1", f"{metrics['macro']['f1']:.3f}"),
        ("chance / majority", f"{metrics['chance_accuracy']:.2f} / {metrics['majority_accuracy']:.2f}"),
        ("calibration error", f"{metrics['expected_calibration_error']:.3f}"),
        ("unreadable skipped", len(skipped)),
    ]
    if "top_k_accuracy" in metrics:
        cards.insert(2, (f"top-{metrics['top_k']} accuracy", f"{metrics['top_k_accuracy']:.3f}"))
    context_rows = [(key, str(value)) for key, value in info.items() if value is not None and key != "run_id"]

    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f"<div class='sub'>{len(names)} classes: {html.escape(', '.join(names))}</div>",
        "<h2 id='summary'>Summary</h2><div class='cards'>",
        *[
            f"<div class='card'><div class='v{' ' + headline_cls if k == 'accuracy' else ''}'>{html.escape(str(v))}</div>"
            f"<div class='k'>{html.escape(k)}</div></div>"
            for k, v in cards
        ],
        "</div>",
    ]
    if acc <= metrics["majority_accuracy"] + 1e-9:
        parts.append(
            "<p class='bad'>The accuracy is no better than always predicting the most frequent class: "
            "the model has not learned to tell the classes apart.</p>"
        )
    if metrics.get("outputs_were_logits"):
        parts.append("<p class='bad'>The model outputs are not probabilities (no softmax on the last layer); "
                     "a softmax was applied for these metrics.</p>")
    if context_rows:
        parts.append(_table_html(["", "value"], context_rows))

    md: list[str] = [f"# {title}", "", summary_markdown(metrics, info), ""]

    if diagnosis is not None:
        findings = diagnosis.get("findings", [])
        healthy = diagnosis.get("healthy", True)
        parts.append("<h2 id='diagnosis'>Doctor's findings</h2>")
        parts.append(f"<p class='{'good' if healthy else 'bad'}'>Training was judged "
                     f"{'healthy' if healthy else 'UNHEALTHY'} ({len(findings)} finding(s)).</p>")
        md += ["## Doctor's findings", "", f"Training judged {'healthy' if healthy else 'unhealthy'}.", ""]
        if findings:
            rows = [
                (f.get("severity", ""), f.get("code", ""), f.get("advice", ""),
                 ", ".join(f"{k}={_fmt(v)}" for k, v in (f.get("evidence") or {}).items()))
                for f in findings
            ]
            parts.append(_table_html(["severity", "code", "advice", "evidence"], rows, left=4,
                                     row_classes=[str(f.get("severity", "")) for f in findings]))
            md += [_table_md(["severity", "code", "advice", "evidence"], rows), ""]

    if champion is not None:
        parts.append("<h2 id='comparison'>Candidate vs champion (same data)</h2>")
        md += ["## Candidate vs champion (same data)", ""]
        rows = [(row["metric"], row["candidate"], row["champion"], row["difference"]) for row in champion["rows"]]
        header = ["metric", f"candidate {champion['candidate_run_id']}", f"champion {champion['champion_run_id']}", "difference"]
        parts.append(_table_html(header, rows))
        decision = champion["decision"]
        parts.append(f"<p class='{'good' if decision == 'promote' else 'bad'}'>Decision: "
                     f"{html.escape(decision)} — {html.escape(champion['reason'])}</p>")
        md += [_table_md(header, rows), "", f"**Decision: {decision}** — {champion['reason']}", ""]

    header = ["class", "precision", "recall", "f1", "support", "predicted"]
    class_rows = [tuple(row.values()) for row in per_class_rows(metrics)]
    class_rows.append(("macro avg", metrics["macro"]["precision"], metrics["macro"]["recall"], metrics["macro"]["f1"], metrics["count"], ""))
    class_rows.append(("weighted avg", metrics["weighted"]["precision"], metrics["weighted"]["recall"], metrics["weighted"]["f1"], metrics["count"], ""))
    parts.append("<h2 id='metrics'>Metrics per class</h2>")
    parts.append(_table_html(header, class_rows))
    md += ["## Metrics per class", "", _table_md(header, class_rows), ""]

    parts.append("<h2 id='notes'>Per-class notes</h2><ul class='notes'>")
    parts += [f"<li>{html.escape(note)}</li>" for note in metrics["class_notes"].values()]
    parts.append("</ul>")

    cm = metrics["confusion_matrix"]
    cm_header = ["true \\ predicted", *names]
    cm_rows = [(names[i], *cm[i]) for i in range(len(names))]
    parts.append("<h2 id='confusion'>Confusion matrix</h2>")
    parts.append(_table_html(cm_header, cm_rows))
    md += ["## Confusion matrix (rows = true, columns = predicted)", "", _table_md(cm_header, cm_rows), ""]
    if metrics["most_confused"]:
        pair_rows = [(p["true"], p["predicted"], p["count"], p["fraction_of_true"]) for p in metrics["most_confused"][:5]]
        pair_header = ["true class", "predicted as", "images", "share of true class"]
        parts.append("<h3>Most-confused pairs</h3>" + _table_html(pair_header, pair_rows, left=2))
        md += ["### Most-confused pairs", "", _table_md(pair_header, pair_rows), ""]

    parts.append("<h2 id='plots'>Plots</h2>")
    md += ["## Plots", ""]
    for key, path in plots.items():
        caption = _PLOT_TITLES.get(key, key.replace("_", " "))
        if key == "saliency" and info.get("saliency_method"):
            caption += f" ({info['saliency_method']})"
        parts.append(f"<figure id='plot-{html.escape(key)}'><img alt='{html.escape(caption)}' "
                     f"src='{_png_data_uri(path)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
        md += [f"### {caption}", "", f"![{caption}]({path.name})", ""]

    parts.append("<h2 id='skipped'>Unreadable files</h2>")
    md += ["## Unreadable files", ""]
    if skipped:
        parts.append(f"<p>{len(skipped)} file(s) could not be read and were skipped.</p>")
        rows = [(s.get("path", ""), s.get("reason", "")) for s in skipped[:SKIPPED_LISTED]]
        parts.append(_table_html(["file", "reason"], rows, left=2))
        md += [f"{len(skipped)} file(s) skipped.", "", _table_md(["file", "reason"], rows), ""]
    else:
        parts.append("<p>None: every file was read.</p>")
        md += ["None: every file was read.", ""]
    parts.append("</main></body></html>")

    html_path = write_text(out_dir / "report.html", "\n".join(parts))
    md_path = write_text(out_dir / "report.md", "\n".join(md))
    return {"metrics_json": metrics_path, "report_html": html_path, "report_md": md_path}


# --------------------------------------------------------------------------- comparison


def compare_models(
    candidate: dict[str, Any],
    champion: dict[str, Any],
    candidate_run_id: str,
    champion_run_id: str,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Side-by-side metrics of a candidate and the champion on the same images.

    The decision shown is ``promote`` when the candidate's accuracy is at least the
    champion's minus ``tolerance`` (the training config's ``promotion_tolerance``).

    Args:
        candidate: :func:`compute_metrics` of the candidate.
        champion: :func:`compute_metrics` of the champion on the same images.
        candidate_run_id: shown in the table header.
        champion_run_id: shown in the table header.
        tolerance: accuracy the candidate may lose and still be promoted.

    Returns:
        {"candidate_run_id", "champion_run_id", "rows": [{"metric", "candidate",
        "champion", "difference"}], "decision": "promote"|"keep champion", "reason",
        "tolerance"}.
    """
    def pick(m: dict[str, Any]) -> dict[str, float]:
        values = {
            "accuracy": m["accuracy"],
            "loss": m["loss"],
            "macro F1": m["macro"]["f1"],
            "weighted F1": m["weighted"]["f1"],
            "calibration error": m["expected_calibration_error"],
        }
        if "top_k_accuracy" in m:
            values[f"top-{m['top_k']} accuracy"] = m["top_k_accuracy"]
        for name in m["class_names"]:
            values[f"recall {name}"] = m["per_class"][name]["recall"]
        return values

    a, b = pick(candidate), pick(champion)
    rows = [
        {"metric": key, "candidate": round(a[key], 4), "champion": round(b[key], 4), "difference": round(a[key] - b[key], 4)}
        for key in a if key in b
    ]
    promote = candidate["accuracy"] >= champion["accuracy"] - tolerance
    reason = (
        f"candidate accuracy {candidate['accuracy']:.4f} vs champion {champion['accuracy']:.4f} "
        f"on the same {candidate['count']} images (tolerance {tolerance:.4f}): "
        + ("the candidate is at least as good" if promote else "the champion is better")
    )
    return {
        "candidate_run_id": candidate_run_id,
        "champion_run_id": champion_run_id,
        "rows": rows,
        "decision": "promote" if promote else "keep champion",
        "reason": reason,
        "tolerance": tolerance,
    }


# --------------------------------------------------------------------------- model directories


def load_model_dir(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Load ``model.keras`` and ``metadata.json`` through ``imgflow.tasks.registry``.

    Raises:
        imgflow.tasks.registry.RegistryError: no metadata, or no class names / image size in it.
    """
    from imgflow.tasks.registry import load_model_dir as registry_load

    return registry_load(Path(model_dir))


def _champion_dir(workdir: Path) -> Path | None:
    """The champion's model directory in ``workdir``; None when none is promoted or it is gone."""
    from imgflow.tasks.registry import read_champion

    pointer = read_champion(Path(workdir))
    if not pointer or "model_dir" not in pointer:
        return None
    path = Path(pointer["model_dir"])
    if not path.is_absolute():
        path = Path(workdir) / path
    return path if (path / "model.keras").is_file() else None


# --------------------------------------------------------------------------- image sources


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    return np.stack([
        np.asarray(Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
        for img in images
    ])


def scan_class_folders(data_dir: Path, class_names: Sequence[str]) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """Files of a class-folder directory labelled in the model's class order.

    Args:
        data_dir: ``data_dir/<class>/**/<file>``; hidden files and ``.tmp-`` names are ignored.
        class_names: the model's classes.

    Returns:
        (files, skipped): files as (POSIX path relative to data_dir, label), sorted;
        skipped lists files in folders the model does not know (``{"path", "reason"}``).

    Raises:
        EvaluationError: ``data_dir`` is not a directory or holds no folder named
            after a model class.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"DATA_DIR {data_dir}: expected a directory of class folders, not found")
    index = {name: i for i, name in enumerate(class_names)}
    files: list[tuple[str, int]] = []
    skipped: list[dict[str, str]] = []
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not is_hidden(p.name))
    if not any(folder.name in index for folder in folders):
        raise EvaluationError(
            f"DATA_DIR {data_dir}: expected folders named after the model's classes {list(class_names)}, "
            f"found {[f.name for f in folders] or 'no folders'}"
        )
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or any(is_hidden(part) for part in path.relative_to(data_dir).parts):
                continue
            rel = path.relative_to(data_dir).as_posix()
            if folder.name in index:
                files.append((rel, index[folder.name]))
            else:
                skipped.append({"path": rel, "reason": f"class folder {folder.name!r} is not one of the model's classes"})
    return files, skipped


def _split_batches(manifest_path: Path, split: str, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(uint8 images, labels, filenames) batches of a split, in make_dataset's deterministic order."""
    from imgflow.tasks.tfrecords import make_dataset

    dataset = make_dataset(manifest_path, split, batch_size, training=False, include_filenames=True)
    for images, labels, names in dataset.as_numpy_iterator():
        yield np.asarray(images), np.asarray(labels), [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


# --------------------------------------------------------------------------- evaluation core


def _predict(model: Any, images: np.ndarray) -> np.ndarray:
    from imgflow.tasks.inference import predict

    return predict(model, images)


def _select_examples(labels: np.ndarray, probs: np.ndarray, k_names: Sequence[str]) -> dict[str, Any]:
    """Indices of the gallery, the confused-pair examples and the saliency examples."""
    pred = probs.argmax(axis=1)
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))
    order = np.argsort(-loss, kind="stable")
    gallery = [int(i) for i in order[:GALLERY_SIZE]]
    cm = np.zeros((len(k_names), len(k_names)), dtype=int)
    np.add.at(cm, (labels, pred), 1)
    np.fill_diagonal(cm, 0)
    pairs = []
    for flat in np.argsort(-cm, axis=None, kind="stable")[:CONFUSED_PAIRS]:
        t, p = divmod(int(flat), len(k_names))
        if cm[t, p] == 0:
            break
        members = [int(i) for i in order if labels[i] == t and pred[i] == p][:CONFUSED_EXAMPLES]
        pairs.append((t, p, int(cm[t, p]), members))
    # saliency: the classes with the worst recall first, best correct and worst wrong of each
    recalls = []
    for c in range(len(k_names)):
        mask = labels == c
        recalls.append((float((pred[mask] == c).mean()) if mask.any() else 1.0, c))
    saliency = []
    for _, c in sorted(recalls)[:SALIENCY_MAX_CLASSES]:
        correct = [i for i in np.argsort(loss, kind="stable") if labels[i] == c and pred[i] == c][:SALIENCY_PER_CLASS]
        wrong = [i for i in order if labels[i] == c and pred[i] != c][:SALIENCY_PER_CLASS]
        saliency += [int(i) for i in correct] + [int(i) for i in wrong]
    return {"gallery": gallery, "pairs": pairs, "saliency": saliency, "loss": loss, "pred": pred}


def _caption(name: str, names: Sequence[str], label: int, probs: np.ndarray) -> str:
    pred = int(probs.argmax())
    short = name if len(name) <= 24 else "…" + name[-23:]
    return f"{short}\ntrue {names[label]} → {names[pred]} ({probs[pred]:.2f})"


def _render(
    out_dir: Path,
    model: Any,
    metadata: dict[str, Any],
    labels: np.ndarray,
    probs: np.ndarray,
    filenames: Sequence[str],
    fetch: Callable[[list[int]], np.ndarray],
    history_csv: Path | None,
) -> tuple[dict[str, Path], str | None]:
    """Write every PNG plot; returns (plots, saliency method)."""
    names = metadata["class_names"]
    metrics_cm = np.zeros((len(names), len(names)), dtype=int)
    np.add.at(metrics_cm, (labels, probs.argmax(axis=1)), 1)
    plots: dict[str, Path] = {
        "confusion_matrix": plot_confusion_matrix(metrics_cm, names, out_dir / "confusion_matrix.png"),
        "reliability": plot_reliability(labels, probs, out_dir / "reliability.png"),
    }
    if history_csv is not None:
        curves = plot_learning_curves(history_csv, out_dir / "learning_curves.png")
        if curves is not None:
            plots["learning_curves"] = curves
    chosen = _select_examples(labels, probs, names)
    wanted = sorted(set(chosen["gallery"]) | {i for pair in chosen["pairs"] for i in pair[3]} | set(chosen["saliency"]))
    images = dict(zip(wanted, fetch(wanted))) if wanted else {}

    def colour(i: int) -> str:
        return "#1b7f3b" if chosen["pred"][i] == labels[i] else "#b00020"

    gallery = chosen["gallery"]
    plots["gallery"] = plot_image_grid(
        [images[i] for i in gallery],
        [_caption(filenames[i], names, labels[i], probs[i]) + f"\nloss {chosen['loss'][i]:.2f}" for i in gallery],
        out_dir / "gallery.png", ncols=4, title="Highest-loss images (true → predicted, confidence)",
        colors=[colour(i) for i in gallery],
    )
    if chosen["pairs"]:
        grid, captions = [], []
        blank = np.full_like(next(iter(images.values())), 255)
        for t, p, count, members in chosen["pairs"]:
            for slot in range(CONFUSED_EXAMPLES):
                if slot < len(members):
                    i = members[slot]
                    grid.append(images[i])
                    captions.append((f"{names[t]} → {names[p]} ({count}×)\n" if slot == 0 else "\n")
                                    + _caption(filenames[i], names, labels[i], probs[i]).split("\n", 1)[0]
                                    + f" ({probs[i][p]:.2f})")
                else:
                    grid.append(blank)
                    captions.append("")
        plots["confused_pairs"] = plot_image_grid(
            grid, captions, out_dir / "confused_pairs.png", ncols=CONFUSED_EXAMPLES,
            title="Most-confused pairs: one row per (true → predicted) pair",
        )
    method = None
    if chosen["saliency"]:
        sel = chosen["saliency"]
        batch = np.stack([images[i] for i in sel]).astype(np.float32)
        maps, methods = saliency_maps(model, batch, [int(chosen["pred"][i]) for i in sel])
        method = " + ".join(sorted(set(methods)))
        plots["saliency"] = plot_saliency(
            [images[i] for i in sel], list(maps),
            [_caption(filenames[i], names, labels[i], probs[i]) for i in sel],
            out_dir / "saliency.png", methods, ncols=2, colors=[colour(i) for i in sel],
        )
    return plots, method


def _write_predictions(out_dir: Path, filenames: Sequence[str], labels: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> Path:
    pred = probs.argmax(axis=1)
    target = out_dir / "predictions.csv"
    with atomic_open(target, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "true", "label", "confidence", *[f"prob_{n}" for n in names]])
        for i, name in enumerate(filenames):
            writer.writerow([name, names[labels[i]], names[pred[i]], f"{probs[i, pred[i]]:.6f}",
                             *[f"{p:.6f}" for p in probs[i]]])
    return target


def _evaluate(
    model_dir: Path,
    out_dir: Path,
    batches: Callable[[int, str], Iterator[tuple[list[int], np.ndarray, np.ndarray]]],
    fetch: Callable[[list[int]], np.ndarray],
    filenames: Callable[[], list[str]],
    champion_dir: Path | None,
    info: dict[str, Any],
    skipped: list[dict[str, str]],
    tolerance: float,
) -> dict[str, Any]:
    """Predict with the candidate (and the champion), then write metrics, plots and reports."""
    model_dir = Path(model_dir)
    model, metadata = load_model_dir(model_dir)
    names = list(metadata["class_names"])
    size, aspect = int(metadata["image_size"]), str(metadata.get("aspect", "squash"))
    champion = None
    if champion_dir is not None and Path(champion_dir).resolve() != model_dir.resolve():
        champion_model, champion_meta = load_model_dir(Path(champion_dir))
        if list(champion_meta["class_names"]) != names:
            log.warning("champion %s has classes %s, the candidate %s: no comparison",
                        champion_dir, champion_meta["class_names"], names)
        else:
            champion = (champion_model, champion_meta)

    order: list[int] = []
    labels: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    champion_outputs: list[np.ndarray] = []
    for indices, images, batch_labels in batches(size, aspect):
        order += indices
        labels.append(np.asarray(batch_labels, dtype=np.int64))
        outputs.append(_predict(model, images))
        if champion is not None:
            c_size, c_aspect = int(champion[1]["image_size"]), str(champion[1].get("aspect", "squash"))
            if (c_size, c_aspect) == (size, aspect):
                c_images = images
            else:
                c_images = fetch(indices, c_size, c_aspect)
            champion_outputs.append(_predict(champion[0], c_images))
    if not order:
        raise EvaluationError(f"no readable images to evaluate ({len(skipped)} skipped)")
    y = np.concatenate(labels)
    metrics = compute_metrics(y, np.concatenate(outputs), names)
    probs, _ = _as_probabilities(np.concatenate(outputs))
    all_names = filenames()
    names_in_order = [all_names[i] for i in order]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots, method = _render(
        out_dir, model, metadata, y, probs, names_in_order,
        lambda ks: fetch([order[k] for k in ks], size, aspect), model_dir / "history.csv",
    )
    comparison = None
    if champion is not None:
        champion_metrics = compute_metrics(y, np.concatenate(champion_outputs), names)
        comparison = compare_models(metrics, champion_metrics, str(metadata.get("run_id", model_dir.name)),
                                    str(champion[1].get("run_id", Path(champion_dir).name)), tolerance)
        # the pipeline's own promotion rule (health, tolerance), fed the accuracies measured here
        from imgflow.tasks.registry import promotion_decision

        candidate_meta = {**metadata, "metrics": {**(metadata.get("metrics") or {}), "val_accuracy": metrics["accuracy"]}}
        champion_meta = {**champion[1], "fingerprint": "<scored on the same images>"}
        promote, reason = promotion_decision(candidate_meta, champion_meta, tolerance, champion_metrics["accuracy"])
        comparison["decision"] = "promote" if promote else "keep champion"
        comparison["reason"] = f"{reason}; both scored on the same {metrics['count']} images"
        comparison["champion_metrics"] = {k: champion_metrics[k] for k in (
            "accuracy", "loss", "macro", "weighted", "per_class", "confusion_matrix", "expected_calibration_error")}
    diagnosis = read_json(model_dir / "diagnosis.json") if (model_dir / "diagnosis.json").is_file() else None
    info = {
        "run_id": str(metadata.get("run_id", model_dir.name)),
        "model_dir": str(model_dir.resolve()),
        **info,
        "image_size": size,
        "aspect": aspect,
        "saliency_method": method,
        "skipped_count": len(skipped),
    }
    _write_predictions(out_dir, names_in_order, y, probs, names)
    paths = write_report(out_dir, metrics, plots, diagnosis=diagnosis, champion=comparison, info=info, skipped=skipped)
    result = dict(metrics)
    result.update({
        "skipped": len(skipped),
        "out_dir": str(out_dir.resolve()),
        "report_html": str(paths["report_html"]),
        "report_md": str(paths["report_md"]),
        "metrics_json": str(paths["metrics_json"]),
        "plots": {k: str(v) for k, v in plots.items()},
        "saliency_method": method,
    })
    if comparison is not None:
        result["comparison"] = comparison
    return result


def evaluate_split(
    model_dir: Path,
    manifest_path: Path,
    split: str = "val",
    out_dir: Path | None = None,
    champion_dir: Path | None = None,
    batch_size: int = 64,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Evaluate a model directory on one split of the TFRecord shards.

    Args:
        model_dir: holds ``model.keras``, ``metadata.json`` and optionally
            ``history.csv`` (learning curves) and ``diagnosis.json`` (findings).
        manifest_path: the shards' ``manifest.json``.
        split: ``"val"`` or ``"train"``.
        out_dir: report folder; default ``model_dir`` itself.
        champion_dir: a champion model directory to compare against on the same data.
        batch_size: images per prediction batch.
        tolerance: accuracy the candidate may lose to the champion and still be promoted.

    Returns:
        The metrics dict (:func:`compute_metrics` keys) plus ``skipped``,
        ``out_dir``, ``report_html``, ``report_md``, ``metrics_json``, ``plots``,
        ``saliency_method`` and ``comparison`` (with a champion).

    Raises:
        EvaluationError: the split is missing or empty, or the model's classes differ
            from the manifest's.
    """
    manifest_path = Path(manifest_path)
    manifest = read_json(manifest_path)
    if split not in manifest.get("splits", {}) or not manifest["splits"][split].get("count"):
        raise EvaluationError(f"{manifest_path}: expected a non-empty split {split!r}, found splits "
                              f"{ {k: v.get('count') for k, v in manifest.get('splits', {}).items()} }")
    from imgflow.tasks.registry import read_metadata

    metadata = read_metadata(Path(model_dir))
    if list(metadata.get("class_names", [])) != list(manifest["class_names"]):
        raise EvaluationError(f"{model_dir}: model classes {metadata.get('class_names')} differ from the "
                              f"manifest's {manifest['class_names']} ({manifest_path})")

    names: dict[int, str] = {}

    def batches(size: int, aspect: str):
        start = 0
        for images, labels, batch_names in _split_batches(manifest_path, split, batch_size):
            n = len(labels)
            names.update(zip(range(start, start + n), batch_names))
            yield list(range(start, start + n)), _resize_batch(images, size), labels
            start += n

    def fetch(indices: list[int], size: int, aspect: str) -> np.ndarray:
        # a second deterministic pass keeps only the few images the plots need in memory
        wanted = set(indices)
        found: dict[int, np.ndarray] = {}
        start = 0
        for images, _, _ in _split_batches(manifest_path, split, batch_size):
            for j in range(len(images)):
                if start + j in wanted:
                    found[start + j] = images[j]
            start += len(images)
            if len(found) == len(wanted):
                break
        return _resize_batch(np.stack([found[i] for i in indices]), size)

    info = {"data": f"{manifest_path.parent} ({split} split)", "split": split,
            "manifest": str(manifest_path.resolve()), "fingerprint": manifest.get("fingerprint")}
    result = _evaluate(Path(model_dir), Path(out_dir) if out_dir else Path(model_dir), batches, fetch,
                       lambda: [names[i] for i in range(len(names))], champion_dir, info, [], tolerance)
    return result


def evaluate_folder(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    champion_dir: Path | None = None,
    batch_size: int = 64,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Evaluate a model directory on any class-folder directory.

    Images are read with ``imgflow.tasks.images.load_image`` at the model's recorded
    ``image_size``, ``aspect`` and ``background`` (the training preparation). Unreadable files, and files in
    folders that are not model classes, are skipped and listed in the report.

    Args:
        model_dir: holds ``model.keras`` and ``metadata.json``.
        data_dir: ``data_dir/<class>/<image>``.
        out_dir: report folder.
        champion_dir: a champion model directory to compare against on the same images.
        batch_size: images per prediction batch.
        tolerance: accuracy the candidate may lose to the champion and still be promoted.

    Returns:
        As :func:`evaluate_split`; ``skipped`` counts the skipped files.

    Raises:
        EvaluationError: no class folder the model knows, or no readable image.
    """
    from imgflow.tasks.images import load_image
    from imgflow.tasks.registry import read_metadata

    data_dir = Path(data_dir)
    metadata = read_metadata(Path(model_dir))
    background = metadata.get("background")  # as in training; None (older models): alpha dropped
    files, skipped = scan_class_folders(data_dir, metadata["class_names"])
    if not files:
        raise EvaluationError(f"DATA_DIR {data_dir}: no files in the class folders {metadata['class_names']}")
    bad: set[int] = set()

    def batches(size: int, aspect: str):
        for start in range(0, len(files), batch_size):
            indices, images, labels = [], [], []
            for index in range(start, min(start + batch_size, len(files))):
                rel, label = files[index]
                try:
                    images.append(load_image(data_dir / rel, size, aspect, background))  # the training resize
                except Exception as exc:  # any decode failure: skip and report, never fatal
                    bad.add(index)
                    skipped.append({"path": rel, "reason": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                indices.append(index)
                labels.append(label)
            if indices:
                yield indices, np.stack(images), np.asarray(labels)

    def fetch(indices: list[int], size: int, aspect: str) -> np.ndarray:
        return np.stack([load_image(data_dir / files[i][0], size, aspect, background) for i in indices])

    info = {"data": str(data_dir.resolve())}
    return _evaluate(Path(model_dir), Path(out_dir), batches, fetch, lambda: [f for f, _ in files],
                     champion_dir, info, skipped, tolerance)
