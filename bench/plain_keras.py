"""The plain Keras script a user writes instead of imgflow (issue 13), run as its own process.

The TensorFlow tutorial CNN, verbatim: ``image_dataset_from_directory`` ->
``Rescaling(1/255)`` -> 3 x [``Conv2D(f, 3, padding="same", activation="relu")`` ->
``MaxPooling2D``] with f = 32, 64, 128 -> ``Flatten`` -> ``Dense(128, relu)`` ->
``Dropout(0.5)`` -> softmax, Adam 1e-3, batch 32, the last epoch's weights.

Beyond the script itself it only measures: the wall time of each epoch (a callback that
does nothing else), the validation accuracy of the kept (last) weights and the recall of
every class, written as JSON to ``--out``; with ``--inbox`` (class folders the model never
saw), also the accuracy of ``model.predict`` on them, read the same way::

    python bench/plain_keras.py TRAIN_DIR VAL_DIR --image-size 48 --epochs 10 --seed 0 --out plain.json [--inbox DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tutorial_cnn(image_size: int, num_classes: int):
    """The TensorFlow tutorial CNN, uncompiled (bench/recipe_grid.py trains the same network)."""
    import keras

    return keras.Sequential([
        keras.Input(shape=(image_size, image_size, 3)),
        keras.layers.Rescaling(1.0 / 255),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(128, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])


def epoch_clock(seconds: list[float]):
    """A callback that appends each epoch's wall time (training and validation) to ``seconds``."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.started)

    return EpochClock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_dir")
    parser.add_argument("val_dir")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the measured figures")
    parser.add_argument("--inbox", default=None, help="labelled class folders to predict after training")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    size = (args.image_size, args.image_size)
    train = keras.utils.image_dataset_from_directory(args.train_dir, image_size=size, batch_size=args.batch_size,
                                                     seed=args.seed)
    val = keras.utils.image_dataset_from_directory(args.val_dir, image_size=size, batch_size=args.batch_size,
                                                   shuffle=False)
    classes = train.class_names
    model = tutorial_cnn(args.image_size, len(classes))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    seconds: list[float] = []
    history = model.fit(train, validation_data=val, epochs=args.epochs, callbacks=[epoch_clock(seconds)], verbose=2)

    # measurement only: recall per class of the kept (last-epoch) weights
    labels = np.concatenate([y.numpy() for _, y in val])
    predicted = np.argmax(model.predict(val, verbose=0), axis=1)
    recall = {name: float(np.mean(predicted[labels == i] == i)) if np.any(labels == i) else None
              for i, name in enumerate(classes)}
    result = {
        "val_accuracy": float(np.mean(predicted == labels)),
        "last_epoch_val_accuracy": float(history.history["val_accuracy"][-1]),
        "per_class_recall": recall,
        "epoch_seconds": seconds,
        "epochs_run": len(seconds),
        "tf_version": tf.__version__,
    }
    if args.inbox:  # measured apart: imgflow predicts the inbox with its own command
        started = time.perf_counter()
        inbox = keras.utils.image_dataset_from_directory(args.inbox, image_size=size, batch_size=args.batch_size,
                                                         class_names=classes, shuffle=False)
        truth = np.concatenate([y.numpy() for _, y in inbox])
        result["inbox_accuracy"] = float(np.mean(np.argmax(model.predict(inbox, verbose=0), axis=1) == truth))
        result["inbox_seconds"] = time.perf_counter() - started
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
