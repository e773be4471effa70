"""Fine-tuning a pretrained backbone in two phases (the Keras transfer-learning recipe).

With pretrained weights (``weights: imagenet`` or a file) on a keras.applications
backbone, training runs as two ``model.fit`` calls on one history:

1. **frozen**: the backbone is frozen (``trainable = False``; its BatchNorm layers run
   in inference mode, Keras 3 does so for a frozen BatchNorm) and only the new head
   trains, for a third of the epochs (at least one), at the run's learning rate;
2. **unfrozen**: the top fifth of the backbone's layers with weights are unfrozen (its
   BatchNorm layers stay frozen, so their ImageNet statistics are not wrecked by small
   batches), the model is recompiled at a tenth of the rate, and training continues from
   ``initial_epoch`` to the planned epochs.

Early stopping and the best checkpoint see one run: the best epoch may be in either
phase, the kept weights are the best of both, and the patience counts from the start of
phase 2 (phase 1 always runs its epochs unless the loss becomes NaN). The backup of the
last frozen epoch is kept into phase 2, so a killed run resumes in the phase it was in:
at or before the last frozen epoch it finishes phase 1 first; after it, the model is
rebuilt in its phase-2 state and the phase-2 backup (weights and optimizer) restored.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras

# share of the epochs spent with the whole backbone frozen (at least one epoch)
FROZEN_SHARE = 1 / 3
# share of the backbone's layers with weights unfrozen in phase 2 (its top, BatchNorm excepted)
UNFREEZE_FRACTION = 0.2
# phase 2's learning rate as a share of phase 1's
LEARNING_RATE_FACTOR = 0.1
APPLICATIONS = ("efficientnetv2b0", "mobilenetv3small", "resnet50")


def plan_fine_tune(model: str, weights: str | None, epochs: int,
                   architecture: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The two phases of a pretrained backbone's training, or None when there is nothing to fine-tune; pure.

    Args:
        model: the canonical model name.
        weights: ``imagenet``, a weights file, or None.
        epochs: the planned epochs.
        architecture: the model options (``trainable_backbone: false`` keeps the backbone
            frozen for the whole run: one phase).

    Returns:
        ``{"frozen_epochs", "unfreeze_fraction", "learning_rate_factor"}`` or None (random
        initialisation, not a keras.applications backbone). ``frozen_epochs`` equals
        ``epochs`` when the backbone never unfreezes.
    """
    if weights is None or model not in APPLICATIONS:
        return None
    trainable = bool((architecture or {}).get("trainable_backbone", True))
    frozen = epochs if (epochs < 2 or not trainable) else min(epochs - 1, max(1, round(epochs * FROZEN_SHARE)))
    return {"frozen_epochs": int(frozen), "unfreeze_fraction": UNFREEZE_FRACTION,
            "learning_rate_factor": LEARNING_RATE_FACTOR}


def backbone_of(model: Any) -> Any:
    """The keras.applications backbone nested in an imgflow classifier (None if there is none)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential):
            return layer
    return None


def unfreeze_top(backbone: Any, fraction: float = UNFREEZE_FRACTION) -> list[str]:
    """Make the top ``fraction`` of ``backbone``'s layers with weights trainable, BatchNorm excepted.

    Returns:
        The names of the layers made trainable.
    """
    backbone.trainable = True  # a frozen parent hides every sublayer's variables
    weighted = [layer for layer in backbone.layers if layer.weights]
    top = weighted[len(weighted) - max(1, round(fraction * len(weighted))):]
    opened = {id(layer) for layer in top if not isinstance(layer, keras.layers.BatchNormalization)}
    for layer in backbone.layers:
        layer.trainable = id(layer) in opened
    return [layer.name for layer in top if id(layer) in opened]


def prepare(model: Any, options: Any) -> dict[str, Any] | None:
    """Plan the phases for ``options`` and freeze the backbone for phase 1 (None: no fine-tuning)."""
    from imgflow.tasks.models import resolve_model_name

    try:
        name = resolve_model_name(options.model)
    except ValueError:
        return None
    plan = plan_fine_tune(name, options.weights, options.epochs, options.architecture)
    backbone = backbone_of(model) if plan else None
    if backbone is None:
        return None
    backbone.trainable = False
    return {**plan, "backbone": backbone.name}


@contextlib.contextmanager
def _deferred_train_end(callbacks: list[Any]) -> Iterator[None]:
    """Skip ``on_train_end`` of ``callbacks`` (restoring the best weights, deleting the backup, the
    doctor's end-of-run judgement) while phase 1 ends: the run goes on in phase 2."""
    for callback in callbacks:
        callback.on_train_end = lambda logs=None: None
    try:
        yield
    finally:
        for callback in callbacks:
            del callback.on_train_end


class CarryBest(keras.callbacks.Callback):
    """Give EarlyStopping phase 1's best-so-far back after ``fit`` resets it (in its on_train_begin).

    Placed right after the EarlyStopping callback.
    """

    def __init__(self, early: keras.callbacks.EarlyStopping, state: dict[str, Any]):
        super().__init__()
        self.early = early
        self.state = state

    def on_train_begin(self, logs: dict | None = None) -> None:
        for key, value in self.state.items():
            setattr(self.early, key, value)


def fit_phases(
    model: Any,
    plan: dict[str, Any] | None,
    callbacks: list[Any],
    epochs: int,
    resume_from: int,
    recompile: Callable[[float, int], Any],
    learning_rate: float,
    steps_per_epoch: int,
    log: Callable[[str], None] = print,
    **fit_args: Any,
) -> Any:
    """``model.fit`` for ``epochs``: one call, or the frozen and unfrozen phases of ``plan``.

    Args:
        model: the compiled model (backbone frozen by :func:`prepare` when ``plan`` is set).
        plan: from :func:`prepare`, or None for one ordinary fit; ``unfrozen_layers`` and
            ``learning_rate`` (phase 2's) are added to it.
        callbacks: the run's callbacks (EarlyStopping and the backup among them).
        epochs: the planned epochs.
        resume_from: epochs a backup already holds (0 for a fresh run).
        recompile: ``recompile(learning_rate, total_steps)`` compiles the model anew.
        learning_rate: phase 1's rate.
        steps_per_epoch: batches an epoch (phase 2's schedule length).
        log: where the phase line goes.
        fit_args: the rest of ``model.fit``'s arguments (data, class weights, verbosity).

    Returns:
        The Keras ``History`` of the last ``fit`` call.
    """
    from imgflow.tasks import progress
    from imgflow.tasks.doctor.monitor import DoctorMonitor
    from imgflow.tasks.resume import AtomicBackupAndRestore

    frozen = plan["frozen_epochs"] if plan else epochs
    if plan is None or frozen >= epochs:
        if plan is not None:
            plan.update(unfrozen_layers=0, learning_rate=None)
        return model.fit(epochs=epochs, callbacks=callbacks, **fit_args)
    early = next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))
    backup = next(c for c in callbacks if isinstance(c, AtomicBackupAndRestore))
    ending = [c for c in callbacks if c is early or c is backup or isinstance(c, DoctorMonitor)]
    history = None
    if resume_from <= frozen:
        patience = early.patience
        early.patience = frozen + patience + 1  # phase 1 runs all its epochs; patience acts in phase 2
        try:
            with _deferred_train_end(ending):
                history = model.fit(epochs=frozen, callbacks=callbacks, **fit_args)
        finally:
            early.patience = patience
        if model.stop_training:  # the loss became NaN (or the doctor stopped the run): no phase 2
            for callback in ending:
                callback.on_train_end(None)
            plan.update(unfrozen_layers=0, learning_rate=None)
            return history
        carried = [CarryBest(early, {"best": early.best, "best_weights": early.best_weights,
                                     "best_epoch": early.best_epoch, "wait": 0})]
        backup.start = None  # the weights in memory are the run's state now
    else:
        carried = []  # the phase-2 backup restores the callbacks' state
    opened = unfreeze_top(backbone_of(model), plan["unfreeze_fraction"])
    rate = learning_rate * plan["learning_rate_factor"]
    plan.update(unfrozen_layers=len(opened), learning_rate=rate)
    recompile(rate, steps_per_epoch * (epochs - frozen))
    model._initial_epoch = None  # set by a phase-1 restore; phase 2 starts where phase 1 ended
    line = (f"fine-tuning: unfroze the top {len(opened)} layers of {plan['backbone']} (BatchNorm stays frozen) "
            f"at learning rate {rate:.2g} for epochs {frozen + 1}-{epochs}")
    if log is not print:
        log(line)
    progress.say(line)
    position = callbacks.index(early) + 1
    with warnings.catch_warnings():
        # a resumed phase 2 first loads the best checkpoint, whose optimizer state may be phase 1's
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return model.fit(initial_epoch=frozen, epochs=epochs,
                         callbacks=callbacks[:position] + carried + callbacks[position:], **fit_args)
