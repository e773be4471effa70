"""Fit a model: device plan (GPU, precision, XLA, strategy), callbacks, resume, outputs.

A run directory holds everything one training writes::

    backup/          two verified generations of the training state (tasks/resume.py; deleted
                     when fit ends; a killed run resumes from the newest intact one)
    checkpoints/     ModelCheckpoint of the best epoch (val loss)
    logs/            TensorBoard
    history.csv      one row per finished epoch (CSVLogger, appended across resumes)
    learning_curves.png, diagnosis.json, train_summary.json, model.keras

Re-running :func:`train_from_manifest` on the same run directory continues from the last
finished epoch; once ``model.keras`` and ``train_summary.json`` exist it returns the
saved summary without training again.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgflow.tasks.options import TrainOptions
from imgflow.tasks import doctor, finetune, registry
from imgflow.tasks.atomic import atomic_path, read_json, write_json, write_text
from imgflow.tasks.errors import DiskFullError, disk_full, is_disk_full
from imgflow.tasks.resume import (
    BACKUP_DIR,
    AtomicBackupAndRestore,
    AtomicModelCheckpoint,
    enable_determinism,
    fast_forward_shuffle,
    ensure_space,
    h5_bytes,
    select_backup,
)
from imgflow.tasks.models import BUILTIN_MODELS, build_model, compile_model, recipe_learning_rate, resolve_model_name
from imgflow.tasks.lr_finder import find_learning_rate
from imgflow.tasks.outcome import training_outcome  # noqa: F401 - also imported from here
from imgflow.tasks.records import read_manifest

Logger = Callable[[str], None]

CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "logs"
HISTORY_FILE = "history.csv"
CURVES_FILE = "learning_curves.png"
DIAGNOSIS_FILE = "diagnosis.json"
SUMMARY_FILE = "train_summary.json"
MODEL_FILE = "model.keras"


# ----------------------------------------------------------------------------- devices


def detect_gpus() -> list[str]:
    """Names of the GPUs the current Keras backend can use (empty on a CPU-only machine)."""
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return [d.name for d in tf.config.list_physical_devices("GPU")]
        if backend == "jax":
            import jax

            return [str(d) for d in jax.devices() if d.platform == "gpu"]
        if backend == "torch":
            import torch

            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    except RuntimeError:
        return []
    return []


def plan_devices(
    gpus: list[str],
    mixed_precision: str = "auto",
    jit_compile: str = "auto",
    batch_size: int = 32,
    backend: str = "tensorflow",
) -> dict[str, Any]:
    """Decide precision, XLA, distribution strategy and global batch size; pure.

    ``auto`` means: mixed precision (``mixed_float16``) and XLA on a GPU, float32 and no
    XLA on a CPU (XLA rarely helps convolutions on a CPU and compiles slowly). Several
    GPUs with the TensorFlow backend train under ``MirroredStrategy`` with the batch
    scaled by the number of replicas, so each GPU keeps ``batch_size`` images a step.

    Args:
        gpus: visible GPU names (see :func:`detect_gpus`).
        mixed_precision: ``auto``, ``on`` or ``off``.
        jit_compile: ``auto``, ``on`` or ``off``.
        batch_size: images per step and device.
        backend: the Keras backend name.

    Returns:
        ``{"devices", "precision", "jit_compile", "strategy", "replicas", "global_batch_size", "log"}``.
    """
    for option, value in (("mixed_precision", mixed_precision), ("jit_compile", jit_compile)):
        if value not in ("auto", "on", "off"):
            raise ValueError(f"{option}: expected auto, on or off, found {value!r}")
    on_gpu = bool(gpus)
    mixed = mixed_precision == "on" or (mixed_precision == "auto" and on_gpu)
    jit = jit_compile == "on" or (jit_compile == "auto" and on_gpu)
    if len(gpus) > 1 and backend == "tensorflow":
        strategy, replicas = "mirrored", len(gpus)
    else:
        strategy, replicas = "default", 1
    devices = list(gpus) if on_gpu else ["CPU"]
    precision = "mixed_float16" if mixed else "float32"
    where = f"{len(gpus)} GPU(s) ({', '.join(gpus)})" if on_gpu else "CPU (no GPU visible)"
    log = (
        f"training on {where} with backend {backend}, strategy {strategy} ({replicas} replica(s)), "
        f"precision {precision}, XLA {'on' if jit else 'off'}, global batch {batch_size * replicas}"
    )
    return {
        "devices": devices,
        "precision": precision,
        "jit_compile": jit,
        "strategy": strategy,
        "replicas": replicas,
        "global_batch_size": batch_size * replicas,
        "log": log,
    }


def make_strategy(plan: dict[str, Any]) -> Any:
    """The ``tf.distribute`` strategy of a device plan (TensorFlow backend).

    For several machines, set ``TF_CONFIG`` on every worker and use
    ``tf.distribute.MultiWorkerMirroredStrategy`` the same way; other backends use
    ``keras.distribution`` instead and get the default (no-op) strategy here.
    """
    if keras.backend.backend() != "tensorflow":
        return _NullStrategy()
    import tensorflow as tf

    if plan["strategy"] == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class _NullStrategy:
    def scope(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


# ----------------------------------------------------------------------------- helpers


def class_weights_for(counts: list[int], mode: str = "auto", threshold: float = 1.5) -> dict[int, float] | None:
    """Class weights ``n / (k * count)`` for imbalanced data; pure.

    Args:
        counts: training images per class, in label order.
        mode: ``on`` (always), ``off`` (never) or ``auto`` (when max/min count > ``threshold``).
        threshold: imbalance ratio above which ``auto`` weights the classes.

    Returns:
        ``{label: weight}`` or None for unweighted training.
    """
    if mode == "off" or not counts or min(counts) <= 0:
        return None
    if mode == "auto" and max(counts) / min(counts) <= threshold:
        return None
    total, k = float(sum(counts)), len(counts)
    return {i: total / (k * c) for i, c in enumerate(counts)}


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """The rows of ``history.csv`` (one dict per finished epoch; ``epoch`` an int), or [] when there is none.

    A cell that is not a number (Keras' CSVLogger writes ``NA`` for a missing metric) reads as NaN.
    """
    from imgflow.tasks.plots import read_history as read_columns

    columns = read_columns(Path(run_dir) / HISTORY_FILE)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    for row in rows:
        if "epoch" in row and math.isfinite(row["epoch"]):
            row["epoch"] = int(row["epoch"])
    return rows


def _trim_history(run_dir: Path, keep_epochs: int) -> None:
    """Keep only the rows of epochs < ``keep_epochs`` (a killed run may have logged one more), as written.

    An epoch logged twice keeps its last row, in that row's place.
    """
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return
    if keep_epochs <= 0 or path.stat().st_size == 0:
        path.unlink()
        return
    with open(path, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    at = header.index("epoch")
    last = {row[at]: i for i, row in enumerate(rows) if len(row) > at}
    kept = [row for i, row in enumerate(rows) if len(row) > at and last[row[at]] == i and _epoch(row[at]) < keep_epochs]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *kept])


def _epoch(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.inf  # not an epoch number: not kept


def backup_epoch(run_dir: Path) -> int:
    """The number of epochs a killed run had finished, from its newest verified backup (0 if none)."""
    start = select_backup(run_dir)
    return int(start["epoch"]) if start else 0


def _warm_up_charts() -> None:
    from imgflow.tasks.plots import warm_up_in_background

    warm_up_in_background()


def save_learning_curves(run_dir: Path, best_epoch: int | None = None) -> Path | None:
    """Plot every metric per epoch (train and val) from ``history.csv`` to ``learning_curves.png``.

    ``best_epoch`` (1-based), the epoch whose weights were kept, is marked on every panel.
    """
    from imgflow.tasks.plots import plot_learning_curves

    return plot_learning_curves(Path(run_dir) / HISTORY_FILE, Path(run_dir) / CURVES_FILE, best_epoch=best_epoch)


class EpochTimer(keras.callbacks.Callback):
    """Add the epoch's wall time (``seconds``, training and validation) to the epoch logs.

    Placed first, so ``history.csv`` gets the column too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["seconds"] = round(time.perf_counter() - self.started, 4)


class EpochLogger(keras.callbacks.Callback):
    """One line per epoch (figures, seconds, a mark on the best so far) to the terminal and ``log``.

    Replaces the Keras progress bar (``fit(verbose=0)``): the line goes to the user through
    :func:`imgflow.tasks.progress.say` and to ``log`` (the Prefect run log in a flow, which
    the CLI keeps off the terminal, so the user reads each epoch once).
    """

    def __init__(self, log: Logger, epochs: int, monitor: str = "val_loss"):
        super().__init__()
        self.log = log
        self.epochs = epochs
        self.monitor = monitor
        self.best: float | None = None
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from imgflow.tasks import progress

        logs = dict(logs or {})
        best = False
        value = logs.get(self.monitor, logs.get("loss"))
        if value is not None and np.isfinite(float(value)):
            higher = "acc" in self.monitor or "auc" in self.monitor
            best = self.best is None or (float(value) > self.best if higher else float(value) < self.best)
            self.best = float(value) if best else self.best
        line = progress.epoch_line(epoch + 1, self.epochs, logs, time.perf_counter() - self.started, best)
        if self.log is not print:  # print (the default) would show the line twice
            self.log(line)
        progress.say(line)


def _tensorboard_available() -> bool:
    import importlib.util

    return keras.backend.backend() != "tensorflow" or importlib.util.find_spec("tensorboard") is not None


def _fallback_diagnosis(history: list[dict[str, float]]) -> dict[str, Any]:
    """Without a probe batch there is no monitor: only a non-finite loss in the history is judged."""
    findings = []
    if any(not math.isfinite(float(r.get("loss", 0.0))) for r in history):
        findings.append(
            {
                "code": "nan_loss",
                "severity": "critical",
                "evidence": {"epochs": len(history)},
                "advice": "The loss became NaN or infinite: lower the learning rate and check the input scaling.",
            }
        )
    return {"healthy": not findings, "findings": findings}


def discard_resume_state(run_dir: Path) -> None:
    """Remove the backup, best checkpoint and history of an interrupted run (``--force``)."""
    import shutil

    run_dir = Path(run_dir)
    for name in (BACKUP_DIR, CHECKPOINT_DIR):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / HISTORY_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- fit


def fit_model(
    model: keras.Model,
    train_ds: Any,
    val_ds: Any,
    run_dir: Path,
    options: TrainOptions,
    class_counts: list[int],
    probe: tuple[np.ndarray, np.ndarray] | None = None,
    log: Logger = print,
    steps_per_epoch: int | None = None,
    jit_compile: bool | str = False,
    extra_callbacks: list[keras.callbacks.Callback] | None = None,
    overfit_steps: int = 0,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Compile (unless compiled), check, fit with resume, and write history and diagnosis.

    Args:
        model: a built Keras model taking raw 0-255 images (weights are trained in place).
        train_ds: training batches ``(images, labels)`` (tf.data, or anything ``fit`` takes).
        val_ds: validation batches.
        run_dir: the run directory; a BackupAndRestore state there is resumed.
        options: optimiser, schedule, epochs, class weights, early stopping.
        class_counts: training images per class, in label order.
        probe: a (images, labels) batch for the doctor's preflight and monitor.
        log: where one-line progress messages go.
        steps_per_epoch: batches per epoch (for the cosine schedule's length).
        jit_compile: XLA for the train step.
        extra_callbacks: more callbacks, run after the built-in ones.
        overfit_steps: steps of the doctor's overfit-one-batch preflight check (0: skip).
        class_names: class names in label order (the doctor's advice names the classes).

    Returns:
        ``{"epochs_run", "initial_epoch", "resumed", "stopped_early", "best_epoch",
        "final": {metric: value}, "diagnosis": {"healthy", "findings"}, "fit_seconds"}``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(class_counts)
    tune = finetune.prepare(model, options)  # pretrained backbone: frozen for phase 1 (tasks/finetune.py)
    total_steps = (steps_per_epoch or 1) * (tune["frozen_epochs"] if tune else options.epochs)
    warmup_steps = options.warmup_steps(steps_per_epoch or 1)
    lr_finder = None
    if options.learning_rate == "auto":
        lr_finder = find_learning_rate(model, train_ds, run_dir, options, log)
        learning_rate = lr_finder["suggested"] or recipe_learning_rate(options.model)
    else:
        learning_rate = options.learning_rate or recipe_learning_rate(options.model)
    compile_model(model, options.optimizer, learning_rate, options.schedule, total_steps, jit_compile,
                  warmup_steps=warmup_steps)
    if jit_compile is True and getattr(model, "jit_compile", True) is False:
        log("XLA requested but off for this model: one of its layers (TensorFlow image augmentation) "
            "has no XLA kernel; training runs as a TensorFlow graph instead")

    findings: list[dict[str, Any]] = []
    if lr_finder and lr_finder.get("suggested"):  # the range test's pick, in the diagnosis as ``lr_range``
        findings.append(doctor.lr_range_finding(lr_finder["suggested"], lr_finder["min_loss_lr"],
                                                optimizer=options.optimizer, steps=lr_finder["steps"]))
    start = select_backup(run_dir, log)
    resume_from = int(start["epoch"]) if start else 0
    _trim_history(run_dir, resume_from)
    facts = doctor.model_facts(model, num_classes, options.batch_size, class_counts, class_names)
    if probe is not None and resume_from == 0:
        findings.extend(doctor.preflight(model, probe[0], probe[1], num_classes, overfit_steps=overfit_steps, facts=facts))
        critical = [f for f in findings if f.get("severity") == "critical"]
        if critical:
            log(f"preflight found {len(critical)} critical problem(s): {', '.join(f['code'] for f in critical)}; not training")
            diagnosis = doctor.diagnose(findings)
            write_json(run_dir / DIAGNOSIS_FILE, diagnosis)
            if not (run_dir / HISTORY_FILE).exists():
                write_text(run_dir / HISTORY_FILE, "epoch,loss,accuracy,val_loss,val_accuracy\n")  # no epoch ran
            return {
                "epochs_run": 0,
                "epochs_planned": options.epochs,
                "initial_epoch": 0,
                "resumed": False,
                "stopped_early": False,
                "stop_reason": "not trained: the preflight checks found a critical problem",
                "monitor": options.monitor,
                "best_epoch": None,
                "best_value": None,
                "lr_finder": lr_finder,
                "final": {},
                "diagnosis": diagnosis,
                "fit_seconds": 0.0,
            }

    if resume_from:
        from imgflow.tasks import progress

        resumed = f"resuming from the backup in {run_dir / BACKUP_DIR}: {resume_from} epoch(s) done, continuing at epoch {resume_from + 1}"
        if log is not print:  # print (the default) would show the line twice
            log(resumed)
        progress.say(resumed)  # the user must see why the first epochs are missing
    monitor = None
    callbacks: list[keras.callbacks.Callback] = [
        EpochTimer(),
        # the history row of an epoch is written before its backup: a kill in between
        # leaves one row too many (trimmed on resume), never a missing one
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE), append=True),
        # weights only: a light per-epoch write (the full model.keras is saved once at the end)
        AtomicModelCheckpoint(
            str(run_dir / CHECKPOINT_DIR / "best.weights.h5"), monitor=options.monitor, save_best_only=True,
            save_weights_only=True,
        ),
        # the kept weights are those of the best epoch by `monitor` (restored at the end of
        # fit whether or not training stopped early); the summary says which epoch that was
        keras.callbacks.EarlyStopping(
            monitor=options.monitor, patience=options.early_stopping_patience, restore_best_weights=True
        ),
        keras.callbacks.TerminateOnNaN(),
        EpochLogger(log, options.epochs, getattr(options, "monitor", None) or "val_loss"),
        # the learning curves' matplotlib is imported while the later epochs train
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: _warm_up_charts()),
    ]
    if _tensorboard_available():
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / TENSORBOARD_DIR), write_graph=False, profile_batch=0))
    else:
        log("TensorBoard is not installed: no TensorBoard logs (pip install tensorboard)")
    if options.schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, min_lr=1e-6))
    callbacks.append(_backup_callback(run_dir, start, callbacks))
    if probe is not None:
        monitor = doctor.DoctorMonitor(probe[0], probe[1], num_classes, class_counts, facts=facts)
        callbacks.append(monitor)
    callbacks.extend(extra_callbacks or [])

    weights = class_weights_for(class_counts, options.class_weights)
    if weights:
        log("class weights (imbalanced data): " + ", ".join(f"{k}: {v:.2f}" for k, v in weights.items()))
    (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
    started = time.perf_counter()
    fast_forward_shuffle(train_ds, resume_from)
    try:
        # one line per epoch comes from EpochLogger (verbose=0); shuffle=False because the
        # tf.data pipeline shuffles itself (Keras warns that shuffle=True is ignored otherwise)
        keras_history = finetune.fit_phases(
            model, tune, callbacks, options.epochs, resume_from,
            lambda rate, steps: compile_model(model, options.optimizer, rate, options.schedule, steps, jit_compile,
                                              force=True),
            learning_rate, steps_per_epoch or 1, log,
            x=train_ds, validation_data=val_ds, class_weight=weights, shuffle=False, verbose=0,
        )
    except OSError as exc:  # history.csv, a checkpoint or a backup could not be written
        if is_disk_full(exc) and not isinstance(exc, DiskFullError):
            raise disk_full(exc, run_dir, h5_bytes(model)) from exc
        raise
    fit_seconds = time.perf_counter() - started
    history = read_history(run_dir)
    early = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
    if monitor is not None:
        findings.extend(monitor.findings)
        diagnosis = doctor.diagnose(findings)
    else:
        diagnosis = _fallback_diagnosis(history)
    write_json(run_dir / DIAGNOSIS_FILE, diagnosis)
    outcome = training_outcome(history, options.monitor, options.epochs, options.early_stopping_patience,
                               early.best_epoch + 1 if early.best is not None else None, bool(early.stopped_epoch))
    save_learning_curves(run_dir, outcome.get("best_epoch"))
    log(outcome["sentence"])
    final = {k: float(v[-1]) for k, v in keras_history.history.items() if v}
    return {
        "initial_epoch": resume_from,
        "resumed": resume_from > 0,
        **{k: v for k, v in outcome.items() if k != "sentence"},
        "outcome": outcome["sentence"],
        "learning_rate": learning_rate,
        "lr_finder": lr_finder,
        **({"fine_tune": {k: v for k, v in tune.items() if k != "learning_rate_factor"}} if tune else {}),
        "final": final,
        "diagnosis": diagnosis,
        "fit_seconds": round(fit_seconds, 2),
    }


def _backup_callback(run_dir: Path, start: dict[str, Any] | None,
                     callbacks: list[keras.callbacks.Callback]) -> AtomicBackupAndRestore:
    """The backup callback; it goes after the callbacks whose best-so-far state it keeps."""
    kinds = (keras.callbacks.ModelCheckpoint, keras.callbacks.EarlyStopping, keras.callbacks.ReduceLROnPlateau)
    stateful = [c for c in callbacks if isinstance(c, kinds)]
    return AtomicBackupAndRestore(run_dir / BACKUP_DIR, start, stateful, run_dir / CHECKPOINT_DIR / "best.weights.h5")


def save_model(model: keras.Model, target: Path) -> Path:
    """Save ``model`` as a ``.keras`` file atomically."""
    ensure_space(target, h5_bytes(model))
    try:
        with atomic_path(target) as tmp:
            model.save(tmp)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(exc, target, h5_bytes(model)) from exc
        raise
    return Path(target)


def train_from_manifest(
    manifest_path: Path,
    run_dir: Path,
    options: TrainOptions,
    log: Logger = print,
) -> dict[str, Any]:
    """Train the configured model on the TFRecord shards of a manifest into ``run_dir``.

    Resumes a killed run from its backup; returns the saved summary when the run already
    finished. Writes ``model.keras``, ``history.csv``, ``learning_curves.png``,
    ``diagnosis.json`` and ``train_summary.json``.

    Args:
        manifest_path: ``manifest.json`` written by preprocessing (class names, shards).
        run_dir: the run's model directory.
        options: the training options.
        log: where progress lines go.

    Returns:
        The summary record: model path, class names, image size, device plan, fit figures,
        diagnosis.

    Raises:
        ValueError: the manifest has no validation images or fewer than 2 classes.
    """
    from imgflow.tasks.tfrecords import make_dataset

    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if summary_path.is_file() and (run_dir / MODEL_FILE).is_file():
        log(f"run {run_dir.name} already finished; reusing {run_dir / MODEL_FILE}")
        return read_json(summary_path)

    manifest = read_manifest(manifest_path).to_dict()
    class_names = list(manifest["class_names"])
    image_size = int(manifest["image_size"])
    splits = manifest["splits"]
    if len(class_names) < 2:
        raise ValueError(f"{manifest_path}: class_names: expected at least 2 classes, found {class_names}")
    if not splits.get("val", {}).get("count"):
        raise ValueError(
            f"{manifest_path}: splits.val: expected validation images (set val_fraction > 0 or pass a val dir), found none"
        )
    counts = [int(splits["train"]["per_class"].get(n, 0)) for n in class_names]

    plan = plan_devices(detect_gpus(), options.mixed_precision, options.jit_compile, options.batch_size, keras.backend.backend())
    log(plan["log"])
    previous_policy = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(plan["precision"])
    try:
        deterministic = enable_determinism(options.seed, on_gpu=bool(plan["devices"] != ["CPU"]))
        batch = plan["global_batch_size"]
        train_ds = make_dataset(manifest_path, "train", batch, training=True, seed=options.seed)
        val_ds = make_dataset(manifest_path, "val", batch, training=False, seed=options.seed)
        steps = math.ceil(int(splits["train"]["count"]) / batch)
        strategy = make_strategy(plan)
        with strategy.scope():
            model = build_model(
                options.model, image_size, len(class_names), options.architecture, options.augment,
                options.weights, options.seed, steps_per_epoch=steps,
            )
            fit = fit_model(
                model, train_ds, val_ds, run_dir, options, counts, probe=doctor.probe_batch(val_ds, max_images=64), log=log,
                steps_per_epoch=steps, jit_compile=plan["jit_compile"], class_names=class_names,
            )
        save_model(model, run_dir / MODEL_FILE)
        # a built-in one-device model: this run's next steps use it as it is. A user builder's
        # model is read back, so one that Keras' safe mode refuses stops the run before promotion
        if plan["strategy"] != "mirrored" and resolve_model_name(options.model) in BUILTIN_MODELS:
            registry.hand_over_saved_model(run_dir / MODEL_FILE, model)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    summary = {
        "model_path": str((run_dir / MODEL_FILE).resolve()),
        "class_names": class_names,
        "image_size": image_size,
        "aspect": manifest["aspect"],
        "background": manifest.get("background"),
        "fingerprint": manifest.get("fingerprint"),
        "device_plan": {k: v for k, v in plan.items() if k != "log"},
        "deterministic": deterministic,
        **fit,
    }
    write_json(summary_path, summary)
    return summary
