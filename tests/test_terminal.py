"""What a user reads in the terminal: progress, no start-up noise, one summary, the verdict last."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgflow.flows import console
from imgflow.flows.info import info_lines, version_line, workdir_contents
from imgflow.tasks import progress

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]")
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "cuda", "cuInit", "cpu_feature_guard",
         "This TensorFlow binary is optimized", "Your input ran out of data", "shuffle=True")


# ------------------------------------------------------------------ progress (pure)


def test_epoch_line_orders_loss_first_and_marks_the_best():
    logs = {"accuracy": 0.5, "loss": 1.25, "val_accuracy": 0.75, "val_loss": 0.5, "learning_rate": 0.001}
    line = progress.epoch_line(3, 10, logs, 2.04, best=True)
    assert line == "epoch  3/10  loss 1.2500  accuracy 0.5000  |  val_loss 0.5000  val_accuracy 0.7500  2.0s  * best"
    assert not progress.epoch_line(1, 2, {"loss": float("nan")}, 0.5, best=False).endswith("best")
    assert "loss nan" in progress.epoch_line(1, 2, {"loss": float("nan")}, 0.5, best=False)


def test_progress_line_and_durations():
    assert progress.progress_line("validate", 100, 400, 10.0) == "validate: 100/400 files (10.0/s, ETA 30s)"
    assert progress.progress_line("predict", 400, 400, 125.0) == "predict: 400/400 files (3.2/s, in 2m05s)"
    assert progress.progress_line("shards", 7, None, 1.0, unit="images") == "shards: 7 images (7.0/s)"
    assert progress.format_duration(7500) == "2h05m"


def test_not_a_terminal_logs_periodic_lines_and_tasks_report_by_name(monkeypatch, caplog):
    monkeypatch.setenv(progress.MODE_ENV, "plain")
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # every count is due: the lines are deterministic
    caplog.set_level(logging.INFO, logger="imgflow.progress")
    progress.advance("predict", 5)  # no tracker open: a pure task call does nothing
    with progress.track("predict") as bar:
        bar.add_total(4)
        progress.advance("predict", 1)
        progress.advance("predict", 3)  # the last count: the closing line says it, once
        assert bar.done == 4
    items = list(progress.iterate(range(3), "validate", total=3))
    assert items == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records if r.name == "imgflow.progress"]
    assert lines[0].startswith("predict: 1/4 files (")
    assert lines[1].startswith("predict: 4/4 files (") and "in 0s" in lines[1]
    assert [line.split(" (")[0] for line in lines[2:]] == ["validate: 1/3 files", "validate: 2/3 files", "validate: 3/3 files"]
    progress.say("epoch 1/1  loss 0.1000")
    assert caplog.records[-1].getMessage() == "epoch 1/1  loss 0.1000"


def test_off_says_nothing(monkeypatch, caplog):
    monkeypatch.setenv(progress.MODE_ENV, "off")
    caplog.set_level(logging.INFO, logger="imgflow.progress")
    with progress.track("predict", 2) as bar:
        bar.advance(2)
    progress.say("hidden")
    assert not [r for r in caplog.records if r.name == "imgflow.progress"]


# ------------------------------------------------------------------ console, summary, info


def test_terminal_filter_keeps_warnings_and_retries_only():
    def record(level: int, msg: str, name: str = "prefect.task_runs") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, (), None)

    keep = console.TerminalFilter()
    assert not keep.filter(record(logging.INFO, "Finished in state Completed()"))
    assert not keep.filter(record(logging.WARNING, "shown by imgflow's own handler", "imgflow.tasks.dataset"))
    assert console.TerminalFilter(quiet=False).filter(record(logging.INFO, "Finished in state Completed()"))
    assert keep.filter(record(logging.WARNING, "class_imbalance: cats has 3x dogs"))
    assert keep.filter(record(logging.INFO, "Task run failed with %s: %r - Retry %s/%s will start %s"))
    assert not keep.filter(record(logging.WARNING, "5 out of the last 8 calls ... triggered tf.function retracing",
                                  "tensorflow"))


def test_epoch_lines_read_metadata_defensively():
    stopped = {"best_epoch": 4, "epochs_run": 7, "stopped_early": True, "stop_reason": "val_loss did not improve "
               "for 3 epochs", "monitor": "val_loss"}
    assert console.epoch_lines(stopped) == [
        "Kept epoch 4 of 7 run (best val_loss).", "Training stopped early: val_loss did not improve for 3 epochs."]
    legacy = {"best_epoch": 2, "epochs_run": 3, "stopped_early": {"stopped": False}, "config": {"epochs": 3}}
    assert console.epoch_lines(legacy) == ["Kept epoch 2 of 3 run (best val_loss).", "Training ran all 3 epochs."]
    assert console.epoch_lines({}) == []
    ran_all = {"best_epoch": 9, "best_value": 0.775, "epochs_run": 10, "stopped_early": False,
               "stop_reason": "ran all 10 epochs", "monitor": "val_accuracy"}
    assert console.epoch_lines(ran_all) == ["Kept epoch 9 of 10 run (best val_accuracy 0.7750).",
                                            "Training ran all 10 epochs."]
    cut = {**ran_all, "best_epoch": 2, "epochs_run": 3, "best_value": float("nan"),
           "stop_reason": "stopped after 3 of 10 epochs (the loss became NaN or training was interrupted)"}
    assert console.epoch_lines(cut) == ["Kept epoch 2 of 3 run (best val_accuracy).", "Training stopped: stopped after 3 of "
                                        "10 epochs (the loss became NaN or training was interrupted)."]


def test_summary_paths_are_absolute_and_time_comes_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = console.Summary("predict")
    summary.add("3 rows")
    summary.path("Predictions", Path("out.csv"))
    summary.path("Drift", None)
    lines = summary.render()
    assert lines[:3] == ["", "3 rows", f"Predictions:  {tmp_path / 'out.csv'}"]
    assert re.fullmatch(r"predict took \d+s", lines[-1])


def test_info_lists_champion_runs_and_predictions(tmp_path):
    work = tmp_path / "work"
    run = work / "models" / "default-1"
    run.mkdir(parents=True)
    (run / "metadata.json").write_text(json.dumps({"run_id": "default-1", "metrics": {"val_accuracy": 0.875},
                                                   "best_epoch": 2}))
    (run / "model.keras").write_bytes(b"x")
    (work / "champion.json").write_text(json.dumps({"model_dir": str(run), "run_id": "default-1"}))
    (work / "predictions").mkdir()
    (work / "predictions" / "inbox.csv").write_text("path,label\na.png,cat\nb.png,dog\n")
    found = workdir_contents(work)
    assert found["champion"] == {"model_dir": str(run), "run_id": "default-1", "val_accuracy": 0.875}
    assert found["runs"] == [{"name": "default-1", "val_accuracy": 0.875, "best_epoch": 2, "finished": True}]
    assert [(Path(p["path"]).name, p["rows"]) for p in found["predictions"]] == [("inbox.csv", 2)]
    text = "\n".join(info_lines(work, ["CPU:0"]))
    assert "devices     CPU:0" in text and "(val accuracy 0.8750)" in text and "2 rows" in text
    assert workdir_contents(tmp_path / "none")["exists"] is False


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="120", TERM="xterm", PREFECT_LOGGING_LEVEL="INFO")  # INFO lines exist: the CLI hides them
    for name in ("TF_CPP_MIN_LOG_LEVEL", "IMGFLOW_VERBOSE", progress.MODE_ENV, progress.INTERVAL_ENV):
        env.pop(name, None)  # the command itself must keep TensorFlow quiet
    try:
        from prefect.settings import PREFECT_API_URL

        if PREFECT_API_URL.value():
            env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    except ImportError:
        pass
    return env


def test_version_and_info_commands(tmp_path):
    done = subprocess.run([sys.executable, "-m", "imgflow", "--version"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == version_line()
    assert re.fullmatch(r"imgflow \S+ \(TensorFlow \S+, Keras 3\.\S+, Prefect 3\.\S+\)", done.stdout.strip())
    shown = subprocess.run([sys.executable, "-m", "imgflow", "info", "--workdir", str(tmp_path / "w")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), timeout=300)
    assert shown.returncode == 0, shown.stdout
    assert "devices     CPU:0" in shown.stdout and "does not exist yet" in shown.stdout
    assert not [line for line in shown.stdout.splitlines() if any(n in line for n in NOISE)], shown.stdout


# ------------------------------------------------------------------ the commands, piped and in a pseudo-terminal


def run_piped(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "imgflow", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=_env(), timeout=900)
    return done.returncode, done.stdout.splitlines()


def run_in_pty(*args: str) -> tuple[int, str]:
    """Run the command with stdin/stdout/stderr on a pseudo-terminal; its screen output, ANSI removed."""
    master, slave = os.openpty()
    child = subprocess.Popen([sys.executable, "-m", "imgflow", *args], stdin=slave, stdout=slave, stderr=slave,
                             env=_env(), close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif child.poll() is not None:
            break
    code = child.wait(timeout=60)
    os.close(master)
    return code, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")


def assert_quiet(lines: list[str]) -> None:
    noisy = [line for line in lines if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(lines)
    assert not [line for line in lines if "Finished in state" in line or "Created task run" in line], "\n".join(lines)


@pytest.mark.slow
def test_train_and_predict_read_well_piped_and_in_a_terminal(prefect_server, tmp_path):
    from tests.imagefactory import make_digit_folder

    data = make_digit_folder(tmp_path / "data", per_class=24)
    work = tmp_path / "work"
    code, lines = run_piped("train", str(data), "--workdir", str(work), "--epochs", "3", "--image-size", "32",
                            "--seed", "1")
    assert code == 0, "\n".join(lines)
    assert_quiet(lines)
    epochs = [line for line in lines if re.match(r"epoch \d+/3 ", line)]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], "\n".join(lines)  # one line per epoch
    assert len(lines) <= 40, "\n".join(lines)
    metadata = json.loads(next((work / "models").glob("*/metadata.json")).read_text())
    kept = [line for line in lines if line.startswith("Kept epoch ")]
    assert kept == [f"Kept epoch {metadata['best_epoch']} of {metadata['epochs_run']} run "
                    f"(best {metadata['monitor']} {metadata['best_value']:.4f})."], kept
    assert not any(line.startswith("Training: kept") for line in lines)  # said once
    assert "* best" in epochs[0] and any(f"Model:        {work.absolute()}" in line for line in lines)
    assert lines[-1].startswith("promoted"), lines[-1]
    assert (work / "logs" / "imgflow.log").read_text().count("Finished in state") >= 3  # Prefect's lines went there

    inbox = make_digit_folder(tmp_path / "inbox", per_class=6)
    code, lines = run_piped("predict", "champion", str(inbox), "--workdir", str(work))
    assert code == 0, "\n".join(lines)
    assert_quiet(lines)
    assert len(lines) <= 15, "\n".join(lines)
    assert lines[-1] == "Classified 18 of 18 files", lines[-1]
    assert any(line.startswith("predict took ") for line in lines)

    code, screen = run_in_pty("predict", "champion", str(inbox), "--workdir", str(work), "--out",
                              str(tmp_path / "again.csv"))
    assert code == 0, screen
    screen_lines = [line.rstrip() for line in screen.split("\n") if line.strip()]
    assert_quiet(screen_lines)
    bars = [line for line in screen_lines if line.lstrip().startswith("predict") and "18/18" in line]
    assert bars and "files" in bars[-1], screen  # the rich progress display, left at its final state
    assert screen_lines[-1] == "Classified 18 of 18 files", screen


def test_verbose_is_a_global_option_that_sets_the_environment(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from imgflow.flows.cli import app

    monkeypatch.delenv("IMGFLOW_VERBOSE", raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))  # restored after
    result = CliRunner().invoke(app, ["--verbose", "info", "--no-devices", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert os.environ.get("IMGFLOW_VERBOSE") == "1" and console.verbose()
    assert f"workdir     {tmp_path}" in result.output and "champion    none (no model promoted yet)" in result.output
    monkeypatch.delenv("IMGFLOW_VERBOSE")
    assert not console.verbose()


def test_bars_show_counts_and_lines_said_above_them(monkeypatch):
    import io

    screen = io.StringIO()
    monkeypatch.setattr(progress, "mode", lambda: "bars")
    monkeypatch.setattr(sys, "stderr", screen)
    with progress.track("predict", unit="files") as bar:
        bar.add_total(5)
        progress.say("epoch 1/1  loss 0.1000")
        progress.advance("predict", 2)
        progress.advance("other", 7)  # no such tracker: ignored
        progress.advance("predict", 3)
    lines = screen.getvalue().splitlines()
    assert lines[0] == "epoch 1/1  loss 0.1000"
    assert lines[-1].startswith("predict ") and " 5/5 files " in lines[-1] and "100%" in lines[-1]
    assert progress._display is None  # the display stops with its last bar
