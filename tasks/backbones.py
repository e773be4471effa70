"""Pretrained backbone weights: ``weights: imagenet`` through the Keras cache, or a local file.

``keras.applications`` downloads ImageNet weights into ``$KERAS_HOME/models`` (default
``~/.keras/models``) the first time and reads them from there afterwards. imgflow looks
in that cache itself first, so a machine without network trains from a file placed
there by hand; when the file is missing it downloads it once (the same URL and checksum
Keras uses), and when that fails it says in one line which file to place where.

The file names and checksums are those of Keras 3 (``keras/src/applications/
efficientnet_v2.py``, ``mobilenet_v3.py``, ``resnet.py``) for the headless models
(``include_top=False``) imgflow builds: EfficientNetV2B0, MobileNetV3Small (alpha 1.0,
not minimalistic) and ResNet50. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import NamedTuple

from imgflow.tasks.errors import UsageError

IMAGENET = "imagenet"
_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
# seconds a download may wait on the network before it counts as "no network"
DOWNLOAD_TIMEOUT_S = 30.0


class WeightsFile(NamedTuple):
    """Where Keras gets one backbone's headless ImageNet weights."""

    file_name: str
    url: str
    md5: str


# headless (include_top=False) ImageNet weights of the built-in backbones
IMAGENET_WEIGHTS: dict[str, WeightsFile] = {
    "efficientnetv2b0": WeightsFile(
        "efficientnetv2-b0_notop.h5", _BASE + "efficientnet_v2/efficientnetv2-b0_notop.h5",
        "893217f2bb855e2983157299931e43ff"),
    "mobilenetv3small": WeightsFile(
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        _BASE + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "resnet50": WeightsFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626"),
}


class WeightsUnavailable(UsageError, ValueError):
    """Pretrained weights that cannot be found or downloaded (exit 2; the message says where to put them)."""


def keras_cache_dir() -> Path:
    """The folder Keras keeps downloaded model weights in: ``$KERAS_HOME/models`` or ``~/.keras/models``.

    Read from the environment at call time (Keras itself reads ``KERAS_HOME`` once, when
    it is imported); like Keras, an unwritable home falls back to ``/tmp/.keras``.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    if os.path.isdir(home) and not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def is_imagenet(weights: str | None) -> bool:
    """Whether ``weights`` asks for the ImageNet weights (``imagenet``, any case)."""
    return isinstance(weights, str) and weights.strip().lower() == IMAGENET


def cached_weights(backbone: str) -> Path | None:
    """The cached ImageNet weights file of ``backbone`` (a canonical built-in name), or None."""
    path = keras_cache_dir() / IMAGENET_WEIGHTS[backbone].file_name
    return path if path.is_file() and path.stat().st_size > 0 else None


def unavailable_message(backbone: str, reason: str) -> str:
    """The one line for weights that are neither cached nor downloadable; pure."""
    entry = IMAGENET_WEIGHTS[backbone]
    return (f"weights: cannot download {entry.file_name} ({reason}); place it in {keras_cache_dir()}/ "
            f"(from {entry.url}) and run again, or give --weights FILE")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if any(s in lowered for s in ("name or service not known", "temporary failure in name resolution",
                                   "network is unreachable", "no address associated", "nodename nor servname",
                                   "connection refused", "timed out", "timeout")):
        return "no network"
    return text[:160] or type(exc).__name__


def _check_network(backbone: str, url: str) -> None:
    """Fail fast, before Keras is imported or prints "Downloading", when the weights host is unreachable.

    Skipped behind an HTTPS proxy (urllib goes through it; a direct connection would not).
    """
    import urllib.parse
    import urllib.request

    if urllib.request.getproxies().get("https"):
        return
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=DOWNLOAD_TIMEOUT_S).close()
    except OSError as exc:  # socket.gaierror (no DNS), a refused or timed-out connection
        raise WeightsUnavailable(unavailable_message(backbone, _reason(exc))) from None


def imagenet_weights_path(backbone: str) -> Path:
    """The local file of ``backbone``'s ImageNet weights: from the Keras cache, else downloaded into it.

    Args:
        backbone: ``efficientnetv2b0``, ``mobilenetv3small`` or ``resnet50``.

    Returns:
        The ``.h5`` file in :func:`keras_cache_dir` (checksum-verified when downloaded).

    Raises:
        WeightsUnavailable: not cached and the download failed (no network, say); the one-line
            message names the file, the folder to place it in and the URL.
    """
    if backbone not in IMAGENET_WEIGHTS:
        raise WeightsUnavailable(
            f"weights: imagenet weights exist for {', '.join(IMAGENET_WEIGHTS)}, not {backbone!r}")
    cached = cached_weights(backbone)
    if cached is not None:
        return cached
    entry = IMAGENET_WEIGHTS[backbone]
    folder = keras_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsUnavailable(unavailable_message(backbone, f"cannot create the folder: {exc.strerror}")) from None
    _check_network(backbone, entry.url)
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urlretrieve has no timeout of its own
    try:
        path = keras.utils.get_file(entry.file_name, entry.url, cache_subdir="models",
                                    cache_dir=str(folder.parent), file_hash=entry.md5)
    except Exception as exc:  # noqa: BLE001 - Keras wraps every download failure in a bare Exception
        raise WeightsUnavailable(unavailable_message(backbone, _reason(exc))) from None
    finally:
        socket.setdefaulttimeout(previous)
    return Path(path)


def resolve_weights(backbone: str, weights: str | None) -> str | None:
    """The weights file to load into ``backbone``: None, a local file, or the cached ImageNet file.

    A path is returned unchanged (the model builder checks that it is a file).

    Raises:
        WeightsUnavailable: ``imagenet`` weights that are not cached and cannot be downloaded.
    """
    if weights is None:
        return None
    if is_imagenet(weights):
        return str(imagenet_weights_path(backbone))
    return weights


def ensure_weights(model: str, weights: str | None) -> None:
    """Check ``weights`` before any work: ``imagenet`` is cached (or downloaded now), a path is a file.

    Light: imports Keras only to download. The model builder resolves the weights again
    (from the cache, at no cost) for flows started without the command line.

    Args:
        model: the ``model`` option (any spelling of a built-in name, or ``module:function``).
        weights: the ``weights`` option.

    Raises:
        WeightsUnavailable: imagenet weights for a model that has none, or neither cached nor
            downloadable; a weights path that is not a file.
    """
    if weights is None:
        return
    canonical = model.strip().lower().replace("-", "").replace("_", "")
    if canonical not in IMAGENET_WEIGHTS:
        raise WeightsUnavailable(
            f"weights: only the keras.applications backbones {', '.join(IMAGENET_WEIGHTS)} take imagenet or a "
            f"weights file, not --model {model}")
    if is_imagenet(weights):
        imagenet_weights_path(canonical)
    elif not Path(weights).is_file():
        raise WeightsUnavailable(f"weights: expected imagenet or a local weights file, found no file at {weights}")
