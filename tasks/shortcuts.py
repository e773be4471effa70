"""Shortcuts in the data: cheap file properties that alone tell the classes apart.

A CNN learns whatever separates the classes most easily. When every ``cats`` photo is
a JPEG and every ``dogs`` photo a PNG, or the two classes were collected at different
sizes, or one class sits on white and the other on black under its transparent pixels,
the model can score well on such data while learning nothing about cats or dogs.

The test, run by validation on the usable training files (no second decode: the
properties come from the decode pass of :func:`imgflow.tasks.dataset.inspect_image`):

* properties: ``format``, ``mode``, ``has_alpha`` (categorical); ``width``, ``height``,
  ``aspect``, ``file_size``, ``brightness`` (mean grey level), ``border_colour`` (mean RGB
  of the 1-pixel border of the decode's thumbnail) and ``transparent_colour`` (mean RGB of
  the pixels whose alpha is 0, only for images that have such pixels) (numeric);
* for each property alone, a tiny classifier predicts the class: a frequency table for a
  categorical property (each value predicts the class it occurs with most often), a
  decision tree of depth ``max(2, ceil(log2(classes)))`` for a numeric one;
* it is scored by stratified k-fold cross-validation (``shortcut_folds``, default 5, fewer
  when a class is smaller) with *balanced accuracy* (mean per-class recall, so a big class
  cannot inflate it); chance is ``1 / classes``;
* a property is reported as a ``shortcut`` problem (severity ``warning``) when its balanced
  accuracy is at least chance + ``shortcut_margin`` (default 0.4: 90% for 2 classes, 73%
  for 3, 50% for 10) and every class it is tested on has at least ``shortcut_min_files``
  files with the property (default 10). Classes with fewer such files are left out of that
  property's test; at least two classes must remain.

The colour under transparent pixels is also tested one class against the rest, because a
cue for one class barely moves the balanced accuracy over all of them: the share of a
class's images storing a *light* colour there (mean grey above 127.5) against the share in
the other classes pooled. A class is reported when the two shares differ by at least
:data:`LIGHT_SHARE_GAP` and by at least :data:`LIGHT_SHARE_Z` standard errors (a
two-proportion z-test), with ``shortcut_min_files`` such images in the class. Real icon
themes do this: in the MATE theme 56% of the ``mimetypes`` icons store white under their
transparent pixels, 0-7% of the other categories' icons do (bench/RESULTS.md).

``brightness``, ``border_colour`` and ``file_size`` partly measure content: when the classes
really differ by colour (red apples, green pears) the image centre tells them apart too, and
a "1" has less ink and compresses smaller than an "8". These are reported only when they
also beat a content baseline, tested the same way, by ``shortcut_content_gap`` (default 0.2
balanced accuracy): brightness and border colour the *centre colour* (mean RGB of the
central half of the thumbnail), file size the *detail* (mean absolute difference of
neighbouring pixels of the grey thumbnail). A white backdrop for one class and a black one
for another is reported; classes that simply have different colours or amounts of detail
are not. The price: one class saved at a much lower JPEG quality also loses detail, so its
file size is not reported on its own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image

from imgflow.tasks.options import ValidationOptions

# Modes that carry an alpha channel (palette and RGB images may instead name a
# transparent colour in ``info["transparency"]``).
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Side of the nearest-neighbour sample the transparent colour is read from. Nearest
# sampling keeps the stored colours: the box reduction of the thumbnail premultiplies
# alpha, which turns every transparent pixel black.
TRANSPARENCY_SAMPLE = 64
# a shortcut message names the typical value of this many classes at most
DESCRIBED_CLASSES = 10
#: a class is reported when its share of light colours under transparent pixels differs
#: from the other classes' by at least this much (absolute) ...
LIGHT_SHARE_GAP = 0.3
#: ... and by at least this many standard errors
LIGHT_SHARE_Z = 3.0


@dataclass(frozen=True)
class Property:
    """One cheap file property tested for a shortcut."""

    name: str
    words: str  # "the file format": completes "the class can be told from ... alone"
    kind: str  # "categorical" or "numeric"
    fix: str  # what to do about it
    baseline: str | None = None  # partly content: must beat this content baseline as well


PROPERTIES = (
    Property("format", "the file format", "categorical", "convert every class to the same format"),
    Property("mode", "the image mode (colour type)", "categorical", "convert every class to the same mode (e.g. RGB)"),
    Property("has_alpha", "whether the file has transparency", "categorical",
             "give every class the same kind of files, or remove the alpha channel"),
    Property("width", "the image width", "numeric", "bring every class to similar sizes"),
    Property("height", "the image height", "numeric", "bring every class to similar sizes"),
    Property("aspect", "the aspect ratio", "numeric", "crop every class to similar shapes"),
    Property("file_size", "the file size", "numeric", "re-encode every class the same way (format, quality, size)",
             baseline="detail"),
    Property("brightness", "the mean brightness", "numeric",
             "check the classes were photographed under similar light and on similar backgrounds",
             baseline="centre_colour"),
    Property("border_colour", "the border colour", "numeric",
             "check for frames or backgrounds that differ by class; crop or unify them",
             baseline="centre_colour"),
    Property("transparent_colour", "the colour under transparent pixels", "numeric",
             "composite every image onto one background colour (the colour under transparent pixels is invisible "
             "to a person but not to a model)"),
)
# content baselines of the properties that name one (never reported themselves)
BASELINES = (
    Property("centre_colour", "the colour of the image centre", "numeric", ""),
    Property("detail", "the amount of detail", "numeric", ""),
)


class DecodedFile(Protocol):
    """What the decode pass records about one file (:class:`imgflow.tasks.dataset.ImageInfo`)."""

    byte_size: int
    format: str | None
    mode: str | None
    width: int
    height: int
    has_alpha: bool
    brightness: float | None
    border_rgb: tuple[float, float, float] | None
    centre_rgb: tuple[float, float, float] | None
    detail: float | None
    transparent_rgb: tuple[float, float, float] | None


class PixelProperties(NamedTuple):
    """The pixel statistics the shortcut test uses (None: not computable for the mode)."""

    brightness: float | None
    border_rgb: tuple[float, float, float] | None
    centre_rgb: tuple[float, float, float] | None
    detail: float | None
    transparent_rgb: tuple[float, float, float] | None


def has_alpha(image: Image.Image) -> bool:
    """Whether an image carries transparency (an alpha channel or a transparent colour)."""
    return image.mode in ALPHA_MODES or "transparency" in image.info


def _mean_rgb(pixels: np.ndarray) -> tuple[float, float, float]:
    mean = pixels.reshape(-1, pixels.shape[-1])[:, :3].mean(axis=0)
    return (round(float(mean[0]), 1), round(float(mean[1]), 1), round(float(mean[2]), 1))


def pixel_properties(image: Image.Image, small: Image.Image, gray: Image.Image) -> PixelProperties:
    """Brightness, border and centre colour, and colour under transparent pixels of a decoded image.

    Args:
        image: the decoded image (already loaded).
        small: its reduced copy (the validation thumbnail).
        gray: ``small`` in mode ``L``.

    Returns:
        The statistics; ``transparent_rgb`` is None when no pixel is fully transparent.
    """
    grey = np.asarray(gray, dtype=np.float32)
    brightness = round(float(grey.mean()), 2)
    steps = [np.abs(np.diff(grey, axis=axis)).ravel() for axis in (0, 1) if grey.shape[axis] > 1]
    detail = round(float(np.concatenate(steps).mean()), 3) if steps else 0.0
    try:
        rgb = np.asarray(small.convert("RGB"), dtype=np.float32)
    except (ValueError, OSError):  # modes Pillow cannot turn into RGB (some 16-bit ones)
        rgb = None
    border = centre = None
    if rgb is not None and rgb.size:
        edge = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
        border = _mean_rgb(edge)
        h, w = rgb.shape[:2]
        centre = _mean_rgb(rgb[h // 4: h - h // 4, w // 4: w - w // 4])
    transparent = None
    if has_alpha(image):
        sample = image
        if max(image.size) > TRANSPARENCY_SAMPLE:
            scale = TRANSPARENCY_SAMPLE / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            sample = image.resize(size, Image.Resampling.NEAREST)
        try:
            rgba = np.asarray(sample.convert("RGBA"))
        except (ValueError, OSError):
            rgba = None
        if rgba is not None:
            clear = rgba[..., 3] == 0
            if clear.any():
                transparent = _mean_rgb(rgba[clear].astype(np.float32))
    return PixelProperties(brightness, border, centre, detail, transparent)


def file_properties(info: DecodedFile) -> dict[str, Any]:
    """The properties of one decoded file, by name (None where it has none)."""
    return {
        "format": info.format,
        "mode": info.mode,
        "has_alpha": "yes" if info.has_alpha else "no",
        "width": info.width,
        "height": info.height,
        "aspect": round(info.width / info.height, 4) if info.height else None,
        "file_size": info.byte_size,
        "brightness": info.brightness,
        "border_colour": info.border_rgb,
        "transparent_colour": info.transparent_rgb,
        "centre_colour": info.centre_rgb,
        "detail": info.detail,
    }


def _table_predictions(values: list[Any], labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Out-of-fold predictions of a frequency table: each value predicts its most common class."""
    predicted = np.empty_like(labels)
    for train, test in folds:
        overall = Counter(labels[train].tolist()).most_common(1)[0][0]
        table: dict[Any, Counter[int]] = {}
        for i in train:
            table.setdefault(values[i], Counter())[int(labels[i])] += 1
        for i in test:
            counts = table.get(values[i])
            # ties go to the smaller label, so the result does not depend on file order
            predicted[i] = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else overall
    return predicted


def _tree_predictions(
    features: np.ndarray, labels: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], classes: int, seed: int
) -> np.ndarray:
    from sklearn.tree import DecisionTreeClassifier

    depth = max(2, math.ceil(math.log2(classes)))
    predicted = np.empty_like(labels)
    for train, test in folds:
        tree = DecisionTreeClassifier(max_depth=depth, class_weight="balanced", random_state=seed)
        tree.fit(features[train], labels[train])
        predicted[test] = tree.predict(features[test])
    return predicted


def _describe(prop: Property, values: list[Any], names: list[str]) -> str:
    """Per class, the typical value: the most common one, or the median (colours as hex)."""
    parts = []
    classes = sorted(set(names))
    for name in classes[:DESCRIBED_CLASSES]:
        own = [v for v, n in zip(values, names) if n == name]
        if prop.kind == "categorical":
            value, count = Counter(own).most_common(1)[0]
            parts.append(f"{name}: {value} {count}/{len(own)}")
        elif isinstance(own[0], tuple):
            median = np.median(np.asarray(own, dtype=np.float64), axis=0)
            parts.append(f"{name}: #{''.join(f'{int(round(c)):02x}' for c in median)}")
        else:
            parts.append(f"{name}: {float(np.median(own)):g}")
    if len(classes) > DESCRIBED_CLASSES:
        parts.append(f"… {len(classes) - DESCRIBED_CLASSES} more classes")
    return ("most common per class — " if prop.kind == "categorical" else "median per class — ") + ", ".join(parts)


def score_property(
    prop: Property, values: Sequence[Any], names: Sequence[str], options: ValidationOptions, seed: int = 0
) -> dict[str, Any] | None:
    """Cross-validated balanced accuracy of predicting the class from one property alone.

    Args:
        prop: the property.
        values: its value for each file (None: the file has no such value; left out).
        names: the class of each file.
        options: ``shortcut_min_files`` and ``shortcut_folds``.
        seed: seed of the fold assignment.

    Returns:
        ``{"balanced_accuracy", "chance", "files", "classes", "folds", "detail"}``, or None when
        fewer than two classes have ``shortcut_min_files`` files with a value.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    present = [(v, n) for v, n in zip(values, names) if v is not None]
    per_class = Counter(n for _, n in present)
    kept_classes = sorted(n for n, c in per_class.items() if c >= options.shortcut_min_files)
    if len(kept_classes) < 2:
        return None
    present = [(v, n) for v, n in present if n in kept_classes]
    kept_values = [v for v, _ in present]
    kept_names = [n for _, n in present]
    labels = np.asarray([kept_classes.index(n) for n in kept_names])
    n_folds = min(options.shortcut_folds, min(per_class[n] for n in kept_classes))
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = list(splitter.split(np.zeros(len(labels)), labels))
    if prop.kind == "categorical":
        predicted = _table_predictions([str(v) for v in kept_values], labels, folds)
    else:
        features = np.asarray([v if isinstance(v, tuple) else (v,) for v in kept_values], dtype=np.float64)
        predicted = _tree_predictions(features, labels, folds, len(kept_classes), seed)
    return {
        "balanced_accuracy": round(float(balanced_accuracy_score(labels, predicted)), 4),
        "chance": round(1 / len(kept_classes), 4),
        "files": len(labels),
        "classes": kept_classes,
        "folds": n_folds,
        "detail": _describe(prop, kept_values, kept_names),
    }


def light_shares(samples: Sequence[tuple[str, DecodedFile]]) -> dict[str, tuple[int, int]]:
    """Per class, ``(images storing a light colour under transparent pixels, images with transparent pixels)``."""
    shares: dict[str, list[int]] = {}
    for name, info in samples:
        if info.transparent_rgb is not None:
            counts = shares.setdefault(name, [0, 0])
            counts[0] += sum(info.transparent_rgb) / 3 > 127.5
            counts[1] += 1
    return {name: (light, total) for name, (light, total) in sorted(shares.items())}


def odd_light_shares(shares: dict[str, tuple[int, int]], min_files: int) -> list[tuple[str, float, float]]:
    """The classes whose share of light colours under transparent pixels stands out from the rest's.

    Returns:
        ``(class, its share, the other classes' share)`` for each class with at least
        ``min_files`` images with transparent pixels whose share differs from the pooled
        rest by :data:`LIGHT_SHARE_GAP` and :data:`LIGHT_SHARE_Z` standard errors.
    """
    odd = []
    all_light, all_total = sum(light for light, _ in shares.values()), sum(total for _, total in shares.values())
    for name, (light, total) in shares.items():
        rest_light, rest_total = all_light - light, all_total - total
        if total < min_files or rest_total < min_files:
            continue
        own, rest = light / total, rest_light / rest_total
        pooled = all_light / all_total
        error = math.sqrt(pooled * (1 - pooled) * (1 / total + 1 / rest_total))
        if abs(own - rest) >= LIGHT_SHARE_GAP and error > 0 and abs(own - rest) / error >= LIGHT_SHARE_Z:
            odd.append((name, own, rest))
    return odd


def _light_share_problem(root: Path | str, shares: dict[str, tuple[int, int]],
                         odd: list[tuple[str, float, float]]) -> dict[str, Any]:
    classes = "; ".join(f"{own:.0%} of {name} ({shares[name][0]} of {shares[name][1]}) against {rest:.0%} of the "
                        f"other classes" for name, own, rest in odd[:DESCRIBED_CLASSES])
    if len(odd) > DESCRIBED_CLASSES:
        classes += f"; … {len(odd) - DESCRIBED_CLASSES} more classes"
    return {
        "path": str(root),
        "code": "shortcut",
        "severity": "warning",
        "message": (
            f"the colour under transparent pixels differs by class: a light colour is stored there in {classes}. "
            "A model that sees those pixels can learn this instead of the content (what a script that drops alpha, "
            "with Image.convert('RGB') or decode_png(channels=3), trains on). imgflow composites every image onto "
            "one background colour (the background option) in training, evaluation and prediction, so its models "
            "cannot. Fix: nothing for imgflow; composite onto one colour wherever else these images are used"
        ),
        "excluded": False,
        "property": "transparent_colour",
        "classes": [name for name, _, _ in odd],
    }


def find_shortcuts(
    samples: Sequence[tuple[str, DecodedFile]], root: Path | str, options: ValidationOptions, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Test every property of the training files for a shortcut to the class.

    Args:
        samples: ``(class name, decoded file)`` for each usable training file.
        root: the dataset root, named as the problems' path.
        options: the thresholds (see the module docstring).
        seed: seed of the cross-validation folds.

    Returns:
        ``(problems, stats)``: one ``shortcut`` warning per property over the threshold
        (with ``property``, ``balanced_accuracy`` and ``chance``), or, for the colour under
        transparent pixels, one naming the classes whose share of light colours stands out
        (with ``property`` and ``classes``), and the report stats
        ``{"transparency": {...}, "shortcuts": {property: score}}``.
    """
    names = [name for name, _ in samples]
    rows = [file_properties(info) for _, info in samples]
    with_alpha = Counter(name for name, info in samples if info.has_alpha)
    shares = light_shares(samples)  # per class: (light, with fully transparent pixels)
    stats: dict[str, Any] = {
        "transparency": {
            "with_alpha": sum(with_alpha.values()),
            "with_transparent_pixels": sum(total for _, total in shares.values()),
            "by_class": {name: shares.get(name, (0, 0))[1] for name in sorted(set(names))},
            "light_by_class": {name: light for name, (light, _) in shares.items()},
        },
        "shortcuts": {},
    }
    problems: list[dict[str, Any]] = []
    if not options.shortcuts:
        return problems, stats
    baselines = {b.name: score_property(b, [row[b.name] for row in rows], names, options, seed) for b in BASELINES}
    for prop in PROPERTIES:
        score = score_property(prop, [row[prop.name] for row in rows], names, options, seed)
        if score is None:
            continue
        stats["shortcuts"][prop.name] = {k: score[k] for k in ("balanced_accuracy", "chance", "files", "folds")}
        if score["balanced_accuracy"] < score["chance"] + options.shortcut_margin:
            continue
        baseline = baselines.get(prop.baseline or "")
        if baseline is not None and score["balanced_accuracy"] < baseline["balanced_accuracy"] + options.shortcut_content_gap:
            continue  # the content itself differs this way (see the module docstring): not a shortcut
        problems.append({
            "path": str(root),
            "code": "shortcut",
            "severity": "warning",
            "message": (
                f"the class can be told from {prop.words} alone: {score['balanced_accuracy']:.0%} balanced accuracy "
                f"(chance {score['chance']:.0%}; {score['files']} files of {', '.join(score['classes'])}, "
                f"{score['folds']}-fold cross-validation); a model may learn that instead of the content. "
                f"{score['detail']}. Fix: {prop.fix}"
            ),
            "excluded": False,
            "property": prop.name,
            "balanced_accuracy": score["balanced_accuracy"],
            "chance": score["chance"],
        })
    odd = odd_light_shares(shares, options.shortcut_min_files)
    if odd and not any(p["property"] == "transparent_colour" for p in problems):
        problems.append(_light_share_problem(root, shares, odd))
    return problems, stats


def markdown_lines(stats: dict[str, Any]) -> list[str]:
    """Report lines: how many images have transparency, and each property's shortcut score."""
    lines = []
    transparency = stats.get("transparency")
    if transparency:
        by_class = ", ".join(f"{k} {v}" for k, v in transparency["by_class"].items() if v)
        lines.append(f"- transparency: {transparency['with_alpha']} images with alpha, "
                     f"{transparency['with_transparent_pixels']} with fully transparent pixels"
                     + (f" ({by_class})" if by_class else ""))
        light = transparency.get("light_by_class") or {}
        if any(light.values()):
            lines.append("- a light colour under the transparent pixels: " + ", ".join(
                f"{name} {count} of {transparency['by_class'][name]}" for name, count in light.items()))
    scores = stats.get("shortcuts")
    if scores:
        lines.append("- shortcut test (balanced accuracy from one property alone / chance): "
                     + ", ".join(f"{name} {s['balanced_accuracy']:.0%}/{s['chance']:.0%}" for name, s in scores.items()))
    return lines
