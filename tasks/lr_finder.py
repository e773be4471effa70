"""Learning-rate range test (fastai ``lr_find`` style): pick a rate from a short exponential sweep.

The rate rises exponentially from ``min_lr`` to ``max_lr`` over ``steps`` training steps
on a copy of the model (the model itself is not changed); the loss of every step is
smoothed (exponential moving average, bias-corrected) and the sweep stops once the
smoothed loss exceeds 4x its minimum. The suggested rate is the minimum-loss rate / 10,
kept no lower than the rate of the steepest descent / 10 (a noisy, flat curve would
otherwise pick a rate far too low).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.tasks.atomic import read_json, write_json

LR_FINDER_PLOT = "lr_finder.png"


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Bias-corrected exponential moving average of ``losses``; pure."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def pick_learning_rate(lrs: list[float], smoothed: list[float], skip_start: int = 5) -> dict[str, float | None]:
    """Suggest a rate from a range test: ``min_loss_lr / 10``, not below ``steepest_lr / 10``; pure.

    Args:
        lrs: the rate of each step (increasing).
        smoothed: the smoothed loss of each step.
        skip_start: first steps left out (the average is still warming up).

    Returns:
        ``{"suggested", "min_loss_lr", "steepest_lr"}`` (all None when fewer than 3 finite points).
    """
    points = [(lr, loss) for lr, loss in zip(lrs[skip_start:], smoothed[skip_start:]) if math.isfinite(loss)]
    if len(points) < 3:
        return {"suggested": None, "min_loss_lr": None, "steepest_lr": None}
    x = np.log10([p[0] for p in points])
    y = np.asarray([p[1] for p in points])
    min_loss_lr = float(points[int(np.argmin(y))][0])
    slopes = np.gradient(y, x)
    steepest_lr = float(points[int(np.argmin(slopes[: int(np.argmin(y)) + 1]))][0])
    suggested = max(min_loss_lr / 10, steepest_lr / 10)
    return {"suggested": suggested, "min_loss_lr": min_loss_lr, "steepest_lr": steepest_lr}


def lr_range_test(
    model: Any,
    train_ds: Any,
    optimizer: str = "adam",
    steps: int = 100,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    run_dir: Path | None = None,
    seed: int = 42,
) -> dict[str, Any]:
    """Run a learning-rate range test on a copy of ``model`` and suggest a rate.

    Args:
        model: a built Keras model (not changed: a clone with the same weights is trained).
        train_ds: training batches ``(images, labels)``; repeated when shorter than ``steps``.
        optimizer: optimizer name (see :func:`imgflow.tasks.models.make_optimizer`).
        steps: sweep length in steps (100-300).
        min_lr: first rate of the sweep.
        max_lr: last rate of the sweep.
        run_dir: when given, the plot of loss against rate goes to ``run_dir/lr_finder.png``.
        seed: seed of the clone's random layers.

    Returns:
        ``{"suggested", "min_loss_lr", "steepest_lr", "steps", "lrs", "losses", "plot"}``.

    Raises:
        ValueError: ``steps`` < 10 or ``min_lr`` >= ``max_lr``.
    """
    import keras

    from imgflow.tasks.models import make_optimizer

    if steps < 10 or not 0 < min_lr < max_lr:
        raise ValueError(f"lr range test: expected steps >= 10 and 0 < min_lr < max_lr, found {steps}, {min_lr}, {max_lr}")
    keras.utils.set_random_seed(seed)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.compile(optimizer=make_optimizer(optimizer, min_lr), loss="sparse_categorical_crossentropy")
    factor = (max_lr / min_lr) ** (1.0 / (steps - 1))
    lrs: list[float] = []
    losses: list[float] = []
    running: list[float] = []

    class _Sweep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            lr = min_lr * factor**len(lrs)
            self.model.optimizer.learning_rate.assign(lr)
            lrs.append(lr)

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            # Keras logs the running mean of the epoch's loss: recover this step's own loss
            running.append(float((logs or {}).get("loss", float("nan"))))
            n = len(running)
            losses.append(n * running[-1] - (n - 1) * running[-2] if n > 1 else running[-1])
            smoothed = smooth(losses)
            best = min(smoothed)
            if not math.isfinite(smoothed[-1]) or (len(losses) > 10 and smoothed[-1] > 4 * best):
                self.model.stop_training = True  # diverged: the rest of the sweep says nothing

    clone.fit(train_ds.repeat(), steps_per_epoch=steps, epochs=1, callbacks=[_Sweep()], shuffle=False, verbose=0)
    lrs = lrs[: len(losses)]
    smoothed = smooth(losses)
    result: dict[str, Any] = {**pick_learning_rate(lrs, smoothed), "steps": len(losses),
                              "lrs": lrs, "losses": losses, "plot": None}
    if run_dir is not None:
        result["plot"] = str(plot_range_test(lrs, smoothed, result["suggested"], Path(run_dir) / LR_FINDER_PLOT))
    return result


def plot_range_test(lrs: list[float], smoothed: list[float], suggested: float | None, path: Path) -> Path:
    """Plot the smoothed loss against the rate (log scale), the suggestion marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imgflow.tasks.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(lrs, smoothed)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    if suggested:
        ax.axvline(suggested, color="#c44e52", linestyle="--", label=f"suggested {suggested:.2g}")
        ax.legend()
    ax.set_title("Learning-rate range test")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


LR_FINDER_FILE = "lr_finder.json"


def find_learning_rate(model: Any, train_ds: Any, run_dir: Path, options: Any,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """``learning_rate: auto``: a range test's pick, saved so that a resumed run keeps the same rate."""
    from imgflow.tasks.models import is_compiled

    saved = run_dir / LR_FINDER_FILE
    if saved.is_file():
        return read_json(saved)
    if is_compiled(model):
        log("learning_rate auto: the model came compiled by its builder; its optimizer's rate is kept")
        return {"suggested": None, "reason": "model compiled by its builder"}
    found = lr_range_test(model, train_ds, options.optimizer, steps=100, run_dir=run_dir, seed=options.seed)
    record = {k: found[k] for k in ("suggested", "min_loss_lr", "steepest_lr", "steps", "plot")}
    if record["suggested"] is None:
        log("learning_rate auto: the range test found no usable loss curve; using the recipe's rate")
    else:
        log(f"learning_rate auto: range test over {record['steps']} steps suggests {record['suggested']:.2g} "
            f"(lowest loss at {record['min_loss_lr']:.2g}; plot {record['plot']})")
    write_json(saved, record)
    return record
