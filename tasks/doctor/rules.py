"""The per-epoch rules: pure functions ``rule(records, thresholds) -> Finding | None``.

A record is a plain dict per finished epoch (``epoch`` from 1, ``loss``, ``accuracy``,
``val_loss``, ``val_accuracy``, ``lr``; on the probe batch ``top_class``,
``top_class_share``, ``probe_accuracy``, ``pred_counts`` and ``label_counts`` per class;
``dead_relu``: ``{layer: {"dead_fraction", "dead_units", "units"}}``). A run whose loss
became NaN/inf ends with a record whose ``loss`` is NaN (with ``batch`` and
``last_finite_loss``). :class:`Thresholds` holds the limits and what is known about the
run (class shares, :class:`~imgflow.tasks.doctor.facts.RunFacts`), and ``final`` when the
run has ended. No Keras here: the rules are tested on hand-written records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from imgflow.tasks.doctor.facts import RunFacts, fix_head, fix_inputs, fix_learning_rate, join
from imgflow.tasks.doctor.findings import Finding, chance_loss

Record = dict[str, Any]
Rule = Callable[[Sequence[Record], "Thresholds"], "Finding | None"]


@dataclass(frozen=True)
class Thresholds:
    """The rules' limits and the facts of the run they judge.

    Attributes:
        num_classes: number of classes K (chance loss ln K).
        majority_share: share of the largest class in the training data.
        probe_majority_share: share of the largest class in the probe batch.
        probe_size: images in the probe batch.
        patience: epochs a failure must persist before it is critical.
        chance_tolerance: relative distance of the loss from ln(K) that counts as chance.
        collapse_share: share of probe predictions in one class that counts as collapse.
        majority_tolerance: accuracy within this of the majority share counts as majority-only.
        dead_fraction: share of never-active units that makes a ReLU layer dead.
        frozen_tolerance: relative loss change per epoch below which the loss is frozen.
        explode_factor: a first-epoch loss this many times chance means the steps exploded.
        min_class_images: probe images a class needs before ``class_never_predicted`` judges it.
        min_recall: recall below which a class counts as not learned.
        underfit_accuracy: final training accuracy below which a still-rising run underfits.
        underfit_rise: accuracy gained per epoch (last epochs) that counts as still rising.
        unstable_factor: epoch-to-epoch val-loss ratio that counts as a swing.
        final: the run has ended (a failure state at the end counts even if short).
        facts: what the model and run have, for the advice.
    """

    num_classes: int
    majority_share: float = 0.0
    probe_majority_share: float = 0.0
    probe_size: int = 0
    patience: int = 3
    chance_tolerance: float = 0.02
    collapse_share: float = 0.95
    majority_tolerance: float = 0.01
    dead_fraction: float = 0.5
    frozen_tolerance: float = 1e-3
    explode_factor: float = 100.0
    min_class_images: int = 10
    min_recall: float = 0.1
    underfit_accuracy: float = 0.85
    underfit_rise: float = 0.01
    unstable_factor: float = 1.4
    final: bool = False
    facts: RunFacts = field(default_factory=RunFacts)

    @property
    def chance(self) -> float:
        """ln(K), the loss of a uniform guess."""
        return chance_loss(self.num_classes)

    def at_end(self) -> "Thresholds":
        """The same thresholds for judging the ended run."""
        return replace(self, final=True)


def _finding(code: str, severity: str, evidence: dict[str, Any], advice: str, layer: str | None = None) -> Finding:
    return Finding(code=code, severity=severity, evidence=evidence, advice=advice, layer=layer)


def _finite(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if math.isfinite(float(r.get("loss", float("nan"))))]


def _streak(records: Sequence[Record], predicate: Callable[[Record], bool]) -> int:
    n = 0
    for record in reversed(records):
        if not predicate(record):
            break
        n += 1
    return n


def _severity(streak: int, th: Thresholds) -> str | None:
    if streak >= th.patience or (th.final and streak >= 1):
        return "critical"
    return None


def _learned(record: Record, th: Thresholds) -> bool:
    acc = record.get("accuracy")
    return acc is not None and acc > th.majority_share + 0.05


def _lr(records: Sequence[Record], th: Thresholds) -> float:
    lr = records[-1].get("lr") if records else None
    if lr is None:
        lr = th.facts.learning_rate
    return float(lr) if lr is not None else float("nan")


def _lr_is_high(th: Thresholds, factor: float = 10.0) -> bool:
    ratio = th.facts.lr_ratio
    return ratio is not None and ratio >= factor


# --------------------------------------------------------------------------- failures


def nan_loss(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``nan_loss`` (critical): the training loss became NaN or infinite."""
    bad = next((r for r in records if not math.isfinite(float(r.get("loss", 0.0)))), None)
    if bad is None:
        return None
    facts = th.facts
    fixes = [fix_inputs(facts)]
    if facts.input_scaling or _lr_is_high(th, 3.0):
        fixes.append(fix_learning_rate(facts))
    where = f"epoch {bad['epoch']}" + (f", batch {bad['batch']}" if bad.get("batch") is not None else "")
    return _finding(
        "nan_loss", "critical",
        {"epoch": bad["epoch"], "batch": bad.get("batch"), "last_finite_loss": bad.get("last_finite_loss"),
         "chance_loss": th.chance, "learning_rate": _lr(records, th)},
        f"the training loss became NaN/inf at {where}: the updates exploded; "
        + join(fixes, "lower the learning rate 10x and check custom layers for division by zero"),
    )


def loss_at_chance(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``loss_at_chance``: the loss stays at ln(K) for ``patience`` epochs (or at the end)."""
    recs = _finite(records)
    if not recs:
        return None
    tol = th.chance_tolerance * th.chance
    streak = _streak(recs, lambda r: abs(r["loss"] - th.chance) <= tol)
    severity = _severity(streak, th)
    if not severity:
        return None
    loss = recs[-1]["loss"]
    return _finding(
        "loss_at_chance", severity, {"loss": loss, "chance_loss": th.chance, "epochs": streak, "tolerance": tol},
        f"the training loss has stayed at {loss:.4f} = ln({th.num_classes}) for {streak} epoch(s): the model outputs "
        "the same probabilities for every image and learns nothing; "
        + join([fix_inputs(th.facts), fix_head(th.facts)], fix_learning_rate(th.facts, 3.0) + " (or raise it if the "
               "loss never moved), and check that the labels match the images"),
    )


def loss_frozen(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``loss_frozen``: the loss does not move (critical when accuracy is at the majority share)."""
    recs = _finite(records)
    if len(recs) < 2:
        return None
    window = recs[-min(len(recs), th.patience + 1):]
    losses = [r["loss"] for r in window]
    change = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses, losses[1:]))
    steps = len(window) - 1
    if change > th.frozen_tolerance or losses[-1] < 0.1 * th.chance or not (steps >= th.patience or th.final):
        return None
    acc = recs[-1].get("accuracy", recs[-1].get("probe_accuracy"))
    evidence = {"loss": losses[-1], "max_relative_change": change, "epochs": steps + 1, "chance_loss": th.chance,
                "accuracy": acc if acc is not None else float("nan"), "majority_share": th.majority_share,
                "learning_rate": _lr(recs, th)}
    if acc is None or acc <= th.majority_share + 0.05:
        return _finding(
            "loss_frozen", "critical", evidence,
            f"the training loss has not moved from {losses[-1]:.4f} for {steps + 1} epochs: no gradient reaches the "
            "weights; " + join([fix_head(th.facts), fix_inputs(th.facts)],
                               "look for dead ReLU layers (lower the learning rate) or frozen layers (trainable=False)"),
        )
    return _finding(
        "loss_frozen", "warning", evidence,
        f"the training loss has plateaued at {losses[-1]:.4f} for {steps + 1} epochs; lower the learning rate "
        f"({_lr(recs, th):.3g}) once it stalls (schedule `plateau` or `cosine`) to make further progress",
    )


def single_class_collapse(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``single_class_collapse``: (nearly) every probe image is predicted as one class."""
    recs = _finite(records)
    if not recs or "top_class_share" not in recs[-1] or th.probe_majority_share >= th.collapse_share:
        return None
    streak = _streak(recs, lambda r: r.get("top_class_share", 0.0) >= th.collapse_share)
    if streak == 0:
        return None
    last = recs[-1]
    acc = last.get("accuracy")
    evidence = {"top_class": last["top_class"], "top_class_share": last["top_class_share"],
                "probe_accuracy": last.get("probe_accuracy"), "probe_size": th.probe_size, "epochs": streak,
                "train_accuracy": acc if acc is not None else float("nan"), "majority_share": th.majority_share}
    label = th.facts.class_label(int(last["top_class"]))
    if _learned(last, th):
        # training-mode accuracy is fine but inference-mode predictions collapse: moving
        # statistics (BatchNorm) not warmed up, or train/inference differ; not a dead model
        if streak >= th.patience or th.final:
            return _finding(
                "single_class_collapse", "warning", evidence,
                f"in inference mode {last['top_class_share']:.0%} of the probe images are predicted as {label} although "
                f"training accuracy is {acc:.1%}: BatchNormalization statistics or dropout make inference differ from "
                "training; train more epochs or lower the BatchNorm momentum",
            )
        return None
    severity = _severity(streak, th)
    if not severity:
        return None
    fixes = [fix_inputs(th.facts), fix_head(th.facts)]
    if _lr_is_high(th, 3.0) or not any(fixes):
        fixes.append(fix_learning_rate(th.facts))
    return _finding(
        "single_class_collapse", severity, evidence,
        f"{last['top_class_share']:.0%} of the probe images are predicted as {label} for {streak} epoch(s): the model "
        "has collapsed to one class; " + join(fixes, ""),
    )


def majority_class_only(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``majority_class_only``: training accuracy equals the largest class's share."""
    recs = _finite(records)
    if not recs or "accuracy" not in recs[-1]:
        return None
    streak = _streak(recs, lambda r: "accuracy" in r and abs(r["accuracy"] - th.majority_share) <= th.majority_tolerance)
    severity = _severity(streak, th)
    if not severity:
        return None
    acc = recs[-1]["accuracy"]
    counts = th.facts.class_counts
    imbalanced = bool(counts) and min(counts) > 0 and max(counts) / min(counts) > 1.5
    fixes = [fix_inputs(th.facts), fix_head(th.facts)]
    if imbalanced:
        fixes.append(f"weight the classes (counts {min(counts)}..{max(counts)}; `class_weights: on`)")
    return _finding(
        "majority_class_only", severity,
        {"accuracy": acc, "majority_share": th.majority_share, "epochs": streak, "num_classes": th.num_classes},
        f"training accuracy has been {acc:.2%}, the share of the largest class ({th.majority_share:.2%}), for {streak} "
        "epoch(s): the model predicts one class for everything; " + join(fixes, fix_learning_rate(th.facts, 3.0)),
    )


def dead_relu(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``dead_relu``: the ReLU layer with the most never-active units on the probe, when over the limit."""
    recs = _finite(records)
    if not recs or not recs[-1].get("dead_relu"):
        return None
    layers = recs[-1]["dead_relu"]
    dead = {name: v for name, v in layers.items() if v["dead_fraction"] >= th.dead_fraction}
    if not dead:
        return None
    name = max(dead, key=lambda n: dead[n]["dead_fraction"])  # the first of the deadest
    stats = dead[name]
    frac = stats["dead_fraction"]
    # a wholly dead layer passes no gradient at all; critical once it has lasted `patience`
    # epochs and the model has not learned past it (residual paths may)
    lasting = len(recs) >= th.patience
    severity = "critical" if frac >= 1.0 and lasting and not _learned(recs[-1], th) else "warning"
    others = [n for n in dead if n != name]
    fixes = [fix_inputs(th.facts), fix_learning_rate(th.facts, 3.0),
             "use `LeakyReLU` or BatchNormalization before the activation"]
    return _finding(
        "dead_relu", severity,
        {"dead_fraction": frac, "dead_units": stats["dead_units"], "units": stats["units"],
         "probe_size": th.probe_size, "epoch": recs[-1]["epoch"], "dead_layers": len(dead)},
        f"{frac:.0%} of the ReLU units of {name} never activate on the probe images, so no gradient flows through "
        "them" + (f" (also over {th.dead_fraction:.0%} dead: {', '.join(others)})" if others else "") + "; "
        + join(fixes, ""),
        layer=name,
    )


# --------------------------------------------------------------------------- learning rate


def learning_rate_too_high(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``learning_rate_too_high``: the first epoch exploded, the loss climbs above its best,
    or the rate is far above the optimizer's usual one.

    A first-epoch loss (training or validation) ``explode_factor`` x chance or non-finite
    is a root cause; so is one 10x chance with a rate 100x the optimizer's usual one. It is
    critical when the rate is 10x the usual one or more. Raw inputs with a usual rate are
    left to ``unnormalized_input``. A rate 30x the usual one is a warning on its own, which
    :func:`~imgflow.tasks.doctor.findings.diagnose` promotes when training failed.
    """
    if not records:
        return None
    facts, lr = th.facts, _lr(records, th)
    first = records[0]
    first_loss = float(first.get("loss", float("nan")))
    first_val = float(first.get("val_loss", float("nan")))
    worst = max((v for v in (first_loss, first_val) if math.isfinite(v)), default=float("nan"))
    times = worst / th.chance if math.isfinite(worst) else float("inf")
    # judged on epoch 1 only (a resumed run's first record is a later epoch)
    epoch1 = first.get("epoch", 1) == 1
    hard = epoch1 and (not math.isfinite(first_loss) or times >= th.explode_factor)
    soft = epoch1 and times >= 10.0 and _lr_is_high(th, 100.0)
    high = _lr_is_high(th)
    if (hard and (facts.input_scaling is not False or high)) or soft:
        evidence = {"first_epoch_loss": first_loss, "first_epoch_val_loss": first.get("val_loss"),
                    "chance_loss": th.chance, "ratio": times, "learning_rate": lr,
                    "typical_learning_rate": facts.typical_lr, "lr_ratio": facts.lr_ratio}
        if not math.isfinite(first_loss):
            what = "the first epoch's training loss was NaN/inf"
        else:
            which = "validation" if worst == first_val and first_val > first_loss else "training"
            what = f"the first epoch's {which} loss was {worst:.3g}, {times:.3g}x chance ln({th.num_classes})"
        return _finding(
            "learning_rate_too_high", "critical" if high else "warning", evidence,
            f"{what}: the first updates overshot; " + fix_learning_rate(facts)
            + (f" (batch size {facts.batch_size})" if facts.batch_size else ""),
        )
    losses = [r["loss"] for r in _finite(records)]
    if len(losses) < 2:
        return None
    lowest = min(losses[:-1])
    # the loss climbs well above its best: steps overshoot
    if losses[-1] > 1.5 * lowest and losses[-1] > 0.1 * th.chance:
        return _finding(
            "learning_rate_too_high", "warning",
            {"loss": losses[-1], "lowest_loss": lowest, "ratio": losses[-1] / max(lowest, 1e-12),
             "learning_rate": lr, "epoch": len(losses)},
            f"the training loss rose from {lowest:.4g} to {losses[-1]:.4g}: the learning rate ({lr:.3g}) is probably "
            f"too high; {fix_learning_rate(facts)}, or use a `plateau`/`cosine` schedule",
        )
    if losses[0] > 10.0 * th.chance and len(losses) == 2:
        return _finding(
            "learning_rate_too_high", "warning",
            {"first_epoch_loss": losses[0], "chance_loss": th.chance, "ratio": losses[0] / th.chance,
             "learning_rate": lr},
            f"the first epoch's mean loss was {losses[0]:.3g}, {losses[0] / th.chance:.0f}x chance: the first updates "
            "exploded; " + join([fix_inputs(facts), fix_learning_rate(facts)], ""),
        )
    if _lr_is_high(th, 30.0):
        return _finding(
            "learning_rate_too_high", "warning",
            {"learning_rate": lr, "typical_learning_rate": facts.typical_lr, "lr_ratio": facts.lr_ratio},
            f"the learning rate {facts.learning_rate:.3g} is {facts.lr_ratio:.0f}x {facts.optimizer}'s usual rate: "
            "steps that large overshoot; " + fix_learning_rate(facts),
        )
    return None


def learning_rate_too_low(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``learning_rate_too_low`` (info): the loss falls under 1% an epoch while still high."""
    losses = [r["loss"] for r in _finite(records)]
    n = min(len(losses), th.patience + 1)
    if n < th.patience + 1 or n < 2:
        return None
    window = losses[-n:]
    per_epoch = (window[0] - window[-1]) / max(window[0], 1e-12) / (n - 1)
    if not (0.0 < per_epoch < 0.01 and window[-1] > 0.5 * th.chance):
        return None
    lr = _lr(records, th)
    return _finding(
        "learning_rate_too_low", "info",
        {"loss": window[-1], "relative_drop_per_epoch": per_epoch, "chance_loss": th.chance, "learning_rate": lr},
        f"the training loss falls only {per_epoch:.2%} per epoch and is still {window[-1]:.4f}: the learning rate "
        f"({lr:.3g}) may be too low; try 3-10x higher",
    )


# --------------------------------------------------------------------------- generalisation


def overfitting(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``overfitting`` (warning): validation loss rises ``patience`` epochs while training loss falls."""
    recs = [r for r in _finite(records) if "val_loss" in r and math.isfinite(r["val_loss"])]
    if len(recs) < th.patience + 1:
        return None
    best = min(range(len(recs)), key=lambda i: recs[i]["val_loss"])
    rising = len(recs) - 1 - best
    window = recs[best:]
    if not (rising >= th.patience and window[-1]["loss"] < window[0]["loss"]
            and all(b["val_loss"] >= a["val_loss"] for a, b in zip(window, window[1:]))):
        return None
    return _finding(
        "overfitting", "warning",
        {"best_val_loss": recs[best]["val_loss"], "best_epoch": recs[best]["epoch"], "val_loss": window[-1]["val_loss"],
         "train_loss_at_best": window[0]["loss"], "train_loss": window[-1]["loss"], "epochs_rising": rising},
        f"validation loss has risen from {recs[best]['val_loss']:.4f} (epoch {recs[best]['epoch']}) to "
        f"{window[-1]['val_loss']:.4f} while training loss kept falling: the model is memorising the training images; "
        "keep EarlyStopping with best-weight restore, add augmentation or dropout, or collect more data",
    )


def class_never_predicted(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``class_never_predicted`` (warning, at the end): a class with enough probe images gets
    no prediction, or a recall under ``min_recall``. Left to ``single_class_collapse`` when the
    model predicts one class for everything."""
    recs = _finite(records)
    if not th.final or not recs or "pred_counts" not in recs[-1] or "label_counts" not in recs[-1]:
        return None
    last = recs[-1]
    if last.get("top_class_share", 0.0) >= th.collapse_share and th.probe_majority_share < th.collapse_share:
        return None
    labels, preds = last["label_counts"], last["pred_counts"]
    hits = last.get("class_hits") or [0] * len(labels)
    worst = None
    for k, n in enumerate(labels):
        if n < th.min_class_images:
            continue
        recall = hits[k] / n
        if preds[k] == 0 or recall < th.min_recall:
            if worst is None or recall < worst[1]:
                worst = (k, recall)
    if worst is None:
        return None
    k, recall = worst
    label = th.facts.class_label(k)
    train = f"; it has {th.facts.class_counts[k]} training images" if k < len(th.facts.class_counts) else ""
    return _finding(
        "class_never_predicted", "warning",
        {"class_index": k, "probe_images": labels[k], "predicted": preds[k], "recall": recall,
         "epoch": last["epoch"], "probe_size": th.probe_size},
        f"{label} was predicted for {preds[k]} of the {th.probe_size} probe images and recognised in {recall:.0%} of "
        f"its own {labels[k]}{train}: the model has not learned it; train longer, check that class's images and labels, "
        "or weight the classes (`class_weights: on`)",
    )


def underfitting(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``underfitting`` (warning, at the end): training accuracy low and still rising at the last epoch."""
    recs = [r for r in _finite(records) if "accuracy" in r]
    if not th.final or len(recs) < 2:
        return None
    window = recs[-min(len(recs), 3):]
    rise = (window[-1]["accuracy"] - window[0]["accuracy"]) / (len(window) - 1)
    acc = window[-1]["accuracy"]
    still_rising = rise >= th.underfit_rise and acc - window[-2]["accuracy"] >= th.underfit_rise
    if not (acc < th.underfit_accuracy and still_rising and acc > th.majority_share + 0.05):
        return None
    facts = th.facts
    fixes = [f"train longer (it gained {rise:.1%} accuracy an epoch over the last {len(window) - 1})"]
    if facts.lr_ratio is not None and facts.lr_ratio < 1.0:
        fixes.append(f"raise the learning rate ({facts.learning_rate:.3g}, {facts.optimizer}'s usual is "
                     f"{facts.typical_lr:.0e})")
    fixes.append("widen the model (more filters or units) if it plateaus low")
    val = window[-1].get("val_accuracy")
    return _finding(
        "underfitting", "warning",
        {"train_accuracy": acc, "accuracy_gain_per_epoch": rise, "epochs": window[-1]["epoch"],
         "val_accuracy": val, "learning_rate": _lr(recs, th)},
        f"training accuracy is only {acc:.1%} after {window[-1]['epoch']} epochs and still rising: the model has not "
        "finished learning; " + join(fixes, ""),
    )


def val_loss_unstable(records: Sequence[Record], th: Thresholds) -> Finding | None:
    """``val_loss_unstable`` (warning): validation loss swings up and down (two or more reversals,
    a rise of ``unstable_factor`` x or more) and ends well above its best."""
    vals = [float(r["val_loss"]) for r in _finite(records) if r.get("val_loss") is not None
            and math.isfinite(float(r["val_loss"])) and float(r["val_loss"]) > 0][-6:]
    if len(vals) < 4:
        return None
    ratios = [b / a for a, b in zip(vals, vals[1:])]
    signs = [1 if r > 1 else -1 for r in ratios]
    reversals = sum(1 for a, b in zip(signs, signs[1:]) if a != b)
    swing = max(max(r, 1 / r) for r in ratios)
    jump = max(ratios)  # the largest epoch-to-epoch rise
    # a converging run may bounce once on its way down and still end at its best: only a
    # loss that jumps up and ends well above its best (by a margin that matters) is unstable
    unsettled = vals[-1] >= 1.2 * min(vals) and vals[-1] - min(vals) >= 0.1 * th.chance
    if reversals < 2 or jump < th.unstable_factor or not unsettled:
        return None
    facts = th.facts
    fixes = [fix_learning_rate(facts, 3.0)]
    if facts.batch_size:
        fixes.append(f"a larger batch than {facts.batch_size}")
    fixes.append("more validation images (a small validation set makes the loss noisy)")
    return _finding(
        "val_loss_unstable", "warning",
        {"val_loss_min": min(vals), "val_loss_max": max(vals), "val_loss_last": vals[-1], "max_swing": swing,
         "max_rise": jump, "reversals": reversals, "epochs": len(vals), "learning_rate": _lr(records, th)},
        "validation loss jumps between epochs (" + " → ".join(f"{v:.3g}" for v in vals) + f", swings up to "
        f"{swing:.2f}x): training is unstable; " + join(fixes, ""),
    )


# Evaluation order (the monitor applies them in this order after every epoch and at the end).
RULES: tuple[Rule, ...] = (
    nan_loss, dead_relu, loss_at_chance, loss_frozen, single_class_collapse, majority_class_only,
    overfitting, learning_rate_too_high, learning_rate_too_low, class_never_predicted, underfitting,
    val_loss_unstable,
)
# Codes whose critical finding stops training.
STOPPING = frozenset({"nan_loss", "loss_at_chance", "loss_frozen", "single_class_collapse", "majority_class_only"})
# Codes that describe the current state: a warning that no longer holds is withdrawn.
TRANSIENT = frozenset({"dead_relu", "class_never_predicted", "underfitting", "val_loss_unstable"})


def apply_rules(records: Sequence[Record], th: Thresholds, rules: Sequence[Rule] = RULES) -> dict[str, Finding | None]:
    """Run every rule on the records; ``{rule name: finding or None}``."""
    return {rule.__name__: rule(records, th) for rule in rules}
