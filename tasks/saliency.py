"""Where the model looks: Grad-CAM on the last convolutional layer, occlusion sensitivity otherwise.

Keras and TensorFlow are imported inside the functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgflow.tasks.metrics import as_probabilities

log = logging.getLogger(__name__)

# Keras layers that transform the input but learn nothing: never a Grad-CAM target.
_PREPROCESSING_LAYERS = (
    "Rescaling", "Normalization", "Resizing", "CenterCrop", "InputLayer",
    "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast",
    "RandomBrightness", "RandomCrop", "RandomHeight", "RandomWidth", "AutoContrast",
    "RandAugment", "RandomColorJitter", "RandomGrayscale", "RandomHue", "RandomSaturation",
    "RandomSharpness", "RandomShear", "RandomPerspective", "RandomInvert", "RandomPosterization",
    "RandomErasing", "RandomGaussianBlur", "RandomElasticTransform", "Equalization", "Solarization",
    "MixUp", "CutMix", "Pipeline", "AugMix",
)


class SaliencyUnavailable(RuntimeError):
    """Grad-CAM cannot run on this model (no conv layer, no gradients on this backend)."""


def find_gradcam_layer(model: Any) -> str | None:
    """Name of the last top-level layer with a spatial 4-D output (the last conv block).

    Preprocessing and augmentation layers (Rescaling, Random*) are skipped: a map
    over the input pixels says nothing about what the network learned. Pooling and
    dropout layers are skipped too; a nested backbone (``keras.applications``) counts
    as one layer whose output is its last conv map.

    Args:
        model: a built Keras functional or sequential model.

    Returns:
        The layer name, or None when the model has no such layer.
    """
    for layer in reversed(getattr(model, "layers", [])):
        kind = type(layer).__name__
        # pooling and dropout only coarsen or mask the last conv map: explain the map itself
        if kind in _PREPROCESSING_LAYERS or "Pooling" in kind or "Dropout" in kind:
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and (shape[1] is None or shape[1] > 1) and (shape[2] is None or shape[2] > 1):
            return layer.name
    return None


def _resize_map(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    resized = np.asarray(Image.fromarray(heatmap.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR))
    low, high = float(resized.min()), float(resized.max())
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


def grad_cam(model: Any, images: np.ndarray, class_indices: Sequence[int], layer_name: str | None = None) -> np.ndarray:
    """Grad-CAM heatmaps of ``class_indices`` on the last conv layer (Selvaraju et al. 2017).

    Args:
        model: a Keras functional or sequential model taking raw 0-255 images.
        images: float or uint8 batch [N, H, W, 3].
        class_indices: the class to explain per image (usually the predicted one).
        layer_name: the conv layer; default :func:`find_gradcam_layer`.

    Returns:
        float32 [N, H, W] maps in [0, 1].

    Raises:
        SaliencyUnavailable: no conv layer, a backend without ``GradientTape``, a model
            whose layers cannot be rewired, or gradients that are all zero.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SaliencyUnavailable(f"Grad-CAM is implemented for the TensorFlow backend, found {keras.backend.backend()}")
    import tensorflow as tf

    layer_name = layer_name or find_gradcam_layer(model)
    if layer_name is None:
        raise SaliencyUnavailable("the model has no convolutional layer with a spatial output")
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    idx = tf.convert_to_tensor(np.asarray(class_indices, dtype=np.int32))
    # Explain the class score before the softmax: a confident softmax saturates to 1.0 in
    # float32 and its gradient vanishes. The activation is swapped only for this call.
    last = model.layers[-1] if getattr(model, "layers", None) else None
    softmax_head = last is not None and getattr(getattr(last, "activation", None), "__name__", "") == "softmax"
    original = getattr(last, "activation", None)
    if softmax_head:
        last.activation = keras.activations.linear
    try:
        features, grads = _cam_gradients(model, layer_name, x, idx)
    finally:
        if softmax_head:
            last.activation = original
    if grads is None:
        raise SaliencyUnavailable(f"no gradient flows from the output to layer {layer_name!r}")
    features = tf.cast(features, tf.float32).numpy()
    grads = tf.cast(grads, tf.float32).numpy()
    if not np.any(grads):
        raise SaliencyUnavailable("the gradients are all zero (saturated output)")
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cams = np.maximum((weights * features).sum(axis=-1), 0.0)
    height, width = x.shape[1], x.shape[2]
    return np.stack([_resize_map(cam, height, width) for cam in cams]).astype(np.float32)


def _cam_gradients(model: Any, layer_name: str, x: Any, idx: Any) -> tuple[Any, Any]:
    """(feature maps of ``layer_name``, gradient of the chosen class scores on them)."""
    import keras
    import tensorflow as tf

    if isinstance(model, keras.Sequential):
        # A reloaded Sequential model's rebuilt graph does not always connect layer.output
        # to model.output; running its layers one by one always does.
        names = [layer.name for layer in model.layers]
        split = names.index(layer_name) + 1
        with tf.GradientTape() as tape:
            features = x
            for layer in model.layers[:split]:
                features = layer(features, training=False)
            tape.watch(features)
            outputs = features
            for layer in model.layers[split:]:
                outputs = layer(outputs, training=False)
            scores = tf.gather(tf.cast(outputs, tf.float32), idx, batch_dims=1)
    else:
        try:
            grad_model = keras.Model(model.inputs, [model.get_layer(layer_name).output, model.outputs[0]])
        except Exception as exc:  # subclassed models have no symbolic graph to rewire
            raise SaliencyUnavailable(f"cannot read layer {layer_name!r} of the model: {exc}") from exc
        with tf.GradientTape() as tape:
            features, outputs = grad_model(x, training=False)
            tape.watch(features)
            scores = tf.gather(tf.cast(outputs, tf.float32), idx, batch_dims=1)
    return features, tape.gradient(scores, features)


def occlusion_saliency(
    model: Any,
    images: np.ndarray,
    class_indices: Sequence[int],
    patch: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion sensitivity: how much the class probability drops when a patch is greyed out.

    Backend-agnostic (only ``model.predict``), works for any model.

    Args:
        model: a Keras model taking raw 0-255 images.
        images: batch [N, H, W, 3].
        class_indices: the class to explain per image.
        patch: occluding square side (default H // 6, at least 2).
        stride: step between patches (default patch // 2, at least 1).
        batch_size: occluded images per ``predict`` call.

    Returns:
        float32 [N, H, W] maps in [0, 1] (1 = occluding here hurts the class most).
    """
    from imgflow.tasks.inference import predict

    images = np.asarray(images, dtype=np.float32)
    n, height, width = images.shape[:3]
    patch = patch or max(2, height // 6)
    stride = stride or max(1, patch // 2)
    ys = list(range(0, max(height - patch, 0) + 1, stride))
    xs = list(range(0, max(width - patch, 0) + 1, stride))
    maps = np.zeros((n, height, width), dtype=np.float32)
    for i in range(n):
        image = images[i]
        fill = image.mean(axis=(0, 1))
        variants = [image]
        for y in ys:
            for x in xs:
                occluded = image.copy()
                occluded[y:y + patch, x:x + patch] = fill
                variants.append(occluded)
        outputs, _ = as_probabilities(predict(model, np.stack(variants), batch_size=batch_size))
        scores = outputs[:, int(class_indices[i])]
        drop = scores[0] - scores[1:]
        total = np.zeros((height, width), dtype=np.float64)
        hits = np.zeros((height, width), dtype=np.float64)
        for value, (y, x) in zip(drop, ((y, x) for y in ys for x in xs)):
            total[y:y + patch, x:x + patch] += value
            hits[y:y + patch, x:x + patch] += 1
        heat = np.maximum(np.divide(total, hits, out=np.zeros_like(total), where=hits > 0), 0.0)
        maps[i] = heat / heat.max() if heat.max() > 0 else heat
    return maps


def saliency_maps(model: Any, images: np.ndarray, class_indices: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Grad-CAM where it can run, occlusion sensitivity otherwise.

    Grad-CAM keeps only positive evidence; an image whose map is empty (every weighted
    feature pointed away from the class) gets an occlusion map instead, so no panel of
    the report is blank.

    Args:
        model: a Keras model taking raw 0-255 images.
        images: batch [N, H, W, 3].
        class_indices: the class to explain per image.

    Returns:
        (maps [N, H, W] in [0, 1], methods) with one ``"grad-cam"`` or ``"occlusion"`` per image.
    """
    images = np.asarray(images, dtype=np.float32)
    try:
        maps = grad_cam(model, images, class_indices)
    except SaliencyUnavailable as exc:
        log.info("Grad-CAM unavailable (%s); using occlusion sensitivity", exc)
        return occlusion_saliency(model, images, class_indices), ["occlusion"] * len(images)
    methods = ["grad-cam"] * len(images)
    empty = [i for i in range(len(images)) if not maps[i].any()]
    if empty:
        maps[empty] = occlusion_saliency(model, images[empty], [class_indices[i] for i in empty])
        for i in empty:
            methods[i] = "occlusion"
    return maps, methods

