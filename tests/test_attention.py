"""Where the model looks: saliency share on the border / transparent pixels and ``attends_to_background``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks.attention import (
    BORDER_SHARE_THRESHOLD,
    attention_finding,
    attention_shares,
    border_mask,
    measure_attention,
    read_alpha,
)

NAMES = ["a", "b"]


def _border_map(size: int = 32) -> np.ndarray:
    return border_mask(size, size).astype(np.float64)


def _blob_map(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    return np.exp(-((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * (size / 10) ** 2))


# --------------------------------------------------------------------------- pure functions


def test_border_mask_is_the_outer_eighth_of_each_side():
    mask = border_mask(32, 32)
    assert mask.sum() == 32 * 32 - 24 * 24  # 4 px band on each side
    assert mask[0].all() and mask[:, 31].all() and not mask[4:28, 4:28].any()
    assert border_mask(4, 4).sum() == 16 - 4  # at least one pixel wide
    with pytest.raises(ValueError, match="border fraction"):
        border_mask(8, 8, 0.5)


def test_border_map_scores_near_one_centred_blob_near_zero_uniform_at_area_share():
    maps = np.stack([_border_map(), _border_map(), _blob_map(), _blob_map(), np.ones((32, 32))])
    shares = attention_shares(maps, None, [0, 0, 1, 1, 2], ["edge", "centre", "flat"])
    assert shares["edge"]["border_share"] == pytest.approx(1.0)
    assert shares["edge"]["examples"] == 2
    assert shares["centre"]["border_share"] < 0.01
    assert shares["flat"]["border_share"] == pytest.approx(0.4375)
    assert shares["edge"]["transparent_share"] is None and shares["edge"]["transparent_examples"] == 0


def test_empty_maps_are_left_out_and_bad_input_is_named():
    maps = np.stack([np.zeros((16, 16)), _border_map(16)])
    shares = attention_shares(maps, None, [0, 1], NAMES)
    assert list(shares) == ["b"]  # the class with only an empty map has no share
    with pytest.raises(ValueError, match="non-negative"):
        attention_shares(-maps - 1, None, [0, 1], NAMES)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        attention_shares(maps[0], None, [0], NAMES)
    with pytest.raises(ValueError, match="one of each per image"):
        attention_shares(maps, None, [0], NAMES)


def test_transparent_share_uses_only_images_with_transparency():
    size = 32
    alpha = np.full((size, size), 255, dtype=np.uint8)
    alpha[:, : size // 2] = 0  # the left half is transparent
    left = np.zeros((size, size))
    left[8:24, 2:10] = 1.0  # all the saliency on the transparent half
    right = np.zeros((size, size))
    right[8:24, 20:28] = 1.0
    shares = attention_shares(np.stack([left, right, left]), [alpha, alpha, None], [0, 1, 1], NAMES)
    assert shares["a"]["transparent_share"] == pytest.approx(1.0)
    assert shares["a"]["transparent_area"] == pytest.approx(0.5)
    assert shares["b"]["transparent_share"] == pytest.approx(0.0)
    assert shares["b"]["transparent_examples"] == 1 and shares["b"]["examples"] == 2
    with pytest.raises(ValueError, match="alpha mask 0"):
        attention_shares(np.stack([left]), [alpha[:8]], [0], NAMES)


def test_finding_names_the_class_on_the_border_and_stays_quiet_otherwise():
    maps = np.stack([_border_map()] * 3 + [_blob_map()] * 3)
    shares = attention_shares(maps, None, [0, 0, 0, 1, 1, 1], ["studio", "field"])
    finding = attention_finding(shares)
    assert finding is not None
    assert finding["code"] == "attends_to_background" and finding["severity"] == "warning"
    assert "100% of its attention on the image border for class studio" in finding["advice"]
    assert "crop" in finding["advice"].lower()
    assert finding["evidence"]["border_share[studio]"] == pytest.approx(1.0)
    assert finding["evidence"]["examples[studio]"] == 3
    assert finding["evidence"]["classes_flagged"] == 1
    assert finding["evidence"]["border_threshold"] == BORDER_SHARE_THRESHOLD
    # uniform attention (0.44) and a centred object are quiet
    quiet = attention_shares(np.stack([np.ones((32, 32))] * 2 + [_blob_map()] * 2), None, [0, 0, 1, 1], NAMES)
    assert attention_finding(quiet) is None
    # one example is an anecdote, not a finding
    assert attention_finding(attention_shares(_border_map()[None], None, [0], NAMES)) is None


def test_transparent_finding_needs_more_than_the_transparent_area():
    rows = {"icon": {"border_share": 0.3, "transparent_share": 0.92, "transparent_area": 0.9, "examples": 4},
            "logo": {"border_share": 0.3, "transparent_share": 0.8, "transparent_area": 0.3, "examples": 4}}
    finding = attention_finding(rows)
    assert finding is not None and "class logo" in finding["advice"] and "icon" not in finding["advice"]
    assert "transparent pixels" in finding["advice"] and "background: option" in finding["advice"]
    assert finding["evidence"]["transparent_share[logo]"] == pytest.approx(0.8)


def test_measure_attention_survives_an_unreadable_alpha():
    def broken():
        raise OSError("gone")

    keys = measure_attention(np.stack([_border_map()] * 2), [1, 1], NAMES, broken)
    assert keys["attention"]["b"]["transparent_share"] is None
    assert [f["code"] for f in keys["evaluation_findings"]] == ["attends_to_background"]


def test_read_alpha_resizes_like_the_loader(tmp_path):
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:32, :, 3] = 0  # top half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[..., :3], "RGB").save(tmp_path / "b.png")
    alpha = read_alpha(tmp_path / "a.png", 32)
    assert alpha.shape == (32, 32) and alpha.dtype == np.uint8
    assert (alpha[:15] == 0).all() and (alpha[17:] == 255).all()
    assert read_alpha(tmp_path / "b.png", 32) is None
    Image.fromarray(rgba[:, :32], "RGBA").save(tmp_path / "tall.png")  # 64 high, 32 wide
    padded = read_alpha(tmp_path / "tall.png", 32, "pad")
    assert (padded[:, :8] == 255).all()  # the padding is opaque
    with pytest.raises(ValueError, match="aspect"):
        read_alpha(tmp_path / "a.png", 32, "stretch")


# --------------------------------------------------------------------------- report and diagnosis


def test_report_shows_where_it_looks_and_the_finding_first(tmp_path):
    from imgflow.tasks.metrics import compute_metrics
    from imgflow.tasks.report import write_report

    metrics = compute_metrics(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]]),
                              ["studio", "field"])
    shares = attention_shares(np.stack([_border_map()] * 2 + [_blob_map()] * 2), None, [0, 0, 1, 1],
                              ["studio", "field"])
    metrics.update(attention=shares, evaluation_findings=[attention_finding(shares)])
    diagnosis = {"healthy": True, "findings": [{"code": "lr_range", "severity": "info", "evidence": {}, "advice": "x"}]}
    paths = write_report(tmp_path, metrics, diagnosis=diagnosis)
    md = Path(paths["report_md"]).read_text()
    assert "**Where it looks:** share of saliency studio 100% on the border" in md
    assert "**Most likely reason:** attends\\_to\\_background: the model puts 100% of its attention" in md
    assert "## Where the model looks" in md and "| studio | 1.000 | – | 2 |" in md
    html = Path(paths["report_html"]).read_text()
    assert 'id="attention"' in html and "attends_to_background (warning)" in html
    saved = json.loads(Path(paths["metrics_json"]).read_text())
    assert saved["attention"]["field"]["examples"] == 2


def test_append_findings_reranks_and_replaces(tmp_path):
    from imgflow.flows.training import append_findings
    from imgflow.tasks.doctor.findings import make_finding, read_diagnosis, write_diagnosis

    path = tmp_path / "diagnosis.json"
    write_diagnosis(path, {"healthy": True, "findings": [make_finding("lr_range", "info", {"lr": 0.01}, "fine")]})
    finding = attention_finding(attention_shares(np.stack([_border_map()] * 2), None, [0, 0], NAMES))
    append_findings(path, [finding])
    append_findings(path, [finding])  # a retried evaluation adds it once
    append_findings(path, [])
    saved = read_diagnosis(path)
    assert [f["code"] for f in saved["findings"]] == ["attends_to_background", "lr_range"]
    assert saved["healthy"] is True
    append_findings(tmp_path / "new.json", [finding])  # no diagnosis yet: one is written
    assert read_diagnosis(tmp_path / "new.json")["findings"][0]["code"] == "attends_to_background"


# --------------------------------------------------------------------------- through evaluate_folder


def _background_folder(root: Path, per_class: int) -> Path:
    """Class ``dark``: black background; class ``light``: white, RGBA with a transparent corner; same grey squares."""
    rng = np.random.default_rng(0)
    for name, value in (("dark", 0), ("light", 255)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((32, 32, 4), value, dtype=np.uint8)
            pixels[..., 3] = 255
            y, x = rng.integers(4, 20, size=2)
            pixels[y:y + 8, x:x + 8, :3] = 128
            if name == "light":
                pixels[:6, :6, 3] = 0
                Image.fromarray(pixels, "RGBA").save(root / name / f"{name}_{i:03d}.png")
            else:
                Image.fromarray(pixels[..., :3], "RGB").save(root / name / f"{name}_{i:03d}.png")
    return root


def _train(model_dir: Path, data: Path) -> Path:
    import keras

    from imgflow.tasks.images import load_image

    keras.utils.set_random_seed(0)
    names = ["dark", "light"]
    files = [(p, names.index(p.parent.name)) for p in sorted(data.glob("*/*.png"))]
    x = np.stack([load_image(p, 32, "squash", None) for p, _ in files]).astype("float32")
    y = np.array([label for _, label in files])
    model = keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    model_dir.mkdir(parents=True)
    model.save(model_dir / "model.keras")
    (model_dir / "metadata.json").write_text(json.dumps({
        "run_id": "bg", "class_names": names, "image_size": 32, "aspect": "squash", "metrics": {},
        "fingerprint": "test", "config": {}, "versions": {}, "created": "2026-01-01T00:00:00+00:00", "healthy": True,
    }))
    return model_dir


def test_evaluate_folder_writes_attention_for_background_classes(tmp_path):
    from imgflow.tasks.evaluation import evaluate_folder

    data = _background_folder(tmp_path / "data", per_class=12)
    model_dir = _train(tmp_path / "model", data)
    result = evaluate_folder(model_dir, data, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    attention = saved["attention"]
    assert attention == result["attention"]
    assert set(attention) == {"dark", "light"}
    for row in attention.values():
        assert 0.0 <= row["border_share"] <= 1.0
        assert 1 <= row["examples"] <= 4
    assert attention["dark"]["transparent_share"] is None  # RGB files: nothing transparent
    assert 0.0 <= attention["light"]["transparent_share"] <= 1.0
    assert attention["light"]["transparent_area"] == pytest.approx(36 / 1024, abs=1e-3)  # the 6x6 corner
    assert all(f["code"] == "attends_to_background" for f in saved["evaluation_findings"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Where the model looks" in md and "**Where it looks:**" in md


def test_evaluate_task_appends_the_evaluation_finding_to_the_run_diagnosis(monkeypatch, tmp_path):
    import imgflow.tasks.evaluation as evaluation
    from imgflow.flows.training import evaluate_task
    from imgflow.tasks.doctor.findings import read_diagnosis

    finding = attention_finding(attention_shares(np.stack([_border_map()] * 2), None, [1, 1], NAMES))
    monkeypatch.setattr(evaluation, "evaluate_split", lambda *a, **k: {
        "out_dir": str(tmp_path), "accuracy": 0.5, "count": 4, "evaluation_findings": [finding]})
    summary = evaluate_task.fn(str(tmp_path), str(tmp_path / "manifest.json"), None, 0.0)
    assert summary["evaluation_findings"][0]["code"] == "attends_to_background"
    saved = read_diagnosis(tmp_path / "diagnosis.json")
    assert saved["healthy"] is True and saved["findings"][0]["evidence"]["border_share[b]"] == pytest.approx(1.0)
