"""Config: flat YAML keys routed to their stage, options override the file."""

from __future__ import annotations

import pytest

from imgflow.flows.config import TRAINING_SECTIONS, ConfigError, ImgflowConfig, load_config
from imgflow.tasks.options import EvaluateOptions, PredictOptions, with_overrides


def test_defaults():
    config = load_config()
    assert config.preprocess.image_size == 128
    assert config.train.optimizer == "adamw" and config.train.schedule == "cosine"
    assert config.train.warmup_epochs == "auto" and config.train.warmup_steps(30) == 30  # 20 epochs: one
    assert with_overrides(config.train, epochs=5).warmup_steps(30) == 15  # a tenth of a short run
    assert config.train.learning_rate is None  # the model's recipe rate (2e-3 for the default model)
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
    # flat() holds the training stages (what a run records): they round-trip exactly
    for stage in TRAINING_SECTIONS:
        assert getattr(again, stage) == getattr(config, stage)
    assert again.flat() == config.flat() and again.flat()["image_size"] == 48


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


# ------------------------------------------------------------------ predict and evaluate sections


def test_predict_and_evaluate_defaults():
    config = load_config()
    assert config.predict == PredictOptions(batch_size=256, chunk_size=1024, top_k=None, out=None, dask_address=None)
    assert config.evaluate == EvaluateOptions(batch_size=64)


def test_flat_keys_reach_predict_and_sections_scope_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "batch_size: 16\ntop_k: 3\nchunk_size: 100\ndask_address: tcp://h:8786\nout: preds.csv\n"
        "predict:\n  batch_size: 512\nevaluate:\n  batch_size: 8\n"
    )
    config = load_config(path)
    assert config.train.batch_size == 16  # a flat batch size is the training batch ...
    assert config.predict.batch_size == 512 and config.evaluate.batch_size == 8  # ... a section wins for its stage
    assert (config.predict.top_k, config.predict.chunk_size, str(config.predict.out)) == (3, 100, "preds.csv")
    assert config.predict.dask_address == config.preprocess.dask_address == "tcp://h:8786"


def test_options_override_the_file_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("top_k: 2\npredict:\n  batch_size: 512\n  chunk_size: 50\n")
    config = load_config(path, {"predict": {"batch_size": 32, "chunk_size": None, "top_k": None}})
    assert config.predict.batch_size == 32  # the option wins over the file's section
    assert config.predict.chunk_size == 50 and config.predict.top_k == 2  # None: not given, the file stays
    flat_option = load_config(path, {"batch_size": 64})
    assert flat_option.predict.batch_size == 512 and flat_option.train.batch_size == 64
    only_flat = load_config(None, {"batch_size": 8, "csv_neutralise": False})
    # a training batch never slows prediction down; other flat keys reach every stage that has them
    assert (only_flat.train.batch_size, only_flat.predict.batch_size, only_flat.evaluate.batch_size) == (8, 256, 64)
    assert only_flat.predict.csv_neutralise is False and only_flat.evaluate.csv_neutralise is False


def test_predict_options_do_not_change_the_training_run():
    base = ImgflowConfig.from_flat({"epochs": 3})
    other = ImgflowConfig.from_flat({"epochs": 3, "predict": {"batch_size": 8}, "top_k": 2, "chunk_size": 10})
    assert other.predict.batch_size == 8 and base.flat() == other.flat()  # same run id, same metadata config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("predict:\n  epochs: 3\n", "unknown key predict.epochs; known predict keys: batch_size, chunk_size"),
        ("predict: 5\n", "'predict' must be a mapping of predict options, found int"),
        ("evaluate:\n  batch_size: 0\n", "'evaluate.batch_size': input should be greater than or equal to 1, found 0"),
        ("top_k: 0\n", "'predict.top_k': input should be greater than or equal to 1, found 0"),
        ("saliency: false\n", "unknown key 'saliency'"),
    ],
)
def test_bad_sections_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))


def test_a_bad_option_is_blamed_on_the_option_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("top_k: 2\n")
    with pytest.raises(ConfigError, match=r"^options: 'predict.chunk_size': input should be greater"):
        load_config(path, {"predict": {"chunk_size": 0}})


def test_with_overrides_validates_and_names_the_option():
    options = PredictOptions(top_k=2)
    assert with_overrides(options, batch_size=None, top_k=None) is options
    assert with_overrides(options, batch_size=8) == PredictOptions(top_k=2, batch_size=8)
    with pytest.raises(ValueError, match="'batch_size': input should be greater than or equal to 1, found 0"):
        with_overrides(options, batch_size=0)


# ------------------------------------------------------------------ the commands take the sections


def test_cli_predict_and_evaluate_take_file_and_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import imgflow.flows.evaluation as evaluation_flows
    import imgflow.flows.prediction as prediction_flows
    from imgflow.flows.cli import app

    calls: dict[str, dict] = {}

    def fake_predict(**kwargs):
        calls["predict"] = kwargs
        return {"rows": 0, "errors": 0, "images_per_second": 0.0, "label_counts": {}, "csv": "x.csv"}

    def fake_evaluate(**kwargs):
        calls["evaluate"] = kwargs
        return {"accuracy": 1.0, "skipped": 0, "report_html": "r.html", "metrics_json": "m.json"}

    monkeypatch.setattr(prediction_flows, "batch_predict", fake_predict)
    monkeypatch.setattr(evaluation_flows, "evaluate_flow", fake_evaluate)
    (tmp_path / "in").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 16\ntop_k: 2\npredict:\n  chunk_size: 7\nevaluate:\n  batch_size: 5\n")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "m", str(tmp_path / "in"), "--config", str(path), "--batch-size", "99"])
    assert result.exit_code == 0, result.output
    options = calls["predict"]["options"]
    assert (options.batch_size, options.top_k, options.chunk_size, options.out) == (99, 2, 7, None)
    result = runner.invoke(app, ["evaluate", "m", str(tmp_path / "in"), "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert calls["evaluate"]["options"] == EvaluateOptions(batch_size=5)
    result = runner.invoke(app, ["evaluate", "m", str(tmp_path / "in"), "--batch-size", "0"])
    assert result.exit_code == 2 and "'evaluate.batch_size': input should be greater than or equal to 1" in result.output
    path.write_text("predict:\n  topk: 3\n")
    result = runner.invoke(app, ["predict", "m", str(tmp_path / "in"), "--config", str(path)])
    assert result.exit_code == 2 and "unknown key predict.topk" in result.output


def test_flows_take_the_sections(prefect_server, tmp_path):
    import csv

    from imgflow.flows.evaluation import evaluate_flow
    from imgflow.flows.prediction import batch_predict
    from tests.imagefactory import make_digit_folder
    from tests.modelfactory import make_digit_model_dir

    model_dir = make_digit_model_dir(tmp_path / "models" / "digits", per_class=30, epochs=8)
    data = make_digit_folder(tmp_path / "data", per_class=4)  # 12 images in 3 class folders
    out = tmp_path / "preds.csv"
    options = ImgflowConfig.from_flat({"top_k": 2, "chunk_size": 4, "out": str(out), "batch_size": 3}).predict
    summary = batch_predict(model=str(model_dir), input_dir=data, workdir=tmp_path / "work", options=options)
    with open(out, newline="") as handle:
        header = next(csv.reader(handle))
    assert summary["csv"] == str(out) and summary["rows"] == 12 and summary["chunks"] >= 2
    assert {"top1_label", "top2_label"} <= set(header) and "top3_label" not in header
    # an argument wins over the options
    again = batch_predict(model=str(model_dir), input_dir=data, workdir=tmp_path / "work", options=options,
                          out=tmp_path / "other.csv")
    assert again["csv"] == str(tmp_path / "other.csv") and again["rows"] == 12
    result = evaluate_flow(str(model_dir), data, workdir=tmp_path / "work", out=tmp_path / "eval",
                           options=EvaluateOptions(batch_size=5))
    assert result["count"] == 12 and result["skipped"] == 0
