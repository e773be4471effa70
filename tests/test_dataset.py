"""Each validation check on a tiny generated folder, one kind of problem per case."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgflow.flows.config import ValidationOptions
from imgflow.tasks.dataset import DatasetError, inspect_image, report_markdown, validate_dataset
from tests.imagefactory import make_class_folder


def codes(report, path_part: str | None = None) -> set[tuple[str, str]]:
    """(code, severity) of every problem, optionally only those whose path contains ``path_part``."""
    return {(p["code"], p["severity"]) for p in report["problems"] if path_part is None or path_part in p["path"]}


def usable_paths(report, split: str = "train") -> set[str]:
    return {rel for rel, _ in report["files"][split]}


def pattern_image(size: int = 48, shift: int = 0) -> Image.Image:
    """A structured image (rings and bars) whose perceptual hash survives re-encoding."""
    y, x = np.mgrid[0:size, 0:size]
    r = np.hypot(x - size / 2 - shift, y - size / 3)
    pixels = np.stack([(np.sin(r / 3) * 120 + 128), (x * 255 / size), (y * 255 / size)], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def test_clean_folder_is_usable_with_counts(shapes_dir):
    report = validate_dataset(shapes_dir)
    assert report["usable"] is True
    assert report["class_names"] == ["birds", "cats", "dogs"]
    assert report["classes"] == {"birds": 12, "cats": 12, "dogs": 12}
    assert report["problems"] == []
    assert len(report["files"]["train"]) == 36 and report["files"]["val"] == []
    assert ["cats/cats_000.png", "cats"] in report["files"]["train"]
    assert report["stats"]["modes"] == {"RGB": 36}
    assert report["stats"]["formats"] == {"PNG": 36}


def test_missing_or_non_directory_root_raises(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        validate_dataset(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is not a directory"):
        validate_dataset(tmp_path / "file")


def test_one_class_is_not_usable(tmp_path):
    root = make_class_folder(tmp_path / "data", {"only": 5})
    report = validate_dataset(root)
    assert report["usable"] is False
    assert ("too_few_classes", "error") in codes(report)


def test_empty_class_folder_is_left_out(shapes_dir):
    (shapes_dir / "fish").mkdir()
    report = validate_dataset(shapes_dir)
    assert ("empty_class", "error") in codes(report, "fish")
    assert report["class_names"] == ["birds", "cats", "dogs"]
    assert report["usable"] is True


def test_structure_problems(shapes_dir, tmp_path):
    (shapes_dir / "notes.txt").write_text("stray")
    (shapes_dir / "cats" / ".DS_Store").write_bytes(b"\0\0")
    nested = shapes_dir / "cats" / "more"
    nested.mkdir()
    pattern_image(32).save(nested / "x.png")
    os.symlink(shapes_dir / "cats" / "cats_000.png", shapes_dir / "dogs" / "link_inside.png")
    outside = tmp_path / "outside.png"
    shutil.copy(shapes_dir / "birds" / "birds_000.png", outside)
    os.symlink(outside, shapes_dir / "birds" / "link_outside.png")
    report = validate_dataset(shapes_dir)
    assert ("root_file", "warning") in codes(report, "notes.txt")
    assert ("hidden_file", "warning") in codes(report, ".DS_Store")
    assert ("nested_folder", "warning") in codes(report, "cats/more")
    assert "cats/more/x.png" in usable_paths(report)  # counts as a cat, as Keras would
    assert ("symlink_outside_root", "error") in codes(report, "link_outside")
    assert "birds/link_outside.png" not in usable_paths(report)
    assert ("symlink", "warning") in codes(report, "link_inside")


def test_broken_files_are_excluded_with_their_reason(shapes_dir, monkeypatch):
    cats = shapes_dir / "cats"
    (cats / "empty.jpg").write_bytes(b"")
    good = (cats / "cats_000.png").read_bytes()
    jpeg = io.BytesIO()
    pattern_image(64).save(jpeg, "JPEG", quality=90)
    (cats / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (cats / "truncated_png.png").write_bytes(good[: len(good) // 2])
    (cats / "readme.jpg").write_text("this is text, not a JPEG")
    (cats / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    Image.new("RGB", (32, 32), "red").save(cats / "icon.ico")
    (cats / "locked.png").write_bytes(good[:-1] + b"\x00")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.png":
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    report = validate_dataset(shapes_dir)
    expected = {
        "empty.jpg": "empty_file",
        "truncated.jpg": "truncated",
        "truncated_png.png": "truncated",
        "readme.jpg": "not_an_image",
        "photo.heic": "unsupported_format",
        "icon.ico": "unsupported_format",
        "locked.png": "unreadable",
    }
    for name, code in expected.items():
        assert (code, "error") in codes(report, name), (name, codes(report, name))
        assert f"cats/{name}" not in usable_paths(report)
    assert report["classes"]["cats"] == 12
    assert report["stats"]["excluded_files"] == len(expected)


def test_decompression_bomb_is_reported(shapes_dir, monkeypatch):
    Image.new("RGB", (200, 200)).save(shapes_dir / "dogs" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # 200x200 is over twice the limit
    info = inspect_image(shapes_dir / "dogs" / "huge.png")
    assert info.error_code == "decompression_bomb"
    assert "decompression" in info.error_message


def test_extension_mismatch_is_a_warning_and_the_file_is_kept(shapes_dir):
    Image.open(shapes_dir / "cats" / "cats_001.png").save(shapes_dir / "cats" / "really_png.jpg", "PNG")
    report = validate_dataset(shapes_dir)
    assert ("extension_mismatch", "warning") in codes(report, "really_png.jpg")
    assert "cats/really_png.jpg" in usable_paths(report)


def test_modes_are_counted(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    base = pattern_image(32)
    base.convert("L").save(root / "a" / "gray.png")
    base.convert("RGBA").save(root / "a" / "rgba.png")
    base.convert("CMYK").save(root / "a" / "cmyk.jpg")
    base.convert("P").save(root / "b" / "palette.png")
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(root / "b" / "deep.png")
    base.save(root / "b" / "rgb.png")
    report = validate_dataset(root)
    modes = report["stats"]["modes"]
    assert modes["L"] == 1 and modes["RGBA"] == 1 and modes["CMYK"] == 1 and modes["P"] == 1 and modes["RGB"] == 1
    assert sum(v for k, v in modes.items() if k.startswith("I")) == 1  # 16-bit grey
    assert report["classes"] == {"a": 3, "b": 3}


def test_size_aspect_and_tiny_outliers(shapes_dir):
    pattern_image(300).save(shapes_dir / "cats" / "big.png")
    pattern_image(32).resize((32, 128)).save(shapes_dir / "cats" / "tall.png")
    pattern_image(32).resize((8, 8)).save(shapes_dir / "cats" / "tiny.png")
    report = validate_dataset(shapes_dir, options=ValidationOptions(min_image_side=16))
    assert ("size_outlier", "warning") in codes(report, "big.png")
    assert ("aspect_outlier", "warning") in codes(report, "tall.png")
    assert ("tiny_image", "warning") in codes(report, "tiny.png")
    assert {"cats/big.png", "cats/tall.png", "cats/tiny.png"} <= usable_paths(report)
    assert report["stats"]["sizes"]["width"]["max"] == 300


def test_class_imbalance(tmp_path):
    root = make_class_folder(tmp_path / "data", {"many": 20, "few": 3})
    report = validate_dataset(root, options=ValidationOptions(imbalance_ratio=3.0))
    problem = next(p for p in report["problems"] if p["code"] == "class_imbalance")
    assert problem["severity"] == "warning"
    assert "'many' has 20" in problem["message"] and "'few' only 3" in problem["message"]
    balanced = validate_dataset(make_class_folder(tmp_path / "b", {"x": 10, "y": 9}))
    assert "class_imbalance" not in {p["code"] for p in balanced["problems"]}


def test_duplicates_conflicts_and_leaks(shapes_dir, tmp_path):
    shutil.copy(shapes_dir / "cats" / "cats_000.png", shapes_dir / "cats" / "copy.png")
    shutil.copy(shapes_dir / "dogs" / "dogs_000.png", shapes_dir / "birds" / "conflict.png")
    val = make_class_folder(tmp_path / "val", {"birds": 2, "cats": 2, "dogs": 2}, seed=7)
    shutil.copy(shapes_dir / "birds" / "birds_005.png", val / "birds" / "leak.png")
    report = validate_dataset(shapes_dir, val)
    assert ("duplicate", "warning") in codes(report, "cats/copy.png")
    assert "cats/copy.png" in usable_paths(report)
    assert ("label_conflict", "error") in codes(report, "birds/conflict.png")
    assert ("label_conflict", "error") in codes(report, "dogs/dogs_000.png")
    assert "birds/conflict.png" not in usable_paths(report) and "dogs/dogs_000.png" not in usable_paths(report)
    assert ("train_val_leak", "error") in codes(report, "leak.png")
    assert "birds/leak.png" not in usable_paths(report, "val")
    assert "birds/birds_005.png" in usable_paths(report)  # the training copy stays
    assert report["val_classes"] == {"birds": 2, "cats": 2, "dogs": 2}


def test_near_duplicate_by_perceptual_hash(shapes_dir):
    pattern_image(64).save(shapes_dir / "cats" / "original.png")
    pattern_image(64).save(shapes_dir / "dogs" / "recompressed.jpg", "JPEG", quality=85)
    pattern_image(64, shift=20).save(shapes_dir / "dogs" / "different.png")
    report = validate_dataset(shapes_dir)
    near = [p for p in report["problems"] if p["code"] == "near_duplicate"]
    assert len(near) == 1 and near[0]["severity"] == "warning"
    assert {"recompressed.jpg", "original.png"} & {Path(near[0]["path"]).name} and "label conflict" in near[0]["message"]
    assert "different.png" not in " ".join(p["path"] for p in report["problems"])


def test_val_dir_classes_must_match(shapes_dir, tmp_path):
    val = make_class_folder(tmp_path / "val", {"cats": 2, "dogs": 2, "zebras": 2}, seed=3)
    report = validate_dataset(shapes_dir, val)
    assert ("unknown_val_class", "error") in codes(report, "zebras")
    assert ("missing_val_class", "warning") in codes(report, "birds")
    assert sorted({c for _, c in report["files"]["val"]}) == ["cats", "dogs"]


def test_odd_file_names_and_files_never_modified(shapes_dir):
    shutil.copy(shapes_dir / "cats" / "cats_001.png", shapes_dir / "cats" / "ça, \"quoted\" = ü.png")
    (shapes_dir / "cats" / "broken, file.jpg").write_bytes(b"\xff\xd8\xff garbage")
    before = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in shapes_dir.rglob("*")
              if p.is_file()}
    report = validate_dataset(shapes_dir)
    after = {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in shapes_dir.rglob("*")
             if p.is_file()}
    assert before == after
    assert 'cats/ça, "quoted" = ü.png' in usable_paths(report)
    assert any("broken, file.jpg" in p["path"] and p["excluded"] for p in report["problems"])


def test_markdown_summary_lists_classes_and_problems(shapes_dir):
    (shapes_dir / "stray.txt").write_text("x")
    text = report_markdown(validate_dataset(shapes_dir))
    assert "| cats | 12 |" in text and "root_file" in text and "usable for training: **yes**" in text
