"""The evaluation plots, as PNG files written atomically.

Every chart draws on matplotlib's object-oriented ``Figure`` (Agg canvas, no pyplot, no
global backend), imported inside the functions: importing this module stays cheap and
is safe in threads. Image grids are Pillow mosaics (:mod:`imgflow.tasks.mosaic`).
"""

from __future__ import annotations

import csv
import io
import math
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imgflow.tasks.atomic import atomic_open
from imgflow.tasks.metrics import CALIBRATION_BINS, expected_calibration_error, reliability_bins


#: inches per character of a 10 pt tick label (DejaVu Sans runs ~0.6 em a character)
_CHAR_INCHES = 0.085


_warm_up: threading.Thread | None = None
_warm_up_lock = threading.Lock()


def warm_up_in_background() -> None:
    """Import matplotlib and load its font in a thread, once per process.

    The first chart of a process otherwise pays ~0.4 s for both. Called while the model
    trains (TensorFlow's steps run without the GIL); every chart waits for it to finish
    first (:func:`_figure`), so two threads never draw at once (matplotlib's shared font
    cache is not thread-safe).
    """
    global _warm_up
    with _warm_up_lock:
        if _warm_up is None:
            thread = threading.Thread(target=_draw_a_throwaway_chart, name="imgflow-chart-warm-up", daemon=True)
            thread.start()
            _warm_up = thread  # published once started: a chart may join it at any moment after


def _draw_a_throwaway_chart() -> None:
    try:
        fig = _new_figure(1.0, 1.0)
        fig.subplots().plot([0, 1], [0, 1], label="0")
        fig.axes[0].legend(fontsize=8)
        fig.savefig(io.BytesIO(), format="png")
    except Exception:  # noqa: BLE001 - only a head start: the real chart reports any real error
        pass


def _figure(width: float, height: float):
    warm_up = _warm_up
    if warm_up is not None and warm_up is not threading.current_thread():
        warm_up.join()
    return _new_figure(width, height)


def _new_figure(width: float, height: float):
    # The object-oriented Figure needs no pyplot and no global backend: safe in threads.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _subplots(fig, rows: int, cols: int, left: float, right: float, bottom: float, top: float,
              gap_x: float = 0.0, gap_y: float = 0.0) -> np.ndarray:
    """A rows x cols grid of axes placed with fixed margins and gaps, in inches.

    Fixed margins instead of matplotlib's constrained layout: the layout engine measures
    every text on an extra draw of the figure, a third of each chart's cost (~0.15 s).
    """
    width, height = fig.get_size_inches()
    axes_width = (width - left - right - (cols - 1) * gap_x) / cols
    axes_height = (height - top - bottom - (rows - 1) * gap_y) / rows
    grid = fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
        "wspace": gap_x / axes_width, "hspace": gap_y / axes_height})
    return grid.ravel()


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
    side = max(2.5, 0.45 * k + 1.2)  # the matrix itself
    rotate = k > 4
    names = _CHAR_INCHES * max((len(str(name)) for name in class_names), default=1)
    left = names + 0.55  # tick labels, then "True class"
    bottom = (0.72 * names if rotate else 0.2) + 0.5  # 45-degree labels, then "Predicted class"
    cell = side / (1 - 0.15 - 0.03)  # the matrix and its colour bar (colorbar's fraction and pad)
    numbers = 0.55  # the colour bar's tick labels, right of each cell
    fig = _figure(2 * (left + cell + numbers), side + bottom + 0.35)
    axes = _subplots(fig, 1, 2, left=left, right=numbers, bottom=bottom, top=0.35, gap_x=numbers + left)
    annotate = k <= 25
    for ax, data, title, fmt in (
        (axes[0], cm, "Counts", "{:.0f}"),
        (axes[1], norm, "Row-normalised (recall)", "{:.2f}"),
    ):
        vmax = data.max() if data.max() > 0 else 1.0
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, shrink=0.8, fraction=0.15, pad=0.03)
        ax.set_title(title)
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("True class")
        ax.set_xticks(range(k), labels=list(class_names), rotation=45 if rotate else 0, ha="right" if rotate else "center")
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


def plot_learning_curves(history_csv: Path, path: Path, best_epoch: int | None = None) -> Path | None:
    """Training and validation curves of every metric in a Keras ``history.csv``.

    Args:
        history_csv: CSV with an ``epoch`` column and metric columns (``loss``,
            ``val_loss``, ``accuracy`` ...), as ``keras.callbacks.CSVLogger`` writes it.
        path: PNG file to write.
        best_epoch: the 1-based epoch whose weights the model kept; marked on every
            panel with a dashed line and a star on the validation curve.

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
    rows, cols = math.ceil(len(panels) / 3), min(len(panels), 3)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = _subplots(fig, rows, cols, left=0.6, right=0.15, bottom=0.5, top=0.3, gap_x=0.65, gap_y=0.8)
    from matplotlib.ticker import MaxNLocator

    for ax, key in zip(axes, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.plot(epochs, history[key], marker="o", markersize=3, label=f"train {key}" if key not in extra else key)
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], marker="o", markersize=3, label=f"val {key}")
        if best_epoch is not None and best_epoch in epochs:
            values = history.get(f"val_{key}", history[key]) if key not in extra else [float("nan")] * len(epochs)
            _mark_epoch(ax, epochs, values, best_epoch)
        ax.set_title(key)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if key in extra:
            ax.set_yscale("log")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, path)


def _mark_epoch(ax, epochs: list[int], values: list[float], best_epoch: int) -> None:
    """A dashed line at the kept epoch and a star on its value ("weights kept")."""
    ax.axvline(best_epoch, color="#555555", linestyle="--", linewidth=1)
    value = values[epochs.index(best_epoch)] if epochs.index(best_epoch) < len(values) else float("nan")
    if math.isfinite(value):
        ax.plot([best_epoch], [value], marker="*", markersize=13, color="#d62728", linestyle="none",
                label=f"weights kept (epoch {best_epoch})")


def plot_reliability(labels: np.ndarray, probabilities: np.ndarray, path: Path, bins: int = CALIBRATION_BINS,
                     calibrated: np.ndarray | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin, with the confidence histogram.

    With ``calibrated`` (temperature-scaled probabilities of the same images) the
    calibrated per-bin accuracy is drawn over the bars and the title shows both ECEs.

    Args:
        labels: true class indices, shape [N].
        probabilities: class probabilities, shape [N, K].
        path: PNG file to write.
        bins: equal-width confidence bins.
        calibrated: optional calibrated probabilities, shape [N, K].

    Returns:
        ``path``.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    rows = reliability_bins(labels, probabilities, bins)
    ece = expected_calibration_error(labels, probabilities, bins)
    centers = [(r["low"] + r["high"]) / 2 for r in rows]
    fig = _figure(8.5, 3.8)
    ax, hist = _subplots(fig, 1, 2, left=0.6, right=0.15, bottom=0.55, top=0.35, gap_x=0.75)
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
    if calibrated is not None:
        after = np.asarray(calibrated, dtype=np.float64)
        points = [(r["confidence"], r["accuracy"]) for r in reliability_bins(labels, after, bins) if r["accuracy"] is not None]
        if points:
            ax.plot(*zip(*points), "o-", color="#dd8452", linewidth=1.5, label="after temperature scaling")
        ax.set_title(f"Reliability (ECE {ece:.3f} before, {expected_calibration_error(labels, after, bins):.3f} after)")
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
    """A grid of images with a caption above each (gallery, confused pairs); see :mod:`imgflow.tasks.mosaic`.

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
    from imgflow.tasks.mosaic import write_mosaic

    return write_mosaic(images, captions, path, ncols, title, colors)


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
    from imgflow.tasks.mosaic import overlay_heatmap, write_mosaic

    methods = [method] * len(images) if isinstance(method, str) else list(method)
    summary = method if isinstance(method, str) else " / ".join(sorted(set(methods)))
    tiles, texts, tints = [], [], []
    for index, image in enumerate(images):
        tiles += [np.asarray(image), overlay_heatmap(image, heatmaps[index])]
        texts += [captions[index], methods[index]]
        tints += [colors[index] if colors else "black", "black"]
    return write_mosaic(tiles, texts, path, 2 * max(1, ncols),
                        f"What the model looked at ({summary}; red = most important for the predicted class)", tints)


def plot_novelty_histogram(in_scores: np.ndarray, ood_scores: np.ndarray, threshold: float, path: Path,
                           auroc: float | None = None) -> Path:
    """Histogram of novelty scores: evaluation images vs the ``--ood-dir`` images, with the threshold.

    Args:
        in_scores: novelty of the evaluated (known-class) images.
        ood_scores: novelty of the images known to be none of the classes.
        threshold: the calibrated ``unknown`` threshold.
        path: PNG file to write.
        auroc: shown in the title when given.
    """
    in_scores, ood_scores = np.asarray(in_scores, float), np.asarray(ood_scores, float)
    both = np.concatenate([in_scores, ood_scores, [threshold]])
    edges = np.linspace(float(both.min()), float(both.max()) + 1e-9, 41)
    fig = _figure(7.5, 3.6)
    (ax,) = _subplots(fig, 1, 1, left=0.6, right=0.15, bottom=0.55, top=0.35)
    ax.hist(in_scores, bins=edges, alpha=0.6, color="#4c72b0", label=f"evaluation images ({len(in_scores)})")
    ax.hist(ood_scores, bins=edges, alpha=0.6, color="#c44e52", label=f"--ood-dir images ({len(ood_scores)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="unknown threshold")
    ax.set_xlabel("novelty (higher = less like the training data)")
    ax.set_ylabel("images")
    ax.set_title("Novelty" + (f" (AUROC {auroc:.3f})" if auroc is not None else ""))
    ax.legend(fontsize=8)
    return _save(fig, path)
