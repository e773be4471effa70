"""The tf.data input pipeline over imgflow's TFRecord shards (training, evaluation, the doctor).

:func:`make_dataset` reads a split of the shards a manifest names, decodes and batches
them for Keras; :func:`read_records` reads a shard back as plain records (tests, tools).
The shards themselves are written by :mod:`imgflow.tasks.tfrecords`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from imgflow.tasks import records


def shard_paths(manifest_path: Path | str, split: str) -> list[str]:
    """Absolute paths of a split's shards, in manifest order.

    Raises:
        ValueError: unknown split, or a split with no records.
        FileNotFoundError: a shard named by the manifest is missing.
    """
    path = Path(manifest_path)
    manifest = records.read_manifest(path).to_dict()
    if split not in manifest["splits"]:
        raise ValueError(f"{path}: split must be one of {', '.join(manifest['splits'])}, got {split!r}")
    info = manifest["splits"][split]
    if not info.get("count"):
        raise ValueError(
            f"{path}: split {split!r} has no records"
            + (" (set --val-fraction above 0 or give --val-dir)" if split == "val" else "")
        )
    files = [str(path.parent / shard["file"]) for shard in info["shards"]]
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: shard named by {path} is missing; re-run `imgflow preprocess`")
    return files


_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
}


# Records parsed per tf.io.parse_example call: one parse per block instead of one per
# record cuts the first epoch of 13,000 raw 128 px records from 1.7-2.4 s to 1.2-1.4 s
# (bench/input_pipeline.py; later epochs come from the in-memory cache either way).
PARSE_BLOCK = 128


def _block_parser(encoding: str, size: int, include_filenames: bool):
    """Parse a block of serialized records; raw pixels are decoded here, for the whole block."""

    def parse(block: tf.Tensor):
        parsed = tf.io.parse_example(block, _FEATURES)
        images = parsed["image/encoded"]
        if encoding == "raw":
            images = tf.reshape(tf.io.decode_raw(images, tf.uint8), [-1, size, size, 3])
        labels = tf.cast(parsed["image/class/label"], tf.int32)
        return (images, labels, parsed["image/filename"]) if include_filenames else (images, labels)

    return parse


def _image_decoder(encoding: str, size: int):
    """Decode one record's JPEG or PNG bytes (raw records are decoded per block)."""

    def decode(encoded: tf.Tensor, *rest: tf.Tensor):
        if encoding == "jpeg":
            image = tf.io.decode_jpeg(encoded, channels=3)
        else:
            image = tf.io.decode_png(encoded, channels=3, dtype=tf.uint8)
        return (tf.reshape(image, [size, size, 3]), *rest)

    return decode


def make_dataset(
    manifest_path: Path | str,
    split: str,
    batch_size: int,
    training: bool,
    seed: int = 42,
    cache_budget_mb: float = 1024.0,
    shuffle_buffer: int = 4096,
    include_filenames: bool = False,
) -> tf.data.Dataset:
    """The tf.data input pipeline over a split's shards.

    Shards are read with a parallel interleave, records parsed a block at a time and
    decoded in parallel;
    the decoded split is cached in memory when it fits ``cache_budget_mb``; training data
    is shuffled (shard order, then a buffer of records, reshuffled every epoch); then
    batched and prefetched. With ``training=False`` the order is deterministic (the same on
    every pass and every machine) and nothing is shuffled.

    Args:
        manifest_path: ``manifest.json`` written by preprocessing.
        split: ``train`` or ``val``.
        batch_size: images per batch (the last batch may be smaller).
        training: shuffle, and allow a non-deterministic order for speed.
        seed: shuffle seed.
        cache_budget_mb: cache the decoded split in memory when ``count * S * S * 3``
            bytes fit in this many MiB; 0 disables the cache.
        shuffle_buffer: records in the shuffle buffer (capped at the split size).
        include_filenames: also yield the filenames (relative to the data root) as a
            third element, for evaluation reports.

    Returns:
        A dataset of ``(uint8 images [B, S, S, 3], int32 labels [B])`` (plus
        ``string filenames [B]`` with ``include_filenames``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    manifest = records.read_manifest(manifest_path).to_dict()
    files = shard_paths(manifest_path, split)
    count = int(manifest["splits"][split]["count"])
    size = int(manifest["image_size"])
    encoding = manifest["encoding"]
    deterministic = not training

    ds = tf.data.Dataset.from_tensor_slices(files)
    if training and len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=8 * 1024 * 1024),
        cycle_length=min(len(files), 16),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    ds = ds.batch(PARSE_BLOCK).map(
        _block_parser(encoding, size, include_filenames), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
    ).unbatch()
    if encoding != "raw":
        ds = ds.map(_image_decoder(encoding, size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if count * size * size * 3 <= cache_budget_mb * 1024 * 1024:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(count, shuffle_buffer), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    # interleave hides the length: state it, so Keras never runs the iterator dry to find
    # the end of an epoch (its "Your input ran out of data" warning)
    ds = ds.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_without_autotune_thread())


def _without_autotune_thread() -> tf.data.Options:
    """Options that turn off tf.data's model-based autotuning (its optimisation thread).

    Keras makes a new iterator every epoch, for training and again for validation, and
    each one's destruction waits for that thread's next optimisation round: idle gaps of
    up to ~2 s an epoch on a 2-core machine (bench/RESULTS.md, twelfth round). Without it the
    parallel steps keep autotuning's starting value (the core count, at most 16) and
    ``prefetch`` keeps its own buffer tuning.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def read_records(shard_path: Path | str) -> list[dict[str, Any]]:
    """Every record of one shard as a dict of Python values (for checks and tests).

    Returns:
        ``[{"image": uint8 array, "label", "class", "filename", "format", "height", "width"}, ...]``.
    """
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/text": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
    }
    out = []
    for record in tf.data.TFRecordDataset(str(shard_path)):
        parsed = tf.io.parse_single_example(record, spec)
        fmt = parsed["image/format"].numpy().decode()
        height, width = int(parsed["image/height"]), int(parsed["image/width"])
        encoded = parsed["image/encoded"].numpy()
        if fmt == "raw":
            image = np.frombuffer(encoded, np.uint8).reshape(height, width, 3)
        else:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
        out.append({
            "image": image,
            "label": int(parsed["image/class/label"]),
            "class": parsed["image/class/text"].numpy().decode("utf-8"),
            "filename": parsed["image/filename"].numpy().decode("utf-8"),
            "format": fmt,
            "height": height,
            "width": width,
        })
    return out
