"""The doctor's findings: schema, ranking (root causes before the symptoms they explain),
the diagnosis and its Markdown/terminal summaries. Pure Python and pydantic, no Keras.

A finding is ``{"code", "severity": critical|warning|info, "evidence": {name: number},
"advice": str}`` plus, where one layer is concerned, ``"layer": name``. A diagnosis is
``{"healthy": bool, "findings": [...]}`` (see :func:`diagnose`); it crosses task
boundaries as that JSON-able dict, validated by :class:`Diagnosis`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from imgflow.tasks.atomic import read_json, write_json

SEVERITIES = ("critical", "warning", "info")
Severity = Literal["critical", "warning", "info"]

# Root causes first, in the order a person should fix them, then the symptoms. Ties of
# severity are broken by this order, so a promoted root cause is listed above the
# critical symptom it explains.
ROOT_CAUSE_ORDER = (
    "labels_out_of_range",
    "output_units_mismatch",
    "bad_output_activation",
    "unnormalized_input",
    "learning_rate_too_high",
    "initial_loss_high",
    "dead_relu",
)
CODE_ORDER = ROOT_CAUSE_ORDER + (
    "cannot_overfit_batch",
    "nan_loss",
    "loss_frozen",
    "loss_at_chance",
    "single_class_collapse",
    "majority_class_only",
    "class_never_predicted",
    "underfitting",
    "val_loss_unstable",
    "learning_rate_too_low",
    "lr_range",
    "overfitting",
    "batch_label_skew",
    "overfit_check_skipped",
)

# Codes that mean "this training run did not learn".
FAILURE_CODES = frozenset(
    {"nan_loss", "loss_at_chance", "single_class_collapse", "majority_class_only", "loss_frozen", "cannot_overfit_batch"}
)
_STUCK = frozenset({"loss_at_chance", "single_class_collapse", "majority_class_only", "loss_frozen",
                    "class_never_predicted", "cannot_overfit_batch"})
# root cause -> the symptoms it explains; a root cause that explains a critical symptom
# present in the same diagnosis becomes critical itself and is listed first
EXPLAINS: dict[str, frozenset[str]] = {
    "labels_out_of_range": FAILURE_CODES,
    "output_units_mismatch": FAILURE_CODES,
    "bad_output_activation": _STUCK | {"nan_loss", "dead_relu"},
    "unnormalized_input": _STUCK | {"nan_loss", "initial_loss_high", "dead_relu", "learning_rate_too_high"},
    "learning_rate_too_high": _STUCK | {"nan_loss", "dead_relu", "val_loss_unstable"},
    "initial_loss_high": frozenset({"nan_loss", "cannot_overfit_batch", "single_class_collapse"}),
    "dead_relu": frozenset({"loss_frozen", "loss_at_chance", "single_class_collapse", "majority_class_only"}),
}
ROOT_CAUSE_CODES = frozenset(EXPLAINS)


def _number(value: Any) -> float | int | None:
    """A JSON-safe number: numpy scalars become Python numbers, NaN/inf become None."""
    if value is None:
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return int(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, 6)


class Finding(BaseModel):
    """One finding: a stable code, a severity, the measured numbers and one actionable sentence.

    Extra keys (e.g. example image paths another stage attaches) are kept as they are.
    """

    model_config = ConfigDict(extra="allow")

    code: str
    severity: Severity
    evidence: dict[str, float | int | None] = {}
    advice: str
    layer: str | None = None

    @field_validator("evidence", mode="before")
    @classmethod
    def _json_safe(cls, value: Mapping[str, Any]) -> dict[str, float | int | None]:
        return {str(k): _number(v) for k, v in dict(value).items()}

    def as_dict(self) -> dict[str, Any]:
        """The finding as the JSON-able dict of ``diagnosis.json`` (no ``layer`` key when None)."""
        return self.model_dump(exclude_none=False, exclude={"layer"} if self.layer is None else set())


class Diagnosis(BaseModel):
    """``diagnosis.json``: healthy means no critical finding."""

    model_config = ConfigDict(extra="allow")

    healthy: bool
    findings: list[Finding]


def make_finding(
    code: str, severity: str, evidence: Mapping[str, Any], advice: str, layer: str | None = None
) -> dict[str, Any]:
    """Build one finding dict with JSON-safe evidence numbers.

    Args:
        code: stable identifier such as ``nan_loss``.
        severity: ``critical``, ``warning`` or ``info``.
        evidence: the measured numbers the finding rests on (non-finite values become null).
        advice: one sentence a person can act on, naming the layer and the fix.
        layer: the layer concerned, if any.

    Returns:
        The finding: ``{"code", "severity", "evidence", "advice"}`` (+ ``"layer"``).

    Raises:
        ValueError: an unknown severity.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"finding {code!r}: severity must be one of {SEVERITIES}, got {severity!r}")
    return Finding(code=code, severity=severity, evidence=evidence, advice=advice, layer=layer).as_dict()


def chance_loss(num_classes: int) -> float:
    """Cross-entropy of a uniform guess over ``num_classes`` classes: ln(K)."""
    return math.log(max(int(num_classes), 2))


def lr_range_finding(
    suggested_lr: float,
    min_loss_lr: float,
    current_lr: float | None = None,
    optimizer: str | None = None,
    **evidence: float,
) -> dict[str, Any]:
    """The ``lr_range`` finding a learning-rate range test (LR finder) reports.

    Args:
        suggested_lr: the rate the finder recommends (typically ~1/10 of ``min_loss_lr``,
            or the steepest descent of the loss).
        min_loss_lr: the rate at which the smoothed loss was lowest.
        current_lr: the configured learning rate, to compare against.
        optimizer: the optimizer the range test ran with (named in the advice).
        **evidence: more numbers of the test (``min_lr``, ``max_lr``, ``steps``, ``min_loss``...).

    Returns:
        An ``info`` finding, or a ``warning`` when the configured rate is more than 10x away
        from the suggestion.
    """
    numbers: dict[str, Any] = {"suggested_lr": suggested_lr, "min_loss_lr": min_loss_lr, **evidence}
    with_opt = f" with {optimizer}" if optimizer else ""
    advice = (f"the learning-rate range test{with_opt} found the loss lowest at {min_loss_lr:.3g}; "
              f"train with a learning rate of about {suggested_lr:.3g}")
    severity = "info"
    if current_lr is not None and current_lr > 0 and suggested_lr > 0:
        numbers["learning_rate"] = current_lr
        numbers["ratio_to_suggested"] = current_lr / suggested_lr
        if not 0.1 <= current_lr / suggested_lr <= 10:
            severity = "warning"
            advice += f" (the configured {current_lr:.3g} is {_times(current_lr / suggested_lr)} that)"
    return make_finding("lr_range", severity, numbers, advice)


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 1 else f"1/{1 / ratio:.0f} of"


# --------------------------------------------------------------------------- diagnosis


def _sort_key(finding: Mapping[str, Any]) -> tuple[int, int, str]:
    code = finding["code"]
    rank = CODE_ORDER.index(code) if code in CODE_ORDER else len(CODE_ORDER)
    return SEVERITIES.index(finding["severity"]), rank, str(finding.get("layer") or "")


def diagnose(findings: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge findings into a diagnosis: deduplicated, most severe first, the root cause first.

    Findings with the same code and layer are merged (the most severe wins; on a tie the
    later one, which has the newer evidence). A root cause (``unnormalized_input``,
    ``learning_rate_too_high``, ``bad_output_activation``... see :data:`EXPLAINS`) that
    explains a critical symptom present (``nan_loss``, ``single_class_collapse``...) becomes
    critical, with ``evidence.training_failed = 1``, and ranks above the symptom; where
    training worked it stays a warning.

    Args:
        findings: finding dicts from preflight, the monitor or :func:`lr_range_finding`.

    Returns:
        ``{"healthy": bool, "findings": [...]}``; healthy means no critical finding.
    """
    merged: dict[tuple[str, str | None], dict[str, Any]] = {}
    for finding in findings:
        finding = Finding.model_validate(dict(finding)).as_dict()
        key = (finding["code"], finding.get("layer"))
        old = merged.get(key)
        if old is None or SEVERITIES.index(finding["severity"]) <= SEVERITIES.index(old["severity"]):
            merged[key] = finding
    critical_symptoms = {f["code"] for f in merged.values() if f["severity"] == "critical"}
    for f in merged.values():
        explained = EXPLAINS.get(f["code"], frozenset()) & critical_symptoms
        if f["severity"] != "critical" and explained:
            f["severity"] = "critical"
            f["evidence"]["training_failed"] = 1
            f["advice"] = "likely root cause of the failed training: " + f["advice"]
    ordered = sorted(merged.values(), key=_sort_key)
    return {"healthy": not any(f["severity"] == "critical" for f in ordered), "findings": ordered}


def root_cause(diagnosis: Mapping[str, Any]) -> dict[str, Any] | None:
    """The finding to name first: the top-ranked critical one (None when healthy and empty)."""
    findings = list(diagnosis.get("findings") or [])
    critical = [f for f in findings if f.get("severity") == "critical"]
    if critical:
        return critical[0]
    return findings[0] if findings and not diagnosis.get("healthy", True) else None


def diverged(diagnosis: Mapping[str, Any]) -> bool:
    """Whether the run's loss became NaN/inf (its weights cannot be evaluated)."""
    return any(f.get("code") == "nan_loss" and f.get("severity") == "critical" for f in diagnosis.get("findings") or [])


def summary_lines(diagnosis: Mapping[str, Any], limit: int = 3) -> list[str]:
    """The top findings as one line each (``CRITICAL nan_loss: advice``), for a terminal."""
    return [f"{f['severity'].upper()} {f['code']}: {f['advice']}" for f in list(diagnosis.get("findings", []))[:limit]]


def _format_number(value: Any) -> str:
    if value is None:
        return "nan"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def findings_markdown(diagnosis: Mapping[str, Any]) -> str:
    """A Markdown section for the run report and the Prefect artifact."""
    findings = list(diagnosis.get("findings", []))
    counts = {s: sum(1 for f in findings if f["severity"] == s) for s in SEVERITIES}
    status = "healthy" if diagnosis.get("healthy", True) else "**unhealthy**"
    lines = [
        "## Training diagnosis",
        "",
        f"Status: {status} ({counts['critical']} critical, {counts['warning']} warning, {counts['info']} info)",
        "",
    ]
    if not findings:
        lines.append("No problems found: inputs, output layer and loss curve look right.")
        return "\n".join(lines) + "\n"
    cause = root_cause(diagnosis)
    if cause is not None and cause["severity"] == "critical":
        lines += [f"Most likely reason: `{cause['code']}` — {cause['advice']}", ""]
    lines += ["| severity | code | evidence | advice |", "|---|---|---|---|"]
    for f in findings:
        evidence = ", ".join(f"{k}={_format_number(v)}" for k, v in f.get("evidence", {}).items())
        advice = str(f.get("advice", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {f['severity']} | `{f['code']}` | {evidence} | {advice} |")
    return "\n".join(lines) + "\n"


def write_diagnosis(path: Path | str, diagnosis: Mapping[str, Any]) -> Path:
    """Write ``diagnosis.json`` atomically (``{"healthy", "findings"}``) and return its path."""
    checked = Diagnosis.model_validate({"healthy": bool(diagnosis["healthy"]), "findings": list(diagnosis["findings"])})
    return write_json(path, {"healthy": checked.healthy, "findings": [f.as_dict() for f in checked.findings]})


def read_diagnosis(path: Path | str) -> dict[str, Any]:
    """Read and validate ``diagnosis.json``.

    Raises:
        pydantic.ValidationError: the file does not hold a diagnosis.
    """
    checked = Diagnosis.model_validate(read_json(path))
    return {"healthy": checked.healthy, "findings": [f.as_dict() for f in checked.findings]}
