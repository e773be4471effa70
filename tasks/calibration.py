"""Temperature scaling: calibrated class probabilities from a model's logits.

One scalar ``T`` divides the logits before the softmax. It is fitted on the
validation split by minimising the negative log-likelihood (Guo et al. 2017,
"On Calibration of Modern Neural Networks"); the arg-max, so the predicted label,
never changes. Pure NumPy, no TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

#: the temperature is searched in [1/T_RANGE, T_RANGE]
T_RANGE = 100.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.size == 0:
        return z.reshape(z.shape)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the validation NLL (1.0 when there is nothing to fit).

    Args:
        logits: pre-softmax scores, shape [N, K].
        labels: true class indices, shape [N].

    Returns:
        ``T`` in ``[1/T_RANGE, T_RANGE]``; 1.0 for an empty set, a single class,
        non-finite logits, or a set the model gets entirely right (the NLL then falls
        without bound as T shrinks: the data cannot say how sharp to be).
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or logits.ndim != 2 or logits.shape[1] < 2 or not np.isfinite(logits).all():
        return 1.0
    if (logits.argmax(axis=1) == labels).all():
        return 1.0
    # search log T: the NLL is smooth and unimodal in it for all practical purposes
    log_t = golden_section_minimum(lambda value: nll(logits, labels, float(np.exp(value))),
                                   -np.log(T_RANGE), np.log(T_RANGE), tolerance=1e-4)
    temperature = float(np.exp(log_t))
    # never worse than no scaling on the very set it was fitted on
    return temperature if nll(logits, labels, temperature) <= nll(logits, labels, 1.0) else 1.0


def golden_section_minimum(f: Callable[[float], float], low: float, high: float, tolerance: float) -> float:
    """Where the unimodal ``f`` is lowest in ``[low, high]``, to within ``tolerance`` (golden-section search).

    ~25 calls of ``f`` for the temperature's range; SciPy's bounded minimiser would do as
    well, but importing ``scipy.optimize`` costs a training run ~0.3 s.
    """
    shrink = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = float(low), float(high)
    c, d = b - shrink * (b - a), a + shrink * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tolerance:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - shrink * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + shrink * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def calibration_summary(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, Any]:
    """ECE and NLL before and after temperature scaling, for ``metrics.json``.

    Returns:
        ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after", "count"}``.
    """
    from imgflow.tasks.metrics import expected_calibration_error

    labels = np.asarray(labels, dtype=np.int64)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": round(float(temperature), 6),
        "ece_before": round(expected_calibration_error(labels, before), 6),
        "ece_after": round(expected_calibration_error(labels, after), 6),
        "nll_before": round(nll(logits, labels), 6) if len(labels) else None,
        "nll_after": round(nll(logits, labels, temperature), 6) if len(labels) else None,
        "count": int(len(labels)),
    }


__all__ = ["calibration_summary", "fit_temperature", "nll", "softmax"]
