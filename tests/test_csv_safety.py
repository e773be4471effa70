"""Spreadsheet formula injection (issue 12 §2): `imgflow predict` neutralises cells, and says how to opt out."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from tests.imagefactory import make_digit_folder
from tests.modelfactory import make_digit_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_digit_model_dir(tmp_path_factory.mktemp("models") / "digits-csv")


@pytest.fixture(scope="module")
def warm(prefect_server, model_dir, tmp_path_factory) -> None:
    """Prefect binds its log handlers to the first flow run's streams: let them be pytest's, not CliRunner's."""
    from imgflow.flows.prediction import batch_predict

    root = tmp_path_factory.mktemp("warm")
    (root / "empty").mkdir()
    batch_predict(model=str(model_dir), input_dir=root / "empty", workdir=root / "w")


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_cli_predict_neutralises_formula_cells_unless_told_not_to(warm, model_dir, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    digits = make_digit_folder(tmp_path / "digits", per_class=1)
    inbox = tmp_path / "inbox"
    (inbox / "-sub").mkdir(parents=True)
    shutil.copy(digits / "zero" / "zero_0000.png", inbox / "=1+1.png")
    shutil.copy(digits / "one" / "one_0000.png", inbox / "@SUM(A1).png")
    shutil.copy(digits / "seven" / "seven_0000.png", inbox / "-sub" / "x.png")
    shutil.copy(digits / "seven" / "seven_0000.png", inbox / "plain.png")
    runner = CliRunner()
    safe = runner.invoke(app, ["predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w"),
                               "--out", str(tmp_path / "safe.csv")])
    assert safe.exit_code == 0, safe.output
    paths = sorted(row[0] for row in _rows(tmp_path / "safe.csv")[1:])
    assert paths == ["'-sub/x.png", "'=1+1.png", "'@SUM(A1).png", "plain.png"]

    raw = runner.invoke(app, ["predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w"),
                              "--out", str(tmp_path / "raw.csv"), "--no-csv-neutralise"])
    assert raw.exit_code == 0, raw.output
    assert sorted(row[0] for row in _rows(tmp_path / "raw.csv")[1:]) == ["-sub/x.png", "=1+1.png", "@SUM(A1).png",
                                                                         "plain.png"]
    config = tmp_path / "config.yaml"
    config.write_text("csv_neutralise: false\n")
    from_file = runner.invoke(app, ["predict", str(model_dir), str(inbox), "--workdir", str(tmp_path / "w"),
                                    "--out", str(tmp_path / "file.csv"), "--config", str(config)])
    assert from_file.exit_code == 0, from_file.output
    assert "=1+1.png" in {row[0] for row in _rows(tmp_path / "file.csv")[1:]}


def test_cli_evaluate_says_when_outputs_are_nan(warm, model_dir, tmp_path):
    import keras
    import numpy as np
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    nan_dir = tmp_path / "nan-model"
    shutil.copytree(model_dir, nan_dir)
    model = keras.saving.load_model(nan_dir / "model.keras")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([np.full(w.shape, np.nan, dtype="float32") for w in layer.get_weights()])
    model.save(nan_dir / "model.keras")
    data = make_digit_folder(tmp_path / "data", per_class=2)
    result = CliRunner().invoke(app, ["evaluate", str(nan_dir), str(data), "--workdir", str(tmp_path / "w"),
                                      "--out", str(tmp_path / "out"), "--no-csv-neutralise"])
    assert result.exit_code == 0, result.output
    assert "Accuracy: 0.0000" in result.output
    assert "6 of 6 images got NaN or infinite model outputs" in result.output
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert rows[0][-1] == "error" and {row[-1] for row in rows[1:]} == {"non-finite model output (NaN or inf)"}
