"""TFRecord shards + manifest from a validated folder dataset, and the tf.data input pipeline.

Preprocessing (``plan_shards`` -> ``write_shard`` for every shard -> ``write_manifest``)
turns the usable files of a validation report into ``tf.train.Example`` shards of images
already decoded, oriented, converted to RGB and resized, so training never touches the
original files again. ``make_dataset`` is the one input path for training, evaluation
and the doctor.

Layout under ``<workdir>/tfrecords/``::

    <fingerprint[:16]>/            one folder per (data, options, code version)
        plan.json                  what each shard holds (written before any shard)
        train-00000-of-00002.tfrecord
        val-00000-of-00002.tfrecord
        manifest.json              written last: a folder without it is not complete

Every file is written to a ``.tmp-`` name and renamed into place, so a final shard name
always holds a complete shard, and the manifest (written last) only ever names shards
that exist. A crashed run is resumed: shards already renamed into place are kept.

Encodings (``PreprocessOptions.encoding``), for 128 px images:

* ``auto`` (default): ``raw`` while every record together fits 1 GiB (~21,000 images at
  128 px), else ``jpeg``; the manifest records the encoding used.
* ``jpeg`` (quality 95): ~5-10 KB a record, lossy (mean error ~1-2 levels at
  q95), cheapest to read from disk, costs a JPEG decode per image per epoch until the
  split is cached in memory.
* ``png``: lossless, ~3-5x larger than JPEG, slower to decode than JPEG.
* ``raw``: lossless uint8 pixels (48 KB a record), no decode at all, largest on disk;
  best when the disk is fast and the CPU is the bottleneck.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgflow.tasks.options import PreprocessOptions
from imgflow.tasks import atomic, progress, records
from imgflow.tasks.errors import UsageError
from imgflow.tasks.images import ASPECTS, load_image  # noqa: F401  (re-exported: the one loader lives in images.py)
from imgflow.tasks.scan import decode_path

# Bump when the record layout or the image preparation changes: old shards are rebuilt.
FORMAT_VERSION = 1
MANIFEST_NAME = records.MANIFEST_NAME
TFRECORDS_DIR = "tfrecords"  # under the workdir
PLAN_NAME = "plan.json"
SPLITS = ("train", "val")
ENCODINGS = ("jpeg", "png", "raw")
# Rough bytes per record per pixel, only used to choose the number of shards.
_BYTES_PER_PIXEL = {"jpeg": 0.6, "png": 2.0, "raw": 3.0}
RAW_MAX_BYTES = 1 << 30  # encoding auto: raw shards up to 1 GiB of pixels (the default in-memory cache budget)
_RECORD_OVERHEAD = 200


class ShardSourceError(UsageError, ValueError):
    """A planned source file could not be read or decoded while writing a shard.

    A ValueError (bad input data), not an OSError: retrying will not help.
    """


def code_version() -> str:
    """The imgflow package version plus the shard format version, e.g. ``0.1.0+fmt1``."""
    try:
        version = metadata.version("imgflow")
    except metadata.PackageNotFoundError:  # running from a source tree
        version = "0+unknown"
    return f"{version}+fmt{FORMAT_VERSION}"


# --------------------------------------------------------------------------- images


def encode_image(pixels: np.ndarray, encoding: str, jpeg_quality: int = 95) -> bytes:
    """Encode a uint8 HxWx3 array as ``jpeg``, ``png`` or ``raw`` bytes (C order)."""
    if encoding == "raw":
        return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    image = Image.fromarray(pixels, "RGB")
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    elif encoding == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    return buffer.getvalue()


def make_example(encoded: bytes, encoding: str, height: int, width: int, label: int, class_name: str, filename: str) -> bytes:
    """A serialized ``tf.train.Example`` with the feature names of DESIGN.md."""
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    features = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(encoding.encode()),
        "image/class/label": _int(label),
        "image/class/text": _bytes(class_name.encode("utf-8")),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/filename": _bytes(filename.encode("utf-8")),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- split


def unit_hash(seed: int, key: str) -> float:
    """A number in [0, 1) fixed by ``(seed, key)`` alone (SHA-256, stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(files: Sequence[Sequence[str]], val_fraction: float, seed: int) -> dict[str, list[list[str]]]:
    """Split ``[[relpath, class_name], ...]`` into train and val, per class, by a hash of the path.

    A file goes to val when ``unit_hash(seed, relpath) < val_fraction``, so its split depends
    on its own relative path and the seed only: adding, removing or renaming other files never
    moves it. Each class then holds about ``val_fraction`` of its files in val. Two guards keep
    small classes usable: a class with at least 2 files and none drawn for val gives its
    lowest-hash file to val, and a class drawn entirely into val keeps its highest-hash file
    in train (these are the only cases where a file's split can depend on its class-mates).

    Args:
        files: usable files as ``[relpath, class_name]`` pairs.
        val_fraction: share of each class held out, in [0, 1). 0 means no val split.
        seed: split seed.

    Returns:
        ``{"train": [[relpath, class_name], ...], "val": [...]}``, each sorted by relpath.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[str, list[tuple[float, str]]] = {}
    for relpath, class_name in files:
        by_class.setdefault(class_name, []).append((unit_hash(seed, relpath), relpath))
    train: list[list[str]] = []
    val: list[list[str]] = []
    for class_name, entries in by_class.items():
        entries.sort()
        in_val = [h < val_fraction for h, _ in entries]
        if val_fraction > 0 and len(entries) >= 2:
            if not any(in_val):
                in_val[0] = True
            if all(in_val):
                in_val[-1] = False
        for (_, relpath), is_val in zip(entries, in_val):
            (val if is_val else train).append([relpath, class_name])
    return {"train": sorted(train), "val": sorted(val)}


# --------------------------------------------------------------------------- plan


def data_fingerprint(roots: dict[str, Path | str], files: dict[str, Sequence[Sequence[str]]]) -> str:
    """SHA-256 of the relative path, class, size and mtime of every file of every split.

    Args:
        roots: split name -> folder the relative paths are relative to.
        files: split name -> ``[[relpath, class_name], ...]``.

    Raises:
        FileNotFoundError: a listed file is gone (validation and preprocessing disagree).
    """
    digest = hashlib.sha256()
    for split in sorted(files):
        root = Path(decode_path(str(roots[split])))
        for relpath, class_name in sorted(files[split]):
            path = root / decode_path(relpath)  # report paths are text (imgflow.tasks.scan.encode_path)
            try:
                st = path.stat()
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{path}: listed as usable by the validation report but no longer exists; re-run validation"
                ) from None
            digest.update(f"{split}\x00{relpath}\x00{class_name}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode("utf-8"))
    return digest.hexdigest()


def _option_key(options: PreprocessOptions, has_val_dir: bool) -> dict[str, Any]:
    """The options that change the shards' content or layout (``dask_address`` does not)."""
    key: dict[str, Any] = {
        "image_size": options.image_size,
        "aspect": options.aspect,
        "background": options.background,
        "encoding": options.encoding,
        "seed": options.seed,
        "shard_size_mb": options.shard_size_mb,
    }
    if options.encoding == "jpeg":
        key["jpeg_quality"] = options.jpeg_quality
    if not has_val_dir:
        key["val_fraction"] = options.val_fraction
    return key


def resolve_encoding(encoding: str, records: int, image_size: int) -> str:
    """The shard encoding for ``encoding: auto``: ``raw`` while all records fit ``RAW_MAX_BYTES``, else ``jpeg``; pure.

    Raw records need no decode, so the first epoch (before the split is cached in memory)
    reads ~1.7x faster than JPEG records (bench/input_pipeline.py: 3.3x vs 2.0x
    ``image_dataset_from_directory`` at 13,000 x 128 px, 640 MB raw); past the budget the
    ~7x smaller JPEG records win on disk. An explicit encoding is returned unchanged.
    """
    if encoding != "auto":
        return encoding
    return "raw" if records * image_size * image_size * 3 <= RAW_MAX_BYTES else "jpeg"


def shard_count(records: int, options: PreprocessOptions, workers: int) -> int:
    """Shards for a split: enough for ``shard_size_mb`` each, at least one per worker, at most one per record."""
    if records == 0:
        return 0
    encoding = resolve_encoding(options.encoding, records, options.image_size)
    per_record = options.image_size**2 * _BYTES_PER_PIXEL[encoding] + _RECORD_OVERHEAD
    by_size = math.ceil(records * per_record / (options.shard_size_mb * 1024 * 1024))
    return max(1, min(records, max(by_size, workers)))


def shard_name(split: str, index: int, total: int) -> str:
    """``train-00000-of-00008.tfrecord``."""
    return f"{split}-{index:05d}-of-{total:05d}.tfrecord"


def plan_shards(report: dict[str, Any], options: PreprocessOptions, out_root: Path | str, workers: int = 1) -> dict[str, Any]:
    """Decide the split, the fingerprint, the output folder and what every shard holds.

    Only files listed as usable in the validation report are planned: a file validation
    excluded can never reach a shard. Nothing is written.

    Args:
        report: a validation report (DESIGN.md interface 1); must be ``usable``.
        options: preprocessing options.
        out_root: ``<workdir>/tfrecords``; shards go in ``out_root/<fingerprint[:16]>``.
        workers: parallel writers available (at least one shard per worker and split).

    Returns:
        The plan (JSON-able): ``fingerprint``, ``data_fingerprint``, ``out_dir``,
        ``manifest``, ``class_names``, the image options, and ``splits`` with the
        ``root``, ``count``, ``per_class`` and ``shards`` (``file`` and ``items``
        ``[[relpath, label], ...]`` in write order) of each split.

    Raises:
        ValueError: the report is not usable, or names a val class it has no label for.
    """
    if not report.get("usable"):
        raise ValueError(f"validation report of {report.get('data_dir')} is not usable; fix the data before preprocessing")
    class_names: list[str] = list(report["class_names"])
    labels = {name: index for index, name in enumerate(class_names)}
    data_dir = str(report["data_dir"])
    val_dir = report.get("val_dir")
    if val_dir:
        split_files = {"train": report["files"]["train"], "val": report["files"]["val"]}
    else:
        split_files = assign_splits(report["files"]["train"], options.val_fraction, options.seed)
    roots = {"train": data_dir, "val": val_dir or data_dir}
    for split, files in split_files.items():
        for relpath, class_name in files:
            if class_name not in labels:
                raise ValueError(
                    f"validation report: {split} file {relpath} has class {class_name!r}, "
                    f"expected one of class_names {class_names}"
                )

    encoding = resolve_encoding(options.encoding, sum(len(files) for files in split_files.values()), options.image_size)
    options = options.model_copy(update={"encoding": encoding})
    data_fp = data_fingerprint(roots, split_files)
    key = {
        "data": data_fp,
        "class_names": class_names,
        "data_dir": data_dir,
        "val_dir": val_dir,
        "options": _option_key(options, bool(val_dir)),
        "code_version": code_version(),
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
    out_dir = Path(out_root) / fingerprint[:16]

    splits: dict[str, Any] = {}
    for split in SPLITS:
        files = split_files[split]
        # Write order is a seeded hash order: every shard is a mix of all classes.
        ordered = sorted(files, key=lambda f: (unit_hash(options.seed, "order\x00" + f[0]), f[0]))
        total = shard_count(len(ordered), options, workers)
        shards = []
        for index, chunk in enumerate(np.array_split(np.arange(len(ordered)), total) if total else []):
            shards.append({
                "file": shard_name(split, index, total),
                "items": [[ordered[i][0], labels[ordered[i][1]]] for i in chunk],
            })
        per_class = Counter(class_name for _, class_name in files)
        splits[split] = {
            "root": roots[split],
            "count": len(files),
            "per_class": {name: per_class.get(name, 0) for name in class_names},
            "shards": shards,
        }
    return {
        "fingerprint": fingerprint,
        "data_fingerprint": data_fp,
        "code_version": code_version(),
        "out_dir": str(out_dir),
        "manifest": str(out_dir / MANIFEST_NAME),
        "class_names": class_names,
        "image_size": options.image_size,
        "aspect": options.aspect,
        "background": options.background,
        "encoding": options.encoding,
        "jpeg_quality": options.jpeg_quality,
        "data_dir": data_dir,
        "val_dir": val_dir,
        "splits": splits,
    }


def split_warnings(per_class: dict[str, dict[str, int]]) -> list[str]:
    """Warnings about the split: a class with no training image, or none to validate on.

    Args:
        per_class: ``{"train": {class: count}, "val": {class: count}}`` of a plan.
    """
    warnings = []
    for split, what in (("train", "the model never sees it, so it can never predict it"),
                        ("val", "its accuracy cannot be measured")):
        empty = [name for name, count in per_class.get(split, {}).items() if count == 0]
        if empty:
            warnings.append(f"class(es) {', '.join(empty)} got no {split} image after the split: {what}; "
                            "add images, raise or lower --val-fraction, or give --val-dir")
    return warnings


def plan_shard_files(plan: dict[str, Any]) -> list[str]:
    """Every shard file name of a plan, train first."""
    return [shard["file"] for split in SPLITS for shard in plan["splits"][split]["shards"]]


def listed_shard_files(manifest_path: Path | str) -> list[str]:
    """Every shard file a manifest lists, train first.

    A complete manifest found for a plan may come from a run with another worker count
    (more workers, more shards; the fingerprint does not include it): a reused run
    reports these, not the plan's.
    """
    manifest = records.read_manifest(manifest_path)
    return [shard.file for split in SPLITS for shard in manifest.split(split).shards]


def _find_shard(plan: dict[str, Any], shard_file: str) -> tuple[str, dict[str, Any]]:
    for split in SPLITS:
        for shard in plan["splits"][split]["shards"]:
            if shard["file"] == shard_file:
                return split, shard
    raise KeyError(f"{shard_file} is not a shard of the plan in {plan['out_dir']}")


# --------------------------------------------------------------------------- write


def write_shard(plan: dict[str, Any], shard_file: str) -> dict[str, Any]:
    """Write one shard of a plan (to a temporary name, renamed into place when complete).

    A shard already in place is complete (it was renamed only after its last record),
    so it is kept as it is: a resumed run does no work for it and rewrites nothing.

    Returns:
        ``{"file", "records", "bytes", "written"}`` (``written`` False when kept).

    Raises:
        ShardSourceError: a file cannot be read or decoded; the message names it. No shard is left.
    """
    split, shard = _find_shard(plan, shard_file)
    target = Path(plan["out_dir"]) / shard_file
    if target.exists():
        return {"file": shard_file, "records": len(shard["items"]), "bytes": target.stat().st_size, "written": False}
    root = Path(decode_path(plan["splits"][split]["root"]))
    class_names = plan["class_names"]
    size, encoding = int(plan["image_size"]), plan["encoding"]
    target.parent.mkdir(parents=True, exist_ok=True)
    import tensorflow as tf

    with atomic.atomic_path(target) as tmp:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for relpath, label in shard["items"]:
                path = root / decode_path(relpath)  # report paths are text (imgflow.tasks.scan.encode_path)
                try:
                    pixels = load_image(path, size, plan["aspect"], plan.get("background"))
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    raise ShardSourceError(
                        f"{path}: validation accepted it, but it cannot be decoded now (changed since?) "
                        f"while writing {shard_file}: {exc}; re-run validation"
                    ) from exc
                encoded = encode_image(pixels, encoding, int(plan["jpeg_quality"]))
                writer.write(make_example(encoded, encoding, size, size, int(label), class_names[label], relpath))
                progress.advance("shards")
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    return {"file": shard_file, "records": len(shard["items"]), "bytes": target.stat().st_size, "written": True}


def manifest_from_plan(plan: dict[str, Any], results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest (DESIGN.md interface 3) for a plan whose shards are written.

    Raises:
        ValueError: a shard result is missing or its record count differs from the plan.
    """
    by_file = {r["file"]: r for r in results}
    splits: dict[str, Any] = {}
    for split in SPLITS:
        info = plan["splits"][split]
        shards = []
        for shard in info["shards"]:
            result = by_file.get(shard["file"])
            if result is None:
                raise ValueError(f"{plan['out_dir']}: shard {shard['file']} was not written")
            if result["records"] != len(shard["items"]):
                raise ValueError(
                    f"{plan['out_dir']}/{shard['file']}: expected {len(shard['items'])} records, found {result['records']}"
                )
            shards.append({"file": shard["file"], "records": result["records"], "bytes": result["bytes"]})
        splits[split] = {"count": info["count"], "per_class": info["per_class"], "shards": shards}
    return {
        "class_names": plan["class_names"],
        "image_size": plan["image_size"],
        "aspect": plan["aspect"],
        "background": plan.get("background"),
        "encoding": plan["encoding"],
        "jpeg_quality": plan["jpeg_quality"] if plan["encoding"] == "jpeg" else None,
        "fingerprint": plan["fingerprint"],
        "data_fingerprint": plan["data_fingerprint"],
        "code_version": plan["code_version"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data_dir": plan["data_dir"],
        "val_dir": plan["val_dir"],
        "splits": splits,
    }


def write_manifest(plan: dict[str, Any], results: Iterable[dict[str, Any]]) -> Path:
    """Check every shard is in place, remove stale shards and temporaries, write the manifest last.

    Returns:
        The manifest path.

    Raises:
        ValueError: a planned shard is missing or its size differs from what was written.
    """
    manifest = manifest_from_plan(plan, results)
    out_dir = Path(plan["out_dir"])
    expected = set()
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            path = out_dir / shard["file"]
            if not path.exists() or path.stat().st_size != shard["bytes"]:
                raise ValueError(f"{path}: expected a complete shard of {shard['bytes']} bytes, found none or another size")
            expected.add(shard["file"])
    # Shards of an earlier, interrupted layout (other worker count) would only confuse a reader.
    for stale in out_dir.glob("*.tfrecord"):
        if stale.name not in expected:
            stale.unlink(missing_ok=True)
    return atomic.write_json(out_dir / MANIFEST_NAME, manifest)


def remove_temporaries(out_dir: Path | str) -> int:
    """Delete ``.tmp-*`` files a killed writer left behind; returns how many."""
    removed = 0
    for tmp in Path(out_dir).glob(".tmp-*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def write_plan(plan: dict[str, Any]) -> Path:
    """Save the plan as ``plan.json`` in its output folder (the shard writers read it)."""
    return atomic.write_json(Path(plan["out_dir"]) / PLAN_NAME, plan)


def complete_manifest(plan: dict[str, Any]) -> Path | None:
    """The plan's manifest path when it exists, matches the fingerprint and every shard is intact."""
    path = Path(plan["manifest"])
    if not path.exists():
        return None
    try:
        manifest = records.read_manifest(path)
    except (OSError, ValueError):
        return None
    if manifest.fingerprint != plan["fingerprint"]:
        return None
    for split in SPLITS:
        for shard in manifest.split(split).shards:
            shard_path = path.parent / shard.file
            if not shard_path.exists() or shard_path.stat().st_size != shard.bytes:
                return None
    return path


def reusable_shards(report: dict[str, Any], options: PreprocessOptions, out_root: Path | str) -> dict[str, Any] | None:
    """The result of preprocessing these files again when their shards are complete, else None.

    Plans (stats every file, decodes nothing) and checks the manifest of the plan's
    folder, so an unchanged re-run needs neither TensorFlow nor Prefect.

    Returns:
        ``{"manifest", "cached": True, "counts", "shards", "per_class"}`` (shards: those
        the manifest lists), or None when anything must be written.
    """
    plan = plan_shards(report, options, out_root)
    done = complete_manifest(plan)
    if done is None:
        return None
    return {
        "manifest": str(done),
        "cached": True,
        "counts": {split: plan["splits"][split]["count"] for split in SPLITS},
        "shards": len(listed_shard_files(done)),
        "per_class": {split: plan["splits"][split]["per_class"] for split in SPLITS},
    }


def preprocess(report: dict[str, Any], options: PreprocessOptions, out_root: Path | str, workers: int = 1) -> dict[str, Any]:
    """Plan, write every shard in this process (one after another) and write the manifest.

    The Prefect flow does the same with mapped tasks; this is the plain-Python path.

    Returns:
        ``{"manifest": str, "cached": bool, "counts": {"train": n, "val": n}, "shards": int}``.
    """
    plan = plan_shards(report, options, out_root, workers)
    counts = {split: plan["splits"][split]["count"] for split in SPLITS}
    done = complete_manifest(plan)
    if done is not None:
        return {"manifest": str(done), "cached": True, "counts": counts, "shards": len(listed_shard_files(done))}
    files = plan_shard_files(plan)
    remove_temporaries(plan["out_dir"])
    write_plan(plan)
    results = [write_shard(plan, name) for name in files]
    manifest = write_manifest(plan, results)
    return {"manifest": str(manifest), "cached": False, "counts": counts, "shards": len(files)}


# --------------------------------------------------------------------------- read


def read_manifest(manifest_path: Path | str) -> dict[str, Any]:
    """Load a manifest through :func:`imgflow.tasks.records.read_manifest` (the one reader), as a dict.

    Raises:
        FileNotFoundError: no manifest (preprocessing did not finish: run ``imgflow preprocess``).
        imgflow.tasks.records.ManifestError: a ValueError naming the file and the bad or missing field.
    """
    return records.read_manifest(manifest_path).to_dict()


# the input pipeline lives in its own module; these names stay importable from here, and
# TensorFlow is imported only when one of them is used (planning and reuse checks need none)
_INPUT_PIPELINE_NAMES = ("make_dataset", "read_records", "shard_paths")


def __getattr__(name: str) -> Any:
    if name in _INPUT_PIPELINE_NAMES:
        from imgflow.tasks import input_pipeline

        return getattr(input_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
