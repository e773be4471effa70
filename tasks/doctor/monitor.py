"""``DoctorMonitor``: a thin Keras callback that gathers per-epoch records and applies the rules.

The judging is done by the pure functions of :mod:`imgflow.tasks.doctor.rules`; this
callback only measures (epoch logs, predictions and ReLU activations on a fixed probe
batch), keeps the latest finding per code and layer, and stops training when a rule
reports a critical failure.
"""

from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np

from imgflow.tasks.doctor import rules
from imgflow.tasks.doctor.facts import RunFacts
from imgflow.tasks.doctor.findings import SEVERITIES, chance_loss
from imgflow.tasks.doctor.checks import (
    _activation_name,
    _as_images,
    _as_labels,
    _model_inputs,
    _output_layer,
    check_input_range,
    check_output_layer,
    configured_learning_rate,
    model_facts,
)
from imgflow.tasks.inference import predict_outputs


class DoctorMonitor(keras.callbacks.Callback):
    """Watches a ``fit`` for the ways a classifier fails to learn, and stops it when it has.

    Per batch: a non-finite loss (``nan_loss``, stops at once). Per epoch, a record of the
    logs and of the model's predictions and ReLU activations on a fixed probe batch is
    judged by :data:`imgflow.tasks.doctor.rules.RULES`; at the end of training the rules
    judge the final state once more (``final``). At the start of training the probe batch
    is also used for the static input-range and output-layer checks, so the monitor
    explains a failure on its own.

    Attributes:
        findings: the latest finding per code (and layer), as dicts.
        epoch_records: the per-epoch records the rules judged.
        thresholds: the rules' limits and the run's facts.
    """

    def __init__(
        self,
        probe_images: Any,
        probe_labels: Any,
        num_classes: int,
        class_counts: Mapping[str, int] | Sequence[int] | None = None,
        *,
        patience: int = 3,
        chance_tolerance: float = 0.02,
        collapse_share: float = 0.95,
        majority_tolerance: float = 0.01,
        dead_fraction: float = 0.5,
        frozen_tolerance: float = 1e-3,
        static_checks: bool = True,
        facts: RunFacts | None = None,
    ) -> None:
        """Args:
            probe_images: a fixed batch of (validation) images, raw as the model takes them.
            probe_labels: their integer labels.
            num_classes: number of classes K.
            class_counts: training images per class in label order (a mapping name -> count
                in label order, or a sequence); gives the majority share.
            patience: epochs a failure must persist before it is critical and stops training.
            chance_tolerance: relative distance of the loss from ln(K) that counts as chance.
            collapse_share: share of probe predictions in one class that counts as collapse.
            majority_tolerance: accuracy within this of the majority share counts as majority-only.
            dead_fraction: share of never-active units that makes a ReLU layer dead (warning).
            frozen_tolerance: relative loss change per epoch below which the loss is frozen.
            static_checks: run the input-range and output-layer checks at train begin.
            facts: what is known of the run (batch size, class names); the model's own facts
                (scaling, head, optimizer) are read at train begin.
        """
        super().__init__()
        self.probe_images = _as_images(probe_images)
        self.probe_labels = _as_labels(probe_labels)
        self.num_classes = int(num_classes)
        names: list[str] = []
        if isinstance(class_counts, Mapping):
            names = [str(k) for k in class_counts]
            counts = [int(v) for v in class_counts.values()]
        elif class_counts is not None:
            counts = [int(v) for v in class_counts]
        else:
            counts = np.bincount(self.probe_labels, minlength=self.num_classes).tolist()
        self.class_counts = counts
        self.majority_share = max(counts) / max(sum(counts), 1)
        probe_counts = np.bincount(self.probe_labels, minlength=self.num_classes)
        self.probe_majority_share = float(probe_counts.max() / max(len(self.probe_labels), 1)) if len(self.probe_labels) else 0.0
        self.static_checks = static_checks
        self.chance = chance_loss(self.num_classes)
        base = (facts or RunFacts()).with_updates(num_classes=self.num_classes, class_counts=tuple(counts))
        if names and not base.class_names:
            base = base.with_updates(class_names=tuple(names))
        self.thresholds = rules.Thresholds(
            num_classes=self.num_classes, majority_share=self.majority_share,
            probe_majority_share=self.probe_majority_share, probe_size=len(self.probe_labels), patience=int(patience),
            chance_tolerance=chance_tolerance, collapse_share=collapse_share, majority_tolerance=majority_tolerance,
            dead_fraction=dead_fraction, frozen_tolerance=frozen_tolerance, facts=base,
        )
        self.findings: list[dict[str, Any]] = []
        self.epoch_records: list[dict[str, Any]] = []
        self._probe_model: Any = None
        self._relu_layers: list[str] = []
        self._epoch = 0
        self._last_finite_loss: float | None = None
        self._stopped_for_nan = False

    @property
    def patience(self) -> int:
        return self.thresholds.patience

    # -- bookkeeping
    def _index(self, code: str, layer: str | None) -> int | None:
        return next((i for i, f in enumerate(self.findings) if f["code"] == code and f.get("layer") == layer), None)

    def _report(self, finding: dict[str, Any], stop: bool = False) -> None:
        i = self._index(finding["code"], finding.get("layer"))
        if i is not None:
            old = self.findings[i]
            # never downgrade: a critical seen earlier stays critical
            if SEVERITIES.index(old["severity"]) < SEVERITIES.index(finding["severity"]):
                finding = {**finding, "severity": old["severity"]}
            self.findings[i] = finding
        else:
            self.findings.append(finding)
        if stop and finding["severity"] == "critical" and self.model is not None:
            self.model.stop_training = True

    def _withdraw(self, code: str, keep_layer: str | None = "\0") -> None:
        """Forget warnings of ``code`` that no longer hold (a critical finding is kept)."""
        self.findings = [f for f in self.findings if not (
            f["code"] == code and f["severity"] != "critical" and f.get("layer") != keep_layer)]

    def _judge(self, final: bool = False) -> None:
        th = self.thresholds.at_end() if final else self.thresholds
        for rule in rules.RULES:
            finding = rule(self.epoch_records, th)
            code = rule.__name__
            if finding is None:
                if code in rules.TRANSIENT:
                    self._withdraw(code)
                continue
            if code in rules.TRANSIENT:
                self._withdraw(code, keep_layer=finding.layer)
            self._report(finding.as_dict(), stop=code in rules.STOPPING)

    # -- keras hooks
    def on_train_begin(self, logs: dict | None = None) -> None:
        try:
            own = model_facts(self.model, self.num_classes)
            self.thresholds = replace(self.thresholds, facts=own.with_updates(
                batch_size=self.thresholds.facts.batch_size, class_counts=self.thresholds.facts.class_counts,
                class_names=self.thresholds.facts.class_names or None))
        except Exception:  # a subclassed model without layers: keep the facts given
            pass
        self._build_probe_model()
        if self.static_checks and len(self.probe_images):
            try:
                for finding in check_input_range(self.model, self.probe_images):
                    self._report(finding)
                outputs = predict_outputs(self.model, self.probe_images)[0]
                outputs = outputs.reshape(len(outputs), -1)
                for finding in check_output_layer(self.model, outputs, self.num_classes):
                    self._report(finding)
            except Exception:  # static checks are a bonus here; preflight reports them properly
                pass

    def _build_probe_model(self) -> None:
        """One functional model giving the output and every ReLU layer's activations."""
        self._probe_model, self._relu_layers = None, []
        try:
            # the output layer is judged by bad_output_activation, not here
            head = _output_layer(self.model)
            relu = [
                layer for layer in self.model.layers
                if _activation_name(layer) == "relu" and not getattr(layer, "layers", None) and layer is not head
            ]
            # a unit is dead when it is never positive: its spatial maximum per image says as
            # much as the whole map, and is all that leaves the graph (not MBs every epoch)
            outputs = list(self.model.outputs) + [
                keras.layers.GlobalMaxPooling2D(name=f"probe_max_{layer.name}")(layer.output)
                if len(layer.output.shape) == 4 else layer.output
                for layer in relu
            ]
            self._probe_model = keras.Model(_model_inputs(self.model), outputs)
            self._relu_layers = [layer.name for layer in relu]
        except Exception:  # subclassed model: predictions only
            self._probe_model = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not logs or "loss" not in logs or self._stopped_for_nan:
            return
        loss = float(np.asarray(logs["loss"]))
        if math.isfinite(loss):
            self._last_finite_loss = loss
            return
        self._stopped_for_nan = True
        self.epoch_records.append({
            "epoch": self._epoch + 1, "loss": float("nan"), "batch": batch + 1 if batch >= 0 else None,
            "last_finite_loss": self._last_finite_loss, "lr": self._learning_rate(),
        })
        self._judge()

    def _learning_rate(self) -> float:
        rate = configured_learning_rate(self.model.optimizer)
        return float("nan") if rate is None else rate

    def _probe(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        if self._probe_model is not None:
            outs = predict_outputs(self._probe_model, self.probe_images)
            return outs[0], dict(zip(self._relu_layers, outs[1:]))
        return predict_outputs(self.model, self.probe_images)[0], {}

    def _probe_record(self) -> dict[str, Any]:
        """Predictions and ReLU activity on the probe batch, as record fields."""
        record: dict[str, Any] = {}
        outputs, relu_acts = self._probe()
        outputs = outputs.reshape(len(outputs), -1)
        if np.all(np.isfinite(outputs)) and outputs.shape[-1] >= 1:
            k = max(outputs.shape[-1], self.num_classes)
            preds = outputs.argmax(axis=-1)
            labels = self.probe_labels[: len(preds)]
            shares = np.bincount(preds, minlength=k) / len(preds)
            record.update(
                top_class_share=float(shares.max()), top_class=int(shares.argmax()),
                probe_accuracy=float((preds == labels).mean()),
                pred_counts=np.bincount(preds, minlength=k)[: self.num_classes].tolist(),
                label_counts=np.bincount(labels, minlength=k)[: self.num_classes].tolist(),
                class_hits=np.bincount(labels[preds == labels], minlength=k)[: self.num_classes].tolist(),
            )
        dead = {}
        for name, act in relu_acts.items():
            if act.ndim < 2 or not np.all(np.isfinite(act)):
                continue
            per_unit = act.reshape(-1, act.shape[-1]).max(axis=0)
            n_dead = int((per_unit <= 0.0).sum())
            dead[name] = {"dead_fraction": n_dead / act.shape[-1], "dead_units": n_dead, "units": int(act.shape[-1])}
        if dead:
            record["dead_relu"] = dead
        return record

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        loss = float(np.asarray(logs.get("loss", float("nan"))))
        if self._stopped_for_nan or not math.isfinite(loss):
            if not self._stopped_for_nan:
                self.on_train_batch_end(-1, {"loss": loss})
            return
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": loss, "lr": self._learning_rate()}
        for key in ("accuracy", "sparse_categorical_accuracy", "acc"):
            if key in logs:
                record["accuracy"] = float(np.asarray(logs[key]))
                break
        for key in ("val_loss", "val_accuracy"):
            if key in logs:
                record[key] = float(np.asarray(logs[key]))
        if len(self.probe_images):
            record.update(self._probe_record())
        self.epoch_records.append(record)
        self._judge()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self._stopped_for_nan or not self.epoch_records:
            return
        # the run ended: a failure state counts even when its evidence is shorter than
        # `patience` epochs, and the end-of-run rules (underfitting...) judge it
        self._judge(final=True)
