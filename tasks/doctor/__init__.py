"""Training doctor: preflight checks, training monitors and a diagnosis in words and numbers.

The classic failure this package exists for: a CNN on a 3-class folder dataset "stuck at
33.33% accuracy, predicting only one class". The usual root causes are raw 0-255 pixels
reaching the first conv/dense layer (exploding activations, NaN loss with SGD), an output
layer whose activation does not produce probabilities, a learning rate far too high, or an
output layer with the wrong number of units. Each check measures something on real data
and reports the numbers (``evidence``) with advice built from what the model has.

Modules:
    findings   the finding schema, ranking (root cause first), diagnosis, summaries (pure)
    facts      what a model and run have, and the advice pieces built from that (pure)
    rules      per-epoch rules ``rule(records, thresholds) -> Finding | None`` (pure)
    checks     preflight: static checks of a model on one batch; reads a model's facts (Keras)
               (not named preflight.py: the package exports the function `preflight`)
    monitor    ``DoctorMonitor``, the Keras callback that gathers records and applies the rules
    probe      ``probe_batch``
    run        ``check_model`` / ``run_doctor``: preflight plus a short probe training

Importing this package does not import Keras: the Keras-bound names are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from imgflow.tasks.doctor.facts import RunFacts
from imgflow.tasks.doctor.findings import (
    CODE_ORDER,
    EXPLAINS,
    FAILURE_CODES,
    ROOT_CAUSE_CODES,
    SEVERITIES,
    Diagnosis,
    Finding,
    chance_loss,
    diagnose,
    diverged,
    findings_markdown,
    lr_range_finding,
    make_finding,
    read_diagnosis,
    root_cause,
    summary_lines,
    write_diagnosis,
)
from imgflow.tasks.doctor.rules import Thresholds

_LAZY = {
    "preflight": "imgflow.tasks.doctor.checks",
    "model_facts": "imgflow.tasks.doctor.checks",
    "check_input_range": "imgflow.tasks.doctor.checks",
    "check_output_layer": "imgflow.tasks.doctor.checks",
    "check_initial_loss": "imgflow.tasks.doctor.checks",
    "check_labels": "imgflow.tasks.doctor.checks",
    "check_overfit_batch": "imgflow.tasks.doctor.checks",
    "DoctorMonitor": "imgflow.tasks.doctor.monitor",
    "probe_batch": "imgflow.tasks.doctor.probe",
    "run_doctor": "imgflow.tasks.doctor.run",
    "check_model": "imgflow.tasks.doctor.run",
}

__all__ = [
    "CODE_ORDER", "EXPLAINS", "FAILURE_CODES", "ROOT_CAUSE_CODES", "SEVERITIES", "Diagnosis", "Finding", "RunFacts",
    "Thresholds", "chance_loss", "diagnose", "diverged", "findings_markdown", "lr_range_finding", "make_finding",
    "read_diagnosis", "root_cause", "summary_lines", "write_diagnosis", *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Load the Keras-bound names (``preflight``, ``DoctorMonitor``, ``check_model``...) on first use."""
    module = _LAZY.get(name)
    if module is None:
        if name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        # the helpers the single-module doctor had (``_has_rescaling``, ``check_*``...) live in checks
        checks = importlib.import_module("imgflow.tasks.doctor.checks")
        if not hasattr(checks, name):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        module = checks.__name__
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
