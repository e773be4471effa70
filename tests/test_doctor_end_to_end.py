"""The doctor through `imgflow train`, as a user meets it: the root cause in the last line.

(a) The seed's own model (Conv/ReLU blocks, Dense 128/64/3 softmax, raw 0-255 input) in the
user's module, with SGD at 0.01: the loss becomes NaN in the first epochs; evaluation is
skipped and the last line names ``unnormalized_input``. (b) A built-in model (Rescaling,
softmax head) with Adam at 0.5: the last line names ``learning_rate_too_high`` and does not
recommend what the model already has. 32 px digits, 3 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

SEED_MODEL = textwrap.dedent(
    """
    import keras


    def build(input_shape, num_classes):
        L = keras.layers
        return keras.Sequential([
            keras.Input(input_shape),
            L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(),
            L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(128, activation="relu"), L.Dense(64, activation="relu"),
            L.Dense(num_classes, activation="softmax"),
        ])
    """
)


def imgflow(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m imgflow` in ``cwd`` (where a user's model module lives) against the test server."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "imgflow", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600, env=env, cwd=cwd)


def _model_dir(workdir: Path) -> Path:
    dirs = [p for p in (workdir / "models").iterdir() if (p / "metadata.json").is_file()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_seed_model_with_sgd_diverges_and_names_unnormalized_input(prefect_server, digits_dir, tmp_path):
    (tmp_path / "seedmodel.py").write_text(SEED_MODEL)
    work = tmp_path / "w"
    done = imgflow(tmp_path, "train", digits_dir, "--workdir", work, "--epochs", "3", "--image-size", "32",
                   "--model", "seedmodel:build", "--optimizer", "sgd", "--learning-rate", "0.01", "--seed", "1")
    assert done.returncode == 1, done.stdout[-4000:]
    assert "Traceback" not in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("imgflow: not promoted — unnormalized_input: "), last
    assert "Rescaling(1/255)" in last
    model_dir = _model_dir(work)
    diagnosis = json.loads((model_dir / "diagnosis.json").read_text())
    codes = {f["code"]: f["severity"] for f in diagnosis["findings"]}
    assert diagnosis["healthy"] is False and diagnosis["findings"][0]["code"] == "unnormalized_input"
    assert codes["unnormalized_input"] == "critical" and codes["nan_loss"] == "critical"
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["evaluation"]["skipped"] is True and "diverged" in metadata["evaluation"]["reason"]
    assert metadata["promotion"]["promoted"] is False and "unnormalized_input" in metadata["promotion"]["reason"]
    assert not (work / "champion.json").exists()


def test_builtin_model_with_a_huge_learning_rate_names_learning_rate_too_high(prefect_server, digits_dir, tmp_path):
    work = tmp_path / "w"
    done = imgflow(tmp_path, "train", digits_dir, "--workdir", work, "--epochs", "3", "--image-size", "32",
                   "--learning-rate", "0.5", "--seed", "1")
    assert done.returncode == 1, done.stdout[-4000:]
    assert "Traceback" not in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("imgflow: not promoted — learning_rate_too_high: "), last
    assert "Rescaling" not in last and "softmax" not in last
    assert "from 0.5 to 0.001" in last
    diagnosis = json.loads((_model_dir(work) / "diagnosis.json").read_text())
    first = diagnosis["findings"][0]
    assert first["code"] == "learning_rate_too_high" and first["severity"] == "critical"
    assert first["evidence"]["lr_ratio"] == 500
    # no finding tells this model to add what it has
    for finding in diagnosis["findings"]:
        assert "Rescaling(1/255)" not in finding["advice"] and "activation='softmax'" not in finding["advice"]
    assert not (work / "champion.json").exists()
