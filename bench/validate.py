"""Benchmark: `imgflow validate` against a bare Pillow open+decode loop on the same cores.

Builds (once, cached under bench/_data/seed-validate) a seed-scale folder: 3 classes,
13,000 JPEGs of 256x256. Prints images/s of
  - bare: a process pool, one process per core, that only opens and decodes each file;
  - validate_dataset(): the work `imgflow validate` does (decode, hashes, checks);
  - `imgflow validate` as a command, start-up of Python, TensorFlow-free imports and a
    temporary Prefect server included;
and the ratios against the bare loop. Run: python bench/validate.py [--images N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def build_seed_folder(root: Path, total: int, size: int = 256) -> list[Path]:
    """3 classes of smooth synthetic photos (gradients, discs, a little noise), JPEG q90."""
    classes = ["cats", "dogs", "birds"]
    marker = root / f".complete-{total}"
    if not marker.exists():
        rng = np.random.default_rng(0)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        for i in range(total):
            name = classes[i % 3]
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            cx, cy, radius = rng.uniform(0, size, 2).tolist() + [rng.uniform(20, 90)]
            base = rng.uniform(0, 255, 3)
            disc = ((x - cx) ** 2 + (y - cy) ** 2 < radius**2)[..., None]
            pixels = base + (x[..., None] / size) * rng.uniform(-80, 80, 3) + disc * rng.uniform(-120, 120, 3)
            pixels += rng.normal(0, 6, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i:05d}.jpg", quality=90)
        marker.write_text("ok")
    return sorted(root.glob("*/*.jpg"))


def _decode(path: Path) -> int:
    with Image.open(path) as image:
        image.load()
        return image.size[0]


def bare_rate(files: list[Path], workers: int) -> float:
    start = time.perf_counter()
    with Pool(workers) as pool:
        for _ in pool.imap_unordered(_decode, files, chunksize=64):
            pass
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=13_000)
    args = parser.parse_args()
    data = ROOT / "_data" / "seed-validate"
    files = build_seed_folder(data, args.images)
    workers = os.cpu_count() or 1
    print(f"{len(files)} JPEGs 256x256, {workers} cores")

    from imgflow.tasks.dataset import validate_dataset

    bare_rate(files[:500], workers)  # warm the page cache and the pool start-up
    bare = bare_rate(files, workers)
    start = time.perf_counter()
    report = validate_dataset(data)
    work = len(files) / (time.perf_counter() - start)
    assert report["stats"]["usable_files"] == len(files), report["stats"]

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PREFECT_HOME=tempfile.mkdtemp())
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imgflow", "validate", str(data), "--workdir", tempfile.mkdtemp()],
                   check=True, env=env, capture_output=True, cwd=ROOT.parent)
    command_seconds = time.perf_counter() - start
    command = len(files) / command_seconds

    print(f"bare Pillow decode, {workers} processes: {bare:8.0f} images/s")
    print(f"validate_dataset()                 : {work:8.0f} images/s  ratio {work / bare:.2f}x (target >= 0.8x)")
    print(f"imgflow validate (whole command)   : {command:8.0f} images/s  ratio {command / bare:.2f}x "
          f"({command_seconds:.1f} s, temporary Prefect server start-up included)")


if __name__ == "__main__":
    main()
