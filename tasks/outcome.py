"""Which epoch's weights were kept and why training stopped, as figures and one sentence (pure).

Keras' ``EarlyStopping(restore_best_weights=True)`` restores the best epoch on the
monitored metric at the end of a run, stopped early or not; imgflow says so out loud
(the CLI summary, ``metadata.json``, the report) from :func:`training_outcome`.
"""

from __future__ import annotations

import math
from typing import Any


def training_outcome(
    history: list[dict[str, float]],
    monitor: str,
    epochs_planned: int,
    patience: int,
    kept_epoch: int | None = None,
    stopped_early: bool = False,
) -> dict[str, Any]:
    """Which epoch's weights were kept and why training stopped, as figures and one sentence; pure.

    Args:
        history: the ``history.csv`` rows (``epoch`` counts from 0).
        monitor: the validation metric that chose the kept epoch (``val_accuracy`` or ``val_loss``).
        epochs_planned: the epochs asked for.
        patience: the early-stopping patience (epochs without improvement).
        kept_epoch: the epoch (from 1) whose weights EarlyStopping restored; when None the
            best epoch of ``history`` by ``monitor`` (the first one on ties, as Keras).
        stopped_early: whether EarlyStopping ended the run before ``epochs_planned``.

    Returns:
        ``{"epochs_run", "epochs_planned", "best_epoch", "best_value", "monitor",
        "stopped_early", "stop_reason", "sentence"}``; the sentence reads like "kept the
        weights of epoch 7 of 11 (best val_accuracy 0.8300); stopped early after epoch 11
        of 20: val_accuracy did not improve for 4 epochs" or "kept the weights of epoch 9 of
        10 (best val_accuracy 0.8100); ran all 10 epochs".
    """
    epochs_run = len(history)
    # Keras marks a stop on the last planned epoch too; that run did not end early
    stopped_early = stopped_early and epochs_run < epochs_planned
    values = [(int(r["epoch"]) + 1, float(r[monitor])) for r in history if monitor in r and math.isfinite(float(r[monitor]))]
    best_value = None
    if kept_epoch is None and values:
        pick = max if monitor.endswith("accuracy") else min
        target = pick(v for _, v in values)
        kept_epoch = next(e for e, v in values if v == target)
    if kept_epoch is not None:
        best_value = next((v for e, v in values if e == kept_epoch), None)
    last_epoch = values[-1][0] if values else epochs_run
    if stopped_early:
        stop_reason = f"{monitor} did not improve for {last_epoch - kept_epoch if kept_epoch else patience} epochs"
    elif epochs_run >= epochs_planned:
        stop_reason = f"ran all {epochs_planned} epochs"
    else:
        stop_reason = f"stopped after {epochs_run} of {epochs_planned} epochs (the loss became NaN or training was interrupted)"
    if kept_epoch is None:
        sentence = f"no epoch had a {monitor}; {stop_reason}"
    else:
        shown = f" (best {monitor} {best_value:.4f})" if best_value is not None else ""
        sentence = f"kept the weights of epoch {kept_epoch} of {epochs_run}{shown}; "
        if stopped_early:
            sentence += f"stopped early after epoch {last_epoch} of {epochs_planned}: {stop_reason}"
        else:
            sentence += stop_reason
    return {
        "epochs_run": epochs_run,
        "epochs_planned": epochs_planned,
        "best_epoch": kept_epoch,
        "best_value": best_value,
        "monitor": monitor,
        "stopped_early": stopped_early,
        "stop_reason": stop_reason,
        "sentence": sentence,
    }
