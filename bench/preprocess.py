"""Benchmark: `imgflow preprocess` throughput vs a bare Pillow decode+resize loop, and the cached rerun.

Run:  TF_CPP_MIN_LOG_LEVEL=2 python bench/preprocess.py [--scale 1.0] [--image-size 128]

Builds (once, cached under bench/_data/) the seed-scale folder: 3 classes, 13,000 training
+ 1,400 validation JPEGs of 256x256, then, in one run on the same cores:

1. floor A: a bare Pillow loop (open, convert RGB, resize) over every file, one process per core
   (best of 2 runs, as the machine may be shared: this favours the baseline);
2. floor B: the same loop calling ``imgflow.tasks.tfrecords.load_image`` (the exact decode preprocessing
   does, with JPEG DCT-scaled decoding), one process per core;
3. ``preprocess_flow`` cold (validation + shards + manifest), timing the validation
   subflow it runs first separately, so the preprocessing stage itself is measured too;
4. ``preprocess_flow`` again over unchanged data (cached).

It prints images/s and the ratios the issue sets targets for.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
DATA = ROOT / "_data"
CLASSES = ("circle", "square", "triangle")


def _make_one(args: tuple[str, int, int, int]) -> None:
    from PIL import Image, ImageDraw

    path, class_index, seed, side = args
    rng = np.random.default_rng(seed)
    # low-frequency colour noise (photo-like JPEG sizes), a little grain, one shape per class
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((side, side), Image.Resampling.BICUBIC)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-12, 12, (side, side, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(side // 8, side // 3))
    cx, cy = (int(v) for v in rng.integers(r, side - r, 2))
    color = tuple(int(v) for v in rng.integers(0, 256, 3))
    if class_index == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif class_index == 1:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    image.save(path, quality=90)


def ensure_seed_data(scale: float = 1.0, side: int = 256) -> tuple[Path, Path]:
    """Create (or reuse) bench/_data/seed-<n>/{train,val}/<class>/*.jpg; returns (train_dir, val_dir)."""
    n_train, n_val = int(13_000 * scale), int(1_400 * scale)
    root = DATA / f"seed-{n_train}-{n_val}-{side}"
    marker = root / "complete.json"
    if marker.exists():
        return root / "train", root / "val"
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for split, total in (("train", n_train), ("val", n_val)):
        for class_index, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            count = total // 3 + (1 if class_index < total % 3 else 0)
            for i in range(count):
                seed = class_index * 1_000_000 + (500_000 if split == "val" else 0) + i
                jobs.append((str(folder / f"{name}_{i:05d}.jpg"), class_index, seed, side))
    start = time.perf_counter()
    with mp.Pool(os.cpu_count()) as pool:
        pool.map(_make_one, jobs, chunksize=64)
    marker.write_text(json.dumps({"train": n_train, "val": n_val, "side": side}))
    print(f"generated {len(jobs)} JPEGs in {time.perf_counter() - start:.1f}s under {root}")
    return root / "train", root / "val"


def _bare_pillow(args: tuple[list[str], int]) -> float:
    from PIL import Image

    paths, size = args
    start = time.process_time()
    for path in paths:
        with Image.open(path) as img:
            np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return time.process_time() - start


def _imgflow_decode(args: tuple[list[str], int]) -> float:
    from imgflow.tasks.tfrecords import load_image

    paths, size = args
    start = time.process_time()
    for path in paths:
        load_image(path, size)
    return time.process_time() - start


def _floor(fn, files: list[str], size: int, rounds: int = 2) -> tuple[float, float]:
    """Best wall seconds and CPU seconds (all workers) of ``fn`` over ``files``, one process per core.

    The best of ``rounds`` runs: on a shared machine this favours the baseline, never imgflow.
    """
    chunks = [(files[i:i + 64], size) for i in range(0, len(files), 64)]
    best = (float("inf"), float("inf"))
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool:
        pool.map(fn, [([files[0]], size)] * (os.cpu_count() or 1))  # warm the workers' imports
        for _ in range(rounds):
            start = time.perf_counter()
            cpu = sum(pool.map(fn, chunks, chunksize=1))
            best = min(best, (time.perf_counter() - start, cpu))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the seed-scale image counts")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    train_dir, val_dir = ensure_seed_data(args.scale)
    files = sorted(str(p) for p in list(train_dir.rglob("*.jpg")) + list(val_dir.rglob("*.jpg")))
    n = len(files)
    cores = os.cpu_count()
    print(f"{n} images ({train_dir.parent}), image_size {args.image_size}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}")

    floor_a, cpu_a = _floor(_bare_pillow, files, args.image_size)
    print(f"floor A  bare Pillow open/convert/resize, {cores} processes: {floor_a:7.1f}s  {n / floor_a:7.0f} img/s"
          f"  CPU {1000 * cpu_a / n:.2f} ms/img")
    floor_b, cpu_b = _floor(_imgflow_decode, files, args.image_size)
    print(f"floor B  imgflow.tasks.tfrecords.load_image,     {cores} processes: {floor_b:7.1f}s  {n / floor_b:7.0f} img/s"
          f"  CPU {1000 * cpu_b / n:.2f} ms/img")

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="imgflow-bench-prefect-")
    from prefect.testing.utilities import prefect_test_harness

    import imgflow.flows.validation
    from imgflow.flows.config import ImgflowConfig
    from imgflow.flows.preprocessing import preprocess_flow

    validate_flow = imgflow.flows.validation.validate_flow
    spent: list[float] = []

    def timed_validation(*a, **k):
        # preprocess_flow looks validate_flow up at call time: time its share of each run
        start = time.perf_counter()
        try:
            return validate_flow(*a, **k)
        finally:
            spent.append(time.perf_counter() - start)

    imgflow.flows.validation.validate_flow = timed_validation

    config = ImgflowConfig.from_flat({"image_size": args.image_size})
    work = Path(tempfile.mkdtemp(prefix="imgflow-bench-work-"))
    try:
        with prefect_test_harness(server_startup_timeout=180):
            import imgflow.tasks.tfrecords  # noqa: F401  (TensorFlow import outside the timings)

            start, cpu_start = time.perf_counter(), time.process_time()
            first = preprocess_flow(train_dir, val_dir, work, config)
            t1, cpu1 = time.perf_counter() - start, time.process_time() - cpu_start
            assert not first["cached"], first
            shard_bytes = sum(p.stat().st_size for p in Path(first["manifest"]).parent.glob("*.tfrecord"))
            t_val = spent[-1]
            print(f"preprocess_flow, cold (validation + shards):   {t1:7.1f}s  {n / t1:7.0f} img/s  "
                  f"({first['shards']} shards, {shard_bytes / 2**20:.0f} MiB)")
            print(f"  CPU of this process (all threads): {1000 * cpu1 / n:.2f} ms/img")
            print(f"  of which validation (validate_flow):         {t_val:7.1f}s  {n / t_val:7.0f} img/s")
            t_stage = t1 - t_val
            print(f"  of which preprocessing (plan+shards+manifest):{t_stage:6.1f}s  {n / t_stage:7.0f} img/s")

            mtimes = {p: p.stat().st_mtime_ns for p in Path(first["manifest"]).parent.iterdir()}
            start = time.perf_counter()
            second = preprocess_flow(train_dir, val_dir, work, config)
            t2 = time.perf_counter() - start
            assert second["cached"], second
            untouched = mtimes == {p: p.stat().st_mtime_ns for p in Path(first["manifest"]).parent.iterdir()}
            print(f"preprocess_flow, second run (cached):          {t2:7.1f}s  files untouched: {untouched}")
            t2_stage = t2 - spent[-1]
            print(f"  of which validation:                         {spent[-1]:7.1f}s")
            print(f"  of which preprocessing (cache check):        {t2_stage:7.1f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nratios (targets from issue #3)")
    print(f"  shard stage vs floor B (same decode):  {floor_b / t_stage:5.2f}x   (target >= 0.8x)")
    print(f"  shard stage vs floor A (bare Pillow):  {floor_a / t_stage:5.2f}x   (target >= 0.8x)")
    print(f"  whole flow incl. validation vs floor A:{floor_a / t1:5.2f}x")
    print(f"  second run / first run, whole flow:    {100 * t2 / t1:5.1f}%   (target < 5%)")
    print(f"  second run minus validation / first:   {100 * t2_stage / t1:5.1f}%   (preprocessing stage only)")


if __name__ == "__main__":
    main()
