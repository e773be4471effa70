"""Pretrained backbones: ImageNet weights through the Keras cache, and two-phase fine-tuning.

No network is used: the "imagenet" file is a locally saved copy placed in a temporary
``KERAS_HOME``, and fine-tuning starts from a locally saved headless MobileNetV3Small.
"""

from __future__ import annotations

import socket

import keras
import numpy as np
import pytest
import tensorflow as tf

from imgflow.tasks import backbones, finetune, training
from imgflow.tasks.options import TrainOptions
from imgflow.tasks.models import build_model
from tests.modelfactory import Crash as _Crash

MNV3 = backbones.IMAGENET_WEIGHTS["mobilenetv3small"].file_name


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    """An empty Keras cache of this test's own (``KERAS_HOME``)."""
    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine has: every connection fails to resolve its host."""
    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def _headless_mnv3(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3),
                                               pooling="avg")


# ----------------------------------------------------------------------------- weights files


def test_imagenet_file_names_urls_and_hashes_are_those_of_keras():
    from keras.src.applications import efficientnet_v2, mobilenet_v3, resnet

    table = backbones.IMAGENET_WEIGHTS
    assert table["efficientnetv2b0"] == (
        "efficientnetv2-b0_notop.h5", efficientnet_v2.BASE_WEIGHTS_PATH + "efficientnetv2-b0_notop.h5",
        efficientnet_v2.WEIGHTS_HASHES["b0"][1])
    name = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    assert table["mobilenetv3small"] == (
        name, mobilenet_v3.BASE_WEIGHT_PATH + name, mobilenet_v3.WEIGHTS_HASHES["small_224_1.0_float"][1])
    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert table["resnet50"] == (name, resnet.BASE_WEIGHTS_PATH + name, resnet.WEIGHTS_HASHES["resnet50"][1])


def test_keras_cache_dir_follows_keras_home(keras_home, monkeypatch, tmp_path):
    assert backbones.keras_cache_dir() == keras_home / "models"
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert backbones.keras_cache_dir() == tmp_path / ".keras" / "models"


def test_imagenet_without_cache_or_network_names_the_file_and_the_folder(keras_home, offline):
    with pytest.raises(backbones.WeightsUnavailable) as caught:
        backbones.ensure_weights("MobileNetV3Small", "imagenet")
    message = str(caught.value)
    assert message.startswith(f"weights: cannot download {MNV3} (no network); place it in {keras_home / 'models'}/")
    assert backbones.IMAGENET_WEIGHTS["mobilenetv3small"].url in message and "--weights FILE" in message
    assert "\n" not in message and caught.value.exit_code == 2
    assert not (keras_home / "models" / MNV3).exists()  # no half file left behind


def test_weights_for_a_model_without_a_backbone_or_a_missing_file_are_usage_errors(tmp_path):
    with pytest.raises(backbones.WeightsUnavailable, match="not --model default"):
        backbones.ensure_weights("default", "imagenet")
    with pytest.raises(backbones.WeightsUnavailable, match="found no file at"):
        backbones.ensure_weights("resnet50", str(tmp_path / "missing.h5"))
    backbones.ensure_weights("default", None)  # no weights: nothing to check


def test_a_cached_imagenet_file_is_loaded_without_network(keras_home, offline):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    source = _headless_mnv3(seed=11)
    cache = keras_home / "models"
    cache.mkdir(parents=True)
    with h5py.File(cache / MNV3, "w") as handle:  # the legacy .h5 layout of Keras' own files
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    model = build_model("mobilenet-v3-small", 32, 3, weights="ImageNet", augment=False)
    backbone = finetune.backbone_of(model)
    assert backbone.name == "MobileNetV3Small"
    for saved, loaded in zip(source.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(saved, loaded)


def test_cli_train_weights_imagenet_offline_ends_with_one_line_and_exit_2(tmp_path, keras_home, offline, shapes_dir):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    result = CliRunner().invoke(app, ["train", str(shapes_dir), "--workdir", str(tmp_path / "w"), "--model",
                                      "mobilenetv3small", "--weights", "imagenet", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"imgflow: weights: cannot download {MNV3} (no network); place it in {keras_home / 'models'}/ "
                     f"(from {backbones.IMAGENET_WEIGHTS['mobilenetv3small'].url}) and run again, "
                     "or give --weights FILE"]
    assert not (tmp_path / "w").exists()  # failed before any work


# ----------------------------------------------------------------------------- fine-tuning


def test_plan_fine_tune_splits_the_epochs():
    plan = finetune.plan_fine_tune("mobilenetv3small", "imagenet", 10)
    assert plan == {"frozen_epochs": 3, "unfreeze_fraction": 0.2, "learning_rate_factor": 0.1}
    assert finetune.plan_fine_tune("resnet50", "/w.h5", 2)["frozen_epochs"] == 1
    assert finetune.plan_fine_tune("resnet50", "/w.h5", 3)["frozen_epochs"] == 1
    assert finetune.plan_fine_tune("resnet50", "/w.h5", 20)["frozen_epochs"] == 7
    assert finetune.plan_fine_tune("resnet50", "/w.h5", 1)["frozen_epochs"] == 1  # no room for phase 2
    # a backbone kept frozen on purpose never unfreezes
    assert finetune.plan_fine_tune("resnet50", "/w.h5", 9, {"trainable_backbone": False})["frozen_epochs"] == 9
    assert finetune.plan_fine_tune("mobilenetv3small", None, 10) is None  # random initialisation
    assert finetune.plan_fine_tune("default", "imagenet", 10) is None


@pytest.fixture(scope="module")
def tiny_data():
    """Three classes of 32 px images that differ in brightness (48 train, 24 val)."""
    rng = np.random.default_rng(0)
    y = (np.arange(72) % 3).astype("int32")
    x = (rng.integers(0, 80, (72, 32, 32, 3)) + 80 * y[:, None, None, None]).astype("float32")
    return x[:48], y[:48], x[48:], y[48:]


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory, tiny_data):
    """A headless MobileNetV3Small saved to a local ``.weights.h5`` file, and its weights by layer.

    Stands in for pretrained weights: its BatchNorm statistics are set from the data (with
    the initial ones, a random MobileNetV3's features vanish to ~1e-11 and a frozen
    backbone gives the head nothing to learn from).
    """
    source = _headless_mnv3(seed=7)
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    source(tiny_data[0], training=True)
    path = tmp_path_factory.mktemp("weights") / "mnv3.weights.h5"
    source.save_weights(path)
    return path, {layer.name: [w.copy() for w in layer.get_weights()] for layer in source.layers if layer.weights}


class _Snapshot(keras.callbacks.Callback):
    """The backbone's weights (by layer) and the head's at the start and the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.epochs: dict[int, dict[str, list[np.ndarray]]] = {}
        self.head: dict[int, list[np.ndarray]] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.head.setdefault(-1, [w.copy() for w in self.model.get_layer("predictions").get_weights()])

    def on_epoch_end(self, epoch, logs=None):
        backbone = finetune.backbone_of(self.model)
        self.epochs[epoch] = {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers
                              if layer.weights}
        self.head[epoch] = [w.copy() for w in self.model.get_layer("predictions").get_weights()]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def _fit(run_dir, data, weights, epochs=3, extra=None, log=None):
    x, y, vx, vy = data
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    val = tf.data.Dataset.from_tensor_slices((vx, vy)).batch(16)
    options = TrainOptions(model="mobilenetv3small", weights=str(weights), epochs=epochs, early_stopping_patience=5,
                           augment=False)
    keras.utils.set_random_seed(3)
    model = build_model("mobilenetv3small", 32, 3, weights=str(weights), augment=False, seed=3)
    return model, training.fit_model(model, train, val, run_dir, options, [16, 16, 16], steps_per_epoch=3,
                                     log=log if log is not None else (lambda _: None), extra_callbacks=extra)


def test_fine_tuning_trains_the_head_frozen_then_only_the_top_layers(tmp_path, tiny_data, saved_backbone):
    path, saved = saved_backbone
    snapshot = _Snapshot()
    logs: list[str] = []
    model, result = _fit(tmp_path / "run", tiny_data, path, extra=[snapshot], log=logs.append)
    tune = result["fine_tune"]
    assert tune["frozen_epochs"] == 1 and tune["backbone"] == "MobileNetV3Small"
    assert tune["learning_rate"] == pytest.approx(result["learning_rate"] * 0.1)
    # phase 1 (epoch 1): the loaded weights, untouched, while the new head trains
    assert all(_same(saved[name], snapshot.epochs[0][name]) for name in saved)
    assert not _same(snapshot.head[-1], snapshot.head[0])
    # phase 2 (epochs 2-3): the top fifth of the weighted layers moved, BatchNorm and the rest did not
    backbone = finetune.backbone_of(model)
    weighted = [layer for layer in backbone.layers if layer.weights]
    top = {layer.name for layer in weighted[-round(0.2 * len(weighted)):]}
    batch_norm = {layer.name for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}
    changed = {name for name in saved if not _same(saved[name], snapshot.epochs[2][name])}
    assert changed and changed <= top - batch_norm
    assert tune["unfrozen_layers"] == len(top - batch_norm) == len(changed)
    assert [int(r["epoch"]) for r in training.read_history(tmp_path / "run")] == [0, 1, 2]
    assert result["epochs_run"] == 3 and result["stop_reason"] == "ran all 3 epochs"
    assert any(line.startswith(f"fine-tuning: unfroze the top {len(changed)} layers of MobileNetV3Small")
               for line in logs)
    assert [line.split()[1] for line in logs if line.startswith("epoch ")] == ["1/3", "2/3", "3/3"]


@pytest.mark.parametrize("killed_after", [1, 2])
def test_a_killed_fine_tuning_resumes_in_the_phase_it_was_in(tmp_path, tiny_data, saved_backbone, killed_after):
    path, saved = saved_backbone
    with pytest.raises(RuntimeError, match="worker lost"):
        _fit(tmp_path, tiny_data, path, extra=[_Crash(killed_after)])
    assert training.backup_epoch(tmp_path) == killed_after  # epoch 1 ends phase 1; epoch 2 is in phase 2
    snapshot = _Snapshot()
    model, result = _fit(tmp_path, tiny_data, path, extra=[snapshot])
    assert result["resumed"] and result["initial_epoch"] == killed_after
    assert result["fine_tune"]["unfrozen_layers"] > 0 and result["epochs_run"] == 3
    assert [int(r["epoch"]) for r in training.read_history(tmp_path)] == [0, 1, 2]
    assert sorted(snapshot.epochs) == list(range(killed_after, 3))  # only the missing epochs ran
    # the lower layers are still the loaded ones: the resumed phase 2 unfroze the same top only
    first = next(layer.name for layer in finetune.backbone_of(model).layers if layer.weights)
    assert first == "conv" and _same(saved[first], snapshot.epochs[2][first])
    assert not (tmp_path / "backup").exists()


def test_train_from_manifest_records_the_phases(tmp_path, shapes_dir, saved_backbone):
    from imgflow.tasks import registry, tfrecords
    from imgflow.tasks.dataset import validate_dataset
    from imgflow.tasks.options import PreprocessOptions
    from imgflow.tasks.records import read_manifest

    path, saved = saved_backbone
    report = validate_dataset(shapes_dir)
    prep = tfrecords.preprocess(report, PreprocessOptions(image_size=32, val_fraction=0.25), tmp_path / "shards")
    options = TrainOptions(model="mobilenetv3small", weights=str(path), epochs=2, batch_size=8, augment=False)
    summary = training.train_from_manifest(prep["manifest"], tmp_path / "run", options, log=lambda _: None)
    tune = summary["fine_tune"]
    assert tune["frozen_epochs"] == 1 and tune["unfrozen_layers"] > 0
    assert tune["learning_rate"] == pytest.approx(summary["learning_rate"] / 10)
    assert summary["epochs_run"] == 2
    saved_summary = training.read_json(tmp_path / "run" / "train_summary.json")
    assert saved_summary["fine_tune"] == tune
    meta = registry.build_metadata("run-1", summary, read_manifest(prep["manifest"]), prep["manifest"],
                                   {"epochs": 2}, {}, shapes_dir)
    assert meta["fine_tune"] == tune  # metadata.json names the phases
    # the saved model holds the loaded backbone below the unfrozen top
    loaded = keras.saving.load_model(tmp_path / "run" / "model.keras")
    backbone = finetune.backbone_of(loaded)
    first = next(layer.name for layer in backbone.layers if layer.weights)
    assert _same(saved[first], backbone.get_layer(first).get_weights())


def test_train_summary_says_how_the_backbone_was_fine_tuned(tmp_path):
    from imgflow.flows import console

    meta = {"best_epoch": 3, "epochs_run": 3, "monitor": "val_accuracy", "stop_reason": "ran all 3 epochs",
            "fine_tune": {"frozen_epochs": 1, "backbone": "MobileNetV3Small", "unfrozen_layers": 10,
                          "learning_rate": 1e-4, "unfreeze_fraction": 0.2}}
    (tmp_path / "metadata.json").write_text(__import__("json").dumps(meta))
    run = console.Summary("train")
    console.train_summary(run, {"model_dir": str(tmp_path), "val_accuracy": 0.5})
    assert "Fine-tuning MobileNetV3Small: 1 epoch(s) with it frozen, then its top 10 layers at learning rate 0.0001." \
        in run.lines
    assert run.lines[0] == "Validation accuracy: 0.5000"
