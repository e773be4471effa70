"""The doctor's probe batch: a fixed, seeded sample of (images, labels) from a dataset."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def _numpy(x: Any) -> np.ndarray:
    # tf/jax/torch tensors and NumPy arrays all convert; keras.ops only when needed
    try:
        return np.asarray(x)
    except Exception:  # a backend tensor NumPy cannot read directly
        from keras import ops

        return np.asarray(ops.convert_to_numpy(x))


def _labels(y: Any) -> np.ndarray:
    arr = _numpy(y)
    if arr.ndim > 1 and arr.shape[-1] > 1:  # one-hot labels
        arr = arr.argmax(axis=-1)
    return arr.reshape(-1).astype("int64")


def probe_batch(
    dataset: Iterable[Any], max_images: int = 256, scan: int = 4096, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed probe of up to ``max_images`` (images, labels) from a batched ``(x, y)`` dataset.

    The images are a seeded sample spread over the first ``scan`` images, not just the
    head: an evaluation-order split is often sorted by class, and a probe of one class
    would look like a collapse onto it.

    Args:
        dataset: batches of ``(images, labels)`` (tf.data or any iterable).
        max_images: size of the probe.
        scan: images read from the start of the dataset to sample from.
        seed: seed of the sample.

    Returns:
        ``(images, labels)`` as NumPy arrays, in dataset order.

    Raises:
        ValueError: the dataset yielded no batches.
    """
    xs, ys, n = [], [], 0
    for x, y in dataset:
        x, y = _numpy(x), _labels(y)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if n >= max(scan, max_images):
            break
    if not xs:
        raise ValueError("probe_batch: the dataset yielded no batches (expected (images, labels) batches)")
    images, labels = np.concatenate(xs), np.concatenate(ys)
    pick = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_images])
    return images[pick], labels[pick]
