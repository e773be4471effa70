"""Evaluation report: metrics against hand-computed values, plots, saliency, report, flows."""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks.atomic import read_json, write_json
from imgflow.tasks.metrics import EvaluationError, compute_metrics, expected_calibration_error
from imgflow.tasks.plots import plot_confusion_matrix, plot_learning_curves, plot_reliability
from imgflow.tasks.registry import compare_models, decide
from imgflow.tasks.report import write_report
from imgflow.tasks.saliency import find_gradcam_layer, grad_cam, occlusion_saliency, saliency_maps
from tests.imagefactory import digit_images

CLASSES = ["one", "seven", "zero"]  # sorted folder names = model class order
DIGIT_TO_LABEL = {1: 0, 7: 1, 0: 2}

# A tiny fixed set, every number below computed by hand.
# true:      0     0     0     1     1     2
# predicted: 0     0     1     1     2     2
HAND_LABELS = [0, 0, 0, 1, 1, 2]
HAND_PROBS = np.array([
    [0.65, 0.25, 0.10],
    [0.55, 0.35, 0.10],
    [0.10, 0.75, 0.15],
    [0.05, 0.85, 0.10],
    [0.07, 0.15, 0.78],
    [0.25, 0.20, 0.55],
])
HAND_NAMES = ["cat", "dog", "bird"]


def _png_ok(path: Path, min_bytes: int = 5_000) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > min_bytes, (path, len(data))
    with Image.open(io.BytesIO(data)) as image:
        extrema = image.convert("L").getextrema()
        assert extrema[0] < extrema[1], f"{path} is a blank image"
        return image.size


# --------------------------------------------------------------------------- pure metrics


def test_metrics_match_hand_computed_values():
    m = compute_metrics(HAND_LABELS, HAND_PROBS, HAND_NAMES)
    assert m["count"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["confusion_matrix_normalized"][0] == pytest.approx([2 / 3, 1 / 3, 0])
    expected = {
        "cat": (1.0, 2 / 3, 0.8, 3),
        "dog": (0.5, 0.5, 0.5, 2),
        "bird": (0.5, 1.0, 2 / 3, 1),
    }
    for name, (p, r, f, s) in expected.items():
        row = m["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f)), name
        assert row["support"] == s
    assert m["macro"]["precision"] == pytest.approx(2 / 3)
    assert m["macro"]["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["macro"]["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted"]["f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["loss"] == pytest.approx(-sum(map(math.log, [0.65, 0.55, 0.10, 0.85, 0.15, 0.55])) / 6)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(5 / 6)
    # bins (0.5,0.6]: 2 right at .55; (0.6,0.7]: 1 right at .65; (0.7,0.8]: 2 wrong at .75/.78; (0.8,0.9]: 1 right at .85
    assert m["expected_calibration_error"] == pytest.approx((2 * 0.45 + 0.35 + 2 * 0.765 + 0.15) / 6)
    assert m["prediction_distribution"] == {"cat": 2, "dog": 2, "bird": 2}
    assert m["chance_accuracy"] == pytest.approx(1 / 3)
    assert m["majority_accuracy"] == pytest.approx(0.5)
    assert m["most_confused"][0] == {"true": "dog", "predicted": "bird", "count": 1, "fraction_of_true": 0.5}
    assert m["class_notes"]["dog"].startswith("dog: recall 0.50, precision 0.50, most often mistaken for bird (1 of 2)")
    assert "all 1 recognised" in m["class_notes"]["bird"]
    assert m["outputs_were_logits"] is False


def test_confusion_matrix_rows_are_true_columns_predicted():
    # every true "a" predicted "c": the count sits in row a, column c
    probs = np.tile([0.1, 0.1, 0.8], (4, 1))
    m = compute_metrics([0, 0, 0, 2], probs, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[0, 0, 3], [0, 0, 0], [0, 0, 1]]
    assert m["per_class"]["a"]["recall"] == 0.0 and m["per_class"]["c"]["precision"] == 0.25
    assert m["per_class"]["c"]["recall"] == 1.0 and m["prediction_distribution"] == {"a": 0, "b": 0, "c": 4}
    assert m["class_notes"]["a"].startswith("a: recall 0.00, precision 0.00, most often mistaken for c (3 of 3)")
    assert "no images of this class" in m["class_notes"]["b"]
    assert "the model predicts c for every image" in m["class_notes"]["c"]
    assert "never predicts" in m["class_notes"]["a"]


def test_logits_are_turned_into_probabilities_and_flagged():
    logits = np.log(HAND_PROBS) + 3.0  # softmax(logits) == HAND_PROBS
    m = compute_metrics(HAND_LABELS, logits, HAND_NAMES)
    assert m["outputs_were_logits"] is True
    assert m["loss"] == pytest.approx(compute_metrics(HAND_LABELS, HAND_PROBS, HAND_NAMES)["loss"])


def test_two_classes_have_no_top_k_and_bad_shapes_are_named():
    m = compute_metrics([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), ["x", "y"])
    assert m["accuracy"] == 1.0 and "top_k_accuracy" not in m
    with pytest.raises(EvaluationError, match=r"expected shape \(2, 3\)"):
        compute_metrics([0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), ["x", "y", "z"])
    with pytest.raises(EvaluationError, match="labels"):
        compute_metrics([0, 5], np.array([[0.9, 0.1], [0.2, 0.8]]), ["x", "y"])


def test_perfectly_calibrated_set_has_zero_ece():
    # confidence 0.75 in every row, 3 of 4 right
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error([0, 0, 0, 1], probs) == pytest.approx(0.0)


# --------------------------------------------------------------------------- plots and report


def test_plots_are_written_and_not_blank(tmp_path):
    m = compute_metrics(HAND_LABELS, HAND_PROBS, HAND_NAMES)
    size = _png_ok(plot_confusion_matrix(m["confusion_matrix"], HAND_NAMES, tmp_path / "cm.png"))
    assert size[0] > size[1] > 200  # counts and normalised side by side
    _png_ok(plot_reliability(np.array(HAND_LABELS), HAND_PROBS, tmp_path / "rel.png"))
    history = tmp_path / "history.csv"
    history.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.4,1.1,0.5,1.0\n1,0.7,0.8,0.6,0.9\n2,0.9,0.4,0.7,0.8\n")
    _png_ok(plot_learning_curves(history, tmp_path / "curves.png"))
    assert plot_learning_curves(tmp_path / "missing.csv", tmp_path / "none.png") is None
    assert not list(tmp_path.glob(".tmp-*"))


def test_chart_warm_up_runs_once_in_a_thread_and_the_next_chart_waits_for_it(tmp_path, monkeypatch):
    from imgflow.tasks import plots

    monkeypatch.setattr(plots, "_warm_up", None)
    plots.warm_up_in_background()
    first = plots._warm_up
    plots.warm_up_in_background()
    assert plots._warm_up is first and first.name == "imgflow-chart-warm-up"
    history = tmp_path / "history.csv"
    history.write_text("epoch,accuracy,loss\n0,0.4,1.1\n1,0.7,0.8\n")
    _png_ok(plot_learning_curves(history, tmp_path / "curves.png"))
    assert not first.is_alive()  # joined before drawing: two threads never draw at once


def test_report_mentions_every_class_findings_and_champion(tmp_path):
    m = compute_metrics(HAND_LABELS, HAND_PROBS, HAND_NAMES)
    cm_png = plot_confusion_matrix(m["confusion_matrix"], HAND_NAMES, tmp_path / "confusion_matrix.png")
    diagnosis = {"healthy": False, "findings": [{"code": "loss_at_chance", "severity": "critical",
                                                  "evidence": {"loss": 1.0986}, "advice": "Check the labels."}]}
    champion_metrics = compute_metrics(HAND_LABELS, np.tile([0.5, 0.3, 0.2], (6, 1)), HAND_NAMES)
    comparison = compare_models(m, champion_metrics, "run-new", "run-old")
    decision = decide({"run_id": "run-new", "healthy": True, "class_names": HAND_NAMES, "fingerprint": "f"}, m,
                      {"run_id": "run-old", "class_names": HAND_NAMES, "fingerprint": "f"}, champion_metrics, 0.01,
                      min_class_images_for_recall_gate=1)
    assert decision["decision"] == "promote" and decision["promote"] is True  # 4/6 beats 3/6
    comparison.update(decision=decision["decision"], reason=decision["reason"])
    paths = write_report(tmp_path, m, {"confusion_matrix": cm_png}, diagnosis=diagnosis, champion=comparison,
                         info={"run_id": "run-new", "data": "somewhere"},
                         skipped=[{"path": "cat/broken.jpg", "reason": "cannot identify image file"}])
    page = paths["report_html"].read_text()
    assert page.count("data:image/png;base64,") == 1 and "src='confusion_matrix.png'" not in page
    for name in HAND_NAMES:
        assert page.count(name) >= 3, name  # table, notes, confusion matrix
    assert "loss_at_chance" in page and "Check the labels." in page
    assert "run-old" in page and "promote" in page
    assert "cat/broken.jpg" in page
    md = paths["report_md"].read_text()
    assert all(name in md for name in HAND_NAMES) and "![" in md
    doc = read_json(paths["metrics_json"])
    assert doc["accuracy"] == pytest.approx(4 / 6) and doc["skipped"]["count"] == 1
    assert doc["comparison"]["champion_run_id"] == "run-old"


# --------------------------------------------------------------------------- models


def _conv_model(seed: int = 1):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu", padding="same", name="last_conv"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])


def _save_model_dir(model, path: Path, run_id: str, history: dict | None = None) -> Path:
    path.mkdir(parents=True)
    model.save(path / "model.keras")
    write_json(path / "metadata.json", {
        "run_id": run_id, "class_names": CLASSES, "image_size": 32, "aspect": "squash",
        "metrics": {}, "fingerprint": "test", "config": {"promotion_tolerance": 0.01},
        "versions": {}, "created": "2024-01-01T00:00:00+00:00", "healthy": True,
    })
    if history:
        keys = list(history)
        rows = ["epoch," + ",".join(keys)]
        for e in range(len(history[keys[0]])):
            rows.append(f"{e}," + ",".join(str(history[k][e]) for k in keys))
        (path / "history.csv").write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A small CNN trained 3 epochs on 20 real digits a class (~90% right on 60), and an untrained 'champion'."""
    pairs = digit_images([0, 1, 7], per_class=20)
    x = np.stack([img for _, img in pairs]).astype("float32")
    y = np.array([DIGIT_TO_LABEL[d] for d, _ in pairs])
    model = _conv_model()
    model.compile(optimizer=__import__("keras").optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    fit = model.fit(x, y, epochs=3, batch_size=16, validation_split=0.2, shuffle=True, verbose=0)
    root = tmp_path_factory.mktemp("models")
    trained = _save_model_dir(model, root / "run-trained", "run-trained", fit.history)
    write_json(trained / "diagnosis.json", {"healthy": True, "findings": [
        {"code": "overfitting", "severity": "info", "evidence": {"gap": 0.05}, "advice": "Fine for now."}]})
    untrained = _save_model_dir(_conv_model(seed=7), root / "run-untrained", "run-untrained")
    return trained, untrained


def test_grad_cam_finds_last_conv_and_falls_back_to_occlusion():
    import keras

    model = _conv_model()
    assert find_gradcam_layer(model) == "last_conv"
    images = np.stack([img for _, img in digit_images([0, 1], per_class=1)]).astype("float32")
    maps = grad_cam(model, images, [0, 1])
    assert maps.shape == (2, 32, 32) and 0.0 <= maps.min() and maps.max() == pytest.approx(1.0, abs=1e-5)

    dense = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    assert find_gradcam_layer(dense) is None
    maps, method = saliency_maps(dense, images, [0, 1])
    assert method == ["occlusion", "occlusion"] and maps.shape == (2, 32, 32) and maps.max() == pytest.approx(1.0)
    direct = occlusion_saliency(dense, images, [0, 1], patch=8, stride=8)
    assert direct.shape == (2, 32, 32)


def _recount(predictions_csv: Path) -> tuple[int, list[list[int]]]:
    cm = [[0] * 3 for _ in CLASSES]
    with open(predictions_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        cm[CLASSES.index(row["true"])][CLASSES.index(row["label"])] += 1
    return len(rows), cm


def test_evaluate_flow_on_a_folder_with_champion_and_broken_file(model_dirs, digits_dir, tmp_path, prefect_server):
    from imgflow.flows.evaluation import evaluate_flow

    trained, untrained = model_dirs
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    (data / "seven" / "broken.png").write_bytes(b"not an image at all")
    workdir = tmp_path / "work"
    write_json(workdir / "champion.json", {"run_id": "run-untrained", "model_dir": str(untrained),
                                           "promoted": "2024-01-01T00:00:00+00:00", "val_accuracy": 0.3})
    result = evaluate_flow(str(trained), data, workdir=workdir, out=tmp_path / "out")

    out = tmp_path / "out"
    assert result["out_dir"] == str(out.resolve()) and result["skipped"] == 1 and result["count"] == 180
    doc = read_json(result["metrics_json"])
    n, cm = _recount(out / "predictions.csv")
    assert n == 180 and doc["confusion_matrix"] == cm
    assert sum(map(sum, doc["confusion_matrix"])) == 180
    assert doc["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 180)
    assert result["accuracy"] == doc["accuracy"] > 0.7  # 3 epochs on digits 0/1/7
    assert doc["skipped"]["files"][0]["path"] == "seven/broken.png"
    assert doc["comparison"]["champion_run_id"] == "run-untrained"
    assert result["comparison"]["decision"] == "promote"
    assert result["comparison"]["reason"].startswith("promoted: val accuracy")  # imgflow.tasks.registry's rule
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"confusion_matrix.png", "reliability.png", "learning_curves.png", "gallery.png", "saliency.png"} <= set(pngs)
    for png in out.glob("*.png"):
        _png_ok(png)
    page = Path(result["report_html"]).read_text()
    assert all(page.count(name) >= 3 for name in CLASSES)
    assert "Confusion matrix" in page and page.count("data:image/png;base64,") == len(pngs)
    assert "overfitting" in page and "seven/broken.png" in page and "run-untrained" in page
    assert doc["info"]["saliency_method"].startswith("grad-cam")  # occlusion only for empty CAMs


def test_evaluate_flow_rejects_unknown_classes_and_missing_champion(model_dirs, tmp_path, prefect_server):
    from imgflow.flows.evaluation import evaluate_flow

    trained, _ = model_dirs
    (tmp_path / "data" / "cats").mkdir(parents=True)
    with pytest.raises(EvaluationError, match=r"expected folders named after the model's classes"):
        evaluate_flow(str(trained), tmp_path / "data", workdir=tmp_path / "work")
    with pytest.raises(ValueError, match="champion: no model was promoted"):  # imgflow.tasks.registry.RegistryError
        evaluate_flow("champion", tmp_path / "data", workdir=tmp_path / "work")


def _write_shards(root: Path, per_class: int = 10) -> Path:
    """Shards and a manifest per the team contract (features of DESIGN.md, interface 3)."""
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    pairs = digit_images([0, 1, 7], per_class=per_class + 60)
    taken: dict[int, int] = {}
    records = []
    for digit, pixels in pairs:  # the 10 after the 60 the model saw
        taken[digit] = taken.get(digit, 0) + 1
        if taken[digit] > 60:
            records.append((DIGIT_TO_LABEL[digit], pixels, f"{CLASSES[DIGIT_TO_LABEL[digit]]}/{digit}_{taken[digit]}.png"))
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, chunk in enumerate((records[: len(records) // 2], records[len(records) // 2:])):
        name = f"val-{s:05d}-of-00002.tfrecord"
        with tf.io.TFRecordWriter(str(root / name)) as writer:
            for label, pixels, filename in chunk:
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                example = tf.train.Example(features=tf.train.Features(feature={
                    "image/encoded": feature(buffer.getvalue()), "image/format": feature(b"png"),
                    "image/class/label": feature(label), "image/class/text": feature(CLASSES[label].encode()),
                    "image/height": feature(32), "image/width": feature(32),
                    "image/filename": feature(filename.encode()),
                }))
                writer.write(example.SerializeToString())
        shards.append({"file": name, "records": len(chunk)})
    per = {name: per_class for name in CLASSES}
    manifest = root / "manifest.json"
    write_json(manifest, {
        "class_names": CLASSES, "image_size": 32, "aspect": "squash", "encoding": "png", "fingerprint": "f",
        "code_version": "test", "created": "2024-01-01T00:00:00+00:00", "data_dir": str(root), "val_dir": None,
        "splits": {"train": {"count": 0, "per_class": {n: 0 for n in CLASSES}, "shards": []},
                   "val": {"count": len(records), "per_class": per, "shards": shards}},
    })
    return manifest


def test_evaluate_split_writes_into_model_dir(model_dirs, tmp_path):
    from imgflow.tasks.evaluation import evaluate_split

    trained, untrained = model_dirs
    manifest = _write_shards(tmp_path / "shards")
    model_dir = tmp_path / "run-copy"
    shutil.copytree(trained, model_dir)
    result = evaluate_split(model_dir, manifest, "val", champion_dir=untrained)
    assert result["count"] == 30 and sum(map(sum, result["confusion_matrix"])) == 30
    assert [row["support"] for row in result["per_class"].values()] == [10, 10, 10]
    n, cm = _recount(model_dir / "predictions.csv")
    assert n == 30 and cm == result["confusion_matrix"]
    with open(model_dir / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["path"].split("/")[0] == row["true"] for row in rows)  # filenames come from the shards
    assert len({row["path"] for row in rows}) == 30
    assert (model_dir / "report.html").stat().st_size > 20_000 and (model_dir / "metrics.json").is_file()
    assert result["comparison"]["champion_run_id"] == "run-untrained"
    # the one decision: the comparison shows what the result carries to promote_task
    assert result["promotion"]["champion_run_id"] == "run-untrained"
    assert result["promotion"]["reason"] == result["comparison"]["reason"]
    assert result["promotion"]["decision"] == result["comparison"]["decision"]
    with pytest.raises(EvaluationError, match="split 'train'"):
        evaluate_split(model_dir, manifest, "train")


# --------------------------------------------------------------------------- non-finite outputs


def test_nan_and_inf_rows_count_wrong_and_never_crash():
    probs = HAND_PROBS.copy()
    probs[0] = [np.nan, 0.5, 0.5]  # a "cat" the model could not score
    probs[4] = [np.inf, 0.0, 0.0]  # a "dog"
    m = compute_metrics(HAND_LABELS, probs, HAND_NAMES)
    assert m["non_finite_outputs"] == 2 and m["count"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)  # rows 1, 3, 5 right; the two broken rows count wrong
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # broken rows sit in no column
    assert m["per_class"]["cat"]["support"] == 3 and m["per_class"]["cat"]["recall"] == pytest.approx(1 / 3)
    assert m["per_class"]["dog"]["recall"] == pytest.approx(0.5) and m["per_class"]["bird"]["precision"] == 1.0
    assert m["prediction_distribution"] == {"cat": 1, "dog": 2, "bird": 1}
    assert m["top_k_accuracy"] == pytest.approx(3 / 6)  # rows 1, 3, 5 have the label in the top 2; 2 is third
    assert math.isfinite(m["loss"]) and math.isfinite(m["expected_calibration_error"])
    assert "1 of 2 got non-finite (NaN/inf) model outputs" in m["class_notes"]["dog"]
    everything = compute_metrics([0, 1], np.full((2, 3), np.nan), HAND_NAMES)
    assert everything["accuracy"] == 0.0 and everything["non_finite_outputs"] == 2
    assert everything["prediction_distribution"] == {"cat": 0, "dog": 0, "bird": 0}
    assert everything["loss"] == pytest.approx(math.log(3))  # a uniform guess


def test_evaluate_folder_with_a_nan_model_marks_rows_and_blocks_promotion(model_dirs, tmp_path):
    import keras

    from imgflow.tasks.evaluation import NON_FINITE_ERROR, evaluate_folder
    from tests.imagefactory import make_digit_folder

    trained, _ = model_dirs
    model = keras.saving.load_model(trained / "model.keras")
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([np.full(w.shape, np.nan, dtype="float32") for w in layer.get_weights()])
    nan_dir = tmp_path / "run-nan"
    shutil.copytree(trained, nan_dir)
    model.save(nan_dir / "model.keras")
    data = make_digit_folder(tmp_path / "data", {"one": 1, "seven": 7, "zero": 0}, per_class=4)

    result = evaluate_folder(nan_dir, data, tmp_path / "out", champion_dir=trained)
    assert result["count"] == 12 and result["non_finite_outputs"] == 12 and result["accuracy"] == 0.0
    assert result["promotion"]["promote"] is False
    assert result["promotion"]["reason"].startswith("rejected: the model gave NaN or infinite outputs for 12 of 12")
    assert result["comparison"]["decision"] == "keep champion"
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and all(r["error"] == NON_FINITE_ERROR and r["label"] == "" for r in rows)
    page = Path(result["report_html"]).read_text()
    assert "12 of 12 images got NaN or infinite model outputs" in page
    assert "Broken outputs:" in page
    doc = read_json(result["metrics_json"])
    assert doc["non_finite_outputs"] == 12 and doc["confusion_matrix"] == [[0, 0, 0]] * 3
    _png_ok(tmp_path / "out" / "confusion_matrix.png", min_bytes=1000)
    _png_ok(tmp_path / "out" / "reliability.png", min_bytes=1000)


# --------------------------------------------------------------------------- hostile names


def test_predictions_csv_neutralises_formulas_and_reports_escape_names(model_dirs, tmp_path):
    from imgflow.tasks.evaluation import evaluate_folder
    from tests.imagefactory import make_digit_folder

    trained, _ = model_dirs
    evil, tagged = '=HYPERLINK("evil.example")', "<img src=x onerror=alert(1)>"
    model_dir = tmp_path / "run-names"
    shutil.copytree(trained, model_dir)
    meta = read_json(model_dir / "metadata.json")
    write_json(model_dir / "metadata.json", {**meta, "class_names": [evil, tagged, "zero"], "best_epoch": 2,
                                             "epochs_run": 3, "monitor": "val_loss", "stopped_early": False})
    data = make_digit_folder(tmp_path / "data", {evil: 1, tagged: 7, "zero": 0}, per_class=3)
    shutil.copy(data / "zero" / "zero_0000.png", data / "zero" / "=1+1.png")
    (data / "-2+3.png").write_bytes(b"")  # not in a class folder: never read

    result = evaluate_folder(model_dir, data, tmp_path / "out")
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    assert header[:4] == ["path", "true", "label", "confidence"] and header[4] == f"prob_{evil}"
    by_path = {row[0]: row for row in body}
    assert f"'{evil}/{evil}_0000.png" in by_path and by_path[f"'{evil}/{evil}_0000.png"][1] == f"'{evil}"
    assert "zero/=1+1.png" in by_path  # only a cell's first character matters
    assert all(not row[i].startswith(("=", "+", "-", "@")) for row in body for i in range(len(row)))
    labels = {row[2] for row in body}
    assert labels <= {f"'{evil}", tagged, "zero"}

    raw = evaluate_folder(model_dir, data, tmp_path / "raw", csv_neutralise=False)
    with open(Path(raw["out_dir"]) / "predictions.csv", newline="") as handle:
        raw_rows = list(csv.reader(handle))
    assert f"{evil}/{evil}_0000.png" in {row[0] for row in raw_rows[1:]}

    md = Path(result["report_md"]).read_text()
    page = Path(result["report_html"]).read_text()
    for text in (md, page):
        assert tagged not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "Weights from epoch 2 of 3, chosen on val_loss; training ran all 3 epochs." in page  # metadata keys
    assert "learning_curves" in result["plots"]
    assert '=HYPERLINK(&#34;evil.example&#34;)' in page  # markupsafe's escape of "


def test_safe_cell_and_the_prediction_csv(tmp_path):
    from imgflow.tasks import prediction as P
    from imgflow.tasks.csvcells import restore_cell, safe_cell

    cases = {"=1+1.jpg": "'=1+1.jpg", "+x": "'+x", "-2": "'-2", "@SUM(A1)": "'@SUM(A1)", "\tcmd": "'\tcmd",
             "\rcmd": "'\rcmd", "a=b.jpg": "a=b.jpg", "": "", "0.25": "0.25", "'quoted": "'quoted"}
    for value, expected in cases.items():
        assert safe_cell(value) == expected, value
        assert safe_cell(value, neutralise=False) == value
        assert restore_cell(safe_cell(value)) == value
    assert safe_cell(None) == ""

    names = ["=cmd|' /C calc'!A0", "b"]
    rows = [["=1+1.jpg", names[0], "0.9", "2.5", "false", "0.9", "0.1", ""],
            ["@x.png", "", "", "", "", "", "", "-1 is not an image"]]
    part = P.write_part(P.part_path(tmp_path, "k"), names, rows)
    summary = P.assemble_csv(tmp_path / "out.csv", [part], names, top_k=1)
    assert summary["label_counts"] == {names[0]: 1}
    with open(tmp_path / "out.csv", newline="") as handle:
        out = list(csv.reader(handle))
    assert out[1] == ["'=1+1.jpg", "'" + names[0], "0.9", "2.5", "false", "0.9", "0.1", "'" + names[0], "0.9", ""]
    assert out[2][0] == "'@x.png" and out[2][-1] == "'-1 is not an image"
    assert list(P.read_part(part, names)) == rows  # part files keep the raw text for resuming
    P.assemble_csv(tmp_path / "raw.csv", [part], names, neutralise=False)
    with open(tmp_path / "raw.csv", newline="") as handle:
        assert list(csv.reader(handle))[1][0] == "=1+1.jpg"


# --------------------------------------------------------------------------- what happened in training, in words


def test_report_states_kept_epoch_and_first_screen(tmp_path):
    from imgflow.tasks.report import training_sentence

    assert training_sentence({"best_epoch": 7, "epochs_run": 10, "monitor": "val_accuracy", "stopped_early": True,
                              "stop_reason": "val_accuracy did not improve for 3 epochs"}) == (
        "Weights from epoch 7 of 10, chosen on val_accuracy; training stopped early: "
        "val_accuracy did not improve for 3 epochs.")
    assert training_sentence({"best_epoch": 3, "epochs_run": 3, "epochs": 3, "stopped_early": False}) == (
        "Weights from epoch 3 of 3; training ran all 3 epochs.")
    assert training_sentence({}) is None

    history = tmp_path / "history.csv"
    history.write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.4,1.1,0.5,1.0\n1,0.7,0.8,0.8,0.7\n2,0.9,0.4,0.7,0.8\n")
    plain = plot_learning_curves(history, tmp_path / "plain.png").read_bytes()
    marked = plot_learning_curves(history, tmp_path / "marked.png", best_epoch=2).read_bytes()
    assert plain != marked  # the kept epoch is drawn

    m = compute_metrics(HAND_LABELS, HAND_PROBS, HAND_NAMES)
    diagnosis = {"healthy": False, "findings": [
        {"code": "learning_rate_too_high", "severity": "critical", "evidence": {}, "advice": "Use 1e-3."},
        {"code": "single_class_collapse", "severity": "critical", "evidence": {}, "advice": "See above."}]}
    paths = write_report(tmp_path / "r", m, diagnosis=diagnosis, info={
        "run_id": "r1", "training": {"best_epoch": 2, "epochs_run": 3, "monitor": "val_loss", "stopped_early": False}})
    page, md = paths["report_html"].read_text(), paths["report_md"].read_text()
    for text in (page, md):
        assert "it recognises bird (recall 1.00)" in text
        assert "it partly recognises cat (recall 0.67), dog (recall 0.50)" in text
        assert "dog taken for bird (1 of 2 images)" in text  # the largest share of its class
        assert "learning\\_rate\\_too\\_high: Use 1e-3." in text or "learning_rate_too_high: Use 1e-3." in text
        assert "Weights from epoch 2 of 3, chosen on val\\_loss" in text or "Weights from epoch 2 of 3, chosen on val_loss" in text
    # the plain-words answer comes before the numbers
    assert page.index("What the model learned") < page.index("class='card'" if "class='card'" in page else 'class="card"')
