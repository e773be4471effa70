"""Benchmark: `imgflow predict` (batch_predict) against the loops people write, and its memory.

From one run, on the same model, files and cores, prints images/s of
  - imgflow: ``imgflow.flows.prediction.batch_predict`` over N JPEGs (default 5,000), fresh
    workdir, everything included (Prefect flow run, model loading, scan, tasks, decode,
    model, CSV assembly);
  - naive: the loop users write, ``load_image`` + ``model.predict(x[None])`` per file
    (timed on the first --naive-images files; the rate is what matters);
  - floor: ``model.predict(array, batch_size)`` on the same N images already decoded into
    one in-memory array (decode not timed): the compute floor;
and the ratios imgflow/naive (target >= 30x) and imgflow/floor (target >= 0.7x). The
three run in alternating rounds (--rounds, default 3) and the best round of each is
compared, so load from other processes on a shared machine does not decide the ratio;
the first imgflow run of the process (Prefect client start-up included) is printed too.

Then peak RSS of a process running batch_predict over 5,000 and over 50,000 tiny files
(16 px PNGs, a tiny model, so the files' count is what varies), each in its own
subprocess (target: within 20% of each other).

The model is the built-in ``default`` CNN of imgflow.tasks.models (untrained weights: speed does
not depend on them) at --image-size (default 64). A temporary Prefect server serves all runs.
TensorFlow's process-wide start-up is paid once before any timing; each method pays
for its own model (imgflow: loading model.keras and tracing are inside its time; the
naive and in-memory loops get one untimed warm-up call).
Run: python bench/predict.py [--images 5000] [--image-size 64] [--rss-sizes 5000,50000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
CLASSES = ["birds", "cats", "dogs"]


def build_inbox(root: Path, total: int, size: int, fmt: str = "jpg") -> Path:
    """``total`` smooth synthetic photos (gradient, disc, noise) in 10 nested folders; cached by marker."""
    marker = root / f".complete-{total}-{size}-{fmt}"
    if marker.exists():
        return root
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    for i in range(total):
        folder = root / f"batch{i % 10}" / f"day{(i // 10) % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        cx, cy, radius = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 8, size / 2.5)]
        disc = ((x - cx) ** 2 + (y - cy) ** 2 < radius**2)[..., None]
        pixels = rng.uniform(0, 255, 3) + (x[..., None] / size) * rng.uniform(-80, 80, 3) + disc * rng.uniform(-120, 120, 3)
        pixels += rng.normal(0, 6, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if fmt == "jpg":
            image.save(folder / f"img_{i:06d}.jpg", quality=90)
        else:
            image.save(folder / f"img_{i:06d}.{fmt}")
    marker.write_text("ok")
    return root


def build_model_dir(path: Path, image_size: int, tiny: bool = False) -> Path:
    """A model directory (interface 4) holding the built-in default CNN, or a tiny CNN."""
    import keras

    from imgflow.tasks import registry
    from imgflow.tasks.models import build_model

    if tiny:
        model = keras.Sequential(
            [
                keras.Input((image_size, image_size, 3)),
                keras.layers.Rescaling(1 / 255.0),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(len(CLASSES), activation="softmax"),
            ]
        )
    else:
        model = build_model("default", image_size, len(CLASSES), augment=False)
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    meta = {
        "run_id": path.name, "class_names": CLASSES, "image_size": image_size,
        "metrics": {}, "fingerprint": "bench", "config": {}, "versions": {}, "created": "2024-01-01T00:00:00+00:00",
        "healthy": True,
    }
    registry.write_metadata(path, meta)
    return path


def warm_up_runtime() -> None:
    """Start TensorFlow's process-wide runtime (thread pools, oneDNN) on a throwaway model.

    Every method below then pays only for its own model: loading, tracing, running.
    """
    import keras

    throwaway = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                                  keras.layers.Dense(2)])
    throwaway.predict(np.zeros((4, 8, 8, 3), np.float32), verbose=0)
    throwaway.predict_on_batch(np.zeros((4, 8, 8, 3), np.float32))


def naive_rate(model_dir: Path, files: list[Path]) -> float:
    """The loop users write: one file, one ``model.predict`` call."""
    from imgflow.tasks.prediction import load_model_cached
    from imgflow.tasks.tfrecords import load_image

    model, meta = load_model_cached(model_dir)
    model.predict(np.zeros((1, meta["image_size"], meta["image_size"], 3), np.float32), verbose=0)  # warm-up
    start = time.perf_counter()
    for path in files:
        x = load_image(path, meta["image_size"], meta["aspect"]).astype(np.float32)
        model.predict(x[None], verbose=0)
    return len(files) / (time.perf_counter() - start)


def decoded(model_dir: Path, files: list[Path]) -> np.ndarray:
    """The files decoded exactly as imgflow does, stacked into one float32 array."""
    from imgflow.tasks.prediction import read_metadata
    from imgflow.tasks.tfrecords import load_image

    meta = read_metadata(model_dir)
    return np.stack([load_image(p, meta["image_size"], meta["aspect"]) for p in files]).astype(np.float32)


def floor_rate(model_dir: Path, images: np.ndarray, batch_size: int) -> float:
    """``model.predict`` on the images already decoded into one array (decode not timed)."""
    from imgflow.tasks.prediction import load_model_cached

    model, _ = load_model_cached(model_dir)
    model.predict(images[:batch_size], batch_size=batch_size, verbose=0)  # warm-up: trace once
    start = time.perf_counter()
    model.predict(images, batch_size=batch_size, verbose=0)
    return len(images) / (time.perf_counter() - start)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MiB).

    ``VmHWM`` of /proc/self/status, which starts afresh at ``exec``; ``ru_maxrss`` is
    the fallback off Linux (on Linux it would carry over the parent's peak at fork time).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(model_dir: str, input_dir: str, workdir: str) -> None:
    """Run batch_predict in this process and print its peak RSS (MiB) as JSON."""
    from imgflow.flows.prediction import batch_predict

    start = time.perf_counter()
    result = batch_predict(model=model_dir, input_dir=Path(input_dir), workdir=Path(workdir))
    print(json.dumps({"rows": result["rows"], "chunks": result["chunks"], "peak_rss_mb": round(peak_rss_mb(), 1),
                      "seconds": round(time.perf_counter() - start, 1)}))


def measure_rss(model_dir: Path, input_dir: Path, workdir: Path, api_url: str) -> dict:
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(ROOT.parent))
    proc = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(model_dir), str(input_dir), str(workdir)],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--source-size", type=int, default=96, help="side of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=64, help="model input size")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--naive-images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the three methods")
    parser.add_argument("--rss-sizes", default="5000,50000")
    parser.add_argument("--data", type=Path, default=ROOT / "_data" / "predict", help="cache of generated files")
    parser.add_argument("--rss-child", nargs=3, metavar=("MODEL", "INPUT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return

    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="imgflow-bench-prefect-"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from imgflow.flows.prediction import batch_predict

    print(f"cores: {os.cpu_count()}, images: {args.images} JPEGs of {args.source_size}px, "
          f"model: built-in default CNN at {args.image_size}px, batch {args.batch_size}")
    inbox = build_inbox(args.data / f"inbox-{args.images}", args.images, args.source_size)
    files = sorted(inbox.rglob("*.jpg"))
    with tempfile.TemporaryDirectory(prefix="imgflow-bench-") as tmp, prefect_test_harness(server_startup_timeout=120):
        tmp_path = Path(tmp)
        model_dir = build_model_dir(tmp_path / "model", args.image_size)
        warm_up_runtime()

        # Rounds alternate the three methods, so a burst of load from other processes on a
        # shared machine hits all of them; the best round of each is compared.
        images = decoded(model_dir, files)
        rates: dict[str, list[float]] = {"imgflow": [], "naive": [], "floor": []}
        chunks = 0
        for round_ in range(args.rounds):
            start = time.perf_counter()
            result = batch_predict(model=str(model_dir), input_dir=inbox, workdir=tmp_path / f"work{round_}",
                                   batch_size=args.batch_size)
            rates["imgflow"].append(result["rows"] / (time.perf_counter() - start))
            assert result["rows"] == len(files) and result["errors"] == 0, result
            chunks = result["chunks"]
            rates["floor"].append(floor_rate(model_dir, images, args.batch_size))
            rates["naive"].append(naive_rate(model_dir, files[: args.naive_images]))
        cold, imgflow = rates["imgflow"][0], max(rates["imgflow"])
        naive, floor = max(rates["naive"]), max(rates["floor"])
        fmt = lambda values: ", ".join(f"{v:.1f}" for v in values)  # noqa: E731
        print(f"imgflow batch_predict : {imgflow:8.1f} images/s  best of rounds [{fmt(rates['imgflow'])}]; "
              f"first run of the process {cold:.1f} (Prefect client start-up included); {chunks} chunks")
        print(f"naive per-image loop  : {naive:8.1f} images/s  [{fmt(rates['naive'])}] (first {args.naive_images} files)")
        print(f"in-memory predict     : {floor:8.1f} images/s  [{fmt(rates['floor'])}] (decode not timed)")
        print(f"imgflow / naive     = {imgflow / naive:6.1f}x (target >= 30x); first run {cold / naive:.1f}x")
        print(f"imgflow / in-memory = {imgflow / floor:6.2f}x (target >= 0.7x); first run {cold / floor:.2f}x")

        sizes = [int(s) for s in args.rss_sizes.split(",") if s]
        if sizes:
            tiny = build_model_dir(tmp_path / "tiny", 16, tiny=True)
            api_url = str(PREFECT_API_URL.value())
            peaks = {}
            for n in sizes:
                folder = build_inbox(args.data / f"tiny-{n}", n, 16, fmt="png")
                measured = measure_rss(tiny, folder, tmp_path / f"rss-{n}", api_url)
                peaks[n] = measured["peak_rss_mb"]
                print(f"peak RSS, {n:>6} files: {measured['peak_rss_mb']:7.1f} MiB "
                      f"({measured['rows']} rows, {measured['chunks']} chunks, {measured['seconds']} s)")
            if len(peaks) >= 2:
                low, high = peaks[sizes[0]], peaks[sizes[-1]]
                print(f"peak RSS {sizes[-1]} / {sizes[0]} files = {high / low:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
