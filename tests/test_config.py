"""Config: flat YAML keys routed to their stage, options override the file."""

from __future__ import annotations

import pytest

from imgflow.flows.config import ConfigError, ImgflowConfig, load_config


def test_defaults():
    config = load_config()
    assert config.preprocess.image_size == 128
    assert config.train.optimizer == "adam"
    assert config.train.learning_rate is None  # the model's recipe rate (3e-3 for the default model)
    assert config.train.monitor == "val_accuracy" and config.train.class_weights == "off"
    assert config.train.augment is False  # auto: off below 30 epochs (the default is 20)
    assert config.preprocess.background == "black"
    assert load_config(None, {"learning_rate": "auto"}).train.learning_rate == "auto"


def test_yaml_then_options_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("image_size: 64\nepochs: 3\nseed: 7\nlearning_rate: 0.01\n")
    config = load_config(path, {"epochs": 5, "learning_rate": None})
    assert config.preprocess.image_size == 64
    assert config.train.epochs == 5  # the option wins
    assert config.train.learning_rate == pytest.approx(0.01)  # None means "not given"
    assert config.preprocess.seed == 7 and config.train.seed == 7  # a shared key sets every stage


def test_flat_round_trip():
    config = ImgflowConfig.from_flat({"image_size": 48, "optimizer": "sgd"})
    again = ImgflowConfig.from_flat(config.flat())
    assert again == config and again.flat()["image_size"] == 48


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: 0.1\n", "unknown key 'lr'"),
        ("optimizer: adamax\n", "optimizer"),
        ("image_size: -3\n", "image_size"),
        ("- a\n- b\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "none.yaml")
