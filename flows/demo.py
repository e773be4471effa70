"""``imgflow demo``: real handwritten digits through the whole pipeline, then batch prediction.

Builds a 3-class dataset (digits 0, 1 and 7 from scikit-learn, written as PNG and JPEG
class folders) and a held-out inbox of unlabelled files beside it, trains, evaluates
and promotes a model, classifies the inbox with the champion, and reports the
accuracy and where every output is. A few minutes on a laptop CPU; nothing downloads.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from imgflow.flows.config import DEFAULT_WORKDIR, ImgflowConfig
from imgflow.tasks.atomic import atomic_path, write_text

DEMO_CLASSES = {"zero": 0, "one": 1, "seven": 7}
DEMO_CONFIG = {
    "image_size": 32,
    "epochs": 15,
    "batch_size": 32,
    "val_fraction": 0.2,
    "encoding": "png",
    "early_stopping_patience": 4,
    "seed": 42,
}


def build_demo_data(root: Path, holdout_per_class: int = 20, size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Write scikit-learn's digits 0/1/7 as class folders plus a held-out, unlabelled inbox.

    Images alternate between PNG and JPEG; the inbox's true labels go to
    ``inbox_labels.csv`` beside it (not inside, so prediction sees only images).
    An existing, complete demo folder is reused.

    Args:
        root: folder to create ``digits/<class>/``, ``inbox/`` and ``inbox_labels.csv`` in.
        holdout_per_class: images per class kept out of training for the inbox.
        size: side of the written images (the 8x8 originals are upscaled).
        seed: which images are held out.

    Returns:
        ``{"data_dir", "inbox_dir", "inbox_labels", "train_counts", "inbox_count"}``.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    data_dir, inbox_dir, labels_path = root / "digits", root / "inbox", root / "inbox_labels.csv"
    by_digit = {digit: name for name, digit in DEMO_CLASSES.items()}
    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    rows: list[tuple[str, str]] = []
    for digit, name in sorted(by_digit.items()):
        indices = np.flatnonzero(digits.target == digit)
        held = set(rng.choice(indices, size=holdout_per_class, replace=False).tolist())
        counts[name] = 0
        for i, index in enumerate(indices):
            gray = (digits.images[index] / 16.0 * 255).astype(np.uint8)
            image = Image.fromarray(gray, "L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
            ext = "png" if i % 2 == 0 else "jpg"
            if index in held:
                target = inbox_dir / f"img_{index:04d}.{ext}"
                rows.append((target.name, name))
            else:
                target = data_dir / name / f"{name}_{index:04d}.{ext}"
                counts[name] += 1
            if not target.exists():
                with atomic_path(target) as tmp:
                    image.save(tmp, format="PNG" if ext == "png" else "JPEG", quality=95)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(sorted(rows))
    write_text(labels_path, buffer.getvalue())
    return {
        "data_dir": str(data_dir.resolve()),
        "inbox_dir": str(inbox_dir.resolve()),
        "inbox_labels": str(labels_path.resolve()),
        "train_counts": counts,
        "inbox_count": len(rows),
    }


def inbox_accuracy(predictions_csv: Path, labels_csv: Path) -> float | None:
    """Share of inbox files whose predicted label is the true one (None without rows)."""
    import pandas as pd

    predicted = pd.read_csv(predictions_csv, dtype={"path": str, "label": str})
    truth = pd.read_csv(labels_csv, dtype=str)
    joined = truth.merge(predicted[["path", "label"]], on="path", how="left", suffixes=("", "_predicted"))
    if joined.empty:
        return None
    return float((joined["label"] == joined["label_predicted"]).mean())


@flow(name="imgflow-demo", log_prints=True)
def run_demo(workdir: Path = DEFAULT_WORKDIR) -> dict[str, Any]:
    """Build the digits demo data under ``workdir``, train, and classify the held-out inbox.

    Returns:
        Accuracy figures and the path of every output: ``val_accuracy``, ``inbox_accuracy``,
        ``promoted``, ``model_dir``, ``champion``, ``evaluation_report``, ``validation_report``,
        ``predictions_csv``, ``data_dir``, ``inbox_dir``, ``seconds``.
    """
    from imgflow.tasks.quiet import import_tensorflow

    import_tensorflow()  # quiet TensorFlow start-up in this process too (a worker runs only the flow)
    from imgflow.flows.prediction import batch_predict
    from imgflow.flows.training import training_pipeline

    started = time.perf_counter()
    workdir = Path(workdir)
    logger = get_run_logger()
    data = build_demo_data(workdir / "demo")
    logger.info("demo data: %s images per class in %s, %d held out in %s",
                data["train_counts"], data["data_dir"], data["inbox_count"], data["inbox_dir"])
    config = ImgflowConfig.from_flat(DEMO_CONFIG, source="demo")
    result = training_pipeline(Path(data["data_dir"]), workdir=workdir, config=config)
    model_dir = Path(result["model_dir"])
    out: dict[str, Any] = {
        "val_accuracy": round(result["val_accuracy"], 4) if result["val_accuracy"] is not None else None,
        "inbox_accuracy": None,
        "promoted": result["promoted"],
        "reason": result["reason"],
        "model_dir": str(model_dir),
        "champion": str(workdir.resolve() / "champion.json"),
        "evaluation_report": str(model_dir / "report.html"),
        "learning_curves": str(model_dir / "learning_curves.png"),
        "diagnosis": str(model_dir / "diagnosis.json"),
        "validation_report": str((workdir / "validation.json").resolve()),
        "predictions_csv": None,
        "data_dir": data["data_dir"],
        "inbox_dir": data["inbox_dir"],
    }
    if result["champion_dir"]:
        predicted = batch_predict(model="champion", input_dir=Path(data["inbox_dir"]), workdir=workdir)
        out["predictions_csv"] = str(Path(predicted["csv"]).resolve())
        accuracy = inbox_accuracy(Path(predicted["csv"]), Path(data["inbox_labels"]))
        out["inbox_accuracy"] = round(accuracy, 4) if accuracy is not None else None
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out
