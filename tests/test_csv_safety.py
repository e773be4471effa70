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


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_cli_predict_neutralises_formula_cells_unless_told_not_to(prefect_server, model_dir, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app
    from imgflow.flows.prediction import batch_predict

    digits = make_digit_folder(tmp_path / "digits", per_class=1)
    inbox = tmp_path / "inbox"
    (inbox / "-sub").mkdir(parents=True)
    shutil.copy(digits / "zero" / "zero_0000.png", inbox / "=1+1.png")
    shutil.copy(digits / "one" / "one_0000.png", inbox / "@SUM(A1).png")
    shutil.copy(digits / "seven" / "seven_0000.png", inbox / "-sub" / "x.png")
    shutil.copy(digits / "seven" / "seven_0000.png", inbox / "plain.png")
    # Prefect binds its log handlers to the first flow run's streams: let them be pytest's
    (tmp_path / "empty").mkdir()
    batch_predict(model=str(model_dir), input_dir=tmp_path / "empty", workdir=tmp_path / "warm")

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
