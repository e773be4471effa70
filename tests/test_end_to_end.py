"""The `imgflow` command end to end, as a user runs it: train, predict, evaluate, demo."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from imgflow.tasks.atomic import read_json
from tests.imagefactory import make_digit_folder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.exit_code = proc.returncode
        self.output = proc.stdout  # stdout and stderr interleaved, as a terminal shows them


def imgflow(*args: str) -> Result:
    """Run the `imgflow` command in a child process against this session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "imgflow", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, env=env, cwd=REPO)
    return Result(proc)


def relu_head_builder(input_shape, num_classes):
    """The original report's mistake: raw 0-255 inputs and a ReLU output layer."""
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(num_classes, activation="relu", name="relu_head"),
    ])


def test_train_predict_evaluate_from_the_command_line(prefect_server, digits_dir, tmp_path):
    workdir = tmp_path / "work"
    trained = imgflow("train", str(digits_dir), "--workdir", str(workdir), "--epochs", "6",
                                  "--image-size", "32", "--seed", "3")
    assert trained.exit_code == 0, trained.output
    assert "Validation accuracy:" in trained.output and "promoted" in trained.output
    champion = read_json(workdir / "champion.json")
    metadata = read_json(Path(champion["model_dir"]) / "metadata.json")
    assert metadata["class_names"] == ["one", "seven", "zero"]
    # novelty statistics, temperature and training profile are fitted by the pipeline
    assert metadata["novelty"]["unknown_rate"] == 0.05 and metadata["calibration"]["temperature"] > 0
    assert all((Path(champion["model_dir"]) / name).is_file() for name in ("novelty.npz", "drift_profile.json"))

    # plain Keras, raw 0-255 images resized by us: no imgflow code in the loop
    model = keras.saving.load_model(Path(champion["model_dir"]) / "model.keras", safe_mode=True)
    held_out = make_digit_folder(tmp_path / "held_out", per_class=None)
    images, labels = [], []
    for label, name in enumerate(metadata["class_names"]):
        for path in sorted((held_out / name).iterdir())[60:120]:  # digits the model never saw
            images.append(np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype="float32"))
            labels.append(label)
    predicted = model.predict(np.stack(images), verbose=0).argmax(axis=1)
    assert float(np.mean(predicted == np.array(labels))) >= 0.85  # chance 0.33; 6 short epochs of warm-up + decay

    inbox = tmp_path / "inbox"
    (inbox / "nested").mkdir(parents=True)
    for i, path in enumerate(sorted((held_out / "seven").iterdir())[60:70]):
        target = inbox / ("nested" if i % 2 else ".") / f"seven, no. {i}=.png"
        target.write_bytes(path.read_bytes())
    (inbox / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    out_csv = tmp_path / "pred.csv"
    predicted_run = imgflow("predict", "champion", str(inbox), "--workdir", str(workdir),
                                        "--out", str(out_csv))
    assert predicted_run.exit_code == 0, predicted_run.output
    rows = list(csv.DictReader(out_csv.open(encoding="utf-8")))
    assert len(rows) == 11
    assert [r["path"] for r in rows if r["error"]] == ["broken.jpg"]
    good = [r for r in rows if not r["error"]]
    assert sum(r["label"] == "seven" for r in good) >= 9
    for row in good:
        assert sum(float(row[f"prob_{c}"]) for c in metadata["class_names"]) == pytest.approx(1.0, abs=1e-4)
        assert row["unknown"] in ("true", "false") and float(row["novelty"]) >= 0
    assert read_json(tmp_path / "pred.drift.json")["files"] == 11

    ood = make_digit_folder(tmp_path / "ood", {"two": 2, "three": 3, "eight": 8}, per_class=20)
    evaluated = imgflow("evaluate", "champion", str(held_out), "--workdir", str(workdir),
                                    "--out", str(tmp_path / "eval"), "--ood-dir", str(ood))
    assert evaluated.exit_code == 0, evaluated.output
    metrics = read_json(tmp_path / "eval" / "metrics.json")
    assert metrics["novelty"]["ood_count"] == 60 and metrics["novelty"]["auroc"] >= 0.8
    assert "Novelty AUROC against --ood-dir" in evaluated.output
    assert metrics["calibration"]["ece_after"] >= 0 and (tmp_path / "eval" / "novelty.png").is_file()
    assert metrics["accuracy"] >= 0.9
    assert np.sum(metrics["confusion_matrix"]) == metrics["count"] == len(list(held_out.rglob("*.png")))
    html = (tmp_path / "eval" / "report.html").read_text(encoding="utf-8")
    assert all(name in html for name in ("one", "seven", "zero"))


def test_relu_head_fails_with_its_cause_in_the_last_line(prefect_server, digits_dir, tmp_path):
    result = imgflow("train", str(digits_dir), "--workdir", str(tmp_path / "w"), "--epochs", "4",
                                 "--image-size", "32", "--model", "tests.test_end_to_end:relu_head_builder")
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("imgflow: not promoted — bad_output_activation")
    assert "relu_head" in last
    assert not (tmp_path / "w" / "champion.json").exists()


def test_training_without_validation_images_is_a_usage_error(prefect_server, digits_dir, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("val_fraction: 0\nimage_size: 16\nepochs: 1\n")
    result = imgflow("train", str(digits_dir), "--workdir", str(tmp_path / "w"), "--config", str(config))
    assert result.exit_code == 2, result.output
    assert "training needs validation images" in result.output


def test_unknown_user_builder_is_a_usage_error(prefect_server, digits_dir, tmp_path):
    result = imgflow("train", str(digits_dir), "--workdir", str(tmp_path / "w"), "--epochs", "1",
                                 "--image-size", "16", "--model", "no_such_package.models:build")
    assert result.exit_code == 2, result.output
    assert "no_such_package" in result.output.strip().splitlines()[-1]


def test_demo_command(prefect_server, tmp_path):
    result = imgflow("demo", "--workdir", tmp_path / "demo")
    assert result.exit_code == 0, result.output[-5000:]
    values = dict(line.split(None, 1) for line in result.output.splitlines() if line.strip() and " " in line.strip())
    assert float(values["val_accuracy"]) >= 0.95
    assert float(values["inbox_accuracy"]) >= 0.9
    assert Path(values["predictions_csv"].strip()).is_file()
    assert Path(values["evaluation_report"].strip()).is_file()
