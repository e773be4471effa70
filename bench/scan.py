"""Folder walking speed: imgflow's scanners against a plain ``os.walk`` loop, same tree, same run.

Builds a tree of empty files (``--classes`` class folders of ``--per-class`` files, a
nested folder in each class), then times, best of ``--repeat``:

* ``os.walk + lstat``: what a user would write to list and stat every file (baseline);
* ``validation scan``: the class folders and every class walked as validation does;
* ``tree fingerprint``: validation's cache key (walk + lstat of every entry);
* ``prediction scan``: ``scan_files`` over the tree (walk + lstat);
* ``evaluation scan``: ``scan_class_folders``.

Run with another checkout first on ``PYTHONPATH`` to compare versions::

    PYTHONPATH=. python bench/scan.py --files 50000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def build(root: Path, classes: int, per_class: int) -> int:
    count = 0
    for c in range(classes):
        folder = root / f"class{c:03d}"
        (folder / "nested").mkdir(parents=True)
        for i in range(per_class):
            target = folder / "nested" if i % 10 == 0 else folder
            (target / f"img{i:05d}.jpg").touch()
            count += 1
    return count


def best(fn, repeat: int) -> tuple[float, int]:
    times, result = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from imgflow.tasks import dataset, evaluation, prediction
    from imgflow.tasks.options import ValidationOptions

    with tempfile.TemporaryDirectory(prefix="imgflow-bench-scan-") as tmp:
        root = Path(tmp) / "data"
        total = build(root, args.classes, args.files // args.classes)
        names = sorted(p.name for p in root.iterdir())

        def plain() -> int:
            n = 0
            for folder, _, files in os.walk(root):
                for name in files:
                    os.lstat(os.path.join(folder, name))
                    n += 1
            return n

        def validation_scan() -> int:
            problems: list = []
            classes = dataset._class_folders(root, problems)
            return sum(1 for c in classes for _ in dataset._scan_class("train", root, c, problems))

        def fingerprint() -> int:
            return dataset.tree_fingerprint([root], ValidationOptions()).entries

        def prediction_scan() -> int:
            return sum(1 for _ in prediction.scan_files(root))

        def evaluation_scan() -> int:
            return len(evaluation.scan_class_folders(root, names)[0])

        print(f"{total} files in {args.classes} classes; imgflow from {Path(dataset.__file__).parent}")
        base, n = best(plain, args.repeat)
        print(f"{'os.walk + lstat (baseline)':<28} {base:7.3f} s  {n} files")
        for label, fn in [("validation scan", validation_scan), ("tree fingerprint", fingerprint),
                          ("prediction scan", prediction_scan), ("evaluation scan", evaluation_scan)]:
            seconds, n = best(fn, args.repeat)
            print(f"{label:<28} {seconds:7.3f} s  {n} entries  {seconds / base:5.2f}x baseline")


if __name__ == "__main__":
    main()
