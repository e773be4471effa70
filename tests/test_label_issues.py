"""Label issues: out-of-fold confident learning finds images filed under the wrong class."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgflow.tasks.dataset import validate_dataset
from imgflow.tasks.label_issues import (
    CSV_COLUMNS,
    LabelIssuesError,
    find_label_issues,
    label_issues_from_report,
    rank_label_issues,
    write_csv,
)


def flipped_digits(root: Path, count: int = 400, share: float = 0.05, seed: int = 0) -> set[str]:
    """Real 8x8 scikit-learn digits as PNGs in ``root/<digit>/``, ``share`` of them in a wrong folder.

    Returns the relative paths of the misfiled images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(digits.target), count, replace=False)
    flipped = set(rng.choice(count, round(count * share), replace=False).tolist())
    wrong: set[str] = set()
    for k, index in enumerate(chosen):
        truth = int(digits.target[index])
        given = (truth + int(rng.integers(1, 10))) % 10 if k in flipped else truth
        rel = f"{given}/digit_{k:04d}.png"
        (root / str(given)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((digits.images[index] / 16 * 255).astype(np.uint8), "L").save(root / rel)
        if k in flipped:
            wrong.add(rel)
    return wrong


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_flipped_digit_labels_rank_first(tmp_path):
    wrong = flipped_digits(tmp_path / "data")
    report = validate_dataset(tmp_path / "data")
    usable = {path for path, _ in report["files"]["train"]}
    wrong &= usable  # validation may exclude an image (same pixels in two folders)
    assert len(wrong) >= 15
    result = label_issues_from_report(report, tmp_path / "work")
    rows = read_rows(Path(result["csv"]))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == result["candidates"]
    top = rows[: len(wrong)]
    hits = sum(row["path"] in wrong for row in top)
    assert len(top) >= len(wrong) * 0.6, (len(top), len(wrong))
    assert hits / len(top) >= 0.8, (hits, len(top), len(wrong))
    for row in top:
        assert row["given"] == row["path"].split("/")[0] and row["predicted"] != row["given"]
        assert float(row["predicted_prob"]) > float(row["given_prob"])
    margins = [float(r["predicted_prob"]) - float(r["given_prob"]) for r in rows]
    assert margins == sorted(margins, reverse=True)
    gallery = Path(result["html"]).read_text(encoding="utf-8")
    assert gallery.count("<figure>") == min(60, len(rows)) and "data:image/png;base64," in gallery
    assert f"labelled <b>{top[0]['given']}</b>" in gallery
    assert result["images"] == len(usable) and not list((tmp_path / "work").glob(".tmp-*"))


def test_rank_uses_per_class_thresholds_and_margin():
    probabilities = np.array([
        [0.9, 0.1], [0.8, 0.2], [0.3, 0.7],  # labelled 0: mean self-confidence 0.667
        [0.1, 0.9], [0.2, 0.8], [0.45, 0.55], [0.6, 0.4],  # labelled 1: mean self-confidence 0.6625
    ])
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    ranked = rank_label_issues(probabilities, labels)
    # sample 2: p1 = 0.7 >= 0.6625 and above its given 0.3; sample 6: p0 = 0.6 < 0.667, not confident;
    # sample 5: p0 = 0.45, below threshold
    assert [(i, j) for i, j, _ in ranked] == [(2, 1)]
    assert ranked[0][2] == pytest.approx(0.4)


def test_csv_cells_that_look_like_formulas_are_neutralised(tmp_path):
    path = write_csv([{"path": "=HYPERLINK(\"x\")/a.png", "given": "-1", "predicted": "+b", "given_prob": 0.1,
                       "predicted_prob": 0.9}], tmp_path / "out.csv")
    rows = read_rows(path)
    assert rows == [{"path": "'=HYPERLINK(\"x\")/a.png", "given": "'-1", "predicted": "'+b",
                     "given_prob": "0.1", "predicted_prob": "0.9"}]


def test_too_few_images_is_a_clear_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name / "x.png")
    with pytest.raises(LabelIssuesError, match="at least 2 images"):
        find_label_issues(tmp_path, [("a/x.png", "a"), ("b/x.png", "b")], ["a", "b"])
    with pytest.raises(LabelIssuesError, match="at least 2 classes"):
        find_label_issues(tmp_path, [("a/x.png", "a")], ["a", "b"])


def test_cli_doctor_label_issues(prefect_server, digits_dir, tmp_path):
    from imgflow.flows.cli import app

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    moved = sorted((data / "zero").iterdir())[0]
    shutil.move(str(moved), data / "one" / "was_zero.png")
    work = tmp_path / "work"
    result = CliRunner().invoke(app, ["doctor", "--label-issues", str(data), "--workdir", str(work)])
    assert result.exit_code == 0, result.output
    assert "training images may be mislabelled" in result.output
    rows = read_rows(work / "label_issues.csv")
    assert rows[0] == {**rows[0], "path": "one/was_zero.png", "given": "one", "predicted": "zero"}
    assert "one/was_zero.png: labelled one" in result.output and (work / "label_issues.html").is_file()
    usage = CliRunner().invoke(app, ["doctor", "--workdir", str(work)])
    assert usage.exit_code == 2 and "doctor needs MODEL_OR_BUILDER and DATA_DIR" in usage.output


def test_training_pipeline_runs_it_only_when_asked(prefect_server, digits_dir, tmp_path, monkeypatch):
    import imgflow.flows.training as training_flow
    from imgflow.flows.config import ImgflowConfig

    class Stop(Exception):
        pass

    def stop_before_training(*args, **kwargs):
        raise Stop  # the hook runs before training: no need to train to check it

    monkeypatch.setattr(training_flow, "train_task", stop_before_training)
    assert ImgflowConfig().validation.label_issues is False
    plain = tmp_path / "plain"
    with pytest.raises(Stop):
        training_flow.training_pipeline(digits_dir, workdir=plain, config=ImgflowConfig.from_flat({"image_size": 16}))
    assert not (plain / "label_issues.csv").exists()
    asked = tmp_path / "asked"
    config = ImgflowConfig.from_flat({"image_size": 16, "label_issues": True})
    with pytest.raises(Stop):
        training_flow.training_pipeline(digits_dir, workdir=asked, config=config)
    assert (asked / "label_issues.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = read_rows(asked / "label_issues.csv")
    assert all(row["given"] in {"zero", "one", "seven"} for row in rows) and (asked / "label_issues.html").is_file()
