"""Tiny image folders for tests: generated shapes and real handwritten digits.

Everything is made in the test's own temporary folder; nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

# three classes a small CNN tells apart in a few epochs: the digits 0, 1 and 7
DIGIT_CLASSES = {"zero": 0, "one": 1, "seven": 7}


def solid_image(size: int = 32, color: tuple[int, int, int] = (200, 30, 30), seed: int = 0) -> Image.Image:
    """A small RGB image: a colour with a little noise (so no two are byte-identical)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color, dtype=np.int16) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def make_class_folder(
    root: Path,
    counts: dict[str, int],
    size: int = 32,
    fmt: str = "png",
    seed: int = 0,
) -> Path:
    """Write ``root/<class>/<class>_<i>.<fmt>`` noisy images, a distinct colour per class."""
    palette = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40), (40, 200, 200)]
    for class_index, (name, count) in enumerate(sorted(counts.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = solid_image(size, palette[class_index % len(palette)], seed=seed * 100_000 + class_index * 1000 + i)
            image.save(folder / f"{name}_{i:03d}.{fmt}")
    return root


def digit_images(digits: Iterable[int], per_class: int | None = None, size: int = 32) -> list[tuple[int, np.ndarray]]:
    """Real scikit-learn handwritten digits as (digit, uint8 HxWx3) pairs, upscaled to ``size``.

    Pixel values span 0-255 like a photo would, so models see raw images.
    """
    from sklearn.datasets import load_digits

    digits = list(digits)
    data = load_digits()
    out: list[tuple[int, np.ndarray]] = []
    taken = {d: 0 for d in digits}
    for image, target in zip(data.images, data.target):
        target = int(target)
        if target not in taken or (per_class is not None and taken[target] >= per_class):
            continue
        taken[target] += 1
        gray = (image / 16.0 * 255).astype(np.uint8)
        big = Image.fromarray(gray, "L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        out.append((target, np.asarray(big)))
    return out


def make_digit_folder(
    root: Path,
    classes: dict[str, int] = DIGIT_CLASSES,
    per_class: int | None = 60,
    size: int = 32,
    fmt: str = "png",
) -> Path:
    """Write real digits as ``root/<class>/<class>_<i>.<fmt>`` class folders."""
    by_digit = {digit: name for name, digit in classes.items()}
    counters = {name: 0 for name in classes}
    for digit, pixels in digit_images(classes.values(), per_class, size):
        name = by_digit[digit]
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{name}_{counters[name]:04d}.{fmt}")
        counters[name] += 1
    return root
