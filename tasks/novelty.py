"""Novelty statistics: how unlike the training data an image is, from the model's own features.

The model's last layer is a ``Dense`` head; its *input* (the penultimate features) and
its *logits* (``features @ W + b``) come out of the same forward pass as the class
probabilities: :func:`two_output_model` wraps the trained model as a Keras model with
two outputs, so prediction stays one pass and temperature scaling needs no second one.

Scores (higher = less like the training data), chosen by measurement in
``bench/novelty.py`` (see ``bench/RESULTS.md``):

* ``mahalanobis`` (the default): class-conditional Gaussians with one tied covariance
  fitted on the training split's features, shrunk with Ledoit-Wolf (Lee et al. 2018);
  the score is the squared distance to the nearest class mean divided by the feature
  dimension. Features wider than :data:`MAX_DIM` are first projected on their leading
  principal components.
* ``energy``: minus the log-sum-exp of the logits (Liu et al. 2020).
* ``combined``: the sum of both, each standardised on the validation split.

The ``unknown`` threshold is the ``1 - unknown_rate`` quantile of the validation
split's scores, so about ``unknown_rate`` of images like the validation images are
flagged. Everything is stored in the model directory: ``novelty.npz`` (arrays) and the
``novelty`` / ``calibration`` keys of ``metadata.json``.

Backfill an existing model directory (uses the shards named in its metadata)::

    python -m imgflow.tasks.novelty MODEL_DIR [--manifest manifest.json] [--unknown-rate 0.05]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imgflow.tasks.atomic import atomic_path
from imgflow.tasks.calibration import calibration_summary, fit_temperature, softmax

log = logging.getLogger(__name__)

NOVELTY_FILE = "novelty.npz"
DEFAULT_UNKNOWN_RATE = 0.05
DEFAULT_METHOD = "mahalanobis"
METHODS = ("mahalanobis", "energy", "combined")
#: wider penultimate features are projected on this many principal components first
MAX_DIM = 512
#: training images used for the class means and covariance (a random subset beyond this)
MAX_FIT_IMAGES = 20000


class NoveltyError(ValueError):
    """Novelty statistics cannot be fitted or used (names the model directory and the fix)."""


# ------------------------------------------------------------------------ the model


def dense_head(model: Any) -> Any | None:
    """The model's last layer when it is a ``Dense`` with a softmax or linear activation, else None."""
    import keras

    layer = model.layers[-1] if model.layers else None
    if not isinstance(layer, keras.layers.Dense):
        return None
    activation = getattr(layer.activation, "__name__", str(layer.activation))
    return layer if activation in ("softmax", "linear") else None


def two_output_model(model: Any) -> Any:
    """``model`` with two outputs: its class outputs and the features its ``Dense`` head reads.

    Raises:
        NoveltyError: the last layer is not a ``Dense`` softmax/linear head.
    """
    import keras

    head = dense_head(model)
    if head is None:
        raise NoveltyError(
            f"model {model.name}: novelty needs a last layer that is a Dense softmax (or linear) head, "
            f"found {type(model.layers[-1]).__name__ if model.layers else 'no layers'}"
        )
    return keras.Model(model.inputs, [model.outputs[0], head.input], name=f"{model.name}_with_features")


def head_weights(model: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(W, b)`` of the Dense head as float64 arrays, or None without one."""
    head = dense_head(model)
    if head is None:
        return None
    kernel = np.asarray(head.kernel.numpy(), dtype=np.float64)
    bias = np.asarray(head.bias.numpy(), dtype=np.float64) if head.use_bias else np.zeros(kernel.shape[1])
    return kernel, bias


def split_outputs(raw: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(outputs, features)`` of one call of a predictor; a one-output model (no Dense head)
    gives its log-probabilities as features."""
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        return np.asarray(raw[0]).reshape(count, -1), np.asarray(raw[1]).reshape(count, -1)
    outputs = np.asarray(raw[0] if isinstance(raw, (list, tuple)) else raw).reshape(count, -1)
    return outputs, np.log(np.clip(outputs.astype(np.float64), 1e-12, None))


def extract(predictor: Any, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(outputs, features)`` of a :func:`two_output_model` (or a plain model) over in-memory images."""
    from imgflow.tasks.inference import predict_outputs

    return split_outputs(predict_outputs(predictor, np.asarray(images, dtype=np.float32), batch_size), len(images))


def extract_batches(predictor: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(outputs, features, labels)`` over ``(images, labels)`` batches."""
    outs, feats, labels = [], [], []
    for images, batch_labels in batches:
        if len(images) == 0:
            continue
        o, f = extract(predictor, images, batch_size)
        outs.append(o)
        feats.append(f)
        labels.append(np.asarray(batch_labels, dtype=np.int64))
    if not outs:
        return np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return np.concatenate(outs), np.concatenate(feats), np.concatenate(labels)


# ------------------------------------------------------------------------ scoring


def logits_of(features: np.ndarray, outputs: np.ndarray, weights: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Logits from the head weights (exact), else the log of the output probabilities (equal up to a constant)."""
    if weights is not None:
        return np.asarray(features, dtype=np.float64) @ weights[0] + weights[1]
    return np.log(np.clip(np.asarray(outputs, dtype=np.float64), 1e-12, None))


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Minus the log-sum-exp of the logits: higher = less like the training data."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


def mahalanobis_score(features: np.ndarray, whiten: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean, per feature dimension.

    Args:
        features: [N, D] penultimate features.
        whiten: [D, k] matrix with ``||(x - m) @ whiten||^2`` the tied-covariance distance.
        means: [C, k] class means, already multiplied by ``whiten``.
    """
    z = np.asarray(features, dtype=np.float64) @ whiten
    d = (z * z).sum(axis=1)[:, None] - 2.0 * z @ means.T + (means * means).sum(axis=1)[None, :]
    return np.maximum(d.min(axis=1), 0.0) / whiten.shape[1]


def ledoit_wolf_covariance(centred: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk covariance of rows already centred, in NumPy.

    The same figures as scikit-learn's ``LedoitWolf(assume_centered=True).fit(x).covariance_``
    (its formula, without the blocks), without importing scikit-learn and SciPy's
    statistics (~1 s) in a training run that needs nothing else of them.
    """
    x = np.asarray(centred, dtype=np.float64)
    n, d = x.shape
    if d == 1:
        return np.atleast_2d((x**2).mean())
    gram = x.T @ x
    squares = x * x
    variances = squares.sum(axis=0) / n
    mu = variances.sum() / d
    delta_ = (gram**2).sum() / n**2  # squared entries of the empirical covariance, summed
    beta = ((squares.T @ squares).sum() / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * variances.sum() + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    covariance = (1.0 - shrinkage) * (gram / n)
    covariance.flat[:: d + 1] += shrinkage * mu
    return covariance


def fit_gaussians(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class means and a whitening matrix of one tied, Ledoit-Wolf-shrunk covariance.

    Returns:
        ``(whiten [D, k], whitened means [C, k])`` for :func:`mahalanobis_score`.

    Raises:
        NoveltyError: fewer than two images, a class without images, or features that are not finite.
    """
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    classes = np.unique(labels)
    if len(x) < 2 or len(classes) < 1:
        raise NoveltyError(f"novelty: expected at least 2 training images with features, found {len(x)}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise NoveltyError(f"novelty: the features of {bad} of {len(x)} training images are not finite "
                           "(NaN or inf: a diverged model?); no statistics fitted")
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    projection = np.eye(x.shape[1])
    if x.shape[1] > MAX_DIM:  # a Flatten head: keep the leading directions of the within-class spread
        _, _, vt = np.linalg.svd(centred - centred.mean(axis=0), full_matrices=False)
        projection = vt[:MAX_DIM].T
        centred = centred @ projection
    covariance = ledoit_wolf_covariance(centred)
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, max(float(values.max()), 1e-12) * 1e-9)
    whiten = projection @ (vectors / np.sqrt(values))
    return whiten, means @ whiten


class NoveltyModel:
    """Fitted statistics: scores features/logits, calibrates probabilities, flags unknowns."""

    def __init__(self, arrays: dict[str, np.ndarray], info: dict[str, Any]):
        self.arrays = arrays
        self.info = info
        self.method = str(info.get("method", DEFAULT_METHOD))
        self.threshold = float(info["threshold"])
        self.temperature = float(info.get("temperature", 1.0))
        self._predictors: dict[int, Any] = {}
        self._lock = threading.Lock()

    @property
    def weights(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The head's ``(W, b)`` when the model has a Dense head."""
        return (self.arrays["kernel"], self.arrays["bias"]) if "kernel" in self.arrays else None

    def raw_scores(self, features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Every score this model has statistics for, by method name."""
        # without head weights the "logits" are log-probabilities, whose log-sum-exp is 0:
        # minus the top log-probability (the max-softmax score) stands in for the energy
        scores = {"energy": energy_score(logits) if self.weights is not None else -np.asarray(logits).max(axis=1)}
        if "whiten" in self.arrays:
            scores["mahalanobis"] = mahalanobis_score(features, self.arrays["whiten"], self.arrays["means"])
            if "combo_center" in self.arrays:
                c, s = self.arrays["combo_center"], self.arrays["combo_scale"]
                scores["combined"] = (scores["mahalanobis"] - c[0]) / s[0] + (scores["energy"] - c[1]) / s[1]
        return scores

    def score(self, features: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(calibrated probabilities [N, K], novelty [N], unknown [N] bool)`` of one batch."""
        logits = logits_of(features, outputs, self.weights)
        novelty = self.raw_scores(features, logits)[self.method]
        return softmax(logits, self.temperature), novelty, novelty > self.threshold

    def predictor(self, model: Any) -> Any:
        """The two-output model of ``model`` (built once per model object); ``model`` itself without a Dense head."""
        with self._lock:
            if id(model) not in self._predictors:
                self._predictors[id(model)] = two_output_model(model) if dense_head(model) is not None else model
            return self._predictors[id(model)]


def fit_novelty(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_outputs: np.ndarray,
    val_labels: np.ndarray,
    weights: tuple[np.ndarray, np.ndarray] | None,
    unknown_rate: float = DEFAULT_UNKNOWN_RATE,
    method: str = DEFAULT_METHOD,
) -> NoveltyModel:
    """Fit the class Gaussians on training features, the temperature and the threshold on validation.

    Args:
        train_features: [N, D] penultimate features of training images.
        train_labels: their class indices.
        val_features: [M, D] features of validation images.
        val_outputs: [M, K] the model's outputs on them.
        val_labels: their class indices.
        weights: the head's ``(W, b)`` (None: logits are taken as log probabilities).
        unknown_rate: share of validation images to flag as unknown (0 < rate < 1).
        method: ``mahalanobis``, ``energy`` or ``combined``.

    Raises:
        NoveltyError: an option out of range, or no validation image.
    """
    if not 0.0 < unknown_rate < 1.0:
        raise NoveltyError(f"unknown_rate: expected a share between 0 and 1 (e.g. 0.05), found {unknown_rate!r}")
    if method not in METHODS:
        raise NoveltyError(f"novelty method: expected one of {', '.join(METHODS)}, found {method!r}")
    if len(val_labels) == 0:
        raise NoveltyError("novelty: the threshold is calibrated on validation images, found none")
    arrays: dict[str, np.ndarray] = {}
    if weights is not None:
        arrays["kernel"], arrays["bias"] = weights
    if method != "energy":
        arrays["whiten"], arrays["means"] = fit_gaussians(train_features, train_labels)
    val_logits = logits_of(val_features, val_outputs, weights)
    temperature = fit_temperature(val_logits, val_labels)
    probe = NoveltyModel(arrays, {"method": "energy", "threshold": 0.0})
    raw = probe.raw_scores(val_features, val_logits)
    if method == "combined":
        arrays["combo_center"] = np.array([np.median(raw["mahalanobis"]), np.median(raw["energy"])])
        spread = [np.subtract(*np.percentile(raw[k], [75, 25])) for k in ("mahalanobis", "energy")]
        arrays["combo_scale"] = np.array([max(float(s), 1e-9) for s in spread])
        raw = NoveltyModel(arrays, {"method": "energy", "threshold": 0.0}).raw_scores(val_features, val_logits)
    scores = raw[method]
    threshold = float(np.quantile(scores, 1.0 - unknown_rate, method="higher")) if len(scores) > 1 else float(scores.max())
    info = {
        "method": method,
        "threshold": threshold,
        "unknown_rate": float(unknown_rate),
        "temperature": temperature,
        "feature_dim": int(np.asarray(val_features).shape[1]),
        "train_count": int(len(train_labels)),
        "val_count": int(len(val_labels)),
        "val_unknown_share": round(float((scores > threshold).mean()), 6),
        "val_quantiles": {q: round(float(np.quantile(scores, float(q))), 6) for q in ("0.5", "0.9", "0.95", "0.99")},
        "calibration": calibration_summary(val_logits, val_labels, temperature),
    }
    return NoveltyModel(arrays, info)


# ------------------------------------------------------------------------ storage


def save(model_dir: Path | str, novelty: NoveltyModel) -> Path:
    """Write ``novelty.npz`` atomically and record ``novelty``/``calibration`` in ``metadata.json``."""
    from imgflow.tasks import registry

    model_dir = Path(model_dir)
    target = model_dir / NOVELTY_FILE
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a bare name
            np.savez(handle, **novelty.arrays)
    metadata = registry.read_metadata(model_dir)
    metadata.update(metadata_keys(novelty))
    registry.write_metadata(model_dir, metadata)
    return target


def metadata_keys(novelty: NoveltyModel) -> dict[str, Any]:
    """The ``novelty`` and ``calibration`` keys of ``metadata.json``."""
    info = dict(novelty.info)
    calibration = info.pop("calibration", {"temperature": novelty.temperature})
    info.pop("temperature", None)
    return {"novelty": {**info, "file": NOVELTY_FILE}, "calibration": calibration}


def load(model_dir: Path | str, metadata: dict[str, Any] | None = None) -> NoveltyModel | None:
    """The fitted statistics of a model directory, or None when it has none (an older model)."""
    from imgflow.tasks import registry

    model_dir = Path(model_dir)
    path = model_dir / NOVELTY_FILE
    metadata = metadata if metadata is not None else registry.read_metadata(model_dir)
    if not path.is_file() or "novelty" not in metadata:
        return None
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    info = dict(metadata["novelty"])
    info["temperature"] = float((metadata.get("calibration") or {}).get("temperature", 1.0))
    return NoveltyModel(arrays, info)


_CACHE: dict[tuple[str, int], NoveltyModel | None] = {}
_CACHE_LOCK = threading.Lock()


def load_cached(model_dir: Path | str) -> NoveltyModel | None:
    """:func:`load`, once per process and ``novelty.npz`` version."""
    model_dir = Path(model_dir).resolve()
    path = model_dir / NOVELTY_FILE
    key = (str(model_dir), path.stat().st_mtime_ns if path.is_file() else 0)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load(model_dir)
        return _CACHE[key]


# ------------------------------------------------------------------------ fitting a model directory


def _subsample(batches: Iterable[tuple[np.ndarray, np.ndarray]], limit: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    seen = 0
    for images, labels in batches:
        if seen >= limit:
            break
        take = min(len(images), limit - seen)
        seen += take
        yield images[:take], labels[:take]


def fit_model_dir(
    model_dir: Path | str,
    train_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    val_batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    unknown_rate: float = DEFAULT_UNKNOWN_RATE,
    method: str = DEFAULT_METHOD,
    model: Any = None,
) -> dict[str, Any]:
    """Fit novelty statistics and the temperature of a model directory and store them there.

    Args:
        model_dir: holds ``model.keras`` and ``metadata.json``.
        train_batches: returns ``(uint8 images, labels)`` batches of the training split.
        val_batches: the same for the validation split.
        unknown_rate: share of validation images to flag as unknown.
        method: see :data:`METHODS`.
        model: the loaded Keras model (loaded from ``model_dir`` when None).

    Returns:
        The ``novelty`` and ``calibration`` metadata keys that were written.
    """
    from imgflow.tasks import registry

    if model is None:
        model, _ = registry.load_model_dir(Path(model_dir))
    if dense_head(model) is None:
        method = "energy"  # no penultimate features to fit Gaussians on: the top log-probability only
        predictor = model
        log.warning("%s: the last layer is not a Dense head; novelty uses the top log-probability", model_dir)
    else:
        predictor = two_output_model(model)
    _, train_features, train_labels = extract_batches(predictor, _subsample(train_batches(), MAX_FIT_IMAGES))
    val_outputs, val_features, val_labels = extract_batches(predictor, val_batches())
    fitted = fit_novelty(train_features, train_labels, val_features, val_outputs, val_labels,
                         head_weights(model), unknown_rate, method)
    save(model_dir, fitted)
    return metadata_keys(fitted)


def manifest_batches(manifest_path: Path | str, split: str, batch_size: int = 64) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """A callable yielding ``(uint8 images, labels)`` of a shard split, in deterministic order."""
    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from imgflow.tasks.tfrecords import make_dataset

        for images, labels in make_dataset(manifest_path, split, batch_size, training=False).as_numpy_iterator():
            yield np.asarray(images), np.asarray(labels)
    return batches


def fit_from_manifest(model_dir: Path | str, manifest_path: Path | str | None = None,
                      unknown_rate: float = DEFAULT_UNKNOWN_RATE, method: str = DEFAULT_METHOD) -> dict[str, Any]:
    """Fit a model directory's statistics on the ``train``/``val`` shards it was trained on.

    Raises:
        NoveltyError: no manifest given and none recorded in ``metadata.json``, or a missing split.
    """
    from imgflow.tasks import registry

    metadata = registry.read_metadata(Path(model_dir))
    manifest_path = manifest_path or metadata.get("manifest")
    if not manifest_path or not Path(manifest_path).is_file():
        raise NoveltyError(
            f"{model_dir}: no shards to fit novelty statistics on (metadata 'manifest' is {metadata.get('manifest')!r}); "
            "pass --manifest <workdir>/shards/manifest.json, or run `imgflow evaluate MODEL DATA_DIR` to fit them "
            "from a class-folder dataset"
        )
    return fit_model_dir(model_dir, manifest_batches(manifest_path, "train"), manifest_batches(manifest_path, "val"),
                         unknown_rate, method)


def fit_from_arrays(model_dir: Path | str, images: np.ndarray, labels: np.ndarray,
                    unknown_rate: float = DEFAULT_UNKNOWN_RATE, method: str = DEFAULT_METHOD,
                    seed: int = 0, model: Any = None) -> dict[str, Any]:
    """Backfill from labelled images in memory: a seeded half fits the Gaussians, the other half calibrates."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    half = len(order) // 2
    fit_idx, val_idx = np.sort(order[:half]), np.sort(order[half:])
    if len(fit_idx) < 2 or len(val_idx) < 1:
        raise NoveltyError(f"{model_dir}: expected at least 3 readable images to fit novelty statistics, found {len(labels)}")
    return fit_model_dir(model_dir, lambda: [(images[fit_idx], labels[fit_idx])],
                         lambda: [(images[val_idx], labels[val_idx])], unknown_rate, method, model=model)


def main(argv: list[str] | None = None) -> int:
    """``python -m imgflow.tasks.novelty MODEL_DIR``: backfill statistics from the recorded shards."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imgflow.tasks.novelty", description=main.__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--manifest", type=Path, default=None)
    parser.add_argument("--unknown-rate", type=float, default=DEFAULT_UNKNOWN_RATE)
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    args = parser.parse_args(argv)
    try:
        keys = fit_from_manifest(args.model_dir, args.manifest, args.unknown_rate, args.method)
    except (NoveltyError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    print(f"novelty statistics written to {args.model_dir / NOVELTY_FILE}: threshold "
          f"{keys['novelty']['threshold']:.4g} ({keys['novelty']['method']}), temperature "
          f"{keys['calibration']['temperature']:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
