"""The doctor's per-epoch rules, findings and diagnosis as pure functions: no Keras, no training.

Records are written by hand the way :class:`imgflow.tasks.doctor.monitor.DoctorMonitor`
gathers them; each rule is checked on a run that has its failure and on one that has not.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgflow.tasks.doctor import rules
from imgflow.tasks.doctor.facts import RunFacts
from imgflow.tasks.doctor.findings import (
    Finding,
    diagnose,
    diverged,
    findings_markdown,
    lr_range_finding,
    make_finding,
    read_diagnosis,
    root_cause,
    write_diagnosis,
)

K = 3
CHANCE = math.log(3)
# a built-in model: Rescaling first, softmax head, Adam at its usual rate
SCALED = RunFacts(input_scaling=True, scaling_layer="rescale", head_activation="softmax", head_layer="predictions",
                  from_logits=False, optimizer="adam", learning_rate=1e-3, batch_size=32, class_counts=(40, 40, 40),
                  class_names=("cats", "dogs", "owls"), num_classes=K)
# the seed's model: raw 0-255 inputs, softmax head, SGD
RAW = RunFacts(input_scaling=False, head_activation="softmax", head_layer="dense_2", from_logits=False,
               optimizer="sgd", learning_rate=0.01, batch_size=32, num_classes=K)


def th(facts: RunFacts = SCALED, **kw) -> rules.Thresholds:
    base = {"num_classes": K, "majority_share": 1 / 3, "probe_majority_share": 1 / 3, "probe_size": 60, "facts": facts}
    return rules.Thresholds(**{**base, **kw})


def recs(losses, **columns):
    out = []
    for i, loss in enumerate(losses):
        record = {"epoch": i + 1, "loss": loss}
        for key, values in columns.items():
            if values[i] is not None:
                record[key] = values[i]
        out.append(record)
    return out


def probe(top_class_share, top_class=0, pred_counts=(20, 20, 20), label_counts=(20, 20, 20), hits=None):
    return {"top_class_share": top_class_share, "top_class": top_class, "probe_accuracy": 0.5,
            "pred_counts": list(pred_counts), "label_counts": list(label_counts),
            "class_hits": list(hits if hits is not None else pred_counts)}


# ----------------------------------------------------------------------------- failures


def test_nan_loss_names_epoch_and_batch_and_advice_fits_the_model():
    records = recs([1.0]) + [{"epoch": 2, "loss": float("nan"), "batch": 7, "last_finite_loss": 3.5, "lr": 0.01}]
    raw = rules.nan_loss(records, th(RAW))
    assert raw.severity == "critical" and raw.evidence["epoch"] == 2 and raw.evidence["batch"] == 7
    assert raw.evidence["last_finite_loss"] == 3.5
    assert "Rescaling(1/255)" in raw.advice
    scaled = rules.nan_loss(records, th(SCALED))
    assert "Rescaling" not in scaled.advice and "learning rate of adam from 0.001" in scaled.advice
    assert rules.nan_loss(recs([1.0, 0.9]), th()) is None


def test_loss_at_chance_needs_patience_epochs_or_the_end():
    two = recs([CHANCE + 0.003, CHANCE - 0.002])
    assert rules.loss_at_chance(two, th()) is None
    assert rules.loss_at_chance(two, th(final=True)).severity == "critical"
    three = rules.loss_at_chance(recs([CHANCE + 0.003, CHANCE - 0.002, CHANCE + 0.001]), th())
    assert three.severity == "critical" and three.evidence["epochs"] == 3
    assert rules.loss_at_chance(recs([1.3, 1.2, 1.25]), th(final=True)) is None
    # a model with Rescaling and softmax is not told to add them
    assert "Rescaling" not in three.advice and "softmax" not in three.advice
    raw = rules.loss_at_chance(recs([CHANCE] * 3), th(RAW.with_updates(head_activation="relu")))
    assert "Rescaling(1/255)" in raw.advice and "Dense(3, activation='softmax')" in raw.advice


def test_loss_frozen_critical_only_when_nothing_was_learned():
    frozen = rules.loss_frozen(recs([0.5] * 4, accuracy=[0.34] * 4), th())
    assert frozen.severity == "critical" and frozen.evidence["epochs"] == 4
    plateau = rules.loss_frozen(recs([0.5] * 4, accuracy=[0.85] * 4), th())
    assert plateau.severity == "warning"
    assert rules.loss_frozen(recs([0.9, 0.7, 0.5, 0.4], accuracy=[0.5, 0.6, 0.7, 0.8]), th()) is None


def test_single_class_collapse_and_its_inference_only_variant():
    collapsed = [{**r, **probe(1.0, top_class=2, pred_counts=(0, 0, 60))}
                 for r in recs([1.2, 1.1, 1.1], accuracy=[0.34, 0.33, 0.34])]
    finding = rules.single_class_collapse(collapsed, th())
    assert finding.severity == "critical" and finding.evidence["top_class"] == 2 and finding.evidence["epochs"] == 3
    assert "'owls' (class 2)" in finding.advice
    # scaled inputs, softmax head and the usual rate: nothing in the model to blame but the rate
    assert "Rescaling" not in finding.advice and "softmax" not in finding.advice
    high = rules.single_class_collapse(collapsed, th(SCALED.with_updates(learning_rate=0.5)))
    assert "from 0.5 to 0.001" in high.advice
    learned = [{**r, **probe(0.97)} for r in recs([0.5, 0.4, 0.3], accuracy=[0.8, 0.85, 0.9])]
    assert rules.single_class_collapse(learned, th()).severity == "warning"
    healthy = [{**r, **probe(0.4)} for r in recs([0.5, 0.4, 0.3], accuracy=[0.8, 0.85, 0.9])]
    assert rules.single_class_collapse(healthy, th(final=True)) is None


def test_majority_class_only_uses_the_class_shares_and_suggests_weights_when_imbalanced():
    imbalanced = SCALED.with_updates(class_counts=(80, 10, 10))
    finding = rules.majority_class_only(recs([0.7, 0.69, 0.68], accuracy=[0.8] * 3), th(imbalanced, majority_share=0.8))
    assert finding.severity == "critical" and finding.evidence["majority_share"] == 0.8
    assert "class_weights: on" in finding.advice and "10..80" in finding.advice
    assert rules.majority_class_only(recs([0.7, 0.6, 0.5], accuracy=[0.8] * 3), th()) is None


def test_dead_relu_reports_the_deadest_layer_and_withholds_rescaling_advice_when_present():
    layers = {"conv1": {"dead_fraction": 0.6, "dead_units": 6, "units": 10},
              "hidden": {"dead_fraction": 1.0, "dead_units": 16, "units": 16},
              "ok": {"dead_fraction": 0.1, "dead_units": 1, "units": 10}}
    records = [{**r, "dead_relu": layers} for r in recs([1.1, 1.1, 1.1], accuracy=[0.34] * 3)]
    finding = rules.dead_relu(records, th())
    assert finding.layer == "hidden" and finding.severity == "critical"
    assert finding.evidence["dead_layers"] == 2 and finding.evidence["units"] == 16
    assert "conv1" in finding.advice and "Rescaling" not in finding.advice  # the defect of issue 14
    assert "Rescaling(1/255)" in rules.dead_relu(records, th(RAW)).advice
    assert rules.dead_relu(records[:1], th()).severity == "warning"  # not lasting yet


# ----------------------------------------------------------------------------- learning rate


def test_learning_rate_too_high_is_a_critical_root_cause_when_the_first_epoch_explodes():
    facts = SCALED.with_updates(learning_rate=0.5)
    exploded = rules.learning_rate_too_high(recs([2e8, 1.1]), th(facts))
    assert exploded.severity == "critical"
    assert exploded.evidence["ratio"] == pytest.approx(2e8 / CHANCE, rel=1e-4)
    assert exploded.evidence["lr_ratio"] == 500
    assert "from 0.5 to 0.001" in exploded.advice
    assert "Rescaling" not in exploded.advice and "softmax" not in exploded.advice
    # validation loss 1000x chance after the first epoch counts too (BatchNorm can hide it in the train loss)
    val = rules.learning_rate_too_high(recs([13.4, 1.7], val_loss=[1006.0, 304.0]), th(facts))
    assert val.severity == "critical" and val.evidence["first_epoch_val_loss"] == 1006.0
    assert val.advice.startswith("the first epoch's validation loss was 1.01e+03, 916x chance ln(3)")
    # a rate 100x the usual one: 10x chance after the first epoch is enough (89x, as measured on digits)
    soft = rules.learning_rate_too_high(recs([12.7, 1.03], val_loss=[97.7, 4.5]), th(facts))
    assert soft.severity == "critical" and soft.evidence["ratio"] == pytest.approx(97.7 / CHANCE, rel=1e-4)
    assert rules.learning_rate_too_high(recs([12.7, 1.03], val_loss=[97.7, 4.5]), th(SCALED)).severity == "warning"
    nan = rules.learning_rate_too_high([{"epoch": 1, "loss": float("nan"), "batch": 3}], th(facts))
    assert nan.severity == "critical"
    # the usual rate on a scaled model: a warning (diagnose promotes it if training failed)
    assert rules.learning_rate_too_high(recs([2e8, 1.1]), th(SCALED)).severity == "warning"
    # raw inputs with SGD's usual rate: the inputs explain the explosion, not the rate
    assert rules.learning_rate_too_high([{"epoch": 1, "loss": float("nan")}], th(RAW)) is None


def test_a_rate_far_above_the_usual_is_a_warning_that_explains_a_collapse():
    facts = SCALED.with_updates(learning_rate=0.05)
    calm = rules.learning_rate_too_high(recs([1.0, 0.8]), th(facts))
    assert calm.severity == "warning" and calm.evidence["lr_ratio"] == 50
    assert calm.advice == ("the learning rate 0.05 is 50x adam's usual rate: steps that large overshoot; lower the "
                           "learning rate of adam from 0.05 to 0.001 (adam's usual rate is 1e-03)")
    assert rules.learning_rate_too_high(recs([1.0, 0.8]), th(SCALED.with_updates(learning_rate=0.01))) is None
    collapse = make_finding("single_class_collapse", "critical", {"top_class_share": 1.0}, "collapsed")
    diagnosis = diagnose([collapse, calm.as_dict()])
    assert root_cause(diagnosis)["code"] == "learning_rate_too_high"


def test_learning_rate_hints_from_the_loss_curve():
    rising = rules.learning_rate_too_high(recs([0.8, 0.5, 0.9], accuracy=[0.6, 0.7, 0.6]), th())
    assert rising.severity == "warning" and rising.evidence["ratio"] == pytest.approx(1.8)
    slow = rules.learning_rate_too_low(recs([1.05, 1.045, 1.04, 1.035]), th())
    assert slow.severity == "info" and slow.evidence["relative_drop_per_epoch"] < 0.01
    assert rules.learning_rate_too_low(recs([1.0, 0.7, 0.5, 0.3]), th()) is None


def test_lr_range_finding_for_the_learning_rate_finder():
    quiet = lr_range_finding(3e-3, 3e-2, current_lr=1e-3, optimizer="adam", steps=100, min_loss=0.4)
    assert quiet["code"] == "lr_range" and quiet["severity"] == "info"
    assert quiet["evidence"] == {"suggested_lr": 0.003, "min_loss_lr": 0.03, "steps": 100, "min_loss": 0.4,
                                 "learning_rate": 0.001, "ratio_to_suggested": pytest.approx(1 / 3, rel=1e-4)}
    assert "about 0.003" in quiet["advice"] and "with adam" in quiet["advice"]
    far = lr_range_finding(1e-3, 1e-2, current_lr=0.5)
    assert far["severity"] == "warning" and "500x" in far["advice"]


# ----------------------------------------------------------------------------- generalisation


def test_overfitting_is_a_warning():
    finding = rules.overfitting(recs([1.0, 0.7, 0.5, 0.3, 0.2], val_loss=[0.9, 0.8, 0.85, 0.9, 1.0]), th())
    assert finding.severity == "warning" and finding.evidence["best_epoch"] == 2 and finding.evidence["val_loss"] == 1.0
    assert rules.overfitting(recs([1.0, 0.7, 0.5, 0.3, 0.2], val_loss=[0.9, 0.8, 0.7, 0.6, 0.5]), th()) is None


def test_class_never_predicted_at_the_end():
    # the issue's run: one class never predicted (0 of 22)
    last = probe(0.55, pred_counts=(33, 27, 0), label_counts=(20, 20, 22), hits=(18, 17, 0))
    records = [{**r, **last} for r in recs([1.0, 0.8], accuracy=[0.6, 0.7])]
    finding = rules.class_never_predicted(records, th(final=True))
    assert finding.severity == "warning"
    assert finding.evidence == {"class_index": 2, "probe_images": 22, "predicted": 0, "recall": 0.0, "epoch": 2,
                                "probe_size": 60}
    assert "'owls' (class 2)" in finding.advice and "40 training images" in finding.advice
    assert rules.class_never_predicted(records, th()) is None  # judged at the end only
    low = {**last, "pred_counts": [30, 28, 2], "class_hits": [18, 17, 1]}  # recall 1/22 < 0.1
    assert rules.class_never_predicted([{**records[-1], **low}], th(final=True)).evidence["recall"] == pytest.approx(1 / 22, rel=1e-4)
    small = {**last, "label_counts": [25, 26, 9]}  # fewer than 10 images: not judged
    assert rules.class_never_predicted([{**records[-1], **small}], th(final=True)) is None
    fine = {**last, "pred_counts": [20, 20, 20], "class_hits": [15, 15, 15]}
    assert rules.class_never_predicted([{**records[-1], **fine}], th(final=True)) is None
    # a collapse onto one class is single_class_collapse's finding, not this one
    collapsed = probe(1.0, pred_counts=(60, 0, 0), hits=(20, 0, 0))
    assert rules.class_never_predicted([{**records[-1], **collapsed}], th(final=True)) is None


def test_underfitting_when_accuracy_is_low_and_still_rising_at_the_end():
    records = recs([1.0, 0.9, 0.8], accuracy=[0.55, 0.63, 0.70], val_accuracy=[0.5, 0.55, 0.58])
    finding = rules.underfitting(records, th(SCALED.with_updates(learning_rate=1e-4), final=True))
    assert finding.severity == "warning"
    assert finding.evidence["train_accuracy"] == 0.7 and finding.evidence["accuracy_gain_per_epoch"] == pytest.approx(0.075)
    assert finding.evidence["val_accuracy"] == 0.58
    assert "train longer" in finding.advice and "raise the learning rate (0.0001" in finding.advice
    assert "widen the model" in finding.advice
    # the usual rate: not told to raise it
    assert "raise the learning rate" not in rules.underfitting(records, th(final=True)).advice
    assert rules.underfitting(records, th()) is None
    assert rules.underfitting(recs([1.0, 0.9, 0.8], accuracy=[0.6, 0.70, 0.70]), th(final=True)) is None  # flat
    assert rules.underfitting(recs([0.3, 0.2, 0.1], accuracy=[0.85, 0.9, 0.95]), th(final=True)) is None  # learned


def test_val_loss_unstable_on_the_issues_curve():
    records = recs([1.0, 0.9, 0.85, 0.8], val_loss=[1.04, 2.12, 1.39, 1.69])
    finding = rules.val_loss_unstable(records, th())
    assert finding.severity == "warning"
    assert finding.evidence["reversals"] == 2 and finding.evidence["max_swing"] == pytest.approx(2.12 / 1.04, rel=1e-4)
    assert "1.04 → 2.12 → 1.39 → 1.69" in finding.advice and "larger batch than 32" in finding.advice
    assert finding.evidence["val_loss_last"] == 1.69 and finding.evidence["max_rise"] == pytest.approx(2.12 / 1.04, rel=1e-4)
    assert rules.val_loss_unstable(recs([1.0, 0.9, 0.85, 0.8], val_loss=[0.9, 0.8, 0.85, 0.78]), th()) is None  # noise
    # a healthy 6-epoch run of the built-in model on digits: one bounce on the way down, ends at its best
    converging = recs([1.0, 0.5, 0.3, 0.2, 0.1, 0.05], val_loss=[3.4, 0.239, 0.357, 0.157, 0.0642, 0.0231])
    assert rules.val_loss_unstable(converging, th()) is None
    assert rules.val_loss_unstable(recs([1.0, 0.9, 0.85, 0.8], val_loss=[0.9, 1.3, 1.9, 2.5]), th()) is None  # one way


def test_a_healthy_run_is_quiet():
    records = [{**r, **probe(0.36, pred_counts=(21, 20, 19), hits=(19, 19, 18))}
               for r in recs([0.9, 0.4, 0.2, 0.12], accuracy=[0.6, 0.88, 0.95, 0.97], val_loss=[0.8, 0.4, 0.25, 0.2])]
    found = {name: f for name, f in rules.apply_rules(records, th(final=True)).items() if f is not None}
    assert found == {}


# ----------------------------------------------------------------------------- diagnosis


def test_root_cause_ranks_first_and_is_promoted_to_critical():
    lr = make_finding("learning_rate_too_high", "warning", {"ratio": 1.8e8}, "lower the rate")
    collapse = make_finding("single_class_collapse", "critical", {"top_class_share": 1.0}, "collapsed")
    chance = make_finding("loss_at_chance", "critical", {"loss": 1.0986}, "chance")
    over = make_finding("overfitting", "warning", {"val_loss": 1.0}, "w")
    diagnosis = diagnose([over, collapse, chance, lr])
    assert [f["code"] for f in diagnosis["findings"]] == [
        "learning_rate_too_high", "loss_at_chance", "single_class_collapse", "overfitting"]
    first = diagnosis["findings"][0]
    assert first["severity"] == "critical" and first["evidence"]["training_failed"] == 1
    assert root_cause(diagnosis)["code"] == "learning_rate_too_high"
    # raw inputs explain the NaN (and the exploding first epoch) ahead of the learning rate
    unnorm = make_finding("unnormalized_input", "warning", {"input_max": 255}, "add Rescaling", layer="conv")
    nan = make_finding("nan_loss", "critical", {"epoch": 1}, "nan")
    seed = diagnose([nan, lr, unnorm])
    assert [f["code"] for f in seed["findings"]] == ["unnormalized_input", "learning_rate_too_high", "nan_loss"]
    assert diverged(seed) and not diverged(diagnosis)
    # a root cause with nothing critical to explain stays a warning
    calm = diagnose([unnorm, over])
    assert calm["healthy"] is True and calm["findings"][0]["severity"] == "warning"
    assert root_cause(calm) is None


def test_diagnosis_round_trips_and_markdown_names_the_reason(tmp_path):
    lr = make_finding("learning_rate_too_high", "critical", {"ratio": float("inf")}, "lower it")
    diagnosis = diagnose([lr])
    path = write_diagnosis(tmp_path / "d" / "diagnosis.json", diagnosis)
    assert json.loads(path.read_text()) == diagnosis == read_diagnosis(path)
    assert diagnosis["findings"][0]["evidence"]["ratio"] is None
    assert "Most likely reason: `learning_rate_too_high` — lower it" in findings_markdown(diagnosis)
    (tmp_path / "bad.json").write_text(json.dumps({"healthy": True, "findings": [{"code": "x"}]}))
    with pytest.raises(ValueError):
        read_diagnosis(tmp_path / "bad.json")


def test_finding_schema():
    finding = Finding(code="dead_relu", severity="warning", evidence={"units": 16, "frac": float("nan")}, advice="a",
                      layer="hidden")
    assert finding.as_dict() == {"code": "dead_relu", "severity": "warning", "evidence": {"units": 16, "frac": None},
                                 "advice": "a", "layer": "hidden"}
    with pytest.raises(ValueError, match="severity"):
        make_finding("x", "fatal", {}, "advice")


def test_importing_the_doctor_package_does_not_import_keras():
    code = ("import sys, imgflow.tasks.doctor as d, imgflow.tasks.doctor.rules, imgflow.flows.doctor; "
            "d.diagnose([]); print('keras' in sys.modules, 'tensorflow' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]


def test_a_diverged_run_skips_evaluation_with_its_root_cause_as_the_reason():
    from imgflow.flows.training import _skip_evaluation_reason

    unnorm = make_finding("unnormalized_input", "warning", {"input_max": 255}, "add `Rescaling(1/255)`", layer="conv")
    nan = make_finding("nan_loss", "critical", {"epoch": 1}, "the loss became NaN")
    reason = _skip_evaluation_reason(diagnose([nan, unnorm]))
    assert reason.startswith("rejected: training diverged (NaN/inf loss), evaluation skipped — unnormalized_input: ")
    assert reason.endswith("add `Rescaling(1/255)`")
    collapse = make_finding("single_class_collapse", "critical", {"top_class_share": 1.0}, "collapsed")
    assert _skip_evaluation_reason(diagnose([collapse])) is None  # not diverged: evaluated, then rejected
