"""The validate flow under the session's Prefect test server, and the `imgflow validate` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from imgflow.flows.cli import app
from imgflow.flows.validation import validate_flow
from tests.imagefactory import make_class_folder

runner = CliRunner()


def test_flow_writes_reports_and_artifacts(prefect_server, shapes_dir, tmp_path):
    from prefect.client.orchestration import get_client

    (shapes_dir / "stray.txt").write_text("x")
    summary = validate_flow(data_dir=shapes_dir, workdir=tmp_path / "work")
    assert summary == {
        "report_path": str(tmp_path / "work" / "validation.json"),
        "usable": True,
        "classes": {"birds": 12, "cats": 12, "dogs": 12},
        "errors": 0,
        "warnings": 1,
    }
    report = json.loads((tmp_path / "work" / "validation.json").read_text())
    assert report["problems"][0]["code"] == "root_file"
    assert "| dogs | 12 |" in (tmp_path / "work" / "validation.md").read_text()

    async def artifact_keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    import asyncio

    assert {"dataset-classes", "dataset-validation"} <= asyncio.run(artifact_keys())


def test_cli_validate_exit_codes(prefect_server, shapes_dir, tmp_path):
    shutil.copy(shapes_dir / "cats" / "cats_000.png", shapes_dir / "cats" / "copy.png")
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["validate", str(shapes_dir), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "37 files: 37 usable, 0 excluded" in result.output
    assert "duplicate" in result.output and str(report) in result.output
    assert json.loads(report.read_text())["usable"] is True

    strict = runner.invoke(app, ["validate", str(shapes_dir), "--report", str(report), "--strict"])
    assert strict.exit_code == 1
    assert "--strict: 1 problems found" in strict.output


def test_cli_validate_unusable_data_exits_1(prefect_server, tmp_path):
    root = make_class_folder(tmp_path / "data", {"only": 3})
    result = runner.invoke(app, ["validate", str(root), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 1
    assert "not usable for training" in result.output


def test_cli_missing_dir_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "imgflow", "validate", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"imgflow: DATA_DIR {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [["validate", "{d}", "--config", "{c}"], ["train", "{d}", "--config", "{c}"]])
def test_cli_bad_config_exits_2(tmp_path, shapes_dir, args):
    config = tmp_path / "bad.yaml"
    config.write_text("image_size: 64\nlearning_rte: 0.1\n")
    result = runner.invoke(app, [a.format(d=shapes_dir, c=config) for a in args])
    assert result.exit_code == 2
    assert "unknown key 'learning_rte'" in result.output


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "imgflow", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("validate", "preprocess", "train", "evaluate", "predict", "demo"):
        assert f" {command} " in proc.stdout


def test_unchanged_data_reuses_the_report_and_a_change_rescans(prefect_server, shapes_dir, tmp_path, monkeypatch):
    import os

    import imgflow.tasks.dataset

    workdir = tmp_path / "work"
    first = validate_flow(data_dir=shapes_dir, workdir=workdir)
    report_path = workdir / "validation.json"
    stamp = report_path.stat().st_mtime_ns
    calls = []
    real = imgflow.tasks.dataset.validate_dataset
    monkeypatch.setattr("imgflow.tasks.dataset.validate_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert validate_flow(data_dir=shapes_dir, workdir=workdir) == first
    assert calls == [] and report_path.stat().st_mtime_ns == stamp  # nothing decoded, nothing rewritten

    victim = shapes_dir / "cats" / "cats_003.png"
    victim.write_bytes(victim.read_bytes()[:40])  # now truncated: must be noticed
    os.utime(victim, ns=(stamp + 10**9, stamp + 10**9))
    changed = validate_flow(data_dir=shapes_dir, workdir=workdir)
    assert calls == [1]
    assert changed["classes"]["cats"] == 11 and changed["errors"] == 1


def test_cli_preprocess_refuses_val_dir_with_val_fraction(shapes_dir, tmp_path):
    result = runner.invoke(app, ["preprocess", str(shapes_dir), "--val-dir", str(shapes_dir), "--val-fraction", "0.2"])
    assert result.exit_code == 2
    assert "give --val-dir or --val-fraction, not both" in result.output


def test_cli_validate_unwritable_report_exits_2(prefect_server, shapes_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = runner.invoke(app, ["validate", str(shapes_dir), "--report", str(blocker / "r.json")])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"imgflow: --report {blocker / 'r.json'}: {blocker} is a file, not a folder: choose another path")


def test_validation_ahead_writes_the_report_the_flow_then_shows_as_its_own(prefect_server, shapes_dir, tmp_path, caplog,
                                                                           monkeypatch):
    import logging

    from imgflow.flows import validate_ahead
    from imgflow.flows.preprocessing import _reusable_validation
    from imgflow.flows.config import ImgflowConfig
    from imgflow.tasks.options import ValidationOptions
    from imgflow.tasks.validation_reuse import validated_ahead

    workdir = tmp_path / "work"
    child = validate_ahead.start(shapes_dir, None, workdir, ValidationOptions())
    assert child.finish() is True
    report = json.loads((workdir / "validation.json").read_text())
    assert report["classes"] == {"birds": 12, "cats": 12, "dogs": 12}
    assert (workdir / "validation.md").is_file() and validated_ahead(workdir / "validation.json")
    # the flow's validation step still runs (artifacts, events) and reuses the child's report
    assert _reusable_validation(shapes_dir, None, workdir, ImgflowConfig()) is None
    stamp = (workdir / "validation.json").stat().st_mtime_ns
    monkeypatch.setattr("imgflow.flows.validation.get_run_logger", lambda: logging.getLogger("test.validation"))
    with caplog.at_level("INFO", logger="test.validation"):
        assert validate_flow(data_dir=shapes_dir, workdir=workdir)["classes"] == report["classes"]
    assert f"Validated {shapes_dir} while TensorFlow was imported: {workdir / 'validation.json'}" in caplog.text
    assert (workdir / "validation.json").stat().st_mtime_ns == stamp


def test_validation_ahead_writes_nothing_when_the_lock_is_held_the_data_is_large_or_the_report_valid(shapes_dir, tmp_path):
    from imgflow.flows import validate_ahead
    from imgflow.tasks.options import ValidationOptions

    workdir = tmp_path / "work"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from imgflow.tasks.locks import workdir_lock\n"
        f"with workdir_lock({str(workdir)!r}, 'test holder'):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        child = validate_ahead.start(shapes_dir, None, workdir, ValidationOptions())
        assert child.finish() is False and child.process.returncode == validate_ahead.NOTHING_TO_DO
        assert not (workdir / "validation.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert validate_ahead.validate(shapes_dir, None, workdir, ValidationOptions(), max_bytes=1000) == validate_ahead.NOTHING_TO_DO
    # 39 entries: 36 images and 3 class folders
    assert validate_ahead.validate(shapes_dir, None, workdir, ValidationOptions(), max_entries=38) == validate_ahead.NOTHING_TO_DO
    assert not (workdir / "validation.json").exists()
    assert validate_ahead.validate(shapes_dir, None, workdir, ValidationOptions(), max_entries=39) == validate_ahead.WROTE
    assert validate_ahead.validate(shapes_dir, None, workdir, ValidationOptions()) == validate_ahead.NOTHING_TO_DO


def test_validation_ahead_failure_is_logged_and_leaves_the_work_to_the_flow(tmp_path, caplog):
    from imgflow.flows import validate_ahead
    from imgflow.tasks.options import ValidationOptions

    with caplog.at_level("INFO", logger="imgflow.validate_ahead"):
        ok = validate_ahead.start(tmp_path / "missing", None, tmp_path / "work", ValidationOptions()).finish()
    assert ok is False and not (tmp_path / "work" / "validation.json").exists()
    assert "validation beside the imports ended with exit 1" in caplog.text and "missing" in caplog.text


def test_validation_ahead_skips_a_workdir_inside_the_data_as_the_flow_does(shapes_dir):
    from imgflow.flows import validate_ahead
    from imgflow.tasks.options import ValidationOptions
    from imgflow.tasks.validation_reuse import reusable_summary

    workdir = shapes_dir / "work"
    assert validate_ahead.validate(shapes_dir, None, workdir, ValidationOptions()) == validate_ahead.WROTE
    report = json.loads((workdir / "validation.json").read_text())
    assert report["classes"] == {"birds": 12, "cats": 12, "dogs": 12}
    assert [p["code"] for p in report["problems"]] == ["workdir_skipped"]
    assert reusable_summary(shapes_dir, None, workdir, ValidationOptions()) is not None


def test_a_command_that_fails_before_its_flow_stops_the_child_and_frees_the_lock(shapes_dir, tmp_path):
    from imgflow.flows import validate_ahead
    from imgflow.tasks.locks import workdir_lock
    from imgflow.tasks.options import ValidationOptions

    workdir = tmp_path / "work"
    with pytest.raises(RuntimeError, match="the import failed"):
        with validate_ahead.head_start(shapes_dir, None, workdir, ValidationOptions()) as child:
            raise RuntimeError("the import failed")
    assert child.process.returncode is not None  # stopped and reaped, not left running
    with workdir_lock(workdir, "test", wait=False):  # released: no LockHeld
        pass


def test_validation_ahead_never_imports_modules_from_the_working_folder(shapes_dir, tmp_path, monkeypatch):
    from imgflow.flows import validate_ahead
    from imgflow.tasks.options import ValidationOptions

    hostile = tmp_path / "downloaded"
    hostile.mkdir()
    marker = tmp_path / "ran"
    (hostile / "numpy.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(9)\n")
    monkeypatch.chdir(hostile)
    child = validate_ahead.start(shapes_dir, None, tmp_path / "work", ValidationOptions())
    assert child.finish() is True and not marker.exists()
