"""How the default recipe was chosen: candidate recipes x seeds, in one process (issue 13).

Loads each ``bench/recipe.py`` dataset once through imgflow's own loader
(``imgflow.tasks.images.load_image``, transparency composited onto ``bg``), then trains
every candidate of a JSON file for each seed, 10 epochs, batch 32, and prints one JSON
line per (dataset, candidate): the validation accuracy of the best epoch (``best``, what
imgflow keeps) and of the last (``last``, what the plain script keeps), the final training
accuracy and the median seconds per epoch. A candidate is a dict: ``plain: true`` (the
tutorial script's network, ``bench/plain_keras.py``, and Adam 1e-3) or imgflow's ``default`` builder with
``arch`` (architecture overrides), ``opt``, ``lr``, ``schedule``, ``warmup`` (epochs),
``wd`` (AdamW weight decay), ``init`` (``he``: He-uniform kernels instead of Keras' Glorot-uniform),
``center`` (true: pixels scaled to [-1, 1], the architecture's ``input_range: signed``), ``ema`` (AdamW with an exponential moving average of the
weights at this momentum, swapped in for each epoch's validation: Keras ``use_ema`` +
``SwapEMAWeights``), ``ls`` (label smoothing), ``augment``, ``bg`` (unset: Adam
3e-3, constant rate, the builder's current architecture, black background)::

    python bench/recipe.py --datasets themes --seeds 0 --contenders plain   # builds the folders once
    python bench/recipe_grid.py bench/recipe_grid.json themes,tuxpaint,digits 0,1,2 grid.jsonl
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from imgflow.tasks import models  # noqa: E402
from imgflow.tasks.images import load_image  # noqa: E402
from imgflow.tasks.models import build_model, make_optimizer  # noqa: E402
from plain_keras import epoch_clock, tutorial_cnn  # noqa: E402

ROOT = Path(__file__).resolve().parent / "_data" / "recipe"
SIZES = {"digits": 32, "tuxpaint": 48, "icons": 48, "themes": 48}
_cache: dict[tuple, tuple] = {}


def load(ds: str, split: str, bg: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, class names) of one split, decoded once per background."""
    key = (ds, split, bg)
    if key not in _cache:
        folder = ROOT / ds / split
        classes = sorted(p.name for p in folder.iterdir())
        images, labels = [], []
        for i, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                images.append(load_image(path, SIZES[ds], background=bg))
                labels.append(i)
        _cache[key] = (np.stack(images), np.array(labels), classes)
    return _cache[key]


@contextlib.contextmanager
def candidate_layers(v: dict):
    """Patch the builder's kernel initializers (``init``) while it builds."""
    saved = models._kernel_initializers
    if v.get("init") == "he":
        def he(seed: int):
            draws = random.Random(seed)
            while True:
                yield keras.initializers.HeUniform(seed=draws.randint(1, int(1e9)))
        models._kernel_initializers = he
    try:
        yield
    finally:
        models._kernel_initializers = saved


def run(ds: str, v: dict, seed: int, epochs: int = 10, batch: int = 32) -> dict:
    """Train one candidate ``v`` on dataset ``ds`` with ``seed``; its figures."""
    bg = v.get("bg", "black")
    xt, yt, classes = load(ds, "train", bg)
    xv, yv, _ = load(ds, "val", bg)
    keras.utils.set_random_seed(seed)
    n, size = len(classes), SIZES[ds]
    steps = int(np.ceil(len(xt) / batch))
    if v.get("plain"):
        model, opt = tutorial_cnn(size, n), keras.optimizers.Adam(1e-3)
    else:
        arch = {**(v.get("arch") or {}), **({"input_range": "signed"} if v.get("center") else {})}
        with candidate_layers(v):
            model = build_model("default", size, n, architecture=arch, augment=v.get("augment", False),
                                seed=seed, steps_per_epoch=steps)
        opt = make_optimizer(v.get("opt", "adam"), v.get("lr", 3e-3), v.get("schedule", "none"), steps * epochs,
                             int(steps * v.get("warmup", 0)))
        if "wd" in v or "ema" in v:
            opt = keras.optimizers.AdamW(opt._learning_rate, weight_decay=v.get("wd", 0.004),
                                         use_ema="ema" in v, ema_momentum=v.get("ema", 0.99))
    smoothing = v.get("ls", 0)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing) if smoothing else "sparse_categorical_crossentropy"
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    ytr = keras.utils.to_categorical(yt, n) if smoothing else yt
    yva = keras.utils.to_categorical(yv, n) if smoothing else yv
    train = tf.data.Dataset.from_tensor_slices((xt, ytr)).shuffle(len(xt), seed=seed, reshuffle_each_iteration=True)
    train = train.batch(batch).prefetch(2)
    val = tf.data.Dataset.from_tensor_slices((xv, yva)).batch(batch)
    times: list[float] = []
    callbacks = [epoch_clock(times)] + ([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if "ema" in v else [])
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=callbacks).history
    va = history["val_accuracy"]
    return {"best": max(va), "last": va[-1], "best_ep": int(np.argmax(va)) + 1,
            "train_last": history["accuracy"][-1], "spe": float(np.median(times[1:]))}


def main() -> None:
    candidates = json.loads(Path(sys.argv[1]).read_text())
    datasets, seeds = sys.argv[2].split(","), [int(s) for s in sys.argv[3].split(",")]
    with open(sys.argv[4], "a") as out:
        for ds in datasets:
            for name, v in candidates.items():
                rs = [run(ds, v, s) for s in seeds]
                row = {"ds": ds, "variant": name, "best": np.mean([r["best"] for r in rs]),
                       "last": np.mean([r["last"] for r in rs]), "last_sd": np.std([r["last"] for r in rs]),
                       "train": np.mean([r["train_last"] for r in rs]), "spe": np.mean([r["spe"] for r in rs]),
                       "best_eps": [r["best_ep"] for r in rs]}
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
                out.flush()


if __name__ == "__main__":
    main()
