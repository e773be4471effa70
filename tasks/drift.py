"""Inbox drift: is a folder of images to predict like the images the model was trained on?

Cheap properties of every image (file format, colour mode, alpha, width, height,
aspect ratio, mean brightness at the model's input size) are counted in fixed bins
(a *profile*: ``{"count": n, "properties": {name: {bin: count}}}``, plain JSON).
The training profile is stored with the model (``drift_profile.json``); each prediction
run builds the inbox's profile chunk by chunk and compares the two with the
Jensen-Shannon distance (base 2, in [0, 1]).

A property is flagged when its distance exceeds both :data:`MIN_DISTANCE` and :data:`NOISE_FACTOR` times the
distance two samples of these sizes (training profile, inbox) would show by chance. The overall ``drift``
flag is raised when any property is flagged or when the share of ``unknown`` files is
clearly above the model's calibrated ``unknown_rate``. Predicted class shares are
reported against the training shares but do not raise the flag (the class mix of an
inbox may change for good reasons).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.tasks.atomic import read_json, write_json

PROFILE_FILE = "drift_profile.json"
PROPERTIES = ("format", "mode", "has_alpha", "width", "height", "aspect", "brightness")
#: a property distance below this is never drift, whatever the sample size
MIN_DISTANCE = 0.2
#: a property distance must also exceed this many times the distance expected by chance
NOISE_FACTOR = 3.0
#: training images read for the stored profile (a seeded sample beyond this)
PROFILE_SAMPLE = 2000
_SIZE_EDGES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
_ASPECT_EDGES = [0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0]
_BRIGHTNESS_BINS = 8


def _labels(edges: Sequence[float]) -> list[str]:
    bounds = ["0", *(format(e, "g") for e in edges), "inf"]
    return [f"[{low},{high})" for low, high in zip(bounds, bounds[1:])]


_SIZE_LABELS, _ASPECT_LABELS = _labels(_SIZE_EDGES), _labels(_ASPECT_EDGES)


def _bucket(value: float, edges: Sequence[float], labels: Sequence[str]) -> str:
    # bisect, not numpy: this runs once per image per property, where numpy's call overhead dominates
    return labels[bisect.bisect_right(edges, value)]


def unreadable_properties() -> dict[str, str]:
    """The properties of a file whose header cannot be read."""
    return {"format": "unreadable", "mode": "unreadable"}


def image_properties(path: Path | str, pixels: np.ndarray | None = None, info: dict | None = None) -> dict[str, str]:
    """The binned properties of one image file (header read only; brightness from ``pixels``).

    Args:
        path: the image file.
        pixels: the decoded model input (uint8 RGB) for the brightness; None leaves it out.
        info: what ``load_image(..., info=)`` recorded when it opened the file (then the
            file is not opened again); None or empty: the header is read here.

    Returns:
        ``{property: bin label}``; an unreadable header gives ``format``/``mode`` ``"unreadable"``.
    """
    if not info or "format" not in info:
        from PIL import Image

        try:
            with Image.open(path) as img:
                info = {"format": img.format, "mode": img.mode, "width": img.size[0], "height": img.size[1],
                        "has_alpha": img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info}
        except Exception:  # noqa: BLE001 - an unreadable file is counted as such, never fatal
            return unreadable_properties()
    width, height = int(info["width"]), int(info["height"])
    props = {"format": str(info["format"] or "unknown"), "mode": str(info["mode"]),
             "has_alpha": str(bool(info["has_alpha"])).lower()}
    props["width"] = _bucket(width, _SIZE_EDGES, _SIZE_LABELS)
    props["height"] = _bucket(height, _SIZE_EDGES, _SIZE_LABELS)
    props["aspect"] = _bucket(width / max(height, 1), _ASPECT_EDGES, _ASPECT_LABELS)
    if pixels is not None:
        level = int(pixels.sum()) / pixels.size  # an integer sum: cheaper than a float mean
        props["brightness"] = str(min(int(level * _BRIGHTNESS_BINS / 256.0), _BRIGHTNESS_BINS - 1))
    return props


def new_profile() -> dict[str, Any]:
    """An empty profile."""
    return {"count": 0, "properties": {name: {} for name in PROPERTIES}}


def add(profile: dict[str, Any], props: dict[str, str]) -> None:
    """Count one image's properties into ``profile`` (in place)."""
    profile["count"] += 1
    for name, value in props.items():
        bins = profile["properties"].setdefault(name, {})
        bins[value] = bins.get(value, 0) + 1


def merge(profiles: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several profiles (chunks of one inbox)."""
    total = new_profile()
    for profile in profiles:
        total["count"] += int(profile.get("count", 0))
        for name, bins in profile.get("properties", {}).items():
            into = total["properties"].setdefault(name, {})
            for value, count in bins.items():
                into[value] = into.get(value, 0) + int(count)
    return total


def profile_files(paths: Sequence[Path], image_size: int, aspect: str = "squash",
                  limit: int = PROFILE_SAMPLE, seed: int = 0, background: str | None = None) -> dict[str, Any]:
    """The profile of image files (a seeded sample of ``limit``), decoded as the model sees them."""
    from imgflow.tasks.decoding import decode_file

    paths = list(paths)
    if len(paths) > limit:
        chosen = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    profile = new_profile()
    for path in paths:
        info: dict[str, Any] = {}
        pixels, _ = decode_file(path, image_size, aspect, info, background)  # None: the header may still read
        add(profile, image_properties(path, pixels, info))
    return profile


def js_distance(p: dict[str, int], q: dict[str, int]) -> float:
    """Jensen-Shannon distance (base 2, 0 = same, 1 = disjoint) of two bin-count dicts; 0.0 if either is empty."""
    keys = sorted(set(p) | set(q))
    a = np.array([p.get(k, 0) for k in keys], dtype=np.float64)
    b = np.array([q.get(k, 0) for k in keys], dtype=np.float64)
    if a.sum() == 0 or b.sum() == 0:
        return 0.0
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float((x[mask] * np.log2(x[mask] / m[mask])).sum())

    return float(math.sqrt(max(0.0, (kl(a) + kl(b)) / 2)))


def noise_distance(bins: int, n: int) -> float:
    """The JS distance a sample of ``n`` shows from its own distribution by chance (about).

    For small differences JS divergence ~ chi-square / (8 n ln 2) and E[chi-square] = bins - 1.
    """
    if n <= 0:
        return 1.0
    return math.sqrt(max(bins - 1, 1) / (8.0 * n * math.log(2)))


def compare(
    training: dict[str, Any],
    inbox: dict[str, Any],
    training_classes: dict[str, int],
    predicted_classes: dict[str, int],
    unknown: int,
    scored: int,
    unknown_rate: float | None,
    calibration_count: int | None = None,
) -> dict[str, Any]:
    """The drift report of an inbox against the training data; pure.

    Args:
        training: the model's stored profile.
        inbox: the profile of the files of this run.
        training_classes: training images per class.
        predicted_classes: files predicted per class in this run.
        unknown: files flagged ``unknown``.
        scored: files with a novelty score.
        unknown_rate: the model's calibrated share of unknowns (None: no novelty statistics).
        calibration_count: validation images the threshold was calibrated on: its own
            sampling error then widens the limit (None: the rate is taken as exact).

    Returns:
        ``{"drift", "reasons", "files", "unknown_share", "unknown_rate", "unknown_drift",
        "properties": {name: {"distance", "threshold", "drift", "training", "inbox"}},
        "class_shares": {"distance", "training", "predicted"}}``.
    """
    n = int(inbox.get("count", 0))
    properties: dict[str, Any] = {}
    reasons: list[str] = []
    for name in PROPERTIES:
        t_bins = (training.get("properties") or {}).get(name) or {}
        i_bins = (inbox.get("properties") or {}).get(name) or {}
        n_in, n_train = sum(i_bins.values()), sum(t_bins.values())
        # both are samples: the chance distance is that of one sample of the "effective" size
        n_eff = n_in * n_train / (n_in + n_train) if n_in and n_train else 0
        distance = js_distance(t_bins, i_bins)
        threshold = max(MIN_DISTANCE, NOISE_FACTOR * noise_distance(len(set(t_bins) | set(i_bins)), int(n_eff)))
        flagged = bool(t_bins and i_bins and distance > threshold)
        properties[name] = {"distance": round(distance, 4), "threshold": round(threshold, 4), "drift": flagged,
                            "training": _shares(t_bins), "inbox": _shares(i_bins)}
        if flagged:
            reasons.append(f"{name}: distance {distance:.2f} > {threshold:.2f}")
    share = unknown / scored if scored else None
    unknown_drift = False
    if share is not None and unknown_rate:
        # clearly above the calibrated rate: at least twice it, and 3 standard errors of the
        # difference of two binomial shares (this inbox's, and the calibration set's: a
        # threshold set on 100 validation images is itself a few points off its rate)
        spread = 1.0 / scored + (1.0 / calibration_count if calibration_count else 0.0)
        limit = max(2.0 * unknown_rate, unknown_rate + 3.0 * math.sqrt(unknown_rate * (1 - unknown_rate) * spread))
        unknown_drift = share > limit
        if unknown_drift:
            reasons.append(f"unknown share {share:.2f} > {limit:.2f} (calibrated rate {unknown_rate:g})")
    return {
        "drift": bool(reasons),
        "reasons": reasons,
        "files": n,
        "unknown_share": None if share is None else round(share, 4),
        "unknown_rate": unknown_rate,
        "unknown_drift": unknown_drift,
        "properties": properties,
        "class_shares": {
            "distance": round(js_distance(training_classes, predicted_classes), 4),
            "training": _shares(training_classes),
            "predicted": _shares(predicted_classes),
        },
    }


def _shares(bins: dict[str, int]) -> dict[str, float]:
    total = sum(bins.values())
    return {k: round(v / total, 4) for k, v in sorted(bins.items())} if total else {}


def report_path(csv_path: Path | str) -> Path:
    """``<csv name>.drift.json`` beside the CSV (``inbox.csv`` -> ``inbox.drift.json``)."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.drift.json")


def read_profile(model_dir: Path | str) -> dict[str, Any] | None:
    """The training profile stored in a model directory, or None."""
    path = Path(model_dir) / PROFILE_FILE
    return read_json(path) if path.is_file() else None


def write_profile(model_dir: Path | str, profile: dict[str, Any], class_counts: dict[str, int]) -> Path:
    """Store the training profile (and training class counts) in the model directory, atomically."""
    return write_json(Path(model_dir) / PROFILE_FILE, {**profile, "classes": dict(class_counts)})


__all__ = ["PROFILE_FILE", "PROPERTIES", "add", "compare", "image_properties", "js_distance",
           "merge", "new_profile", "profile_files", "read_profile", "report_path", "unreadable_properties",
           "write_profile"]


# ------------------------------------------------------------------ per-chunk profiles of a prediction run

PROFILE_SUFFIX = ".profile.json"


def profile_path(part: Path | str) -> Path:
    """The drift profile written beside a prediction part file."""
    part = Path(part)
    return part.with_name(part.stem + PROFILE_SUFFIX)


def read_profiles(parts: Iterable[Path | str]) -> dict[str, Any]:
    """The merged drift profile of the given part files (a part without one adds nothing)."""
    found = []
    for part in parts:
        try:
            found.append(read_json(profile_path(part)))
        except (OSError, ValueError):
            continue
    return merge(found)


def run_report(model_dir: Path | str, metadata: dict[str, Any], parts: Sequence[Path | str],
               summary: dict[str, Any], out_csv: Path | str) -> dict[str, Any]:
    """Build and write ``<csv name>.drift.json`` for one prediction run (atomic).

    Args:
        model_dir: the model directory (its stored training profile).
        metadata: its metadata (``novelty.unknown_rate`` and ``novelty.val_count``).
        parts: the part files of the run, in scan order (their profiles).
        summary: :func:`imgflow.tasks.prediction.assemble_csv`'s result.
        out_csv: the predictions CSV.

    Returns:
        The report, plus ``"path"`` (where it was written) and ``"training_profile"``
        (False when the model directory stores none: properties then cannot drift).
    """
    stored = read_profile(model_dir)
    training = stored or new_profile()
    classes = dict((stored or {}).get("classes") or {})
    novelty = metadata.get("novelty") or {}
    report = compare(training, read_profiles(parts), classes, summary.get("predicted_counts", {}),
                     int(summary.get("unknown", 0)), int(summary.get("scored", 0)),
                     novelty.get("unknown_rate"), novelty.get("val_count"))
    report = {"csv": str(out_csv), "model_dir": str(model_dir), "training_profile": stored is not None, **report}
    path = write_json(report_path(out_csv), report)
    return {**report, "path": str(path)}


def profile_training(model_dir: Path, data_dir: Path, class_names: Sequence[str], image_size: int,
                     aspect: str = "squash", background: str | None = None) -> Path:
    """Profile the training images ``data_dir/<class>/**`` and store it (with class counts) in ``model_dir``.

    Files are found by the one folder walker (:func:`imgflow.tasks.scan.walk`): hidden,
    special and out-of-root names are never read.
    """
    from imgflow.tasks import scan

    files: list[Path] = []
    counts: dict[str, int] = {}
    for name in class_names:
        folder = Path(data_dir) / name
        found = [Path(e.path) for e in scan.walk(data_dir, folder) if e.kind == scan.FILE] if folder.is_dir() else []
        counts[name] = len(found)
        files += found
    return write_profile(model_dir, profile_files(files, image_size, aspect, background=background), counts)
