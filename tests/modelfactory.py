"""A small, really trained digits classifier saved as an imgflow model directory, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np

from tests.imagefactory import DIGIT_CLASSES, digit_images

CLASS_NAMES = sorted(DIGIT_CLASSES)  # ["one", "seven", "zero"]: label order = sorted folder names


def make_digit_model_dir(model_dir: Path, per_class: int = 60, epochs: int = 8, conv: bool = True) -> Path:
    """Train a tiny CNN (Rescaling inside, raw 0-255 input) on real 32 px digits; save model.keras + metadata.json.

    Asserts that it learned (training accuracy above 0.9), so tests built on it test imgflow, not luck.
    """
    import keras

    keras.utils.set_random_seed(0)
    samples = digit_images(DIGIT_CLASSES.values(), per_class=per_class)
    label_of = {digit: CLASS_NAMES.index(name) for name, digit in DIGIT_CLASSES.items()}
    x = np.stack([pixels for _, pixels in samples]).astype("float32")
    y = np.array([label_of[digit] for digit, _ in samples])
    hidden = [keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.MaxPooling2D(2)] if conv else []
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255.0),
        *hidden,
        keras.layers.Flatten(),
        keras.layers.Dense(len(CLASS_NAMES), activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, shuffle=True)
    accuracy = float(history.history["accuracy"][-1])
    assert accuracy > 0.9, f"the test model did not learn: accuracy {accuracy}"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save(model_dir / "model.keras")
    (model_dir / "metadata.json").write_text(json.dumps({
        "run_id": model_dir.name, "class_names": CLASS_NAMES, "image_size": 32, "aspect": "squash",
        "metrics": {"val_accuracy": accuracy}, "fingerprint": "test", "config": {}, "versions": {},
        "created": "2026-01-01T00:00:00+00:00", "healthy": True,
    }))
    return model_dir


def make_champion(workdir: Path, model_dir: Path) -> None:
    """Point ``<workdir>/champion.json`` at ``model_dir``."""
    accuracy = json.loads((model_dir / "metadata.json").read_text())["metrics"]["val_accuracy"]
    (workdir / "champion.json").write_text(json.dumps({
        "run_id": model_dir.name, "model_dir": str(model_dir), "promoted": "2026-01-01T00:00:00+00:00",
        "val_accuracy": accuracy,
    }))


class Crash(keras.callbacks.Callback):
    """Stand-in for a killed worker: fail after ``after`` finished epochs."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after:
            raise RuntimeError("worker lost")
