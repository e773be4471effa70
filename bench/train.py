"""Benchmark: wall time per epoch of the imgflow pipeline vs a plain Keras script, same data and model.

The plain script is what people write first: ``keras.utils.image_dataset_from_directory``
(decodes every file every epoch) and ``model.fit``. imgflow trains from cached TFRecord
shards. Both fit the same built-in model with the same batch size, and both time epochs
with the same callback (wall time of training + validation per epoch).

Prints per-epoch seconds, the ratio imgflow / plain from epoch 2 on (target <= 0.8) and
the pipeline's fixed overhead: its wall time minus the time spent inside ``fit``
(validation, preprocessing, evaluation, promotion and Prefect; target < 15 s).

    python bench/train.py [--data DIR] [--image-size 64] [--source-size 256] [--epochs 4] [--workdir DIR]

Without ``--data`` it builds the demo digits (3 classes, 479 images) under the workdir as
``--source-size`` px PNG/JPEG files (default 256: like photos, larger than the model input).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_keras(data_dir: Path, image_size: int, epochs: int, batch_size: int, seed: int) -> list[float]:
    """The usual hand-written script: image_dataset_from_directory + fit; returns epoch seconds."""
    import keras

    from imgflow.tasks.models import build_model, compile_model
    from imgflow.tasks.training import EpochTimer

    keras.utils.set_random_seed(seed)
    train, val = keras.utils.image_dataset_from_directory(
        data_dir, image_size=(image_size, image_size), batch_size=batch_size,
        validation_split=0.2, subset="both", seed=seed,
    )
    steps = len(train)
    model = compile_model(build_model("default", image_size, len(train.class_names), steps_per_epoch=steps))
    history = model.fit(train, validation_data=val, epochs=epochs, callbacks=[EpochTimer()], verbose=0)
    return [float(s) for s in history.history["seconds"]]


def imgflow_pipeline(data_dir: Path, workdir: Path, image_size: int, epochs: int, batch_size: int, seed: int) -> dict:
    """The whole training pipeline in-process; returns epoch seconds, fit and total wall time."""
    from imgflow.flows.config import ImgflowConfig
    from imgflow.flows.training import training_pipeline
    from imgflow.tasks.atomic import read_json
    from imgflow.tasks.training import read_history

    config = ImgflowConfig.from_flat({
        "image_size": image_size, "epochs": epochs, "batch_size": batch_size, "seed": seed,
        "val_fraction": 0.2, "early_stopping_patience": epochs + 1,
    })
    started = time.perf_counter()
    result = training_pipeline(data_dir, workdir=workdir, config=config, force=True)
    total = time.perf_counter() - started
    model_dir = Path(result["model_dir"])
    summary = read_json(model_dir / "train_summary.json")
    return {
        "epochs": [float(r["seconds"]) for r in read_history(model_dir)],
        "fit_seconds": float(summary["fit_seconds"]),
        "total_seconds": total,
        "val_accuracy": result["val_accuracy"],
    }


def _warm_prefect() -> float:
    """Start the temporary Prefect server once (a real `imgflow train` pays this too), timed apart."""
    from prefect import flow

    @flow
    def noop() -> int:
        return 1

    started = time.perf_counter()
    noop()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=256,
                        help="side of the generated demo files (photo-like files are larger than the model input)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: need at least 2 epochs (the ratio is taken from epoch 2 on)")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imgflow-bench-"))
    data_dir = args.data
    if data_dir is None:
        from imgflow.flows.demo import build_demo_data

        data_dir = Path(build_demo_data(workdir / f"demo-{args.source_size}", size=args.source_size)["data_dir"])

    prefect_start = _warm_prefect()
    flow_result = imgflow_pipeline(data_dir, workdir, args.image_size, args.epochs, args.batch_size, args.seed)
    plain = plain_keras(data_dir, args.image_size, args.epochs, args.batch_size, args.seed)

    ours = flow_result["epochs"]
    steady_ours, steady_plain = statistics.median(ours[1:]), statistics.median(plain[1:])
    ratio = steady_ours / steady_plain
    overhead = flow_result["total_seconds"] - flow_result["fit_seconds"]
    print(f"\ndata {data_dir}, {args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, "
          f"{os.cpu_count()} CPUs")
    print(f"{'epoch':>5} {'plain keras s':>14} {'imgflow s':>10}")
    for i, (a, b) in enumerate(zip(plain, ours), start=1):
        print(f"{i:>5} {a:>14.2f} {b:>10.2f}")
    print(f"median epoch from epoch 2: plain {steady_plain:.2f}s, imgflow {steady_ours:.2f}s "
          f"-> ratio {ratio:.2f}x (target <= 0.80) {'OK' if ratio <= 0.8 else 'MISSED'}")
    print(f"pipeline wall {flow_result['total_seconds']:.1f}s, inside fit {flow_result['fit_seconds']:.1f}s "
          f"-> fixed overhead {overhead:.1f}s (target < 15 s) {'OK' if overhead < 15 else 'MISSED'}; "
          f"Prefect temporary server start {prefect_start:.1f}s (paid once per process)")
    print(f"imgflow val accuracy {flow_result['val_accuracy']:.4f}")


if __name__ == "__main__":
    main()
