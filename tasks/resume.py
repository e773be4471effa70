"""Crash-safe resume and reproducible training (the parts of fit that survive a kill).

Keras' ``BackupAndRestore`` writes its files in place: a full disk or a kill mid-write
leaves half a file that the next attempt cannot load (it segfaulted in h5py, and every
later run failed until ``backup/`` was deleted by hand). Here every generation is
written to a temporary name, fsynced, checksummed and renamed; two generations are
kept; the newest whose checksum still matches is resumed, a corrupt one is reported and
skipped. The record also carries the best-so-far state of the checkpoint and
early-stopping callbacks, so a resumed run never overwrites the best checkpoint with a
worse epoch. Determinism: seeds everywhere, TensorFlow op determinism on a CPU, and the
shuffle order of a resumed epoch fast-forwarded to the one an uninterrupted run sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgflow.tasks.atomic import read_json, write_json
from imgflow.tasks.errors import disk_full, format_bytes, is_disk_full

Logger = Callable[[str], None]

BACKUP_DIR = "backup"
BACKUP_RECORD = "training_metadata.json"
_CALLBACK_STATE = ("best", "wait", "best_epoch", "stopped_epoch", "cooldown_counter")


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def weights_bytes(model: keras.Model) -> int:
    """Bytes of the model's and optimizer's variables: what one backup generation needs."""
    variables = list(model.variables) + list(getattr(getattr(model, "optimizer", None), "variables", []) or [])
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def h5_bytes(model: keras.Model) -> int:
    """Estimated size of a ``.weights.h5`` file of ``model`` (variables plus HDF5 overhead)."""
    variables = len(model.variables) + len(getattr(getattr(model, "optimizer", None), "variables", []) or [])
    return weights_bytes(model) + 1536 * variables + 8192


def free_bytes(folder: Path) -> int:
    """Bytes one new file in ``folder`` may take: free disk space, capped by ``RLIMIT_FSIZE``."""
    import resource

    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    stats = os.statvfs(folder)
    available = stats.f_bavail * stats.f_frsize
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        available = min(available, soft)
    return int(available)


def ensure_space(target: Path | str, needed: int) -> None:
    """Raise :class:`~imgflow.tasks.errors.DiskFullError` before writing ``needed`` bytes that cannot fit.

    HDF5 does not recover from a write that fails half way (it leaves open handles that
    crash the interpreter at exit), so a weights file is never started without room.
    """
    available = free_bytes(Path(target).parent)
    if available < needed:
        error = disk_full(OSError(28, "No space left on device", str(target)), target, needed)
        raise type(error)(f"{error} (about {format_bytes(available)} available)")


def select_backup(run_dir: Path, log: Logger | None = None) -> dict[str, Any] | None:
    """The newest verified backup generation of a run (None: start fresh).

    A generation whose weights file is missing or fails its checksum (a write cut short
    by a full disk, a kill, a bad sector) is reported through ``log`` and skipped.

    Returns:
        ``{"epoch", "weights", "sha256", "bytes", "callbacks"}`` or None.
    """
    backup = Path(run_dir) / BACKUP_DIR
    record_path = backup / BACKUP_RECORD
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
        generations = [record] + ([record["previous"]] if record.get("previous") else [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if log:
            log(f"WARNING: the backup record {record_path} is unreadable ({exc}); starting this run fresh")
        return None
    for generation in generations:
        weights = backup / str(generation.get("weights", ""))
        if weights.is_file() and generation.get("sha256") and _sha256(weights) == generation["sha256"]:
            return generation
        if log:
            log(f"WARNING: the backup of epoch {generation.get('epoch')} ({weights}) is missing or corrupt "
                "(checksum mismatch: a write cut short?); skipping it")
    if log:
        log(f"WARNING: no usable backup in {backup}; starting this run fresh")
    return None


def _tmp_beside(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, f".tmp-{os.getpid()}-{name}")  # keeps Keras' required .weights.h5 ending


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` whose file is written to a temporary name and renamed into place.

    Keras writes the checkpoint in place; a kill or a full disk mid-write would leave a
    half file where the best weights were.
    """

    _final_path: str | None = None

    def _get_file_path(self, epoch: int, batch: int | None, logs: dict | None) -> str:
        self._final_path = super()._get_file_path(epoch, batch, logs)
        return _tmp_beside(self._final_path)

    def _save_model(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        final = Path(self.filepath)
        ensure_space(final, final.stat().st_size if final.is_file() else h5_bytes(self.model))
        try:
            super()._save_model(epoch, batch, logs)
            if self._final_path is not None and Path(_tmp_beside(self._final_path)).is_file():
                _fsync_file(Path(_tmp_beside(self._final_path)))
                os.replace(_tmp_beside(self._final_path), self._final_path)
        except OSError as exc:
            if self._final_path is not None:
                Path(_tmp_beside(self._final_path)).unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(exc, self._final_path or "the checkpoint", h5_bytes(self.model)) from exc
            raise


class AtomicBackupAndRestore(keras.callbacks.Callback):
    """Back up the training state each epoch, atomically, in two generations; restore it.

    Place it after the callbacks whose state it keeps (``stateful``: the best checkpoint,
    early stopping, learning-rate plateau): their ``on_train_begin`` resets them, then
    this one restores their best-so-far values; at an epoch's end they update first, then
    this one records them. The weights file holds the model and the optimizer; the
    record adds the random-generator states of dropout and augmentation layers, which
    ``save_weights`` leaves out (without them a resumed epoch drops other units).

    Args:
        backup_dir: the run's ``backup/`` folder (removed when fit ends).
        start: the generation to resume (from :func:`select_backup`), or None.
        stateful: callbacks whose best-so-far state survives a resume.
        best_weights_path: the best checkpoint, to give early stopping its best weights back.
    """

    def __init__(
        self,
        backup_dir: Path,
        start: dict[str, Any] | None,
        stateful: list[keras.callbacks.Callback],
        best_weights_path: Path | None = None,
    ):
        super().__init__()
        self.backup_dir = Path(backup_dir)
        self.start = start
        self.stateful = stateful
        self.best_weights_path = best_weights_path
        self.previous: dict[str, Any] | None = start

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self.start:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        states = self.start.get("callbacks", {})
        for callback in self.stateful:
            for name, value in states.get(type(callback).__name__, {}).items():
                setattr(callback, name, value)
            if getattr(callback, "restore_best_weights", False) and self.best_weights_path is not None:
                if self.best_weights_path.is_file():
                    self.model.load_weights(self.best_weights_path)
                    callback.best_weights = self.model.get_weights()
        self.model.load_weights(self.backup_dir / self.start["weights"])
        restore_seed_states(self.model, self.start.get("seed_states") or [])
        self.model._initial_epoch = int(self.start["epoch"])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        name = f"epoch-{epoch + 1:04d}.weights.h5"
        target = self.backup_dir / name
        tmp = self.backup_dir / f".tmp-{os.getpid()}-{name}"  # Keras wants the .weights.h5 ending
        last = self.backup_dir / str((self.previous or {}).get("weights", "-"))
        ensure_space(target, last.stat().st_size if last.is_file() else h5_bytes(self.model))
        try:
            self.model.save_weights(tmp, overwrite=True)
            _fsync_file(tmp)
            os.replace(tmp, target)
            states = {
                type(c).__name__: {k: _plain(getattr(c, k)) for k in _CALLBACK_STATE if hasattr(c, k)}
                for c in self.stateful
            }
            record = {"epoch": epoch + 1, "weights": name, "sha256": _sha256(target), "bytes": target.stat().st_size,
                      "callbacks": states, "seed_states": seed_states(self.model)}
            previous = dict(self.previous or {})
            previous.pop("previous", None)
            write_json(self.backup_dir / BACKUP_RECORD, {**record, "previous": previous or None})
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(exc, target, h5_bytes(self.model)) from exc
            raise
        keep = {name, (previous or {}).get("weights")}
        for old in self.backup_dir.glob("epoch-*.weights.h5"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        self.previous = record

    def on_train_end(self, logs: dict | None = None) -> None:
        import shutil

        shutil.rmtree(self.backup_dir, ignore_errors=True)


def _seed_generators(model: keras.Model) -> list[Any]:
    """Every layer's random-generator (dropout, augmentation), in a fixed order."""
    generators = []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        generators.extend(getattr(layer, "_seed_generators", []) or [])
    return generators


def seed_states(model: keras.Model) -> list[list[int]]:
    """The random-generator states of ``model``'s layers (``save_weights`` leaves them out)."""
    return [np.asarray(keras.ops.convert_to_numpy(g.state.value)).tolist() for g in _seed_generators(model)]


def restore_seed_states(model: keras.Model, states: list[list[int]]) -> None:
    """Give ``model``'s layers back the random-generator states of :func:`seed_states`."""
    generators = _seed_generators(model)
    if len(generators) != len(states):
        return  # another architecture: nothing sensible to restore (the weights load would fail first)
    for generator, state in zip(generators, states):
        generator.state.assign(np.asarray(state, dtype=generator.state.dtype))


def _plain(value: Any) -> Any:
    """A callback attribute as JSON (numpy scalars to Python; +-inf kept as floats)."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "numpy"):
        return _plain(value.numpy())
    return value if isinstance(value, (int, float, str, bool, type(None))) else None


def enable_determinism(seed: int, on_gpu: bool) -> bool:
    """Seed Python, NumPy and the backend; make TensorFlow ops deterministic on a CPU.

    On a GPU some kernels have no deterministic implementation (TensorFlow then raises
    instead of training), so a GPU run is seeded but not guaranteed bit-identical.

    Returns:
        True when op determinism is on.
    """
    keras.utils.set_random_seed(seed)
    if on_gpu or keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    return True


def fast_forward_shuffle(dataset: Any, epochs_done: int) -> int:
    """Advance a reshuffling tf.data dataset past ``epochs_done`` epochs without reading it.

    ``shuffle(seed=..., reshuffle_each_iteration=True)`` draws the order of each new
    iterator from a seeded generator that advances once per iterator. Keras 3
    (``keras/src/trainers/epoch_iterator.py``, ``_enumerate_iterator``) creates one
    iterator per epoch when the dataset's length is unknown (TFRecord shards), and two
    when it is known (one at the start of the epoch, one prepared at its end). Creating
    as many iterators (no element is read) puts a resumed run on the order an
    uninterrupted run sees; ``test_training.py`` checks the result on this Keras.

    Returns:
        The number of iterators created.
    """
    if not epochs_done or not hasattr(dataset, "cardinality"):
        return 0
    per_epoch = 2 if int(dataset.cardinality()) > 0 else 1
    for _ in range(epochs_done * per_epoch):
        iter(dataset)
    return epochs_done * per_epoch
