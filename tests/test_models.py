"""Model builders: built-in CNNs, keras.applications backbones, user builders, optimizers."""

from __future__ import annotations

import contextlib
import sys
import textwrap

import keras
import numpy as np
import pytest

from imgflow.tasks.models import (
    BUILTIN_MODELS,
    ModelConfigError,
    build_model,
    compile_model,
    decay_at_one_rate,
    is_compiled,
    make_optimizer,
    resolve_model_name,
)


def _layer_types(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def test_default_model_takes_raw_images_and_outputs_probabilities():
    model = build_model("default", 32, 3)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 3)
    types = _layer_types(model)
    assert types[1] == "Rescaling"  # scaling lives inside the model
    rescale = model.get_layer("rescale")
    assert (rescale.scale, rescale.offset) == (pytest.approx(1 / 255), 0.0)  # 0-255 to [0, 1]
    assert "Sequential" in types  # augmentation block
    # the recipe of bench/recipe.py: tutorial-shaped blocks, no BatchNorm, no dropout
    assert types.count("Conv2D") == 3 and types.count("MaxPooling2D") == 3
    assert "BatchNormalization" not in types and "Dropout" not in types
    assert "Flatten" in types and model.get_layer("dense1").units == 128
    assert model.get_layer("predictions").dtype_policy.name == "float32"
    raw = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("uint8")
    probs = model.predict(raw, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_starting_weights_follow_the_seed_whatever_else_draws_from_python_random():
    """Prefect's client threads draw retry jitter from Python's global ``random``; the
    starting weights of a run must depend on its seed only (a full-suite CI run once gave
    two same-seed trainings different first-epoch losses)."""
    import random

    def weights(seed: int, disturb: int) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        for _ in range(disturb):
            random.random()
        return build_model("conv-blocks", 32, 3, {"filters": [4, 8], "dense": [6]}, seed=seed).get_weights()

    first, disturbed, other_seed = weights(7, 0), weights(7, 5), weights(8, 0)
    assert len(first) == 8  # 2 convolutions, 1 hidden dense, the head: kernels and biases
    assert all(np.array_equal(a, b) for a, b in zip(first, disturbed))
    kernels = [i for i, w in enumerate(first) if w.ndim > 1]
    assert len(kernels) == 4 and not any(np.array_equal(first[i], other_seed[i]) for i in kernels)
    assert len({first[i].ravel()[:4].tobytes() for i in kernels}) == 4  # each layer its own draw


def test_no_augmentation_block_when_disabled():
    model = build_model("default", 32, 2, augment=False)
    assert "Sequential" not in _layer_types(model)


@pytest.mark.parametrize(("name", "arch", "lowest", "highest"), [
    ("default", None, 0.0, 1.0),  # the benchmark's choice (bench/RESULTS.md, fifth recipe round)
    ("default", {"input_range": "signed"}, -1.0, 1.0),
    ("conv_blocks", None, 0.0, 1.0),  # the hand-written script's Rescaling(1/255)
])
def test_the_input_range_is_what_the_first_layer_gives_raw_pixels(name, arch, lowest, highest):
    model = build_model(name, 32, 3, arch, augment=False)
    rescale = model.get_layer("rescale")
    pixels = np.array([0.0, 127.5, 255.0], dtype="float32").reshape(1, 1, 3, 1)
    np.testing.assert_allclose(np.asarray(rescale(pixels)).ravel(), [lowest, (lowest + highest) / 2, highest], atol=1e-6)


def test_conv_blocks_architecture_from_config():
    arch = {"filters": [8, 16], "dense": [24], "dropout": 0.25, "augmentation": {"rotate": 0.0, "flip": True}}
    model = build_model("conv-blocks", 32, 4, arch)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [8, 16]
    assert model.get_layer("dense1").units == 24
    assert model.get_layer("dropout").rate == 0.25
    assert "Flatten" in _layer_types(model)  # the hand-written script style
    aug = [type(layer).__name__ for layer in model.get_layer("augmentation").layers]
    assert aug == ["RandomFlip", "RandomTranslation", "RandomZoom"]
    assert model.output_shape == (None, 4)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "vgg99"}, "unknown model 'vgg99'"),
        ({"architecture": {"filterz": [8]}}, "unknown key(s) filterz"),
        ({"architecture": {"filters": [8, 8, 8, 8, 8, 8]}}, "at least 64 px"),
        ({"architecture": {"pooling": "median"}}, "expected max, avg or none"),
        ({"architecture": {"input_range": "0-255"}}, "input_range: expected unit or signed, found '0-255'"),
        ({"num_classes": 1}, "at least 2 classes"),
        ({"weights": "/nope.h5"}, "only keras.applications backbones"),
    ],
)
def test_bad_model_options_name_the_option(kwargs, needle):
    args = {"name": "default", "image_size": 32, "num_classes": 3, **kwargs}
    with pytest.raises(ModelConfigError) as err:
        build_model(**args)
    assert needle in str(err.value)


def test_builtin_names_resolve_case_and_dash_insensitively():
    assert resolve_model_name("MobileNet-V3-Small".replace("-V3-", "V3")) == "mobilenetv3small"
    assert resolve_model_name("EfficientNetV2B0") == "efficientnetv2b0"
    assert resolve_model_name("pkg.mod:fn") == "pkg.mod:fn"
    assert set(BUILTIN_MODELS) >= {"default", "conv_blocks", "resnet50"}


@pytest.mark.parametrize("name", ["mobilenetv3small", "efficientnetv2b0"])
def test_applications_rescale_raw_input_themselves(name):
    model = build_model(name, 32, 3, augment=False)
    assert model.output_shape == (None, 3)
    backbone = [layer for layer in model.layers if isinstance(layer, keras.Model)][0]
    # include_preprocessing=True: a Rescaling layer inside the backbone takes 0-255 input
    assert any(isinstance(layer, keras.layers.Rescaling) for layer in backbone.layers)


def test_resnet50_gets_caffe_preprocessing_as_a_standard_layer():
    model = build_model("resnet50", 32, 2, augment=False)
    pre = model.get_layer("caffe_preprocess")
    assert pre.trainable is False
    pixel = np.array([[[[10.0, 20.0, 30.0]]]], dtype="float32")  # R, G, B
    out = np.asarray(pre(pixel))[0, 0, 0]
    np.testing.assert_allclose(out, [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-5)


def test_application_weights_come_from_a_local_file(tmp_path):
    source = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    path = tmp_path / "mnv3.weights.h5"
    source.save_weights(path)
    model = build_model("mobilenetv3small", 32, 3, weights=str(path), augment=False)
    backbone = [layer for layer in model.layers if isinstance(layer, keras.Model)][0]
    for a, b in zip(source.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ModelConfigError, match="weights: expected a local weights file"):
        build_model("mobilenetv3small", 32, 3, weights=str(tmp_path / "missing.h5"))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_builders.py").write_text(
        textwrap.dedent(
            """
            import keras

            def plain(input_shape, num_classes):
                inputs = keras.Input(shape=input_shape)
                x = keras.layers.Flatten()(inputs)
                return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))

            def compiled(input_shape, num_classes):
                model = plain(input_shape, num_classes)
                model.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
                return model

            def wrong_units(input_shape, num_classes):
                return plain(input_shape, num_classes + 1)

            def no_kwargs(shape):
                return None
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_builders"
    sys.modules.pop("my_builders", None)


def test_user_builder_uncompiled_gets_compiled_with_configured_optimizer(user_module):
    model = build_model(f"{user_module}:plain", 16, 3)
    assert not is_compiled(model)
    compile_model(model, "rmsprop", 0.002)
    assert isinstance(model.optimizer, keras.optimizers.RMSprop)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.002)
    assert model.loss == "sparse_categorical_crossentropy"
    # a user model is used exactly as given: no rescaling added
    assert not any(isinstance(layer, keras.layers.Rescaling) for layer in model.layers)


def test_user_builder_compiled_keeps_its_optimizer(user_module):
    model = build_model(f"{user_module}:compiled", 16, 3)
    compile_model(model, "adam", 0.1)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("func", "needle"),
    [
        ("wrong_units", "4 output units, expected 3"),
        ("no_kwargs", "must accept the keywords input_shape= and num_classes="),
        ("missing", "has no callable 'missing'"),
    ],
)
def test_bad_user_builders_are_explained(user_module, func, needle):
    with pytest.raises(ModelConfigError) as err:
        build_model(f"{user_module}:{func}", 16, 3)
    assert needle in str(err.value)


def test_unimportable_builder_module():
    with pytest.raises(ModelConfigError, match="cannot import module 'no_such_pkg.mod'"):
        build_model("no_such_pkg.mod:fn", 16, 3)


def test_optimizers_by_name_and_cosine_schedule():
    assert isinstance(make_optimizer("adamw", 1e-3), keras.optimizers.AdamW)
    sgd = make_optimizer("sgd", 0.1)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.nesterov
    cosine = make_optimizer("adam", 0.01, "cosine", total_steps=100)
    schedule = cosine.learning_rate if callable(cosine.learning_rate) else cosine._learning_rate
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(100)) == pytest.approx(0.0001, rel=1e-3)
    warm = make_optimizer("adamw", 0.01, "cosine", total_steps=100, warmup_steps=10)
    schedule = warm.learning_rate if callable(warm.learning_rate) else warm._learning_rate
    assert float(schedule(0)) == pytest.approx(0.0001)  # warm-up starts at 1% of the rate
    assert float(schedule(5)) == pytest.approx(0.0001 + 0.5 * (0.01 - 0.0001), rel=1e-3)
    assert float(schedule(10)) == pytest.approx(0.01)  # peak after the warm-up
    assert float(schedule(100)) == pytest.approx(0.0001, rel=1e-2)
    with pytest.raises(ModelConfigError, match="optimizer: expected adam"):
        make_optimizer("lbfgs", 0.1)
    with pytest.raises(ModelConfigError, match="total number of training steps"):
        make_optimizer("adam", 0.1, "cosine")


def _counting_schedule(calls: list[int]) -> keras.optimizers.schedules.LearningRateSchedule:
    class Counting(keras.optimizers.schedules.CosineDecay):
        def __call__(self, step):
            calls.append(1)
            return super().__call__(step)

    return Counting(1e-4, decay_steps=90, alpha=0.01, warmup_target=0.01, warmup_steps=10)


def test_adamw_reads_a_scheduled_rate_once_per_step_for_its_weight_decay_with_the_same_result():
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 16)

    def train(make_optimizer, strategy=None, run_eagerly=True):
        keras.utils.set_random_seed(0)
        with strategy.scope() if strategy else contextlib.nullcontext():
            model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                                      keras.layers.Dense(8), keras.layers.Dense(3, activation="softmax")])
            model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy", run_eagerly=run_eagerly)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # 2 steps
        return model.get_weights()

    plain_calls: list[int] = []
    plain = train(lambda: keras.optimizers.AdamW(_counting_schedule(plain_calls)))
    calls: list[int] = []
    once = train(lambda: decay_at_one_rate(keras.optimizers.AdamW(_counting_schedule(calls))))
    assert len(plain_calls) == 2 * (6 + 1)  # per step: once per variable (6 of them), once for the update
    assert len(calls) == 2 * 2  # per step: once for the weight decay, once for the update
    for a, b in zip(plain, once):
        np.testing.assert_array_equal(a, b)
    # a compiled step: the calls while it is traced, 2 per trace instead of 7
    plain_traced: list[int] = []
    compiled_plain = train(lambda: keras.optimizers.AdamW(_counting_schedule(plain_traced)), run_eagerly=False)
    traced: list[int] = []
    compiled = train(lambda: decay_at_one_rate(keras.optimizers.AdamW(_counting_schedule(traced))), run_eagerly=False)
    assert plain_traced and len(plain_traced) % 7 == 0 and len(traced) == len(plain_traced) // 7 * 2
    for a, b in zip(compiled_plain, compiled):
        np.testing.assert_array_equal(a, b)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # under a distribution strategy (several GPUs) Keras' own cross-replica weight decay runs, unchanged
        mirrored_traced: list[int] = []
        mirrored = train(lambda: decay_at_one_rate(keras.optimizers.AdamW(_counting_schedule(mirrored_traced))),
                         tf.distribute.MirroredStrategy(["/cpu:0"]), run_eagerly=False)
        assert len(mirrored_traced) == 6 + 1
        for a, b in zip(plain, mirrored):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # still a plain Keras AdamW: its config rebuilds it without imgflow
    rebuilt = keras.optimizers.deserialize(keras.optimizers.serialize(make_optimizer("adamw", 0.01, "cosine", 100, 10)))
    assert type(rebuilt) is keras.optimizers.AdamW and "_apply_weight_decay" not in vars(rebuilt)
    assert "_apply_weight_decay" in vars(make_optimizer("adamw", 0.01, "cosine", 100, 10))
    assert "_apply_weight_decay" not in vars(make_optimizer("adamw", 0.01))  # a constant rate is a variable already


def test_saved_default_model_loads_in_safe_mode_with_plain_keras(tmp_path):
    model = build_model("default", 32, 3)
    compile_model(model)
    raw = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype("float32")
    expected = model.predict(raw, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(raw, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_recipe_learning_rate_and_batchnorm_placement_options():
    from imgflow.tasks.models import recipe_learning_rate

    assert recipe_learning_rate("default") == 2e-3 and recipe_learning_rate("conv_blocks") == 1e-3
    assert recipe_learning_rate("mymod:build") == 1e-3
    # an unset rate (or auto, where no range test runs, as in the doctor) is the model's recipe rate
    default = compile_model(build_model("default", 32, 3), "adam", None)
    assert float(default.optimizer.learning_rate.numpy()) == pytest.approx(2e-3)
    plain = compile_model(build_model("conv_blocks", 32, 3), "adam", "auto")
    assert float(plain.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)
    before = build_model("conv_blocks", 32, 3, architecture={"batch_norm": "after_first"})
    assert [layer.name for layer in before.layers if isinstance(layer, keras.layers.BatchNormalization)] == [
        "block2_bn1", "block3_bn1"]
    with pytest.raises(ModelConfigError, match="architecture.norm_position: expected conv or pool"):
        build_model("default", 32, 3, architecture={"norm_position": "after"})
    with pytest.raises(ModelConfigError, match="architecture.batch_norm: expected true, false, after_first"):
        build_model("default", 32, 3, architecture={"batch_norm": [True]})


def test_filters_auto_scale_blocks_with_image_size():
    from imgflow.tasks.models import filters_for

    assert filters_for(32) == [32, 64, 128] and filters_for(48) == [32, 64, 128]
    assert filters_for(128) == [32, 64, 128, 128]
    assert filters_for(256) == [32, 64, 128, 128, 256]
    model = build_model("conv_blocks", 128, 3, architecture={"filters": "auto"})
    assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [32, 64, 128, 128]


def test_batchnorm_momentum_follows_epoch_length():
    from imgflow.tasks.models import bn_momentum_for

    assert bn_momentum_for(None) == 0.5 and bn_momentum_for(6) == 0.5
    assert bn_momentum_for(40) == pytest.approx(0.9)
    assert bn_momentum_for(100_000) == 0.99
    model = build_model("default", 32, 3, architecture={"batch_norm": True}, steps_per_epoch=40)
    assert model.get_layer("block1_bn").momentum == pytest.approx(0.9)
    fixed = build_model("default", 32, 3, architecture={"batch_norm": True, "bn_momentum": 0.8})
    assert fixed.get_layer("block3_bn").momentum == pytest.approx(0.8)
    with pytest.raises(ModelConfigError, match="bn_momentum: expected auto or a number"):
        build_model("default", 32, 3, architecture={"bn_momentum": 2})


def test_default_model_trains_compiled_under_jax_backend():
    """The same builders run with KERAS_BACKEND=jax, with the train step compiled."""
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("jax")
    script = (
        "import numpy as np, keras\n"
        "from imgflow.tasks.models import build_model, compile_model\n"
        "m = compile_model(build_model('default', 32, 3), jit_compile=True)\n"
        "x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype('float32')\n"
        "loss = m.train_on_batch(x, np.array([0, 1, 2, 0, 1, 2, 0, 1]))\n"
        "print(keras.backend.backend(), m.jit_compile, np.isfinite(loss).all())\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "jax True True"


def test_user_builder_in_the_current_folder_imports_without_python_m(tmp_path, monkeypatch):
    """The `imgflow` console script does not put the current folder on sys.path; builders there still load."""
    import sys

    from imgflow.tasks.models import load_builder

    (tmp_path / "my_cwd_builders.py").write_text("def build(input_shape, num_classes):\n    return ('built', input_shape, num_classes)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    builder = load_builder("my_cwd_builders:build")
    assert builder(input_shape=(8, 8, 3), num_classes=2) == ("built", (8, 8, 3), 2)
