"""Where the model looks: the share of saliency on the image border and on transparent pixels.

The evaluation already draws saliency maps (Grad-CAM or occlusion, see
:mod:`imgflow.tasks.saliency`) for a few examples per class. This module measures, per
class, how much of that saliency mass falls

* on the **border band**: the outer :data:`BORDER_FRACTION` (12.5%) of the side on each
  of the four sides. On a square image that band is ``1 - 0.75**2 = 43.75%`` of the area,
  so attention spread evenly over the image gives a border share of about 0.44. Objects
  are usually framed in the middle; a class whose saliency sits mostly on the border is
  likely recognised by its background (studio colour, frame, watermark in a corner);
* on **transparent pixels** (alpha below half), for images that have transparency:
  what is under a transparent pixel is only the ``background`` colour the loader
  composited there, never the object.

:func:`attention_finding` turns the shares into the doctor-style finding
``attends_to_background`` (warning). Nothing heavy is imported here: numpy and Pillow only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: width of the border band on each side, as a fraction of the side (12.5%: the band is
#: 43.75% of a square image's area, so uniform attention gives a border share of ~0.44)
BORDER_FRACTION = 0.125
#: a class whose mean border share exceeds this is flagged: clearly above the ~0.44 of
#: uniform attention, i.e. the border gets ~1.9x its area's share of the attention
BORDER_SHARE_THRESHOLD = 0.6
#: a class whose mean share on transparent pixels exceeds this is flagged ...
TRANSPARENT_SHARE_THRESHOLD = 0.6
#: ... and exceeds the transparent pixels' share of the area by at least this much (an
#: icon filling 10% of a transparent canvas gets 0.9 of uniform attention there)
TRANSPARENT_MARGIN = 0.15
#: fewer saliency examples than this in a class never raise a finding (one map is anecdote)
MIN_EXAMPLES = 2
#: alpha below this (of 255) counts as a transparent pixel
ALPHA_TRANSPARENT = 128


def border_mask(height: int, width: int, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """Boolean mask of the outer band of an image, ``fraction`` of each side wide (at least 1 pixel).

    Args:
        height: image height in pixels.
        width: image width in pixels.
        fraction: band width as a fraction of the side, in (0, 0.5).

    Returns:
        ``(height, width)`` bool array, True on the border band.

    Raises:
        ValueError: ``fraction`` outside (0, 0.5).
    """
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"border fraction must be in (0, 0.5), got {fraction}")
    by, bx = max(1, int(round(height * fraction))), max(1, int(round(width * fraction)))
    mask = np.ones((height, width), dtype=bool)
    mask[by:height - by, bx:width - bx] = False
    return mask


def attention_shares(
    maps: np.ndarray,
    alphas: Sequence[np.ndarray | None] | None,
    class_indices: Sequence[int],
    class_names: Sequence[str],
    fraction: float = BORDER_FRACTION,
) -> dict[str, dict[str, Any]]:
    """Per class, the mean share of saliency mass on the border band and on transparent pixels.

    Each map is normalised to a total of 1 (a map with no mass is left out); the shares
    are averaged over the class's maps.

    Args:
        maps: saliency maps ``(N, H, W)``, non-negative.
        alphas: per map, the image's alpha channel at the map's size (``(H, W)``, 0-255),
            or None for an image without transparency (or with no file to read it from);
            None for the whole argument when no alpha is known.
        class_indices: the class of each image (its true label).
        class_names: names of the class indices.
        fraction: border band width per side (see :func:`border_mask`).

    Returns:
        ``{class name: {"border_share", "transparent_share", "transparent_area",
        "examples", "transparent_examples"}}`` for the classes with at least one map;
        ``transparent_share`` and ``transparent_area`` (the transparent pixels' share of
        the area) are None when no example of the class has transparent pixels.

    Raises:
        ValueError: maps that are not ``(N, H, W)``, negative values, or lengths that differ.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 3:
        raise ValueError(f"saliency maps must be (N, H, W), got shape {maps.shape}")
    if len(class_indices) != len(maps) or (alphas is not None and len(alphas) != len(maps)):
        raise ValueError(f"{len(maps)} maps, {len(class_indices)} class indices and "
                         f"{'no' if alphas is None else len(alphas)} alpha masks: one of each per image expected")
    if (maps < 0).any():
        raise ValueError("saliency maps must be non-negative")
    border = border_mask(maps.shape[1], maps.shape[2], fraction)
    per_class: dict[int, dict[str, list[float]]] = {}
    for i, heat in enumerate(maps):
        total = float(heat.sum())
        if not np.isfinite(total) or total <= 0:
            continue
        acc = per_class.setdefault(int(class_indices[i]), {"border": [], "transparent": [], "area": []})
        acc["border"].append(float(heat[border].sum()) / total)
        alpha = None if alphas is None else alphas[i]
        if alpha is None:
            continue
        alpha = np.asarray(alpha)
        if alpha.shape != heat.shape:
            raise ValueError(f"alpha mask {i} has shape {alpha.shape}, its saliency map {heat.shape}")
        clear = alpha < ALPHA_TRANSPARENT
        if clear.any():
            acc["transparent"].append(float(heat[clear].sum()) / total)
            acc["area"].append(float(clear.mean()))
    out: dict[str, dict[str, Any]] = {}
    for c in sorted(per_class):
        acc = per_class[c]
        out[str(class_names[c])] = {
            "border_share": round(float(np.mean(acc["border"])), 4),
            "transparent_share": round(float(np.mean(acc["transparent"])), 4) if acc["transparent"] else None,
            "transparent_area": round(float(np.mean(acc["area"])), 4) if acc["area"] else None,
            "examples": len(acc["border"]),
            "transparent_examples": len(acc["transparent"]),
        }
    return out


def attention_finding(
    attention: Mapping[str, Mapping[str, Any]],
    border_threshold: float = BORDER_SHARE_THRESHOLD,
    transparent_threshold: float = TRANSPARENT_SHARE_THRESHOLD,
) -> dict[str, Any] | None:
    """The ``attends_to_background`` finding (warning) for the classes whose attention sits on the background.

    A class is flagged when it has at least :data:`MIN_EXAMPLES` maps and its border share
    exceeds ``border_threshold``, or its transparent share exceeds
    ``transparent_threshold`` and the transparent area's share by :data:`TRANSPARENT_MARGIN`.

    Args:
        attention: :func:`attention_shares` output.
        border_threshold: border share above which a class is flagged.
        transparent_threshold: transparent share above which a class is flagged.

    Returns:
        One finding (:func:`imgflow.tasks.doctor.findings.make_finding`) naming the worst
        class in its advice and every flagged class's share in its evidence, or None.
    """
    from imgflow.tasks.doctor.findings import make_finding

    flagged: list[tuple[float, str, str]] = []  # (share, class, where)
    for name, row in attention.items():
        if int(row.get("examples") or 0) < MIN_EXAMPLES:
            continue
        border = row.get("border_share")
        clear, area = row.get("transparent_share"), row.get("transparent_area")
        if clear is not None and area is not None and clear > transparent_threshold and clear >= area + TRANSPARENT_MARGIN:
            flagged.append((float(clear), name, "transparent"))
        elif border is not None and border > border_threshold:
            flagged.append((float(border), name, "border"))
    if not flagged:
        return None
    flagged.sort(key=lambda item: (-item[0], item[1]))
    share, name, where = flagged[0]
    place = "the image border" if where == "border" else "transparent pixels"
    others = [n for _, n, _ in flagged[1:]]
    advice = (
        f"the model puts {share:.0%} of its attention on {place} for class {name}"
        + (f" (and {', '.join(others)})" if others else "")
        + ": it may be recognising the background, not the object (see the saliency plot). "
        "Crop the images to the object or vary the backgrounds within each class"
        + ("; composite transparent images onto one colour with the background: option"
           if any(w == "transparent" for _, _, w in flagged) else "")
        + "."
    )
    evidence: dict[str, Any] = {"border_threshold": border_threshold, "transparent_threshold": transparent_threshold,
                                "classes_flagged": len(flagged)}
    for value, flagged_name, flagged_where in flagged:
        evidence[f"{flagged_where}_share[{flagged_name}]"] = value
        evidence[f"examples[{flagged_name}]"] = int(attention[flagged_name]["examples"])
    return make_finding("attends_to_background", "warning", evidence, advice)


def read_alpha(path: Path | str, image_size: int, aspect: str = "squash") -> np.ndarray | None:
    """The alpha channel of an image file at the model's size, resized as :func:`imgflow.tasks.images.load_image` resizes.

    Args:
        path: image file.
        image_size: side of the square the model sees.
        aspect: ``squash``, ``crop`` or ``pad`` (pad adds opaque background, alpha 255).

    Returns:
        ``(image_size, image_size)`` uint8 alpha (0 = transparent), or None when the image
        has no transparency.

    Raises:
        OSError: the file cannot be read.
        ValueError: an unknown ``aspect``.
    """
    from PIL import Image, ImageOps

    from imgflow.tasks.images import ASPECTS, has_alpha

    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    size = (image_size, image_size)
    with Image.open(path) as img:
        if not has_alpha(img):
            return None
        alpha = ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")
    resample = Image.Resampling.BILINEAR
    if aspect == "squash":
        out = alpha.resize(size, resample) if alpha.size != size else alpha
    elif aspect == "crop":
        out = ImageOps.fit(alpha, size, resample)
    else:
        out = ImageOps.pad(alpha, size, resample, color=255)  # the padding is opaque background colour
    return np.asarray(out, dtype=np.uint8).copy()


def measure_attention(
    maps: np.ndarray,
    class_indices: Sequence[int],
    class_names: Sequence[str],
    read_alphas: Callable[[], Sequence[np.ndarray | None]] | None = None,
) -> dict[str, Any]:
    """The evaluation's attention keys from the saliency maps it already drew.

    Args:
        maps: saliency maps ``(N, H, W)``, non-negative.
        class_indices: the true class of each map's image.
        class_names: the model's class names.
        read_alphas: returns the images' alpha masks at the maps' size (see
            :func:`read_alpha`); None (TFRecord shards: no file) skips the transparency part.
            A reading failure (a file changed since it was scored) is logged and skips it too.

    Returns:
        ``{"attention": attention_shares(...), "evaluation_findings": [attends_to_background] or []}``.
    """
    alphas = None
    if read_alphas is not None:
        try:
            alphas = list(read_alphas())
        except (OSError, ValueError) as exc:
            log.warning("alpha masks of the saliency examples unreadable (%s); measuring the border only", exc)
    attention = attention_shares(maps, alphas, class_indices, class_names)
    finding = attention_finding(attention)
    return {"attention": attention, "evaluation_findings": [finding] if finding is not None else []}
