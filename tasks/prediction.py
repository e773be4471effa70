"""Batched inference of image files into CSV rows, in resumable chunks.

The pieces, each a plain function:

* :func:`scan_files` walks INPUT_DIR as a stream in a deterministic order (sorted
  per folder, depth first); symlinks never lead out of INPUT_DIR.
* :func:`chunk_entries` cuts that stream into small groups at *content-defined*
  boundaries (after a file whose name hashes to a boundary value), each keyed by
  :func:`chunk_key` and stored as one part file: a new or removed file changes only its
  group, so a re-run over a growing inbox predicts only what is new.
* :func:`predict_groups` decodes files exactly as training did, one batch ahead of the
  model (in the process's decoding workers, :mod:`imgflow.tasks.decoding`, when they
  run, else on threads), and writes one part file per group atomically.
* :func:`assemble_csv` streams the part files of the current scan, in scan order,
  into the final CSV atomically.

The model is loaded once per process (:func:`load_model_cached`), so on a Dask
cluster each worker loads it once and keeps it for every chunk it runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from imgflow.tasks.atomic import atomic_open, write_json
from imgflow.tasks.csvcells import safe_row
from imgflow.tasks import decoding, progress, scan
from imgflow.tasks.decoding import short_error
from imgflow.tasks.drift import profile_path, read_profiles
from imgflow.tasks.inference import run_batch

logger = logging.getLogger(__name__)

PART_PREFIX = "part-"
#: bumped when the part-file columns change, so parts of an older layout are never resumed
PART_FORMAT = "v2-novelty"


class FileEntry(NamedTuple):
    """One file found under INPUT_DIR.

    Attributes:
        rel: POSIX path relative to INPUT_DIR (the CSV ``path``).
        size: size in bytes (0 when it could not be read).
        mtime_ns: modification time in nanoseconds (0 when it could not be read).
        error: a reason the file cannot be predicted, known from the scan alone
            (a symlink leading out of INPUT_DIR, a folder that cannot be listed), else "".
    """

    rel: str
    size: int
    mtime_ns: int
    error: str = ""


# --------------------------------------------------------------------------- scan


# Why a name found under INPUT_DIR gets an error row instead of a prediction; the
# kinds not listed here (folders, hidden names, imgflow's own outputs, links to
# folders inside INPUT_DIR) get no row at all.
_SCAN_ERRORS = {
    scan.OUTSIDE: "symlink leads outside INPUT_DIR; not followed",
    scan.BROKEN: "broken symlink",
    scan.LOOP: "symlink loop; not followed",
    scan.SPECIAL: "not a regular file (FIFO, socket or device); never opened",
}


def scan_files(input_dir: Path | str, exclude: Iterable[Path | str] = ()) -> Iterator[FileEntry]:
    """Yield every file under ``input_dir``, recursively, in a deterministic order.

    The walk is :func:`imgflow.tasks.scan.walk` (its module docstring states the policy):
    sorted per folder, depth first, hidden names skipped. A symlink to a file inside
    ``input_dir`` is listed; a symlink that leads outside, dangles or loops, and a
    FIFO, socket or device, are listed with an ``error`` (the CSV has one row per file
    found) and never opened; symlinked folders are not descended. A folder that cannot
    be listed yields one entry (its path with a trailing ``/``) carrying the error.

    Args:
        input_dir: the folder to walk.
        exclude: folders or files to leave out (for example the work folder when it
            lies inside ``input_dir``).

    Yields:
        :class:`FileEntry` records; ``rel`` is the POSIX path relative to ``input_dir``
        in the text form of :func:`imgflow.tasks.scan.encode_path` (the CSV ``path``;
        :func:`imgflow.tasks.scan.decode_path` gives the name to open).
    """
    if not os.path.isdir(input_dir):
        raise NotADirectoryError(f"INPUT_DIR {input_dir}: expected a folder of images, found no such folder")
    for entry in scan.walk(input_dir, stat=True, exclude=scan.file_ids(exclude)):
        if entry.kind == scan.FILE:
            yield FileEntry(scan.encode_path(entry.rel), entry.size, entry.mtime_ns)
        elif entry.kind in _SCAN_ERRORS:
            yield FileEntry(scan.encode_path(entry.rel), 0, 0, _SCAN_ERRORS[entry.kind])
        elif entry.kind == scan.UNLISTABLE and entry.rel:  # the root itself is checked above
            yield FileEntry(scan.encode_path(entry.rel), 0, 0, short_error(entry.message))


def _name_hash(rel: str) -> int:
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def chunk_entries(entries: Iterable[FileEntry], chunk_size: int) -> Iterator[list[FileEntry]]:
    """Cut a stream of files into groups whose boundaries depend on file names only.

    A group closes after a file whose name hash is divisible by ``chunk_size // 2`` once it
    holds at least that many files, or at ``2 * chunk_size`` files: a file added or removed
    changes its group (rarely also the next), never the groups after it, whose keys and
    finished part files stay valid.

    Args:
        entries: files in scan order.
        chunk_size: target number of files per group (>= 1).

    Yields:
        Lists of :class:`FileEntry`, in scan order.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, found {chunk_size!r}")
    low = max(1, chunk_size // 2)
    high = max(2, 2 * chunk_size)
    current: list[FileEntry] = []
    for entry in entries:
        current.append(entry)
        if (len(current) >= low and _name_hash(entry.rel) % low == 0) or len(current) >= high:
            yield current
            current = []
    if current:
        yield current


def chunk_key(model_id: str, chunk: Sequence[FileEntry]) -> str:
    """Identity of a chunk: a hash of the model and of each file's path, size and mtime."""
    h = hashlib.sha256(model_id.encode("utf-8"))
    for entry in chunk:
        h.update(json.dumps([entry.rel, entry.size, entry.mtime_ns, entry.error]).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:24]


def part_path(run_dir: Path, key: str) -> Path:
    """Where the part file of the chunk with this key lives."""
    return Path(run_dir) / f"{PART_PREFIX}{key}.csv"


def part_done(part: Path) -> bool:
    """Whether a group's part file was written (an empty one, left by a power cut, was not)."""
    try:
        found = part.stat()
    except OSError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_size > 0


def model_identity(model_dir: Path | str) -> str:
    """A string that changes whenever the model directory's weights change."""
    model_dir = Path(model_dir).resolve()
    st = (model_dir / "model.keras").stat()
    return f"{model_dir}|{st.st_size}|{st.st_mtime_ns}" + _novelty_identity(model_dir)


def _novelty_identity(model_dir: Path) -> str:
    """Fitted novelty statistics (a backfill) change every row: they belong to the model's identity."""
    stats = model_dir / "novelty.npz"
    return f"|{PART_FORMAT}|{stats.stat().st_mtime_ns if stats.is_file() else 0}"


def run_dir_for(workdir: Path | str, model_dir: Path | str, input_dir: Path | str, out: Path | str) -> Path:
    """The folder holding part files for one (model, INPUT_DIR, output) combination.

    ``<workdir>/predictions/runs/<hash>``: a re-run with the same three resumes there.
    """
    key_source = "\n".join(
        [model_identity(model_dir), str(Path(input_dir).resolve()), str(Path(out).resolve())]
    )
    return Path(workdir) / "predictions" / "runs" / hashlib.sha256(key_source.encode("utf-8", "surrogateescape")).hexdigest()[:16]


# -------------------------------------------------------------------------- model

_MODEL_CACHE: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}
_MODEL_LOCK = threading.Lock()
_PREDICT_LOCKS: dict[int, threading.Lock] = {}


def read_metadata(model_dir: Path | str) -> dict[str, Any]:
    """The checked ``metadata.json`` of a model directory that holds a ``model.keras`` (no TensorFlow needed).

    Raises:
        FileNotFoundError: no ``model.keras`` or ``metadata.json`` in ``model_dir``.
        imgflow.tasks.registry.RegistryError: metadata without usable ``class_names`` or ``image_size``.
    """
    from imgflow.tasks.registry import METADATA_FILE, read_metadata as read_registry_metadata

    model_dir = Path(model_dir)
    for name in ("model.keras", METADATA_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"model directory {model_dir}: expected {name} in it, found none")
    return read_registry_metadata(model_dir)


def _load_model_dir(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    from imgflow.tasks.registry import load_model_dir

    return load_model_dir(model_dir)


def load_model_cached(model_dir: Path | str) -> tuple[Any, dict[str, Any]]:
    """Load a model directory once per process; reload only when ``model.keras`` changes.

    Returns:
        ``(keras.Model, metadata dict)``.
    """
    model_dir = Path(model_dir).resolve()
    key = (str(model_dir), (model_dir / "model.keras").stat().st_mtime_ns)
    with _MODEL_LOCK:
        cached = _MODEL_CACHE.get(key)
        if cached is None:
            for old in [k for k in _MODEL_CACHE if k[0] == key[0]]:
                del _MODEL_CACHE[old]
            started = time.perf_counter()
            cached = _load_model_dir(model_dir)
            _MODEL_CACHE[key] = cached
            _PREDICT_LOCKS.setdefault(id(cached[0]), threading.Lock())
            logger.info("loaded model %s in %.1f s (pid %d)", model_dir, time.perf_counter() - started, os.getpid())
        return cached


# ---------------------------------------------------------------------- predict


#: columns before the ``prob_<class>`` columns
LEADING_COLUMNS = ("path", "label", "confidence", "novelty", "unknown")


def csv_header(class_names: Sequence[str], top_k: int | None = None) -> list[str]:
    """Columns of the predictions CSV: path, label, confidence, novelty, unknown, prob_<class>..., [top-k], error."""
    header = [*LEADING_COLUMNS, *[f"prob_{name}" for name in class_names]]
    for i in range(1, _clip_top_k(top_k, len(class_names)) + 1):
        header += [f"top{i}_label", f"top{i}_prob"]
    return header + ["error"]


def _clip_top_k(top_k: int | None, n_classes: int) -> int:
    return 0 if not top_k else max(0, min(int(top_k), n_classes))


def _fmt(p: float) -> str:
    return format(float(p), ".10g")


def _error_row(rel: str, class_names: Sequence[str], error: str) -> list[str]:
    """The CSV row of a file that was not classified: empty prediction cells and the ``error``."""
    return [rel, "", "", "", "", *([""] * len(class_names)), error]


def _row(rel: str, class_names: Sequence[str], probs: list[float], best: int,
         novelty: float | None = None, unknown: bool | None = None) -> list[str]:
    """The CSV row of a classified file; ``probs`` as Python floats (``ndarray.tolist()``), ``best`` the largest's index."""
    cells = [format(p, ".10g") for p in probs]
    novelty_cells = ["", ""] if novelty is None else [_fmt(novelty), "true" if unknown else "false"]
    return [rel, class_names[best], cells[best], *novelty_cells, *cells, ""]


def default_decode_threads() -> int:
    """Threads per call that decode: one per decoding process when they run, else half the CPUs (1 to 8).

    Without decoding processes, locally two chunk tasks decode at once, each beside its own
    model calls. Measured on 2 cores, two tasks of 800 files at once: one decoding thread
    each beat two each, on 64 px (0.67 vs 0.76 s) and 384 px JPEGs (0.78 vs 0.90 s); more
    threads than cores only fight over the GIL for Pillow's Python-side work.
    """
    processes = decoding.started()
    return processes.count if processes else max(1, min(16, os.cpu_count() or 1) // 2)


def predict_files(
    model: Any,
    metadata: dict[str, Any],
    input_dir: Path | str,
    entries: Sequence[FileEntry],
    batch_size: int = 256,
    workers: int | None = None,
    novelty: Any = None,
    profile: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
) -> list[list[str]]:
    """Predict a list of files with a loaded model; one row per file, in order.

    Files are decoded one batch ahead of the model (threads that hand them to the
    process's decoding workers when :func:`imgflow.tasks.decoding.start` began them, else
    decode them), so decoding batch *n+1* overlaps the model's work on batch *n*; the
    model sees whole batches.

    Args:
        model: a loaded Keras model taking raw 0-255 RGB images.
        metadata: the model directory's metadata as :func:`read_metadata` returns it (``class_names``,
            ``image_size``, ``aspect``).
        input_dir: the folder ``entries`` are relative to.
        entries: files to predict.
        batch_size: images per model call.
        workers: decoding threads (default: :func:`default_decode_threads`).
        novelty: fitted statistics (:class:`imgflow.tasks.novelty.NoveltyModel`): fills
            ``novelty``/``unknown`` and calibrates the probabilities; None leaves those
            cells empty and the probabilities as the model gives them.
        profile: a drift profile (:func:`imgflow.tasks.drift.new_profile`) to count
            every file's image properties into (in place), or one profile per entry
            (each file counted into its own group's); None skips that work.

    Returns:
        Rows ``[path, label, confidence, novelty, unknown, prob_<class>..., error]`` as
        strings; a file that cannot be decoded gets empty prediction cells and an ``error``.

    Raises:
        ValueError: the model's output width does not match ``class_names``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, found {batch_size!r}")
    class_names = list(metadata["class_names"])
    size, aspect = int(metadata["image_size"]), str(metadata["aspect"])
    background = metadata.get("background")  # as in training; None (older models): alpha dropped, as they saw it
    root = os.fspath(input_dir)
    workers = workers or default_decode_threads()
    predict_lock = _PREDICT_LOCKS.setdefault(id(model), threading.Lock())
    rows: list[list[str]] = []

    processes = decoding.started()
    decode_all = partial(processes.decode if processes else decoding.decode_files,
                         image_size=size, aspect=aspect, background=background, profiled=profile is not None)

    def submit(pool: ThreadPoolExecutor, batch: Sequence[FileEntry]) -> list[Future]:
        # one task per thread and batch, not per file: per-file futures cost more in
        # hand-offs between threads than a small image costs to decode
        # string joins: a pathlib join costs ~30 µs a file here, more than a worker's pickling of its pixels
        paths = [os.path.join(root, scan.decode_path(e.rel)) for e in batch if not e.error]
        step = max(1, -(-len(paths) // workers))
        return [pool.submit(decode_all, paths[i : i + step]) for i in range(0, len(paths), step)]

    batches = [entries[i : i + batch_size] for i in range(0, len(entries), batch_size)]
    # a short batch (a chunk's last) is padded with zeros (their outputs dropped) to a
    # multiple of an eighth of batch_size, not to a whole batch, and a list shorter than one
    # batch to a power of two up to that eighth: a chunk of 1,050 files costs 1,056 rows of
    # model work, not 1,280, and a few files never pay for 256. At most 13 batch sizes
    # (1, 2, 4, 8, 16, 32, then multiples of 32 for batch 256) reach the model: TensorFlow
    # traces twice per process (the second time with a free batch size); JAX, and XLA on
    # a GPU, compile once per size
    rows_per_call = batch_size if len(batches) > 1 else min(batch_size, 1 << max(0, len(entries) - 1).bit_length())
    pad_step = max(1, batch_size // 8)
    x = np.zeros((rows_per_call, size, size, 3), np.float32)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgflow-decode") as pool:
        pending = submit(pool, batches[0]) if batches else []
        for index, batch in enumerate(batches):
            current = pending
            pending = submit(pool, batches[index + 1]) if index + 1 < len(batches) else []
            errors: list[str] = []
            filled = 0
            decoded = (result for future in current for result in future.result())
            for position, entry in enumerate(batch):
                if entry.error:
                    errors.append(entry.error)
                    continue
                pixels, error, *props = next(decoded)
                if profile is not None:
                    from imgflow.tasks.drift import add

                    add(profile if isinstance(profile, dict) else profile[index * batch_size + position], props[0])
                if pixels is not None and pixels.shape != (size, size, 3):
                    pixels, error = None, f"decoded to shape {pixels.shape}, expected {(size, size, 3)}"
                errors.append(error)
                if pixels is not None:
                    x[filled] = pixels
                    filled += 1
            probs, bests, scores, unknown = [], [], None, None
            if filled:
                rows_used = min(rows_per_call, -(-filled // pad_step) * pad_step)
                x[filled:rows_used] = 0.0  # padding rows: computed, then dropped
                out, scores, unknown = run_batch(model, x[:rows_used], len(class_names), predict_lock, novelty)
                # whole-batch conversions: a NumPy call per file costs more than the file's row
                probs, bests = out[:filled].tolist(), out[:filled].argmax(axis=1).tolist()
                scores = None if scores is None else scores[:filled].tolist()
                unknown = None if unknown is None else unknown[:filled].tolist()
            done = 0
            for entry, error in zip(batch, errors):
                if error:
                    rows.append(_error_row(entry.rel, class_names, error))
                    continue
                rows.append(_row(entry.rel, class_names, probs[done], bests[done],
                                 None if scores is None else scores[done],
                                 None if unknown is None else unknown[done]))
                done += 1
            progress.advance("predict", len(batch))
    return rows


def write_part(path: Path | str, class_names: Sequence[str], rows: Iterable[Sequence[str]]) -> Path:
    """Write a chunk's rows as a part CSV (with header), atomically.

    Not fsynced: a part file is a cache of its group's rows, and one found empty (what a
    power cut may leave) counts as not done (:func:`part_done`); the final CSV is.
    """
    with atomic_open(path, "w", durable=False, encoding="utf-8", newline="", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        writer.writerow(csv_header(class_names))
        writer.writerows(rows)
    return Path(path)


def read_part(path: Path | str, class_names: Sequence[str]) -> Iterator[list[str]]:
    """Yield the rows of a part file, checking its header matches ``class_names``."""
    with open(path, encoding="utf-8", newline="", errors="surrogateescape") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header != csv_header(class_names):
            raise ValueError(f"part file {path}: expected header {csv_header(class_names)}, found {header}")
        yield from reader


def predict_chunk(
    model_dir: Path | str,
    input_dir: Path | str,
    entries: Sequence[Sequence[Any]],
    part: Path | str,
    batch_size: int = 256,
    workers: int | None = None,
) -> dict[str, Any]:
    """Predict one group of files and write its part file (:func:`predict_groups` with one group).

    Returns:
        ``{"part", "rows", "errors", "label_counts", "seconds", "pid"}``.
    """
    result = predict_groups(model_dir, input_dir, [(str(part), entries)], batch_size=batch_size, workers=workers)
    return {"part": str(part), **{k: v for k, v in result.items() if k != "parts"}}


def predict_groups(
    model_dir: Path | str,
    input_dir: Path | str,
    groups: Sequence[tuple[str, Sequence[Sequence[Any]]]],
    batch_size: int = 256,
    workers: int | None = None,
) -> dict[str, Any]:
    """Predict several file groups in one pass over the (per-process cached) model; one part file per group.

    The model sees full batches across groups, while each group keeps its own part file,
    so one new file in a big inbox re-predicts only its small group.

    Args:
        model_dir: the model directory (``model.keras`` + ``metadata.json``).
        input_dir: the folder the entries are relative to.
        groups: ``(part file, entries)`` pairs; entries are :class:`FileEntry` records or
            plain lists of the same four fields; each part file is written atomically.
        batch_size: images per model call.
        workers: decoding threads.

    Returns:
        ``{"parts", "rows", "errors", "label_counts", "seconds", "pid"}``.
    """
    from imgflow.tasks import drift, novelty

    started = time.perf_counter()
    model, metadata = load_model_cached(model_dir)
    files = [FileEntry(*e) for _, entries in groups for e in entries]
    profiles = [drift.new_profile() for _ in groups]  # one drift profile beside each part file
    per_file = [profiles[g] for g, (_, entries) in enumerate(groups) for _ in entries]
    rows = predict_files(model, metadata, input_dir, files, batch_size=batch_size, workers=workers,
                         novelty=novelty.load_cached(model_dir), profile=per_file)
    start = 0
    for (part, entries), profile in zip(groups, profiles):
        write_json(profile_path(part), profile, durable=False)  # the profile first: a part file means the group is done
        write_part(part, metadata["class_names"], rows[start:start + len(entries)])
        start += len(entries)
    labels = Counter(row[1] for row in rows if not row[-1])
    return {"parts": [str(part) for part, _ in groups], "rows": len(rows), "errors": sum(1 for row in rows if row[-1]),
            "label_counts": dict(labels), "unknown": sum(1 for row in rows if row[4] == "true"),
            "seconds": round(time.perf_counter() - started, 4), "pid": os.getpid()}


def _top_k_cells(row: Sequence[str], class_names: Sequence[str], k: int) -> list[str]:
    if k == 0:
        return []
    n = len(class_names)
    if row[-1]:  # error row
        return [""] * (2 * k)
    first = len(LEADING_COLUMNS)
    probs = np.array([float(v) for v in row[first : first + n]])
    order = np.argsort(-probs, kind="stable")[:k]
    cells: list[str] = []
    for i in order:
        cells += [class_names[int(i)], _fmt(probs[int(i)])]
    return cells


def assemble_csv(
    out: Path | str,
    parts: Iterable[Path | str],
    class_names: Sequence[str],
    top_k: int | None = None,
    neutralise: bool = True,
    unknown_label: str | None = None,
) -> dict[str, Any]:
    """Concatenate part files, in the given order, into the final CSV atomically.

    Rows are streamed (memory stays flat). ``top_k`` adds ``top<i>_label`` and
    ``top<i>_prob`` columns computed from the stored probabilities. Cells that a
    spreadsheet would run as a formula (a ``path`` or class name starting with ``=``,
    ``+``, ``-``, ``@``, tab or CR) get a leading ``'``
    (:func:`imgflow.tasks.csvcells.safe_cell`) unless ``neutralise`` is False; part
    files keep the raw text. ``unknown_label`` replaces the ``label`` of rows whose
    ``unknown`` is ``true`` (the probabilities still name the most likely class).

    Returns:
        ``{"csv", "rows", "errors", "label_counts", "unknown", "scored", "predicted_counts"}``:
        ``label_counts`` counts the written labels, ``predicted_counts`` the most likely
        classes, ``unknown`` the rows flagged unknown, ``scored`` the rows with a novelty score.
    """
    k = _clip_top_k(top_k, len(class_names))
    rows = errors = unknown = scored = 0
    predicted: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    with atomic_open(out, "w", encoding="utf-8", newline="", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        writer.writerow(safe_row(csv_header(class_names, k), neutralise))
        for part in parts:
            for row in read_part(part, class_names):
                rows += 1
                if row[-1]:
                    errors += 1
                else:
                    predicted[row[1]] += 1
                    scored += row[3] != ""
                    if row[4] == "true":
                        unknown += 1
                        if unknown_label is not None:
                            row = [row[0], unknown_label, *row[2:]]
                    labels[row[1]] += 1
                writer.writerow(safe_row([*row[:-1], *_top_k_cells(row, class_names, k), row[-1]], neutralise))
    ordered = {name: labels[name] for name in class_names if labels[name]}
    if unknown_label is not None and labels[unknown_label] and unknown_label not in ordered:
        ordered[unknown_label] = labels[unknown_label]
    return {"csv": str(out), "rows": rows, "errors": errors, "label_counts": ordered, "unknown": unknown,
            "scored": scored, "predicted_counts": {name: predicted[name] for name in class_names if predicted[name]}}


def images_per_second(count: int, seconds: float) -> float:
    """``count / seconds`` rounded, 0.0 when nothing was timed."""
    return round(count / seconds, 2) if seconds > 0 and count else 0.0


__all__ = [
    "FileEntry",
    "assemble_csv",
    "chunk_entries",
    "chunk_key",
    "csv_header",
    "images_per_second",
    "load_model_cached",
    "model_identity",
    "part_done",
    "part_path",
    "predict_chunk",
    "predict_files",
    "profile_path",
    "read_metadata",
    "read_profiles",
    "read_part",
    "remove_stale_parts",
    "remove_stale_temporaries",
    "remove_superseded_runs",
    "run_dir_for",
    "scan_files",
    "write_part",
]


# housekeeping of a prediction run folder lives in its own module; these names stay importable from here
from imgflow.tasks.prediction_cleanup import (  # noqa: E402,F401
    remove_stale_parts,
    remove_stale_temporaries,
    remove_superseded_runs,
)
