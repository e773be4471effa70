"""How the default recipe was chosen: candidate recipes x seeds, in one process (issue 13).

Loads each ``bench/recipe.py`` dataset once through imgflow's own loader
(``imgflow.tasks.images.load_image``, transparency composited onto ``bg``), then trains
every candidate of a JSON file for each seed, 10 epochs, batch 32, and prints one JSON
line per (dataset, candidate): the validation accuracy of the best epoch (``best``, what
imgflow keeps) and of the last (``last``, what the plain script keeps), the final training
accuracy and the median seconds per epoch. A candidate is a dict: ``plain: true`` (the
tutorial script's network and Adam 1e-3) or imgflow's ``default`` builder with
``arch`` (architecture overrides), ``opt``, ``lr``, ``schedule``, ``warmup`` (epochs),
``wd`` (AdamW weight decay), ``ls`` (label smoothing), ``augment``, ``bg`` (unset: Adam
3e-3, constant rate, the builder's current architecture, black background)::

    python bench/recipe.py --datasets themes --seeds 0 --contenders plain   # builds the folders once
    python bench/recipe_grid.py bench/recipe_grid.json themes,tuxpaint,digits 0,1,2 grid.jsonl
"""
import os, sys, time, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from pathlib import Path
import numpy as np, keras, tensorflow as tf
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imgflow.tasks.images import load_image
from imgflow.tasks.models import build_model, make_optimizer

ROOT = Path(__file__).resolve().parent / "_data" / "recipe"
SIZES = {"digits": 32, "tuxpaint": 48, "icons": 48, "themes": 48}
_cache = {}
def load(ds, split, bg):
    key = (ds, split, bg)
    if key not in _cache:
        folder = ROOT / ds / split
        classes = sorted(p.name for p in folder.iterdir())
        X, y = [], []
        for i, c in enumerate(classes):
            for f in sorted((folder / c).iterdir()):
                X.append(load_image(f, SIZES[ds], background=bg)); y.append(i)
        _cache[key] = (np.stack(X), np.array(y), classes)
    return _cache[key]

def plain_model(size, n):
    return keras.Sequential([keras.Input((size, size, 3)), keras.layers.Rescaling(1/255),
        keras.layers.Conv2D(32,3,padding="same",activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64,3,padding="same",activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(128,3,padding="same",activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(128, activation="relu"), keras.layers.Dropout(0.5),
        keras.layers.Dense(n, activation="softmax")])

def run(ds, v, seed, epochs=10, batch=32):
    bg = v.get("bg", "black")
    Xt, yt, classes = load(ds, "train", bg); Xv, yv, _ = load(ds, "val", bg)
    keras.utils.set_random_seed(seed)
    n = len(classes); size = SIZES[ds]
    steps = int(np.ceil(len(Xt) / batch))
    if v.get("plain"):
        model = plain_model(size, n); opt = keras.optimizers.Adam(1e-3)
    else:
        model = build_model("default", size, n, architecture=v.get("arch"), augment=v.get("augment", False), seed=seed, steps_per_epoch=steps)
        opt = make_optimizer(v.get("opt", "adam"), v.get("lr", 3e-3), v.get("schedule", "none"), steps * epochs, int(steps * v.get("warmup", 0)))
        if "wd" in v:
            opt = keras.optimizers.AdamW(opt._learning_rate, weight_decay=v["wd"])
    ls = v.get("ls", 0)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=ls) if ls else "sparse_categorical_crossentropy"
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])
    ytr = keras.utils.to_categorical(yt, n) if ls else yt
    yva = keras.utils.to_categorical(yv, n) if ls else yv
    train = tf.data.Dataset.from_tensor_slices((Xt, ytr)).shuffle(len(Xt), seed=seed, reshuffle_each_iteration=True).batch(batch).prefetch(2)
    val = tf.data.Dataset.from_tensor_slices((Xv, yva)).batch(batch)
    times = []
    class C(keras.callbacks.Callback):
        def on_epoch_begin(s, e, l=None): s.t = time.perf_counter()
        def on_epoch_end(s, e, l=None): times.append(time.perf_counter() - s.t)
    h = model.fit(train, validation_data=val, epochs=epochs, verbose=0, callbacks=[C()])
    va = h.history["val_accuracy"]
    return dict(best=max(va), last=va[-1], best_ep=int(np.argmax(va)) + 1, train_last=h.history["accuracy"][-1], spe=float(np.median(times[1:])))

VARIANTS = json.loads(open(sys.argv[1]).read())
datasets = sys.argv[2].split(","); seeds = [int(s) for s in sys.argv[3].split(",")]
out = open(sys.argv[4], "a")
for ds in datasets:
    for name, v in VARIANTS.items():
        rs = [run(ds, v, s) for s in seeds]
        row = dict(ds=ds, variant=name, best=np.mean([r["best"] for r in rs]), last=np.mean([r["last"] for r in rs]),
                   last_sd=np.std([r["last"] for r in rs]), train=np.mean([r["train_last"] for r in rs]), spe=np.mean([r["spe"] for r in rs]),
                   best_eps=[r["best_ep"] for r in rs])
        print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
