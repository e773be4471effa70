"""Scan and validate a folder dataset (``DATA_DIR/<class>/*``) before any training.

Every file is decoded for real, in parallel threads (Pillow releases the GIL while it
decodes and hashlib while it hashes), over a streaming walk of the tree with a bounded
window of files in flight, so memory stays flat whatever the dataset size. The user's
files are only ever read: a bad file is excluded from the usable set and reported.
The tree is walked by :mod:`imgflow.tasks.scan` (hidden, special, symlink and non-UTF-8
policy), each file checked by :mod:`imgflow.tasks.inspection`.

The report is a JSON-able dict (see DESIGN.md, "Validation report"):
``usable``, ``classes``, ``problems`` (``path``, ``code``, ``severity``, ``message``,
``excluded``), plus ``class_names``, ``files`` (the usable files of each split),
``val_classes`` and ``stats``.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing
import os
import statistics
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from imgflow.tasks import inspection, paths, scan, shortcuts
from imgflow.tasks.inspection import (  # noqa: F401 - re-exported: the decode checks live there
    COARSE_HASH_SIDE,
    FINE_HASH_SIDE,
    FORMAT_EXTENSIONS,
    LARGE_IMAGE_PIXELS,
    NEAR_DUPLICATE_BITS,
    SUPPORTED_FORMATS,
    ImageInfo,
    difference_hash,
    inspect_image,
    thumbnail,
)
from imgflow.tasks.options import ValidationOptions
from imgflow.tasks import progress
from imgflow.tasks.scan import is_hidden  # noqa: F401 - re-exported: callers import it from here
from imgflow.tasks.errors import CheckFailed, UsageError

# From this many files on, decoding runs in worker processes (batches of PROCESS_BATCH).
PROCESS_THRESHOLD, PROCESS_BATCH = 2000, 32
ERROR, WARNING = "error", "warning"


class DatasetError(UsageError, ValueError):
    """DATA_DIR (or VAL_DIR) cannot be scanned at all: missing, not a folder, unreadable."""


class DatasetUnusable(CheckFailed, RuntimeError):
    """Validation ran, and the data cannot be trained on (fewer than 2 usable classes)."""


@dataclass(frozen=True)
class Candidate:
    """A file found by the scan, to be decoded."""

    split: str  # "train" (DATA_DIR) or "val" (VAL_DIR)
    path: str  # as found: the root as given, then the path below it
    relpath: str  # POSIX, relative to the root
    class_name: str


def _problem(path: Path | str, code: str, severity: str, message: str, excluded: bool) -> dict[str, Any]:
    return {"path": scan.encode_path(str(path)), "code": code, "severity": severity, "message": scan.printable(message), "excluded": excluded}


def _check_root(root: Path, what: str) -> Path:
    if not root.exists():
        raise DatasetError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{what} {root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"{what} {root} is not readable")
    return root


# How each kind of name the walker skips is reported: (code, severity).
_SKIPPED = {
    scan.HIDDEN: ("hidden_file", WARNING),
    scan.SPECIAL: ("special_file", WARNING),
    scan.EXCLUDED: ("workdir_skipped", WARNING),
    scan.UNLISTABLE: ("unreadable", ERROR),
    scan.OUTSIDE: ("symlink_outside_root", ERROR),
    scan.LINKED_FOLDER: ("symlink", WARNING),
    scan.LOOP: ("symlink_loop", WARNING),
    scan.BROKEN: ("symlink", WARNING),
}
_ADVICE = {
    scan.OUTSIDE: " — copy the file in if it belongs to the dataset",
    scan.LINKED_FOLDER: " — copy or move the folder in",
    scan.EXCLUDED: " (the work folder lies inside the dataset)",
}
NON_UTF8_MESSAGE = (
    "the name is not valid UTF-8; the file is used, and reports write its path with \\xHH for each "
    "such byte — rename it to plain UTF-8 to avoid surprises"
)


def _report_skipped(entry: scan.Entry, problems: list[dict[str, Any]]) -> None:
    code, severity = _SKIPPED[entry.kind]
    problems.append(_problem(entry.path, code, severity, entry.message + _ADVICE.get(entry.kind, ""), True))


def _scan_class(
    split: str, root: Path, class_name: str, problems: list[dict[str, Any]],
    exclude: frozenset[tuple[int, int]] = frozenset(),
) -> Iterator[Candidate]:
    """Yield the files of one class folder (nested folders included, as Keras does), in walk order."""
    for entry in scan.walk(root, root / class_name, exclude=exclude):
        if entry.kind == scan.FOLDER:
            problems.append(_problem(entry.path, "nested_folder", WARNING,
                                     f"folder inside class '{class_name}'; its images count as '{class_name}'", False))
        elif entry.kind != scan.FILE:
            _report_skipped(entry, problems)
            continue
        if entry.undecodable:
            problems.append(_problem(entry.path, "non_utf8_name", WARNING, NON_UTF8_MESSAGE, False))
        if entry.kind == scan.FILE:
            if entry.link:
                problems.append(_problem(entry.path, "symlink", WARNING, entry.message, False))
            yield Candidate(split, entry.path, scan.encode_path(entry.rel), class_name)


def _class_folders(
    root: Path, problems: list[dict[str, Any]], exclude: frozenset[tuple[int, int]] = frozenset()
) -> list[str]:
    """Sorted class folder names at the root; report everything else found there."""
    names = []
    for entry in scan.list_root(root, exclude=exclude):
        if entry.kind == scan.FOLDER:
            if entry.undecodable:
                problems.append(_problem(entry.path, "non_utf8_name", ERROR,
                                         "class folder name is not valid UTF-8, and class names must be text; "
                                         "rename the folder — its images are not used", True))
            else:
                names.append(entry.rel)
        elif entry.kind == scan.FILE and not entry.link:
            problems.append(_problem(entry.path, "root_file", WARNING,
                                     "file at the dataset root belongs to no class; move it into a class folder", True))
        elif entry.kind == scan.FILE:
            problems.append(_problem(entry.path, "symlink", WARNING, "symlink at the dataset root; not followed", True))
        else:
            _report_skipped(entry, problems)
    return names


def _inspect_paths(paths: list[str]) -> list[ImageInfo]:
    return [inspect_image(Path(path)) for path in paths]


def _batches(items: Iterator[Candidate], size: int) -> Iterator[list[Candidate]]:
    batch: list[Candidate] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _decode_all(
    candidates: Iterator[Candidate], workers: int, processes: bool
) -> Iterator[tuple[Candidate, ImageInfo]]:
    """Decode files in parallel, a bounded window of batches in flight, results in scan order.

    Processes scale with the cores (decoding is only part of the per-file work, the rest
    holds the GIL) but cost a start-up; threads start at once, for small datasets.
    Worker processes come from a fork server, never forked from this (threaded) process.
    """
    if processes:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        pool: Executor = ProcessPoolExecutor(max_workers=workers, mp_context=context)
        batch_size = PROCESS_BATCH
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgflow-validate")
        batch_size = 1
    window = workers * 4
    pending: collections.deque[tuple[list[Candidate], Future[list[ImageInfo]]]] = collections.deque()
    with pool:
        for batch in _batches(candidates, batch_size):
            pending.append((batch, pool.submit(_inspect_paths, [c.path for c in batch])))
            if len(pending) >= window:
                done, future = pending.popleft()
                yield from zip(done, future.result())
        while pending:
            done, future = pending.popleft()
            yield from zip(done, future.result())


@dataclass
class _Usable:
    candidate: Candidate
    info: ImageInfo


def _find_duplicates(usable: list[_Usable], problems: list[dict[str, Any]], near: bool) -> set[Candidate]:
    """Exact and near duplicates; returns the candidates excluded (label conflicts, leaks)."""
    excluded: set[Candidate] = set()
    groups: dict[str, list[_Usable]] = collections.defaultdict(list)
    for item in usable:
        groups["c" + (item.info.content_hash or "")].append(item)
        groups["p" + (item.info.pixel_hash or "")].append(item)
    reported: set[tuple[Candidate, str]] = set()

    def report(item: _Usable, code: str, severity: str, message: str, exclude: bool) -> None:
        if (item.candidate, code) in reported:
            return
        reported.add((item.candidate, code))
        problems.append(_problem(item.candidate.path, code, severity, message, exclude))
        if exclude:
            excluded.add(item.candidate)

    exact_pairs: set[frozenset[Candidate]] = set()
    for key, members in groups.items():
        if len(members) < 2:
            continue
        members = sorted({id(m): m for m in members}.values(), key=lambda m: (m.candidate.split, m.candidate.relpath))
        for a in members:
            for b in members:
                if a is not b:
                    exact_pairs.add(frozenset((a.candidate, b.candidate)))
        how = "byte-identical" if key.startswith("c") else "same pixels"
        train = [m for m in members if m.candidate.split == "train"]
        val = [m for m in members if m.candidate.split == "val"]
        train_classes = sorted({m.candidate.class_name for m in train})
        if len(train_classes) > 1:
            for m in train:
                others = ", ".join(o.candidate.path for o in train if o is not m)
                report(m, "label_conflict", ERROR,
                       f"the same image ({how}) is labelled {' and '.join(train_classes)}: {others}; "
                       "keep it in one class folder only", True)
        elif len(train) > 1:
            first = train[0]
            for m in train[1:]:
                report(m, "duplicate", WARNING, f"{how} copy of {first.candidate.path} in the same class", False)
        if train and val:
            for m in val:
                report(m, "train_val_leak", ERROR,
                       f"the same image ({how}) is in the training data at {train[0].candidate.path}; "
                       "excluded from validation so the score stays honest", True)
        elif len(val) > 1:
            first = val[0]
            for m in val[1:]:
                report(m, "duplicate", WARNING, f"{how} copy of {first.candidate.path} in the validation data", False)
    if not near:
        return excluded
    by_coarse: dict[int, list[_Usable]] = collections.defaultdict(list)
    flat = {0, (1 << (COARSE_HASH_SIDE * COARSE_HASH_SIDE)) - 1}  # featureless images all hash alike
    for item in usable:
        if item.info.coarse_hash is not None and item.info.coarse_hash not in flat:
            by_coarse[item.info.coarse_hash].append(item)
    for members in by_coarse.values():
        for i, m in enumerate(members):
            for first in members[:i]:
                distance = bin((first.info.fine_hash or 0) ^ (m.info.fine_hash or 0)).count("1")
                if distance > NEAR_DUPLICATE_BITS or frozenset((first.candidate, m.candidate)) in exact_pairs:
                    continue
                where = "" if m.candidate.class_name == first.candidate.class_name else (
                    f" labelled '{first.candidate.class_name}' — a possible label conflict")
                report(m, "near_duplicate", WARNING,
                       f"looks the same as {first.candidate.path}{where} "
                       f"(perceptual hashes differ in {distance} of {FINE_HASH_SIDE ** 2} bits)", False)
                break
    return excluded


def _outliers(usable: list[_Usable], problems: list[dict[str, Any]], options: ValidationOptions) -> dict[str, Any]:
    if not usable:
        return {}
    widths = [u.info.width for u in usable]
    heights = [u.info.height for u in usable]
    median_w, median_h = statistics.median(widths), statistics.median(heights)
    median_aspect = statistics.median(w / h for w, h in zip(widths, heights))
    factor, aspect_factor = options.size_outlier_factor, options.aspect_outlier_factor
    for u in usable:
        w, h = u.info.width, u.info.height
        path = u.candidate.path
        if min(w, h) < options.min_image_side:
            problems.append(_problem(path, "tiny_image", WARNING,
                                     f"only {w}x{h} pixels (under {options.min_image_side}); it will be upscaled a lot", False))
        elif max(w / median_w, median_w / w, h / median_h, median_h / h) > factor:
            problems.append(_problem(path, "size_outlier", WARNING,
                                     f"{w}x{h} is far from the typical {median_w:g}x{median_h:g}", False))
        aspect = w / h
        if max(aspect / median_aspect, median_aspect / aspect) > aspect_factor:
            problems.append(_problem(path, "aspect_outlier", WARNING,
                                     f"aspect ratio {aspect:.2f} is far from the typical {median_aspect:.2f}; "
                                     "squashing will distort it (consider aspect: crop or pad)", False))
    return {
        "width": {"min": min(widths), "median": median_w, "max": max(widths)},
        "height": {"min": min(heights), "median": median_h, "max": max(heights)},
    }


class TreeFingerprint(NamedTuple):
    """Digest of a folder tree (see :func:`tree_fingerprint`) and how many entries it has."""

    digest: str
    entries: int


def tree_fingerprint(
    roots: list[Path], options: ValidationOptions, exclude: frozenset[tuple[int, int]] = frozenset()
) -> TreeFingerprint:
    """A digest of every entry under ``roots`` (relative path, size, mtime, mode), the options and this code.

    Walking and stat-ing a tree costs a tiny fraction of decoding it, so a report whose
    fingerprint matches can be reused: the same files with the same sizes and times
    give the same findings. It walks with :func:`imgflow.tasks.scan.walk`, so it sees
    exactly what validation sees (``exclude``: the work folder inside DATA_DIR).
    """
    digest = hashlib.sha256()
    count = 0
    digest.update(Path(__file__).read_bytes())
    for module in (scan, inspection, shortcuts):  # the code that decides what a report says
        digest.update(Path(module.__file__).read_bytes())
    digest.update(options.model_dump_json().encode())
    for root in roots:
        digest.update(f"\0root:{os.path.realpath(root)}".encode("utf-8", "surrogateescape"))
        for entry in scan.walk(root, stat=True, exclude=exclude):
            count += 1
            digest.update(f"\0{entry.rel}\0{entry.kind}\0{entry.size}\0{entry.mtime_ns}\0{entry.mode}"
                          .encode("utf-8", "surrogateescape"))
    return TreeFingerprint(digest.hexdigest(), count)


def validate_dataset(
    data_dir: Path | str,
    val_dir: Path | str | None = None,
    options: ValidationOptions | None = None,
    exclude: Iterable[Path | str] = (),
) -> dict[str, Any]:
    """Scan, decode and check every file of a class-folder dataset.

    (Long on purpose: it is the one place that orders the stages — classes, streamed
    decode, duplicates, outliers, class checks — and assembles the report contract.)

    Args:
        data_dir: ``DATA_DIR/<class>/*`` training images.
        val_dir: optional validation folder with the same class folders.
        options: thresholds; defaults from :class:`ValidationOptions`.
        exclude: folders never scanned as data (imgflow's work folder when it lies
            inside DATA_DIR); each one found is reported as ``workdir_skipped``.

    Returns:
        The validation report (see the module docstring). ``usable`` is False only when
        fewer than two classes have usable images.

    Raises:
        DatasetError: a root folder is missing, not a folder, or unreadable.
        imgflow.tasks.paths.PathConflict: VAL_DIR is DATA_DIR, or one lies inside the other.
    """
    options = options or ValidationOptions()
    data_root = _check_root(Path(data_dir), "DATA_DIR")
    val_root = _check_root(Path(val_dir), "VAL_DIR") if val_dir is not None else None
    paths.check_val_dir(data_root, val_root)
    skip = scan.file_ids(exclude)
    fingerprint = tree_fingerprint([data_root] + ([val_root] if val_root else []), options, skip)
    problems: list[dict[str, Any]] = []

    train_classes = _class_folders(data_root, problems, skip)
    val_classes = _class_folders(val_root, problems, skip) if val_root else []
    for name in sorted(set(val_classes) - set(train_classes)):
        problems.append(_problem(val_root / name, "unknown_val_class", ERROR,
                                 f"class '{name}' is in VAL_DIR but not in DATA_DIR; its images are not used", True))
    for name in sorted(set(train_classes) - set(val_classes)) if val_root else []:
        problems.append(_problem(val_root / name, "missing_val_class", WARNING,
                                 f"class '{name}' has no folder in VAL_DIR; it will not be validated", False))

    def candidates() -> Iterator[Candidate]:
        for name in train_classes:
            yield from _scan_class("train", data_root, name, problems, skip)
        for name in val_classes:
            if name in train_classes:
                yield from _scan_class("val", val_root, name, problems, skip)

    workers = options.workers or os.cpu_count() or 1
    usable: list[_Usable] = []
    modes: collections.Counter[str] = collections.Counter()
    formats: collections.Counter[str] = collections.Counter()
    scanned = 0
    processes = workers > 1 and fingerprint.entries >= PROCESS_THRESHOLD
    for candidate, info in progress.iterate(_decode_all(candidates(), workers, processes), "validate", fingerprint.entries):
        scanned += 1
        if info.error_code:
            problems.append(_problem(candidate.path, info.error_code, ERROR, info.error_message or info.error_code, True))
            continue
        for code, message in info.warnings:
            problems.append(_problem(candidate.path, code, WARNING, message, False))
        modes[info.mode or "?"] += 1
        formats[info.format or "?"] += 1
        usable.append(_Usable(candidate, info))

    excluded = _find_duplicates(usable, problems, options.near_duplicates)
    sizes = _outliers(usable, problems, options)
    kept = [u.candidate for u in usable if u.candidate not in excluded]

    counts = {split: collections.Counter(c.class_name for c in kept if c.split == split) for split in ("train", "val")}
    class_names = [name for name in train_classes if counts["train"][name] > 0]
    for name in train_classes:
        if counts["train"][name] == 0:
            problems.append(_problem(data_root / name, "empty_class", ERROR,
                                     f"class '{name}' has no usable images; it is left out of the class list", True))
    usable_flag = len(class_names) >= 2
    if not usable_flag:
        problems.append(_problem(data_root, "too_few_classes", ERROR,
                                 f"found {len(class_names)} class folder(s) with usable images "
                                 f"({', '.join(class_names) or 'none'}); training needs at least 2: "
                                 "put each class's images in its own folder DATA_DIR/<class>/", False))
    else:
        for name in class_names:
            if counts["train"][name] < 2 and val_root is None:
                problems.append(_problem(data_root / name, "too_few_images", WARNING,
                                         f"class '{name}' has only {counts['train'][name]} usable image: the held-out "
                                         "validation split can take it, leaving the class with no training image; "
                                         "add images (or give --val-dir)", False))
        class_counts = [counts["train"][n] for n in class_names]
        ratio = max(class_counts) / min(class_counts)
        if ratio > options.imbalance_ratio:
            largest = max(class_names, key=lambda n: counts["train"][n])
            smallest = min(class_names, key=lambda n: counts["train"][n])
            problems.append(_problem(data_root, "class_imbalance", WARNING,
                                     f"'{largest}' has {counts['train'][largest]} images, '{smallest}' only "
                                     f"{counts['train'][smallest]} ({ratio:.1f}x); a model can score well by "
                                     "predicting the big class — use class weights or collect more", False))

    kept_set = set(kept)
    shortcut_problems, shortcut_stats = shortcuts.find_shortcuts(
        [(u.candidate.class_name, u.info) for u in usable
         if u.candidate in kept_set and u.candidate.split == "train" and u.candidate.class_name in class_names],
        data_root, options)
    problems.extend(shortcut_problems)
    files = {
        split: [[c.relpath, c.class_name] for c in kept if c.split == split and c.class_name in class_names]
        for split in ("train", "val")
    }
    problems.sort(key=lambda p: (p["severity"] != ERROR, p["path"], p["code"]))
    return {
        "usable": usable_flag,
        "fingerprint": fingerprint.digest,
        "data_dir": scan.encode_path(str(data_root.resolve())),
        "val_dir": scan.encode_path(str(val_root.resolve())) if val_root else None,
        "class_names": class_names,
        "classes": {n: counts["train"][n] for n in class_names},
        "val_classes": {n: counts["val"][n] for n in class_names} if val_root else None,
        "files": files,
        "problems": problems,
        "stats": {
            "files_scanned": scanned,
            "usable_files": len(files["train"]) + len(files["val"]),
            "excluded_files": scanned - len(files["train"]) - len(files["val"]),
            "errors": sum(p["severity"] == ERROR for p in problems),
            "warnings": sum(p["severity"] == WARNING for p in problems),
            "modes": dict(sorted(modes.items())),
            "formats": dict(sorted(formats.items())),
            "sizes": sizes,
            **shortcut_stats,
        },
    }


def report_markdown(report: dict[str, Any], max_problems: int = 200) -> str:
    """A human summary of a validation report: counts, image modes, the problems."""
    stats = report["stats"]
    lines = [
        "# Dataset validation",
        "",
        f"- data: `{report['data_dir']}`" + (f", validation: `{report['val_dir']}`" if report["val_dir"] else ""),
        f"- usable for training: **{'yes' if report['usable'] else 'no'}**",
        f"- files scanned: {stats['files_scanned']}, usable: {stats['usable_files']}, "
        f"excluded: {stats['excluded_files']}",
        f"- problems: {stats['errors']} errors, {stats['warnings']} warnings",
        f"- image modes: {', '.join(f'{k} {v}' for k, v in stats['modes'].items()) or 'none'}",
        f"- formats: {', '.join(f'{k} {v}' for k, v in stats['formats'].items()) or 'none'}",
        *shortcuts.markdown_lines(stats),
        "",
        "| class | images | validation images |",
        "|---|---:|---:|",
    ]
    val = report.get("val_classes") or {}
    for name, count in report["classes"].items():
        lines.append(f"| {name} | {count} | {val.get(name, '')} |")
    problems = report["problems"]
    if problems:
        by_code = collections.Counter((p["severity"], p["code"]) for p in problems)
        lines += ["", "## Problems by kind", "", "| severity | code | count |", "|---|---|---:|"]
        lines += [f"| {sev} | {code} | {n} |" for (sev, code), n in sorted(by_code.items())]
        lines += ["", "## Problems", "", "| severity | code | path | excluded | message |", "|---|---|---|---|---|"]
        for p in problems[:max_problems]:
            message = p["message"].replace("|", "\\|")
            path = p["path"].replace("|", "\\|")
            lines.append(f"| {p['severity']} | {p['code']} | `{path}` | {'yes' if p['excluded'] else 'no'} | {message} |")
        if len(problems) > max_problems:
            lines.append(f"\n… and {len(problems) - max_problems} more in the JSON report.")
    return "\n".join(lines) + "\n"

