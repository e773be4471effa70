"""Novelty scores, the unknown flag, temperature calibration and the inbox drift report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks import calibration as C
from imgflow.tasks import drift as D
from imgflow.tasks import novelty as N
from tests.imagefactory import DIGIT_CLASSES, digit_images, make_digit_folder
from tests.modelfactory import CLASS_NAMES, make_digit_model_dir

OTHER_DIGITS = [2, 3, 4, 5, 6, 8, 9]


# ------------------------------------------------------------------ pure parts


def test_temperature_scaling_recovers_the_temperature_and_lowers_ece():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4000, 3))
    true_probs = C.softmax(logits, 2.0)  # the model is overconfident by a factor of 2
    labels = np.array([rng.choice(3, p=p) for p in true_probs])
    temperature = C.fit_temperature(logits, labels)
    assert 1.8 < temperature < 2.2
    summary = C.calibration_summary(logits, labels, temperature)
    assert summary["ece_after"] < summary["ece_before"] / 2
    assert summary["nll_after"] < summary["nll_before"]
    assert C.fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    # the arg-max never changes
    assert (C.softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()


def test_temperature_search_finds_what_scipys_bounded_minimiser_finds():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(1)
    for scale in (0.5, 2.0, 7.0):
        labels = rng.integers(0, 4, 500)
        logits = rng.normal(size=(500, 4))
        logits[np.arange(500), labels] += 2.0
        logits *= scale
        reference = minimize_scalar(lambda log_t: C.nll(logits, labels, float(np.exp(log_t))),
                                    bounds=(-np.log(C.T_RANGE), np.log(C.T_RANGE)), method="bounded",
                                    options={"xatol": 1e-4})
        assert C.fit_temperature(logits, labels) == pytest.approx(float(np.exp(reference.x)), rel=2e-4)
    assert C.golden_section_minimum(lambda x: (x - 0.3) ** 2, -1.0, 2.0, 1e-6) == pytest.approx(0.3, abs=1e-6)
    assert C.golden_section_minimum(lambda x: x, -1.0, 2.0, 1e-6) == pytest.approx(-1.0, abs=1e-6)  # at a bound


def test_features_that_are_not_finite_fit_no_statistics_and_say_why():
    features = np.random.default_rng(0).normal(size=(6, 3))
    features[2, 1] = np.nan
    with pytest.raises(N.NoveltyError, match="1 of 6 training images are not finite"):
        N.fit_gaussians(features, np.array([0, 0, 0, 1, 1, 1]))


@pytest.mark.parametrize("rows,columns", [(50, 2), (10, 40), (300, 128), (2, 5), (20, 1)])
def test_ledoit_wolf_covariance_equals_scikit_learns(rows, columns):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(rows * columns)
    x = rng.normal(size=(rows, columns)) * rng.uniform(0.1, 3.0, size=columns)
    x -= x.mean(axis=0)
    expected = LedoitWolf(assume_centered=True).fit(x).covariance_
    assert N.ledoit_wolf_covariance(x) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def _clusters(rng, n, centers, scale=1.0):
    labels = rng.integers(0, len(centers), n)
    return np.asarray(centers)[labels] + rng.normal(0, scale, (n, len(centers[0]))), labels


def test_mahalanobis_threshold_flags_the_calibrated_share_and_far_points():
    rng = np.random.default_rng(1)
    centers = [[0.0] * 8, [6.0] + [0.0] * 7, [0.0, 6.0] + [0.0] * 6]
    train_x, train_y = _clusters(rng, 3000, centers)
    val_x, val_y = _clusters(rng, 2000, centers)
    test_x, _ = _clusters(rng, 4000, centers)
    weights = (rng.normal(size=(8, 3)), np.zeros(3))
    val_out = C.softmax(val_x @ weights[0])
    fitted = N.fit_novelty(train_x, train_y, val_x, val_out, val_y, weights, unknown_rate=0.05)
    assert fitted.info["val_unknown_share"] == pytest.approx(0.05, abs=0.005)
    _, scores, unknown = fitted.score(test_x, C.softmax(test_x @ weights[0]))
    assert unknown.mean() == pytest.approx(0.05, abs=0.015)
    far = rng.normal(0, 1, (200, 8)) + 25.0
    _, far_scores, far_unknown = fitted.score(far, C.softmax(far @ weights[0]))
    assert far_unknown.all() and far_scores.min() > scores.max()


def test_fit_novelty_names_bad_options():
    x, y = np.ones((4, 2)), np.array([0, 1, 0, 1])
    with pytest.raises(N.NoveltyError, match="unknown_rate: expected a share between 0 and 1"):
        N.fit_novelty(x, y, x, np.full((4, 2), 0.5), y, None, unknown_rate=1.5)
    with pytest.raises(N.NoveltyError, match="expected one of mahalanobis, energy, combined, found 'knn'"):
        N.fit_novelty(x, y, x, np.full((4, 2), 0.5), y, None, method="knn")
    with pytest.raises(N.NoveltyError, match="validation images, found none"):
        N.fit_novelty(x, y, x[:0], np.zeros((0, 2)), y[:0], None)


def test_js_distance_and_drift_flags():
    assert D.js_distance({"a": 5, "b": 5}, {"a": 10, "b": 10}) == 0.0
    assert D.js_distance({"a": 5}, {"b": 3}) == pytest.approx(1.0)
    training = D.new_profile()
    for i in range(500):
        D.add(training, {"format": "PNG", "mode": "RGB", "width": "[32,64)", "brightness": str(i % 4)})
    alike, other = D.new_profile(), D.new_profile()
    for i in range(60):
        D.add(alike, {"format": "PNG", "mode": "RGB", "width": "[32,64)", "brightness": str(i % 4)})
        D.add(other, {"format": "JPEG", "mode": "RGB", "width": "[1024,2048)", "brightness": "12"})
    quiet = D.compare(training, alike, {"a": 10}, {"a": 60}, unknown=3, scored=60, unknown_rate=0.05)
    assert quiet["drift"] is False and quiet["reasons"] == []
    loud = D.compare(training, other, {"a": 10}, {"a": 60}, unknown=40, scored=60, unknown_rate=0.05)
    assert loud["drift"] is True and loud["unknown_drift"] is True and loud["unknown_share"] == pytest.approx(0.6667, abs=1e-3)
    assert {k for k, v in loud["properties"].items() if v["drift"]} == {"format", "width", "brightness"}
    assert loud["properties"]["mode"]["distance"] == 0.0
    assert D.report_path(Path("out/inbox.csv")) == Path("out/inbox.drift.json")


def test_unknown_share_limit_counts_the_calibration_sets_own_sampling_error():
    """9 unknown of 60 against a 5% threshold set on 105 validation images (the demo's
    figures): within three standard errors of the difference of the two shares; taken as
    an exact rate (no calibration count) the same share is flagged."""
    from imgflow.tasks import drift as D

    profile = D.new_profile()
    args = (profile, profile, {"a": 10}, {"a": 60})
    exact = D.compare(*args, unknown=9, scored=60, unknown_rate=0.05)
    assert exact["unknown_drift"] is True and exact["reasons"] == ["unknown share 0.15 > 0.13 (calibrated rate 0.05)"]
    calibrated = D.compare(*args, unknown=9, scored=60, unknown_rate=0.05, calibration_count=105)
    assert calibrated["unknown_drift"] is False and calibrated["drift"] is False
    # the limit there is 0.05 + 3 * sqrt(0.05 * 0.95 * (1/60 + 1/105)) = 0.1563
    assert D.compare(*args, unknown=10, scored=60, unknown_rate=0.05, calibration_count=105)["reasons"] == [
        "unknown share 0.17 > 0.16 (calibrated rate 0.05)"]


# ------------------------------------------------------------------ a real model


def _unseen() -> list[tuple[int, np.ndarray]]:
    """Every 0, 1 and 7 of the digits data set the test model was not trained on (~360), in data order."""
    counts: dict[int, int] = {}
    out = []
    for digit, pixels in digit_images(DIGIT_CLASSES.values()):
        counts[digit] = counts.get(digit, 0) + 1
        if counts[digit] > 60:
            out.append((digit, pixels))
    return out


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory) -> Path:
    """The digits test model with novelty statistics, temperature and training profile fitted."""
    root = tmp_path_factory.mktemp("novelty")
    model_dir = make_digit_model_dir(root / "digits-novelty")
    label_of = {digit: CLASS_NAMES.index(name) for name, digit in DIGIT_CLASSES.items()}
    seen = digit_images(DIGIT_CLASSES.values(), per_class=60)  # what the model was trained on
    val = _unseen()[:150]

    def batches(samples):
        return lambda: [(np.stack([p for _, p in samples]).astype("float32"), np.array([label_of[d] for d, _ in samples]))]

    N.fit_model_dir(model_dir, batches(seen), batches(val))
    data = make_digit_folder(root / "data", per_class=None)  # the profile's pool: every 0, 1 and 7
    D.profile_training(model_dir, data, CLASS_NAMES, 32)
    return model_dir


def test_fitted_statistics_are_stored_and_prediction_is_one_calibrated_pass(fitted_model, tmp_path):
    from imgflow.tasks import prediction as P

    meta = json.loads((fitted_model / "metadata.json").read_text())
    assert meta["novelty"]["method"] == "mahalanobis" and meta["novelty"]["unknown_rate"] == 0.05
    assert meta["novelty"]["file"] == "novelty.npz" and (fitted_model / "novelty.npz").is_file()
    assert meta["calibration"]["temperature"] > 0 and "ece_after" in meta["calibration"]
    profile = json.loads((fitted_model / D.PROFILE_FILE).read_text())
    assert profile["count"] == 539 and profile["classes"] == {"one": 182, "seven": 179, "zero": 178}
    assert profile["properties"]["format"] == {"PNG": 539} and profile["properties"]["width"] == {"[32,64)": 539}

    model, metadata = P.load_model_cached(fitted_model)
    stats = N.load(fitted_model)
    predictor = stats.predictor(model)
    assert len(predictor.outputs) == 2 and stats.predictor(model) is predictor
    held_in = [p for _, p in _unseen()[150:190]]
    other = [p for _, p in digit_images(OTHER_DIGITS, per_class=6)]
    for i, pixels in enumerate(held_in + other):
        Image.fromarray(pixels).save(tmp_path / f"{'in' if i < len(held_in) else 'out'}_{i:03d}.png")
    entries = [P.FileEntry(p.name, 1, 1) for p in sorted(tmp_path.glob("*.png"))]
    plain = P.predict_files(model, metadata, tmp_path, entries, batch_size=16)
    scored = P.predict_files(model, metadata, tmp_path, entries, batch_size=16, novelty=stats)
    assert all(r[3] == "" and r[4] == "" for r in plain)
    first = len(P.LEADING_COLUMNS)
    for a, b in zip(plain, scored):
        assert a[1] == b[1]  # calibration never changes the label
        raw = np.array([float(v) for v in a[first:first + 3]])
        expected = C.softmax(np.log(np.clip(raw, 1e-12, None))[None, :], stats.temperature)[0]
        np.testing.assert_allclose([float(v) for v in b[first:first + 3]], expected, atol=1e-5)
        assert float(b[2]) == pytest.approx(expected.max(), abs=1e-5)
        assert b[4] in ("true", "false") and float(b[3]) >= 0
    unknown_in = np.mean([r[4] == "true" for r in scored if r[0].startswith("in_")])
    unknown_out = np.mean([r[4] == "true" for r in scored if r[0].startswith("out_")])
    assert unknown_in <= 0.15 and unknown_out >= 0.6


def _photos(root: Path, count: int) -> None:
    """Large, bright, wide JPEG 'photos' (smooth colour fields with noise): a different kind of image."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(120, 255, 3)
        pixels = np.clip(base + rng.normal(0, 30, (300, 480, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"photo_{i:02d}.jpg", quality=90)


def test_batch_predict_writes_novelty_columns_and_a_drift_report(prefect_server, fitted_model, tmp_path, monkeypatch):
    from imgflow.flows.prediction import batch_predict

    events: list[dict] = []
    from imgflow.flows import events as flow_events

    monkeypatch.setattr(flow_events, "inbox_drift", lambda workdir, inbox, report, *a: events.append(report))
    alike = tmp_path / "alike"
    alike.mkdir()
    for i, (_, pixels) in enumerate(_unseen()[200:260]):
        Image.fromarray(pixels).save(alike / f"d{i:03d}.png")
    (alike / "broken.png").write_bytes(b"not an image")
    result = batch_predict(model=str(fitted_model), input_dir=alike, workdir=tmp_path / "work", batch_size=16)
    with open(result["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["path", "label", "confidence", "novelty", "unknown"]
    broken = next(r for r in rows if r["path"] == "broken.png")
    assert broken["novelty"] == "" and broken["unknown"] == "" and broken["error"]
    good = [r for r in rows if not r["error"]]
    assert len(good) == 60 and all(r["unknown"] in ("true", "false") for r in good)
    report = json.loads(Path(result["drift_json"]).read_text())
    assert Path(result["drift_json"]).name == "alike.drift.json"
    assert report["drift"] is False and result["drift"] is False and events == [], report["reasons"]
    assert report["files"] == 61 and report["unknown_share"] == pytest.approx(result["unknown"] / 60, abs=1e-4)

    photos = tmp_path / "photos"
    _photos(photos, 30)
    result = batch_predict(model=str(fitted_model), input_dir=photos, workdir=tmp_path / "work", batch_size=16,
                           unknown_label="none of these")
    report = json.loads(Path(result["drift_json"]).read_text())
    assert report["drift"] is True and result["drift"] is True and len(events) == 1
    flagged = {k for k, v in report["properties"].items() if v["drift"]}
    assert {"format", "width", "height", "aspect"} <= flagged
    with open(result["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    unknown = [r for r in rows if r["unknown"] == "true"]
    assert len(unknown) == result["unknown"] >= 20
    assert all(r["label"] == "none of these" for r in unknown)
    assert all(r["label"] in CLASS_NAMES for r in rows if r["unknown"] == "false")
    assert result["label_counts"]["none of these"] == len(unknown)


def test_evaluate_reports_novelty_auroc_and_calibration(fitted_model, tmp_path):
    from imgflow.tasks.evaluation import evaluate_folder

    data = make_digit_folder(tmp_path / "val", per_class=None)
    ood = tmp_path / "ood"
    ood.mkdir()
    for i, (_, pixels) in enumerate(digit_images(OTHER_DIGITS, per_class=10)):
        Image.fromarray(pixels).save(ood / f"o{i:03d}.png")
    (ood / "junk.png").write_bytes(b"junk")
    result = evaluate_folder(fitted_model, data, tmp_path / "report", ood_dir=ood)
    metrics = json.loads(Path(result["metrics_json"]).read_text())
    assert metrics["novelty"]["ood_count"] == 70 and metrics["novelty"]["ood_unreadable"] == 1
    assert metrics["novelty"]["auroc"] >= 0.85
    assert metrics["calibration"]["temperature"] == pytest.approx(N.load(fitted_model).temperature, abs=1e-5)
    assert {"ece_before", "ece_after"} <= set(metrics["calibration"])
    assert (tmp_path / "report" / "novelty.png").is_file()
    assert "novelty AUROC" in Path(result["report_html"]).read_text()


def test_evaluate_backfills_a_model_directory_without_statistics(tmp_path):
    from imgflow.tasks.evaluation import evaluate_folder

    model_dir = make_digit_model_dir(tmp_path / "old-model", epochs=4)
    assert N.load(model_dir) is None
    data = make_digit_folder(tmp_path / "val", per_class=30)
    evaluate_folder(model_dir, data, tmp_path / "report")
    stats = N.load(model_dir)
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert stats is not None and meta["novelty"]["train_count"] == 45 and meta["novelty"]["val_count"] == 45
    assert meta["calibration"]["count"] == 45


def test_a_model_without_a_dense_head_falls_back_to_the_top_log_probability(tmp_path):
    import keras

    from imgflow.tasks import prediction as P

    keras.utils.set_random_seed(0)
    samples = digit_images(DIGIT_CLASSES.values(), per_class=40)
    label_of = {digit: CLASS_NAMES.index(name) for name, digit in DIGIT_CLASSES.items()}
    x = np.stack([p for _, p in samples]).astype("float32")
    y = np.array([label_of[d] for d, _ in samples])
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0), keras.layers.Flatten(),
                              keras.layers.Dense(3), keras.layers.Activation("softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3, verbose=0)
    model_dir = tmp_path / "activation-head"
    model_dir.mkdir()
    model.save(model_dir / "model.keras")
    (model_dir / "metadata.json").write_text(json.dumps({
        "run_id": "a", "class_names": CLASS_NAMES, "image_size": 32, "metrics": {}, "fingerprint": "t", "config": {},
        "versions": {}, "created": "", "healthy": True}))
    assert N.dense_head(model) is None
    keys = N.fit_from_arrays(model_dir, x, y, model=model)
    assert keys["novelty"]["method"] == "energy" and "whiten" not in N.load(model_dir).arrays
    for i, (_, pixels) in enumerate(samples[:6]):
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    rows = P.predict_files(model, json.loads((model_dir / "metadata.json").read_text()), tmp_path,
                           [P.FileEntry(f"{i}.png", 1, 1) for i in range(6)], novelty=N.load(model_dir))
    assert all(r[4] in ("true", "false") and float(r[3]) >= 0 for r in rows)


def test_backfill_command_names_the_missing_shards(tmp_path, capsys):
    (tmp_path / "model.keras").write_bytes(b"")
    (tmp_path / "metadata.json").write_text(json.dumps({"class_names": ["a", "b"], "image_size": 32}))
    assert N.main([str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert "no shards to fit novelty statistics on" in out and "--manifest" in out and "imgflow evaluate" in out
