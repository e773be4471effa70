"""``imgflow doctor --lr-find``: the learning-rate range test on DATA_DIR, its plot and its pick."""

from __future__ import annotations

import json
import re

import pytest


def test_doctor_lr_find_writes_the_plot_and_prints_the_suggested_rate(prefect_server, digits_dir, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\nbatch_size: 16\nseed: 1\n")
    result = CliRunner().invoke(app, ["doctor", "default", str(digits_dir), "--workdir", str(tmp_path / "w"),
                                      "--image-size", "32", "--config", str(config), "--lr-find"])
    assert result.exit_code == 0, result.output
    out_dir = next((tmp_path / "w" / "doctor").glob("default-*"))
    assert (out_dir / "lr_finder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out_dir / "lr_finder.json").read_text())
    printed = re.search(r"^Suggested learning rate: (\S+) \(range test over (\d+) steps", result.output, re.M)
    assert printed, result.output
    rate = float(printed.group(1))
    assert rate > 0 and rate == pytest.approx(saved["suggested"], rel=5e-3)
    assert int(printed.group(2)) == saved["steps"] >= 10
    assert f"LR finder:    {(out_dir / 'lr_finder.png').absolute()}" in result.output
    # the diagnosis records the pick too (the lr_range finding), with the same number
    diagnosis = json.loads((out_dir / "diagnosis.json").read_text())
    finding = next(f for f in diagnosis["findings"] if f["code"] == "lr_range")
    assert finding["evidence"]["suggested_lr"] == pytest.approx(saved["suggested"], rel=1e-3)


def test_doctor_lr_find_and_learning_rate_together_are_a_usage_error(digits_dir, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    result = CliRunner().invoke(app, ["doctor", "default", str(digits_dir), "--workdir", str(tmp_path / "w"),
                                      "--lr-find", "--learning-rate", "0.01"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "imgflow: give --lr-find (a range test picks the rate) or --learning-rate, not both")
