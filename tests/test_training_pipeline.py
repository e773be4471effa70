"""The training pipeline end to end: promotion, reuse, rejection, and resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from imgflow.flows.config import ImgflowConfig
from imgflow.tasks import registry
from imgflow.tasks.atomic import read_json
from imgflow.tasks.training import read_history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides) -> ImgflowConfig:
    values = {"image_size": 32, "epochs": 4, "encoding": "png", "val_fraction": 0.2, **overrides}
    return ImgflowConfig.from_flat(values)


def _raw_accuracy(model_dir: Path, data_dir: Path, metadata: dict) -> float:
    """Accuracy of model.keras loaded by plain Keras on raw 0-255 files we resize ourselves."""
    model = keras.saving.load_model(model_dir / "model.keras", safe_mode=True)
    size = metadata["image_size"]
    images, labels = [], []
    for label, name in enumerate(metadata["class_names"]):
        for path in sorted((data_dir / name).iterdir()):
            images.append(np.asarray(Image.open(path).convert("RGB").resize((size, size)), dtype="float32"))
            labels.append(label)
    predicted = np.argmax(model.predict(np.stack(images), verbose=0), axis=1)
    return float(np.mean(predicted == np.array(labels)))


def test_pipeline_trains_promotes_reuses_and_rejects(prefect_server, digits_dir, tmp_path, monkeypatch):
    from imgflow.flows.training import training_pipeline
    from imgflow.tasks import registry

    read_back: list[Path] = []  # model files the pipeline loads with Keras
    load_model = keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda path, *a, **k: read_back.append(Path(path)) or load_model(path, *a, **k))
    workdir = tmp_path / "work"
    result = training_pipeline(digits_dir, workdir=workdir, config=_config())
    # novelty and evaluation use the model just trained, never a copy read back; the run drops it
    assert read_back == [] and registry._saved_model == {}
    assert result["promoted"] is True and result["healthy"] is True and result["skipped"] is False
    assert result["val_accuracy"] >= 0.9
    assert result["reason"].startswith("promoted: first healthy model")
    model_dir = Path(result["model_dir"])
    assert result["champion_dir"] == str(model_dir)
    assert set(result) >= {"run_id", "model_dir", "val_accuracy", "healthy", "promoted", "reason", "findings", "champion_dir"}
    for name in ("model.keras", "metadata.json", "history.csv", "diagnosis.json", "learning_curves.png", "metrics.json"):
        assert (model_dir / name).is_file(), name

    metadata = read_json(model_dir / "metadata.json")
    assert metadata["class_names"] == ["one", "seven", "zero"]  # label order = sorted folders
    assert metadata["image_size"] == 32 and metadata["config"]["epochs"] == 4
    assert metadata["metrics"]["val_accuracy"] == result["val_accuracy"]
    assert set(metadata["metrics"]["per_class_recall"]) == {"one", "seven", "zero"}
    assert metadata["fingerprint"] == read_json(metadata["manifest"])["fingerprint"]
    assert metadata["versions"]["keras"] == keras.__version__
    assert metadata["promotion"]["promoted"] is True
    champion = read_json(workdir / "champion.json")
    assert champion["run_id"] == result["run_id"] and champion["val_accuracy"] == result["val_accuracy"]
    # the saved model takes raw 0-255 images: no preprocessing outside the model
    assert _raw_accuracy(model_dir, digits_dir, metadata) >= 0.9

    # same data and config again: the finished run is reused, nothing is trained
    again = training_pipeline(digits_dir, workdir=workdir, config=_config())
    assert again["skipped"] is True and again["promoted"] is True
    assert again["run_id"] == result["run_id"] and "reused run" in again["reason"]

    # a run that is much worse than the champion on the same validation set is rejected
    read_back.clear()
    weak = training_pipeline(digits_dir, workdir=workdir, config=_config(epochs=1, learning_rate=1e-6))
    assert weak["run_id"] != result["run_id"]
    assert [p.resolve() for p in read_back] == [(model_dir / "model.keras").resolve()]  # the champion, scored beside it
    assert weak["promoted"] is False, weak
    assert weak["reason"].startswith("rejected")
    assert read_json(workdir / "champion.json")["run_id"] == result["run_id"]
    assert read_json(Path(weak["model_dir"]) / "metadata.json")["promotion"]["promoted"] is False


def _api_env() -> dict[str, str]:
    """Environment of a child process that talks to this session's Prefect test server."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PREFECT_LOGGING_LEVEL"] = "INFO"  # the resume message goes to the run log
    return env


def test_killed_training_resumes_at_the_epoch_it_was_killed_in(prefect_server, digits_dir, tmp_path):
    workdir = tmp_path / "work"
    command = [
        sys.executable, "-c", "from imgflow.flows.cli import main; main()",
        "train", str(digits_dir), "--workdir", str(workdir), "--epochs", "5", "--image-size", "32",
    ]
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, env=_api_env(), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    killed_after = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        backups = list(workdir.glob("models/*/backup/training_metadata.json"))
        if backups:
            try:
                epoch = read_json(backups[0])["epoch"]
            except ValueError:  # caught mid-write
                epoch = 0
            if epoch >= 2:  # two epochs backed up: the child is now in epoch 3
                os.kill(child.pid, signal.SIGKILL)
                killed_after = epoch
                break
        time.sleep(0.02)
    child.wait(timeout=60)
    assert killed_after == 2, log_path.read_text()[-3000:]
    assert child.returncode == -signal.SIGKILL
    run_dir = next(workdir.glob("models/*"))
    assert not (run_dir / "model.keras").exists()
    assert not (workdir / "champion.json").exists()

    # the same command again: same run directory, continues at epoch 3
    second = subprocess.run(command, env=_api_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert "continuing at epoch 3" in output
    assert "epoch 1/5" not in output and "epoch 3/5" in output
    assert [p.name for p in workdir.glob("models/*")] == [run_dir.name]
    history = [int(r["epoch"]) for r in read_history(run_dir)]
    assert history == [0, 1, 2, 3, 4]
    summary = read_json(run_dir / "train_summary.json")
    assert summary["resumed"] is True and summary["initial_epoch"] == 2 and summary["epochs_run"] == 5
    assert not (run_dir / "backup").exists()
    assert read_json(workdir / "champion.json")["run_id"] == run_dir.name
    assert registry.resolve_model_dir("champion", workdir) == run_dir.resolve()

    # the best epoch survived the kill: the summary names the epoch with the lowest val loss
    rows = read_history(run_dir)
    monitor = summary["monitor"]
    best = (max if monitor.endswith("accuracy") else min)(r[monitor] for r in rows)
    assert summary["best_epoch"] == next(int(r["epoch"]) for r in rows if r[monitor] == best) + 1
    assert summary["deterministic"] is True


def test_train_task_retries_transient_failures_but_not_logic_errors(prefect_server, monkeypatch, tmp_path):
    from prefect import flow

    import imgflow.tasks.training
    from imgflow.flows.config import TrainOptions
    from imgflow.flows.training import train_task
    from imgflow.tasks.models import ModelConfigError

    calls: list[str] = []

    def flaky(manifest_path, run_dir, options, log=print):
        calls.append(str(run_dir))
        if len(calls) == 1:
            raise RuntimeError("worker lost")  # transient: retried, the retry resumes run_dir
        return {"run_dir": str(run_dir), "attempt": len(calls)}

    monkeypatch.setattr(imgflow.tasks.training, "train_from_manifest", flaky)
    monkeypatch.setattr(train_task, "retry_delay_seconds", 0)

    @flow
    def one_task(fn_args):
        return train_task(*fn_args)

    result = one_task((str(tmp_path / "m.json"), str(tmp_path / "run"), TrainOptions()))
    assert result == {"run_dir": str(tmp_path / "run"), "attempt": 2}
    assert calls == [str(tmp_path / "run")] * 2  # same run directory on the retry

    def bad_config(manifest_path, run_dir, options, log=print):
        calls.append("bad")
        raise ModelConfigError("model: unknown model 'vgg99'")

    calls.clear()
    monkeypatch.setattr(imgflow.tasks.training, "train_from_manifest", bad_config)
    with pytest.raises(ModelConfigError):
        one_task((str(tmp_path / "m.json"), str(tmp_path / "run"), TrainOptions()))
    assert calls == ["bad"]  # a logic error is not retried
