"""Model builders: built-in CNNs, keras.applications backbones and user ``module:function``.

Every built-in model takes raw 0-255 RGB images: rescaling (and, for training only,
light augmentation) are layers inside the model, so a saved ``model.keras`` can be fed
the same pixels at prediction time and can never drift from training. A user builder's
model is used exactly as given.

Only Keras 3 APIs are used here (no ``tf.*``), so the same builders run with
``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import random
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import keras
import numpy as np
from imgflow.tasks.errors import UsageError

# Canonical names of the built-in models; lookups ignore case, "-" and "_".
BUILTIN_MODELS = ("default", "conv_blocks", "efficientnetv2b0", "mobilenetv3small", "resnet50")

# Built-in "default" CNN, chosen on bench/recipe.py (see bench/RESULTS.md): the shape of
# the hand-written tutorial script (one 3x3 conv + max-pool per block, Flatten, Dense 128),
# widths for the image size, no dropout and no BatchNorm, pixels in [0, 1] (centred inputs,
# [-1, 1], gained a point on two sets in the in-process grid but lost 2.9 points on the
# MATE icons and 0.3 on themes as whole commands: bench/RESULTS.md, fifth recipe round).
# What beats the script is the recipe around it (tasks/options.py: AdamW at 2e-3 with a
# warm-up and cosine decay, the best epoch's weights): at 10 epochs on 700-1,000 images
# the script's dropout 0.5 leaves the network underfitting (train accuracy ~0.75), and
# BatchNorm (+2 points on one set of three) cost ~50% more time per epoch on CPU.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "input_range": "unit",
    "filters": "auto",
    "convs_per_block": 1,
    "kernel_size": 3,
    "batch_norm": False,
    # "auto": fast-moving BatchNorm statistics sized to the epoch (see bn_momentum_for);
    # with the Keras default (0.99) a small dataset's few steps leave the statistics used
    # at validation time far from the trained weights' (val accuracy stuck at chance)
    "bn_momentum": "auto",
    "norm_position": "pool",
    "activation": "relu",
    "pooling": "max",
    "global_pool": "flatten",
    "dense": [128],
    "dropout": 0.0,
}
# Training steps per call of Keras' compiled train function (compile's steps_per_execution).
STEPS_PER_EXECUTION = 8
# The learning rate a built-in model trains at when ``learning_rate`` is not set.
DEFAULT_LEARNING_RATES: dict[str, float] = {"default": 2e-3}
FALLBACK_LEARNING_RATE = 1e-3

# "conv_blocks": the architecture of a typical hand-written Keras script
# (Conv2D/MaxPool blocks, Flatten, one Dense layer), but with rescaling inside.
CONV_BLOCKS_ARCHITECTURE: dict[str, Any] = {
    "input_range": "unit",
    "filters": [32, 64, 128],
    "convs_per_block": 1,
    "kernel_size": 3,
    "batch_norm": False,
    "bn_momentum": "auto",
    "norm_position": "conv",
    "activation": "relu",
    "pooling": "max",
    "global_pool": "flatten",
    "dense": [128],
    "dropout": 0.5,
}

# Rescaling (scale, offset) of each input_range: 0-255 pixels to [0, 1] or to [-1, 1].
_INPUT_RANGES: dict[str, tuple[float, float]] = {"unit": (1.0 / 255, 0.0), "signed": (1.0 / 127.5, -1.0)}

# Options of the augmentation block (architecture keys, all models but user ones).
AUGMENT_DEFAULTS: dict[str, Any] = {"translate": 0.1, "rotate": 0.05, "zoom": 0.1, "flip": False}

# ImageNet channel means (BGR) of the "caffe" preprocessing ResNet50 weights expect.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class ModelConfigError(UsageError, ValueError):
    """A model name, builder or architecture option that cannot be used."""


def bn_momentum_for(steps_per_epoch: int | None) -> float:
    """BatchNorm momentum for ``bn_momentum: auto``: statistics averaged over ~a quarter epoch.

    ``1 - 4 / steps`` clipped to [0.5, 0.99]: 0.5 for tiny datasets (or unknown size),
    the Keras default 0.99 from 400 steps an epoch on.
    """
    if not steps_per_epoch:
        return 0.5
    return float(min(0.99, max(0.5, 1.0 - 4.0 / steps_per_epoch)))


def recipe_learning_rate(model: str) -> float:
    """The learning rate of a model's recipe: 2e-3 for ``default``, else 1e-3; pure."""
    try:
        return DEFAULT_LEARNING_RATES.get(resolve_model_name(model), FALLBACK_LEARNING_RATE)
    except ModelConfigError:
        return FALLBACK_LEARNING_RATE


def filters_for(image_size: int) -> list[int]:
    """Conv block widths for ``filters: auto``: one block per halving down to ~4-8 px; pure.

    32 -> [32, 64, 128]; 48 and 64 -> [32, 64, 128]; 128 -> [32, 64, 128, 128];
    256 -> [32, 64, 128, 128, 256]. Beyond the third block the width grows only every
    other block, so the compute per image stays near the plain three-block script's.
    """
    blocks = 3
    while image_size // (2**blocks) > 8 and blocks < 6:
        blocks += 1
    widths = [32, 64, 128, 128, 256, 256]
    return widths[:blocks]


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def resolve_model_name(name: str) -> str:
    """Return the canonical built-in name for ``name``, or ``name`` itself for ``module:function``.

    Raises:
        ModelConfigError: neither a built-in model nor a ``module:function`` reference.
    """
    if ":" in name:
        return name
    for builtin in BUILTIN_MODELS:
        if _canonical(builtin) == _canonical(name):
            return builtin
    raise ModelConfigError(
        f"model: unknown model {name!r}; expected one of {', '.join(BUILTIN_MODELS)} "
        "or a user builder written as package.module:function"
    )


def augmentation_block(options: dict[str, Any] | None = None, seed: int = 42) -> keras.Sequential:
    """Light, label-preserving augmentation layers (active only while training).

    Args:
        options: ``translate``, ``rotate`` (fraction of a full turn), ``zoom`` (fractions)
            and ``flip`` (horizontal flips; off by default because digits and text are
            not mirror-symmetric).
        seed: seed of the random layers.
    """
    opts = {**AUGMENT_DEFAULTS, **(options or {})}
    layers: list[keras.layers.Layer] = []
    if opts["flip"]:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if opts["translate"]:
        layers.append(keras.layers.RandomTranslation(opts["translate"], opts["translate"], seed=seed + 1))
    if opts["rotate"]:
        layers.append(keras.layers.RandomRotation(opts["rotate"], seed=seed + 2))
    if opts["zoom"]:
        layers.append(keras.layers.RandomZoom(opts["zoom"], seed=seed + 3))
    return keras.Sequential(layers, name="augmentation")


def _split_architecture(architecture: dict[str, Any] | None, defaults: dict[str, Any]) -> tuple[dict, dict]:
    """Split ``architecture`` into (model options, augmentation options), checking the keys."""
    arch = dict(architecture or {})
    augment = arch.pop("augmentation", {}) or {}
    unknown = sorted(set(arch) - set(defaults))
    if unknown:
        raise ModelConfigError(
            f"architecture: unknown key(s) {', '.join(unknown)}; expected any of "
            f"{', '.join(sorted(defaults))} (or 'augmentation')"
        )
    bad_aug = sorted(set(augment) - set(AUGMENT_DEFAULTS))
    if bad_aug:
        raise ModelConfigError(
            f"architecture.augmentation: unknown key(s) {', '.join(bad_aug)}; expected any of "
            f"{', '.join(sorted(AUGMENT_DEFAULTS))}"
        )
    return {**defaults, **arch}, augment


def _kernel_initializers(seed: int) -> Iterator[keras.initializers.Initializer]:
    """Keras' default Glorot-uniform kernel initializers, one per layer, seeded from a private generator.

    An unseeded initializer draws its seed from Python's global ``random`` when the layer
    is created, and Prefect's client threads draw from it too (retry jitter): a busy
    server could then give two runs with the same seed different starting weights. These
    draw the same seeds, in layer order, from ``random.Random(seed)`` instead, which is
    what ``keras.utils.set_random_seed(seed)`` gave them when nothing else drew in between
    (the same seed gives the same weights as before).
    """
    draws = random.Random(seed)
    while True:
        yield keras.initializers.GlorotUniform(seed=draws.randint(1, int(1e9)))


def _output_layer(num_classes: int, initializer: keras.initializers.Initializer) -> keras.layers.Dense:
    # float32 output keeps softmax and the loss stable under mixed precision
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions",
                              kernel_initializer=initializer)


def build_conv_blocks(
    image_size: int,
    num_classes: int,
    architecture: dict[str, Any] | None = None,
    augment: bool = True,
    seed: int = 42,
    defaults: dict[str, Any] = CONV_BLOCKS_ARCHITECTURE,
    name: str = "conv_blocks",
    steps_per_epoch: int | None = None,
) -> keras.Model:
    """A plain CNN of Conv2D blocks, configurable the way people write them by hand.

    Args:
        image_size: side of the square input images.
        num_classes: number of output classes (softmax units).
        architecture: overrides of ``filters`` (one block per entry, or ``auto``: see
            :func:`filters_for`), ``input_range`` (``unit``: pixels scaled to [0, 1] by
            ``Rescaling(1/255)``; ``signed``: to [-1, 1]), ``convs_per_block``,
            ``kernel_size``, ``batch_norm`` (true, false, ``after_first`` or one flag per
            block), ``norm_position`` (``conv``: BatchNorm before the activation; ``pool``:
            after the block's pooling, cheaper), ``bn_momentum``, ``activation``, ``pooling`` (max|avg|none),
            ``global_pool`` (avg|max|flatten), ``dense`` (list of units), ``dropout``,
            and ``augmentation`` (see :func:`augmentation_block`).
        augment: include the augmentation block.
        seed: seed of the initial weights, augmentation and dropout.
        defaults: the base architecture the overrides apply to.
        name: the model's name.
        steps_per_epoch: training steps an epoch, for ``bn_momentum: auto``.

    Raises:
        ModelConfigError: an unknown architecture key or an unusable value.
    """
    arch, aug = _split_architecture(architecture, defaults)
    momentum = arch["bn_momentum"]
    if momentum == "auto":
        momentum = bn_momentum_for(steps_per_epoch)
    elif not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ModelConfigError(f"architecture.bn_momentum: expected auto or a number in [0, 1), found {momentum!r}")
    filters = arch["filters"]
    if filters == "auto":
        filters = filters_for(image_size)
    if isinstance(filters, int):
        filters = [filters]
    if not filters or not all(isinstance(f, int) and f > 0 for f in filters):
        raise ModelConfigError(f"architecture.filters: expected a list of positive integers, found {filters!r}")
    if arch["pooling"] not in ("max", "avg", "none"):
        raise ModelConfigError(f"architecture.pooling: expected max, avg or none, found {arch['pooling']!r}")
    if arch["global_pool"] not in ("avg", "max", "flatten"):
        raise ModelConfigError(
            f"architecture.global_pool: expected avg, max or flatten, found {arch['global_pool']!r}"
        )
    if arch["input_range"] not in _INPUT_RANGES:
        raise ModelConfigError(f"architecture.input_range: expected unit or signed, found {arch['input_range']!r}")
    pooled = len(filters) if arch["pooling"] != "none" else 0
    if image_size // (2**pooled) < 1:
        raise ModelConfigError(
            f"architecture.filters: {len(filters)} pooling blocks need images of at least {2**pooled} px, "
            f"found image_size {image_size}"
        )

    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(*_INPUT_RANGES[arch["input_range"]], name="rescale")(inputs)
    if augment:
        x = augmentation_block(aug, seed)(x)
    norm = arch["batch_norm"]
    if isinstance(norm, bool):
        norm = [norm] * len(filters)
    elif isinstance(norm, str) and norm == "after_first":
        # the first block's BatchNorm works on the largest activations (half a CPU epoch at
        # 48 px); later blocks normalise most of what it would, at a fraction of the cost
        norm = [False] + [True] * (len(filters) - 1)
    if not isinstance(norm, list) or len(norm) != len(filters) or not all(isinstance(n, bool) for n in norm):
        raise ModelConfigError(
            f"architecture.batch_norm: expected true, false, after_first or one true/false per block, found {arch['batch_norm']!r}"
        )
    if arch["norm_position"] not in ("conv", "pool"):
        raise ModelConfigError(f"architecture.norm_position: expected conv or pool, found {arch['norm_position']!r}")
    after_pool = arch["norm_position"] == "pool"
    initializers = _kernel_initializers(seed)
    for b, width in enumerate(filters):
        for c in range(int(arch["convs_per_block"])):
            x = keras.layers.Conv2D(
                width,
                arch["kernel_size"],
                padding="same",
                use_bias=not norm[b] or after_pool,
                kernel_initializer=next(initializers),
                name=f"block{b + 1}_conv{c + 1}",
            )(x)
            if norm[b] and not after_pool:
                x = keras.layers.BatchNormalization(
                    momentum=float(momentum), name=f"block{b + 1}_bn{c + 1}"
                )(x)
            x = keras.layers.Activation(arch["activation"], name=f"block{b + 1}_act{c + 1}")(x)
        if arch["pooling"] == "max":
            x = keras.layers.MaxPooling2D(name=f"block{b + 1}_pool")(x)
        elif arch["pooling"] == "avg":
            x = keras.layers.AveragePooling2D(name=f"block{b + 1}_pool")(x)
        if norm[b] and after_pool:
            # normalising the pooled map (a quarter of the values) costs a quarter of the
            # CPU time of BatchNorm before the activation, and keeps its stabilising effect
            x = keras.layers.BatchNormalization(momentum=float(momentum), name=f"block{b + 1}_bn")(x)
    if arch["global_pool"] == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    elif arch["global_pool"] == "max":
        x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(arch["dense"] or []):
        x = keras.layers.Dense(int(units), activation=arch["activation"], name=f"dense{i + 1}",
                               kernel_initializer=next(initializers))(x)
    if arch["dropout"]:
        x = keras.layers.Dropout(float(arch["dropout"]), seed=seed, name="dropout")(x)
    outputs = _output_layer(num_classes, next(initializers))(x)
    return keras.Model(inputs, outputs, name=name)


def build_default(
    image_size: int,
    num_classes: int,
    architecture: dict[str, Any] | None = None,
    augment: bool = True,
    seed: int = 42,
    steps_per_epoch: int | None = None,
) -> keras.Model:
    """The built-in CNN: tutorial-shaped conv blocks, Flatten, Dense 128 (BatchNorm and dropout are options).

    Trains well from scratch on small folder datasets in few epochs; takes raw 0-255 RGB
    images. See ``DEFAULT_ARCHITECTURE`` for the options and why they were chosen.
    """
    return build_conv_blocks(
        image_size, num_classes, architecture, augment, seed, defaults=DEFAULT_ARCHITECTURE,
        name="imgflow_default", steps_per_epoch=steps_per_epoch,
    )


def _channel_reverse_and_center(mean_bgr: tuple[float, float, float]) -> keras.layers.Conv2D:
    """A frozen 1x1 convolution doing RGB->BGR and mean subtraction ("caffe" preprocessing).

    A standard layer (not a Lambda) so the saved model loads anywhere in safe mode.
    """
    layer = keras.layers.Conv2D(3, 1, name="caffe_preprocess", trainable=False)
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel, in_channel in enumerate((2, 1, 0)):
        kernel[0, 0, in_channel, out_channel] = 1.0
    layer.set_weights([kernel, -np.asarray(mean_bgr, dtype="float32")])
    return layer


def build_application(
    name: str,
    image_size: int,
    num_classes: int,
    weights: str | None = None,
    architecture: dict[str, Any] | None = None,
    augment: bool = True,
    seed: int = 42,
) -> keras.Model:
    """A keras.applications backbone with a new softmax head.

    ``weights="imagenet"`` loads the ImageNet weights from the Keras cache, downloading
    them there first when missing (:mod:`imgflow.tasks.backbones`); a path loads a local
    file. EfficientNetV2B0 and MobileNetV3Small rescale 0-255 input themselves
    (``include_preprocessing=True``); ResNet50 gets its "caffe" preprocessing
    (RGB->BGR, ImageNet mean subtraction) as a frozen 1x1 convolution in front.

    Args:
        name: ``efficientnetv2b0``, ``mobilenetv3small`` or ``resnet50``.
        image_size: side of the square input images (at least 32).
        num_classes: number of output classes.
        weights: ``imagenet``, a local weights file for the headless backbone
            (``include_top=False``), or None for random initialisation.
        architecture: ``dropout`` (head dropout, default 0.2), ``trainable_backbone``
            (default True) and ``augmentation`` options.
        augment: include the augmentation block.
        seed: seed of augmentation and dropout.

    Raises:
        ModelConfigError: unknown backbone, missing weights file or too small images.
        imgflow.tasks.backbones.WeightsUnavailable: ``imagenet`` weights neither cached nor downloadable.
    """
    from imgflow.tasks.backbones import resolve_weights

    arch, aug = _split_architecture(architecture, {"dropout": 0.2, "trainable_backbone": True})
    if image_size < 32:
        raise ModelConfigError(f"image_size: {name} needs images of at least 32 px, found {image_size}")
    weights = resolve_weights(name, weights)
    if weights is not None and not Path(weights).is_file():
        raise ModelConfigError(f"weights: expected a local weights file (or imagenet), found no file at {weights}")
    shape = (image_size, image_size, 3)
    common: dict[str, Any] = {"include_top": False, "weights": weights, "input_shape": shape, "pooling": "avg"}
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    if augment:
        x = augmentation_block(aug, seed)(x)
    if name == "resnet50":
        x = _channel_reverse_and_center(_CAFFE_MEAN_BGR)(x)
    constructors = {"efficientnetv2b0": (keras.applications.EfficientNetV2B0, {"include_preprocessing": True}),
                    "mobilenetv3small": (keras.applications.MobileNetV3Small, {"include_preprocessing": True}),
                    "resnet50": (keras.applications.ResNet50, {})}
    if name not in constructors:
        raise ModelConfigError(f"model: unknown keras.applications backbone {name!r}")
    constructor, extra = constructors[name]
    try:
        backbone = constructor(**extra, **common)
    except (OSError, ValueError) as exc:
        if weights is None:
            raise
        raise ModelConfigError(f"weights: cannot load {weights} into {name} ({' '.join(str(exc).split())[:200]}): "
                               f"give the headless (include_top=False) {name} weights, or delete the file and "
                               "run again") from None
    backbone.trainable = bool(arch["trainable_backbone"])
    x = backbone(x)
    if arch["dropout"]:
        x = keras.layers.Dropout(float(arch["dropout"]), seed=seed, name="head_dropout")(x)
    outputs = _output_layer(num_classes, next(_kernel_initializers(seed)))(x)
    return keras.Model(inputs, outputs, name=f"{name}_classifier")


def load_builder(reference: str) -> Callable[..., Any]:
    """Import a user builder written as ``package.module:function``.

    Raises:
        ModelConfigError: malformed reference, module not importable or no such callable.
    """
    module_name, _, func_name = reference.partition(":")
    if not module_name or not func_name:
        raise ModelConfigError(f"model: expected package.module:function, found {reference!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        # the `imgflow` console script does not put the current folder on sys.path the way
        # `python -m` does; a user's `mymodels.py` beside their data should still import
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelConfigError(f"model: cannot import module {module_name!r} of {reference!r}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ModelConfigError(f"model: module {module_name!r} has no callable {func_name!r}")
    return func


def build_user_model(reference: str, image_size: int, num_classes: int) -> keras.Model:
    """Call a user builder as ``function(input_shape=(S, S, 3), num_classes=N)`` and check its model.

    Raises:
        ModelConfigError: the builder does not return a Keras model with ``num_classes`` outputs.
    """
    func = load_builder(reference)
    if not builder_signature_ok(func):
        raise ModelConfigError(
            f"model: {reference} must accept the keywords input_shape= and num_classes=; "
            f"found signature {inspect.signature(func)}"
        )
    model = func(input_shape=(image_size, image_size, 3), num_classes=num_classes)
    if not isinstance(model, keras.Model):
        raise ModelConfigError(
            f"model: {reference} must return a keras.Model, found {type(model).__name__}"
        )
    if not model.built:
        model.build((None, image_size, image_size, 3))
    units = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    if units is not None and units != num_classes:
        raise ModelConfigError(
            f"model: {reference} returned a model with {units} output units, expected {num_classes} (one per class)"
        )
    return model


def build_model(
    name: str,
    image_size: int,
    num_classes: int,
    architecture: dict[str, Any] | None = None,
    augment: bool = True,
    weights: str | None = None,
    seed: int = 42,
    steps_per_epoch: int | None = None,
) -> keras.Model:
    """Build the model named ``name`` for ``image_size`` px RGB input and ``num_classes`` classes.

    Built-in models are returned uncompiled; a user model is returned as its builder made it
    (maybe compiled).

    Args:
        name: a built-in name (see ``BUILTIN_MODELS``) or ``package.module:function``.
        image_size: side of the square input images.
        num_classes: number of classes (at least 2).
        architecture: options for the chosen builder (``TrainOptions.architecture``).
        augment: include augmentation layers (built-in models only).
        weights: ``imagenet`` or a local weights file (keras.applications backbones only).
        seed: seed of the random layers.
        steps_per_epoch: training steps an epoch (sizes BatchNorm momentum of the CNNs).

    Raises:
        ModelConfigError: an unknown model, option or an unusable builder.
    """
    if num_classes < 2:
        raise ModelConfigError(f"num_classes: a classifier needs at least 2 classes, found {num_classes}")
    canonical = resolve_model_name(name)
    if weights is not None and canonical not in ("efficientnetv2b0", "mobilenetv3small", "resnet50"):
        raise ModelConfigError(f"weights: only keras.applications backbones take imagenet or a weights file, not {name!r}")
    if canonical == "default":
        return build_default(image_size, num_classes, architecture, augment, seed, steps_per_epoch)
    if canonical == "conv_blocks":
        return build_conv_blocks(image_size, num_classes, architecture, augment, seed, steps_per_epoch=steps_per_epoch)
    if canonical in ("efficientnetv2b0", "mobilenetv3small", "resnet50"):
        return build_application(canonical, image_size, num_classes, weights, architecture, augment, seed)
    return build_user_model(canonical, image_size, num_classes)


def make_optimizer(
    name: str,
    learning_rate: float,
    schedule: str = "none",
    total_steps: int | None = None,
    warmup_steps: int = 0,
) -> keras.optimizers.Optimizer:
    """An optimizer by name (adam, adamw, sgd, rmsprop), optionally with a cosine decay schedule.

    ``schedule="cosine"`` decays from ``learning_rate`` to 1% of it over the training
    steps; with ``warmup_steps`` the rate first rises linearly from 1% to ``learning_rate``
    over those steps (Keras ``CosineDecay`` warm-up), then decays over the rest.
    ``schedule="plateau"`` is a callback (ReduceLROnPlateau), so the optimizer gets a
    constant rate here.

    Raises:
        ModelConfigError: unknown optimizer or schedule, or cosine without ``total_steps``.
    """
    if schedule == "cosine":
        if not total_steps:
            raise ModelConfigError("schedule: cosine decay needs the total number of training steps")
        warmup = max(0, min(int(warmup_steps), int(total_steps) - 1))
        if warmup:
            lr: Any = keras.optimizers.schedules.CosineDecay(
                learning_rate * 0.01, decay_steps=int(total_steps) - warmup, alpha=0.01,
                warmup_target=learning_rate, warmup_steps=warmup,
            )
        else:
            lr = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=int(total_steps), alpha=0.01)
    elif schedule in ("none", "plateau"):
        lr = learning_rate
    else:
        raise ModelConfigError(f"schedule: expected none, cosine or plateau, found {schedule!r}")
    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "adamw":
        return decay_at_one_rate(keras.optimizers.AdamW(lr))
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    raise ModelConfigError(f"optimizer: expected adam, adamw, sgd or rmsprop, found {name!r}")


def decay_at_one_rate(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """Make ``optimizer``'s weight decay read a scheduled learning rate once per step, not once per variable.

    Keras' decoupled weight decay evaluates the schedule again for every variable it
    decays: the warm-up + cosine schedule's ops, traced and run once per variable and step.
    The rate is the same for all of them within a step (the step counter moves after the
    update), so this evaluates it once and lends that value to Keras' own weight-decay code:
    the same numbers (bit-identical training), a shorter first epoch (less to trace) and
    shorter steps (about 0.9 s of a 13 s themes fit, ``bench/RESULTS.md``). The optimizer
    stays a plain Keras ``AdamW`` (nothing of this is saved with the model); a Keras
    without the private hooks this relies on, and a TensorFlow distribution strategy
    (several GPUs), keep Keras' own behaviour.
    """
    original = getattr(type(optimizer), "_apply_weight_decay", None)
    if not isinstance(getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule) \
            or not callable(original) or not callable(getattr(optimizer, "_get_current_learning_rate", None)):
        return optimizer

    def apply_weight_decay(self: keras.optimizers.Optimizer, variables: list[Any]) -> None:
        if self.weight_decay is None:
            return
        if _in_distribution_strategy():  # Keras decays mirrored variables in a cross-replica context: its own way
            original(self, variables)
            return
        schedule = self._learning_rate
        self._learning_rate = self._get_current_learning_rate()  # a tensor: read back as it is
        try:
            original(self, variables)
        finally:
            self._learning_rate = schedule

    # this optimizer's own method: its class, and an optimizer rebuilt from its config, stay Keras' own
    optimizer._apply_weight_decay = types.MethodType(apply_weight_decay, optimizer)
    return optimizer


def _in_distribution_strategy() -> bool:
    """Whether a TensorFlow distribution strategy other than the default one is in scope."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy()


def is_compiled(model: keras.Model) -> bool:
    """Whether ``model`` was compiled (by a user builder, say)."""
    return bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None


def compile_model(
    model: keras.Model,
    optimizer: str = "adam",
    learning_rate: float | str | None = 1e-3,
    schedule: str = "none",
    total_steps: int | None = None,
    jit_compile: bool | str = "auto",
    warmup_steps: int = 0,
    force: bool = False,
) -> keras.Model:
    """Compile ``model`` with sparse categorical cross-entropy and accuracy, unless it already is.

    A model that a user builder compiled keeps its optimizer, loss and metrics. A
    ``learning_rate`` of None (or ``auto`` here, where no range test runs) is the model's
    recipe rate (see :func:`recipe_learning_rate`). ``force`` compiles anew (a new phase
    of fine-tuning: other trainable layers, another rate).
    """
    if is_compiled(model) and not force:
        return model
    if not isinstance(learning_rate, (int, float)):
        learning_rate = recipe_learning_rate("default" if model.name == "imgflow_default" else model.name)
    if keras.backend.backend() == "jax":
        _mark_augmentation_jit_safe(model)
    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate, schedule, total_steps, warmup_steps),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit_compile,
        # several steps per call of the compiled function: ~10% less time per epoch on CPU
        # for small models (Python and callback overhead per step); batch callbacks run
        # every STEPS_PER_EXECUTION steps
        steps_per_execution=STEPS_PER_EXECUTION,
    )
    return model


def _mark_augmentation_jit_safe(model: keras.Model) -> None:
    """Let the random image layers be compiled under JAX.

    Keras flags RandomTranslation/Rotation/Zoom as not XLA-compatible because TensorFlow's
    image transform op has no XLA kernel; under JAX their ops compile fine, and an
    uncompiled JAX train step is many times slower. (Under TensorFlow Keras leaves XLA
    off for such a model, which is still a compiled graph.)
    """
    random_layers = (keras.layers.RandomTranslation, keras.layers.RandomRotation, keras.layers.RandomZoom)
    for layer in model._flatten_layers():
        if isinstance(layer, random_layers):
            layer.supports_jit = True


def builder_signature_ok(func: Callable[..., Any]) -> bool:
    """Whether ``func`` accepts ``input_shape=`` and ``num_classes=`` keywords."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return "input_shape" in params and "num_classes" in params
