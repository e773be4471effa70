"""Evaluation orchestration: score a model directory on images, then write the report.

- :func:`evaluate_split` reads a split of the TFRecord shards (the pipeline's
  evaluate step), and
- :func:`evaluate_folder` reads any class-folder directory (``imgflow evaluate``).

Both predict in batches (with the champion on the same images when one is given),
compute the metrics (:mod:`imgflow.tasks.metrics`), draw the plots
(:mod:`imgflow.tasks.plots`, :mod:`imgflow.tasks.saliency`), write
``predictions.csv``, ``metrics.json``, ``report.html`` and ``report.md``
(:mod:`imgflow.tasks.report`), and carry the promotion decision of
:func:`imgflow.tasks.registry.decide` in the result.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.tasks import progress, registry
from imgflow.tasks.atomic import atomic_open, read_json
from imgflow.tasks.attention import measure_attention, read_alpha
from imgflow.tasks.csvcells import safe_row
from imgflow.tasks.metrics import EvaluationError, as_probabilities, compute_metrics, finite_rows
from imgflow.tasks.ood import novelty_section
from imgflow.tasks.plots import plot_confusion_matrix, plot_image_grid, plot_learning_curves, plot_reliability, plot_saliency
from imgflow.tasks.report import training_info, write_report
from imgflow.tasks.saliency import saliency_maps

log = logging.getLogger(__name__)

# EvaluationError (the CLI maps it) and plot_learning_curves (imgflow.tasks.training draws the
# run's curves with it) are re-exported for their callers; they live in metrics and plots.
__all__ = ["EvaluationError", "evaluate_folder", "evaluate_split", "plot_learning_curves", "scan_class_folders"]

#: how many highest-loss images the gallery shows
GALLERY_SIZE = 16
#: correct and wrong examples per class in the saliency view (each)
SALIENCY_PER_CLASS = 2
#: classes shown in the saliency view (the worst recall first)
SALIENCY_MAX_CLASSES = 8
#: most-confused pairs plotted, and examples per pair
CONFUSED_PAIRS = 3
CONFUSED_EXAMPLES = 6
#: the evaluation's ``error`` cell of a row whose model outputs were NaN or inf
NON_FINITE_ERROR = "non-finite model output (NaN or inf)"


# --------------------------------------------------------------------------- image sources


def _resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    return np.stack([
        np.asarray(Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((size, size), Image.Resampling.BILINEAR))
        for img in images
    ])


def scan_class_folders(
    data_dir: Path, class_names: Sequence[str], exclude: Iterable[Path | str] = ()
) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """Files of a class-folder directory labelled in the model's class order.

    The walk is :func:`imgflow.tasks.scan.walk` (one policy for every command): hidden
    names and ``exclude`` are ignored; symlinks never lead out of ``data_dir`` (a
    linked file or class folder outside it is skipped and never read); links that
    loop or dangle, FIFOs, sockets and devices are skipped and never opened. Files
    whose name is not UTF-8 are skipped too (the report lists them, ``\\xHH`` for each
    stray byte); nested folders count for their class.

    Args:
        data_dir: ``data_dir/<class>/**/<file>``.
        class_names: the model's classes.
        exclude: folders or files never scanned (imgflow's work folder inside ``data_dir``).

    Returns:
        (files, skipped): files as (POSIX path relative to data_dir, label), sorted;
        skipped lists what is not evaluated and why (``{"path", "reason"}``): files in
        folders the model does not know, and every name the walk policy skips.

    Raises:
        EvaluationError: ``data_dir`` is not a directory or holds no folder named
            after a model class.
    """
    from imgflow.tasks import scan

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvaluationError(f"DATA_DIR {data_dir}: expected a directory of class folders, not found")
    index = {name: i for i, name in enumerate(class_names)}
    files: list[tuple[str, int]] = []
    skipped: list[dict[str, str]] = []
    skip = scan.file_ids(exclude)
    quiet = {scan.FOLDER, scan.HIDDEN, scan.EXCLUDED}  # walked or ignored without a word, as before

    def skip_entry(entry: scan.Entry) -> None:
        if entry.kind not in quiet and entry.kind != scan.FILE:
            skipped.append({"path": scan.encode_path(entry.rel), "reason": entry.message})

    folders = []
    for entry in scan.list_root(data_dir, exclude=skip):
        if entry.kind == scan.FOLDER:
            folders.append(entry)
        else:
            skip_entry(entry)  # a stray file at the root belongs to no class: ignored, as before
    if not any(folder.rel in index for folder in folders):
        raise EvaluationError(
            f"DATA_DIR {data_dir}: expected folders named after the model's classes {list(class_names)}, "
            f"found {[scan.encode_path(f.rel) for f in folders] or 'no folders'}"
        )
    for folder in folders:
        for entry in scan.walk(data_dir, folder.path, exclude=skip):
            rel = scan.encode_path(entry.rel)
            if entry.kind != scan.FILE:
                skip_entry(entry)
            elif folder.rel not in index:
                skipped.append({"path": rel, "reason": f"class folder {scan.encode_path(folder.rel)!r} is not one of the model's classes"})
            elif entry.undecodable:
                skipped.append({"path": rel, "reason": "the file name is not valid UTF-8; rename it to evaluate it"})
            else:
                files.append((entry.rel, index[folder.rel]))
    files.sort()
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


def _newer(path: Path, than: Path) -> bool:
    """Whether ``path`` exists and was written no earlier than ``than`` (which must exist)."""
    try:
        return Path(than).is_file() and path.stat().st_mtime_ns >= Path(than).stat().st_mtime_ns
    except OSError:
        return False


def _render(
    out_dir: Path,
    model: Any,
    metrics: dict[str, Any],
    labels: np.ndarray,
    probs: np.ndarray,
    filenames: Sequence[str],
    fetch: Callable[[list[int]], np.ndarray],
    history_csv: Path | None,
    best_epoch: int | None = None,
    calibrated: np.ndarray | None = None,
    alpha: Callable[[list[int]], list[np.ndarray | None]] | None = None,
) -> tuple[dict[str, Path], str | None]:
    """Write every PNG plot; returns (plots, saliency method).

    ``labels``, ``probs`` and ``filenames`` hold only the rows with finite outputs; the
    confusion matrix comes from ``metrics``; ``metrics`` gains ``attention`` and
    ``evaluation_findings`` (:func:`imgflow.tasks.attention.measure_attention`, with
    the examples' alpha masks from ``alpha``; None: shards, no files).
    """
    names = metrics["class_names"]
    plots: dict[str, Path] = {
        "confusion_matrix": plot_confusion_matrix(metrics["confusion_matrix"], names, out_dir / "confusion_matrix.png"),
        "reliability": plot_reliability(labels, probs, out_dir / "reliability.png", calibrated=calibrated),
    }
    if history_csv is not None:
        curves: Path | None = out_dir / "learning_curves.png"
        # training drew it already (with the kept epoch marked) unless history.csv changed since
        if not _newer(curves, history_csv):
            curves = plot_learning_curves(history_csv, out_dir / "learning_curves.png", best_epoch=best_epoch)
        if curves is not None:
            plots["learning_curves"] = curves
    if len(labels) == 0:  # every output was NaN/inf: there is no example to show
        return plots, None
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
        metrics.update(measure_attention(maps, [int(labels[i]) for i in sel], names,
                                         None if alpha is None else (lambda: alpha(sel))))
    return plots, method


def write_predictions(
    out_dir: Path,
    filenames: Sequence[str],
    labels: np.ndarray,
    probs: np.ndarray,
    names: Sequence[str],
    finite: np.ndarray | None = None,
    neutralise: bool = True,
) -> Path:
    """Write ``predictions.csv``: one row per evaluated image, atomically.

    Columns: ``path``, ``true``, ``label``, ``confidence``, ``prob_<class>`` in model
    order, ``error`` (empty, or why the row has no prediction: non-finite outputs).
    Text cells that a spreadsheet would run as a formula get a leading ``'``
    (:func:`imgflow.tasks.csvcells.safe_cell`) unless ``neutralise`` is False.

    Args:
        out_dir: folder of the CSV.
        filenames: the path of each row (relative to the data root).
        labels: true class indices.
        probs: probabilities [N, K].
        names: class names in model order.
        finite: rows whose outputs were finite (default: all).
        neutralise: prefix formula-like cells with ``'``.

    Returns:
        The CSV path.
    """
    pred = probs.argmax(axis=1)
    finite = np.ones(len(filenames), dtype=bool) if finite is None else finite
    target = Path(out_dir) / "predictions.csv"
    with atomic_open(target, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        writer.writerow(safe_row(["path", "true", "label", "confidence", *[f"prob_{n}" for n in names], "error"], neutralise))
        for i, name in enumerate(filenames):
            if finite[i]:
                cells = [names[pred[i]], f"{probs[i, pred[i]]:.6f}", *[f"{p:.6f}" for p in probs[i]], ""]
            else:
                cells = ["", "", *[""] * len(names), NON_FINITE_ERROR]
            writer.writerow(safe_row([name, names[labels[i]], *cells], neutralise))
    return target


def _load_champion(champion_dir: Path | None, model_dir: Path, names: list[str]) -> tuple[Any, dict[str, Any] | None]:
    """(champion model or None, champion metadata or None); a champion with other classes is not scored."""
    if champion_dir is None or Path(champion_dir).resolve() == model_dir.resolve():
        return None, None
    champion_model, champion_meta = registry.load_model_dir(Path(champion_dir))
    if list(champion_meta["class_names"]) != names:
        log.warning("champion %s has classes %s, the candidate %s: no comparison",
                    champion_dir, champion_meta["class_names"], names)
        return None, champion_meta
    return champion_model, champion_meta


def _score(
    model: Any,
    size: int,
    aspect: str,
    champion: Any,
    champion_meta: dict[str, Any] | None,
    batches: Callable[[int, str], Iterator[tuple[list[int], np.ndarray, np.ndarray]]],
    fetch: Callable[..., np.ndarray],
    total: int | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray | None]:
    """Predict every batch with the candidate (and the champion): (order, labels, outputs, champion outputs)."""
    order: list[int] = []
    labels: list[np.ndarray] = []
    outputs: list[np.ndarray] = []
    champion_outputs: list[np.ndarray] = []
    for indices, images, batch_labels in progress.iterate(batches(size, aspect), "evaluate", total, "images",
                                                          weight=lambda batch: len(batch[0])):
        order += indices
        labels.append(np.asarray(batch_labels, dtype=np.int64))
        outputs.append(_predict(model, images))
        if champion is not None:
            c_size, c_aspect = int(champion_meta["image_size"]), str(champion_meta.get("aspect", "squash"))
            c_images = images if (c_size, c_aspect) == (size, aspect) else fetch(indices, c_size, c_aspect)
            champion_outputs.append(_predict(champion, c_images))
    if not order:
        return order, np.zeros(0, dtype=np.int64), np.zeros((0, 0)), None
    return (order, np.concatenate(labels), np.concatenate(outputs),
            np.concatenate(champion_outputs) if champion is not None else None)


def _evaluate(
    model_dir: Path,
    out_dir: Path,
    batches: Callable[[int, str], Iterator[tuple[list[int], np.ndarray, np.ndarray]]],
    fetch: Callable[..., np.ndarray],
    filenames: Callable[[], list[str]],
    champion_dir: Path | None,
    info: dict[str, Any],
    skipped: list[dict[str, str]],
    tolerance: float,
    min_class_images_for_recall_gate: int = registry.MIN_CLASS_IMAGES_FOR_RECALL_GATE,
    csv_neutralise: bool = True,
    ood_dir: Path | None = None,
    fit_missing: bool = False,
    alpha: Callable[[list[int], int, str], list[np.ndarray | None]] | None = None,
) -> dict[str, Any]:
    """Predict with the candidate (and the champion), decide promotion, write metrics, plots and reports."""
    model_dir = Path(model_dir)
    model, metadata = registry.load_model_dir(model_dir)
    names = list(metadata["class_names"])
    size, aspect = int(metadata["image_size"]), str(metadata.get("aspect", "squash"))
    champion, champion_meta = _load_champion(champion_dir, model_dir, names)
    order, y, raw, champion_raw = _score(model, size, aspect, champion, champion_meta, batches, fetch,
                                         info.pop("count", None))  # the progress total, not a report field
    if not order:
        raise EvaluationError(f"no readable images to evaluate ({len(skipped)} skipped)")
    metrics = compute_metrics(y, raw, names)
    probs, _ = as_probabilities(raw)
    finite = finite_rows(raw)
    all_names = filenames()
    names_in_order = [all_names[i] for i in order]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    training = training_info(model_dir, metadata)
    keep = np.flatnonzero(finite)
    novelty_keys, novelty_plots, calibrated = novelty_section(model_dir, model, y[keep], probs[keep], batches, size,
                                                              aspect, out_dir, ood_dir, fit_missing,
                                                              metadata.get("background"))
    metrics.update(novelty_keys)
    plots, method = _render(
        out_dir, model, metrics, y[keep], probs[keep], [names_in_order[k] for k in keep],
        lambda ks: fetch([order[keep[k]] for k in ks], size, aspect), model_dir / "history.csv",
        best_epoch=training.get("best_epoch"), calibrated=calibrated,
        alpha=None if alpha is None else (lambda ks: alpha([order[keep[k]] for k in ks], size, aspect)),
    )
    plots.update(novelty_plots)
    run_id = str(metadata.get("run_id", model_dir.name))
    champion_metrics = compute_metrics(y, champion_raw, names) if champion_raw is not None else None
    candidate_meta = {**metadata, "metrics": {**(metadata.get("metrics") or {}), "val_accuracy": metrics["accuracy"]}}
    decision = registry.decide(candidate_meta, metrics, champion_meta, champion_metrics, tolerance,
                               min_class_images_for_recall_gate)
    comparison = None
    if champion_metrics is not None:
        comparison = registry.compare_models(metrics, champion_metrics, run_id,
                                             str(champion_meta.get("run_id", Path(champion_dir).name)))
        comparison.update(decision=decision["decision"], reason=decision["reason"], tolerance=tolerance)
        comparison["champion_metrics"] = {k: champion_metrics[k] for k in (
            "accuracy", "loss", "macro", "weighted", "per_class", "confusion_matrix", "expected_calibration_error")}
    diagnosis = read_json(model_dir / "diagnosis.json") if (model_dir / "diagnosis.json").is_file() else None
    info = {
        "run_id": run_id,
        "model_dir": str(model_dir.resolve()),
        **info,
        "image_size": size,
        "aspect": aspect,
        "saliency_method": method,
        "skipped_count": len(skipped),
        "training": training,
    }
    write_predictions(out_dir, names_in_order, y, probs, names, finite, csv_neutralise)
    paths = write_report(out_dir, metrics, plots, diagnosis=diagnosis, champion=comparison, info=info, skipped=skipped)
    result = dict(metrics)
    result.update({
        "skipped": len(skipped),
        "out_dir": str(out_dir.resolve()),
        "report_html": str(paths["report_html"]),
        "report_md": str(paths["report_md"]),
        "metrics_json": str(paths["metrics_json"]),
        "predictions_csv": str((out_dir / "predictions.csv").resolve()),
        "plots": {k: str(v) for k, v in plots.items()},
        "saliency_method": method,
        "promotion": decision,
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
    min_class_images_for_recall_gate: int = registry.MIN_CLASS_IMAGES_FOR_RECALL_GATE,
    csv_neutralise: bool = True,
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
        min_class_images_for_recall_gate: a recall of 0 on a class with at least this
            many images blocks promotion over a champion that recognises the class.
        csv_neutralise: prefix ``predictions.csv`` cells that a spreadsheet would run as
            formulas with ``'`` (False: raw paths and class names).

    Returns:
        The metrics dict (:func:`compute_metrics` keys) plus ``skipped``,
        ``out_dir``, ``report_html``, ``report_md``, ``metrics_json``, ``plots``,
        ``predictions_csv``, ``saliency_method``, ``promotion`` (the decision of
        :func:`imgflow.tasks.registry.decide`: ``promote``, ``decision``, ``reason``)
        and ``comparison`` (with a champion). ``non_finite_outputs`` counts the images
        whose model outputs were NaN or inf (marked in ``predictions.csv``).

    Raises:
        EvaluationError: the split is missing or empty, or the model's classes differ
            from the manifest's.
    """
    manifest_path = Path(manifest_path)
    from imgflow.tasks.records import read_manifest

    manifest = read_manifest(manifest_path).to_dict()
    if split not in manifest.get("splits", {}) or not manifest["splits"][split].get("count"):
        raise EvaluationError(f"{manifest_path}: expected a non-empty split {split!r}, found splits "
                              f"{ {k: v.get('count') for k, v in manifest.get('splits', {}).items()} }")
    metadata = registry.read_metadata(Path(model_dir))
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
            "manifest": str(manifest_path.resolve()), "fingerprint": manifest.get("fingerprint"),
            "count": int(manifest["splits"][split]["count"])}
    return _evaluate(Path(model_dir), Path(out_dir) if out_dir else Path(model_dir), batches, fetch,
                     lambda: [names[i] for i in range(len(names))], champion_dir, info, [], tolerance,
                     min_class_images_for_recall_gate, csv_neutralise)


def evaluate_folder(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    champion_dir: Path | None = None,
    batch_size: int = 64,
    tolerance: float = 0.0,
    min_class_images_for_recall_gate: int = registry.MIN_CLASS_IMAGES_FOR_RECALL_GATE,
    csv_neutralise: bool = True,
    exclude: Sequence[Path | str] = (),
    ood_dir: Path | None = None,
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
        min_class_images_for_recall_gate: a recall of 0 on a class with at least this
            many images blocks promotion over a champion that recognises the class.
        csv_neutralise: prefix ``predictions.csv`` cells that a spreadsheet would run as
            formulas with ``'`` (False: raw paths and class names).
        exclude: folders never scanned (imgflow's work folder inside ``data_dir``).
        ood_dir: images known to be none of the classes: adds ``novelty`` (AUROC) and
            ``novelty.png``. A model directory without novelty statistics gets them here.

    Returns:
        As :func:`evaluate_split`; ``skipped`` counts the skipped files.

    Raises:
        EvaluationError: no class folder the model knows, or no readable image.
    """
    from imgflow.tasks.images import load_image

    data_dir = Path(data_dir)
    metadata = registry.read_metadata(Path(model_dir))
    background = metadata.get("background")  # as in training; None (older models): alpha dropped
    files, skipped = scan_class_folders(data_dir, metadata["class_names"], exclude)
    if not files:
        raise EvaluationError(f"DATA_DIR {data_dir}: no files in the class folders {metadata['class_names']}")
    bad: set[int] = set()

    def batches(size: int, aspect: str):
        for start in range(0, len(files), batch_size):
            indices, images, labels = [], [], []
            for index in range(start, min(start + batch_size, len(files))):
                rel, label = files[index]
                if index in bad:  # batches run again for novelty features: report a bad file once
                    continue
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

    def alpha(indices: list[int], size: int, aspect: str) -> list[np.ndarray | None]:
        return [read_alpha(data_dir / files[i][0], size, aspect) for i in indices]

    info = {"data": str(data_dir.resolve()), "count": len(files)}
    return _evaluate(Path(model_dir), Path(out_dir), batches, fetch, lambda: [f for f, _ in files],
                     champion_dir, info, skipped, tolerance, min_class_images_for_recall_gate, csv_neutralise,
                     ood_dir=ood_dir, fit_missing=True, alpha=alpha)
