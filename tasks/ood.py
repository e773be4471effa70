"""The evaluation's novelty part: calibration before/after, novelty AUROC against ``--ood-dir``.

Called by :mod:`imgflow.tasks.evaluation`; a model directory without novelty statistics
(trained before they existed) gets them here (a backfill: from the shards named in its
metadata, else from the evaluated images themselves, half fitting and half calibrating).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.tasks import novelty as N
from imgflow.tasks.calibration import softmax

log = logging.getLogger(__name__)

Batches = Callable[[int, str], Iterator[tuple[list[int], np.ndarray, np.ndarray]]]


def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities from probabilities (``log p`` equals the logits up to a constant)."""
    return softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)), temperature)


def ensure_statistics(model_dir: Path, model: Any, batches: Batches, size: int, aspect: str,
                      fit_missing: bool = True) -> N.NoveltyModel | None:
    """The model directory's novelty statistics, fitted now when it has none and ``fit_missing`` (else None)."""
    from imgflow.tasks import registry

    metadata = registry.read_metadata(model_dir)
    found = N.load(model_dir, metadata)
    if found is not None or not fit_missing:
        return found
    manifest = metadata.get("manifest")
    try:
        if manifest and Path(manifest).is_file():
            N.fit_from_manifest(model_dir, manifest)
        else:
            images, labels = [], []
            for _, batch, batch_labels in batches(size, aspect):
                images.append(batch)
                labels.append(batch_labels)
            N.fit_from_arrays(model_dir, np.concatenate(images), np.concatenate(labels), model=model)
    except (N.NoveltyError, ValueError) as exc:
        log.warning("%s: no novelty statistics could be fitted: %s", model_dir, exc)
        return None
    log.info("%s: novelty statistics and temperature fitted (backfill)", model_dir)
    return N.load(model_dir)


def ood_files(ood_dir: Path) -> list[Path]:
    """Every non-hidden file under ``ood_dir``, sorted."""
    from imgflow.tasks.dataset import is_hidden

    ood_dir = Path(ood_dir)
    return sorted(p for p in ood_dir.rglob("*")
                  if p.is_file() and not any(is_hidden(part) for part in p.relative_to(ood_dir).parts))


def _scores(stats: N.NoveltyModel, model: Any, images: np.ndarray) -> np.ndarray:
    outputs, features = N.extract(stats.predictor(model), images)
    return stats.score(features, outputs)[1]


def novelty_section(
    model_dir: Path,
    model: Any,
    labels: np.ndarray,
    probs: np.ndarray,
    batches: Batches,
    size: int,
    aspect: str,
    out_dir: Path,
    ood_dir: Path | None = None,
    fit_missing: bool = True,
    background: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path], np.ndarray | None]:
    """Calibration and novelty figures of an evaluation.

    Args:
        model_dir: the evaluated model directory.
        model: its loaded Keras model.
        labels: true classes of the rows with finite outputs.
        probs: their probabilities as the model gives them.
        batches: the evaluation's ``(indices, images, labels)`` batches (iterated again for features).
        size: model image size.
        aspect: model resize mode.
        out_dir: report folder (for ``novelty.png``).
        ood_dir: images known to be none of the classes, or None.
        fit_missing: fit statistics for a model directory that has none (a backfill).
        background: the model's colour under transparent pixels (``ood_dir`` images are read as in training).

    Returns:
        ``(metrics keys, plots, calibrated probabilities or None)``: the keys are
        ``calibration`` (temperature, ECE before/after on these images) and, with
        ``ood_dir``, ``novelty`` (AUROC, counts, unknown shares, threshold).

    Raises:
        ValueError: ``ood_dir`` holds no readable image.
    """
    from imgflow.tasks.metrics import expected_calibration_error

    stats = ensure_statistics(Path(model_dir), model, batches, size, aspect, fit_missing)
    keys: dict[str, Any] = {}
    plots: dict[str, Path] = {}
    if stats is None:
        if ood_dir is not None:
            keys["novelty"] = {"auroc": None, "note": "the model has no Dense head: no novelty statistics"}
        return keys, plots, None
    after = calibrated(probs, stats.temperature)
    keys["calibration"] = {
        "temperature": round(stats.temperature, 6),
        "ece_before": round(expected_calibration_error(labels, probs), 6),
        "ece_after": round(expected_calibration_error(labels, after), 6),
        "fitted_on": "validation split",
    }
    if ood_dir is None:
        return keys, plots, after
    from sklearn.metrics import roc_auc_score

    from imgflow.tasks.images import load_image

    in_scores = np.concatenate([_scores(stats, model, images) for _, images, _ in batches(size, aspect)])
    ood_images, unreadable = [], 0
    for path in ood_files(ood_dir):
        try:
            ood_images.append(load_image(path, size, aspect, background))
        except Exception:  # noqa: BLE001 - an unreadable file is counted, never fatal
            unreadable += 1
    if not ood_images:
        raise ValueError(f"--ood-dir {ood_dir}: expected images known to be none of the classes, found no readable image")
    ood_scores = _scores(stats, model, np.stack(ood_images))
    truth = np.r_[np.zeros(len(in_scores)), np.ones(len(ood_scores))]
    auroc = float(roc_auc_score(truth, np.r_[in_scores, ood_scores]))
    keys["novelty"] = {
        "auroc": round(auroc, 6),
        "method": stats.method,
        "threshold": stats.threshold,
        "ood_dir": str(Path(ood_dir).resolve()),
        "ood_count": int(len(ood_scores)),
        "ood_unreadable": unreadable,
        "in_count": int(len(in_scores)),
        "ood_unknown_share": round(float((ood_scores > stats.threshold).mean()), 6),
        "in_unknown_share": round(float((in_scores > stats.threshold).mean()), 6),
    }
    from imgflow.tasks.plots import plot_novelty_histogram

    plots["novelty"] = plot_novelty_histogram(in_scores, ood_scores, stats.threshold, Path(out_dir) / "novelty.png", auroc)
    return keys, plots, after
