"""Shortcuts in the data: a cheap file property that alone predicts the class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgflow.flows.config import ValidationOptions
from imgflow.tasks.dataset import inspect_image, report_markdown, validate_dataset
from imgflow.tasks.shortcuts import PROPERTIES, pixel_properties, score_property


def shape_image(seed: int, size: int = 32, alpha: bool = False, under: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Noise on a random background with a random circle or square: the same distribution for any class."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 5]
    inside = (np.hypot(x - cx, y - cy) < r) if rng.random() < 0.5 else ((abs(x - cx) < r) & (abs(y - cy) < r))
    pixels[inside] = rng.integers(0, 256, 3)
    if not alpha:
        return Image.fromarray(pixels, "RGB")
    # opaque shape; around it fully transparent pixels whose stored colour is `under`
    rgba = np.dstack([pixels, np.where(inside, 255, 0).astype(np.uint8)])
    rgba[~inside, :3] = under
    return Image.fromarray(rgba, "RGBA")


def write_class(root: Path, name: str, count: int, seed: int, fmt: str = "png", size: int = 32, **kwargs) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape_image(seed * 1000 + i, size, **kwargs).save(folder / f"{name}_{i:03d}.{fmt}")


def shortcut_problems(report) -> dict[str, dict]:
    return {p["property"]: p for p in report["problems"] if p["code"] == "shortcut"}


def test_format_and_size_shortcut_is_reported(tmp_path):
    write_class(tmp_path / "data", "cats", 14, seed=1, fmt="jpg", size=48)
    write_class(tmp_path / "data", "dogs", 14, seed=2, fmt="png", size=32)
    report = validate_dataset(tmp_path / "data")
    found = shortcut_problems(report)
    assert {"format", "width", "height"} <= set(found)
    fmt = found["format"]
    assert fmt["severity"] == "warning" and fmt["excluded"] is False
    assert fmt["path"] == str(tmp_path / "data") and fmt["balanced_accuracy"] == 1.0 and fmt["chance"] == 0.5
    assert fmt["message"].startswith("the class can be told from the file format alone: 100% balanced accuracy")
    assert "a model may learn that instead of the content" in fmt["message"]
    assert "cats: JPEG 14/14, dogs: PNG 14/14" in fmt["message"]
    assert "cats: 48, dogs: 32" in found["width"]["message"]
    # the files are still used: a shortcut is a warning about the data, not a broken file
    assert report["classes"] == {"cats": 14, "dogs": 14}
    assert report["stats"]["shortcuts"]["format"]["balanced_accuracy"] == 1.0
    assert "format 100%/50%" in report_markdown(report)


def test_content_only_classes_have_no_shortcut(tmp_path):
    write_class(tmp_path / "data", "cats", 20, seed=3)
    write_class(tmp_path / "data", "dogs", 20, seed=4)
    report = validate_dataset(tmp_path / "data")
    assert shortcut_problems(report) == {}
    scores = report["stats"]["shortcuts"]
    # every property was tested, and none gets near the threshold (chance 0.5 + 0.4)
    assert set(scores) == {p.name for p in PROPERTIES} - {"transparent_colour"}
    assert all(s["balanced_accuracy"] < 0.9 for s in scores.values()), scores
    assert scores["format"]["balanced_accuracy"] == 0.5


def test_colour_under_transparent_pixels_differs_by_class(tmp_path):
    write_class(tmp_path / "data", "cats", 12, seed=5, alpha=True, under=(0, 0, 0))
    write_class(tmp_path / "data", "dogs", 12, seed=6, alpha=True, under=(255, 255, 255))
    report = validate_dataset(tmp_path / "data")
    transparency = report["stats"]["transparency"]
    assert transparency == {"with_alpha": 24, "with_transparent_pixels": 24, "by_class": {"cats": 12, "dogs": 12},
                            "light_by_class": {"cats": 0, "dogs": 12}}
    found = shortcut_problems(report)
    assert "transparent_colour" in found
    message = found["transparent_colour"]["message"]
    assert message.startswith("the class can be told from the colour under transparent pixels alone: 100%")
    assert "cats: #000000, dogs: #ffffff" in message and "composite every image onto one background" in message
    # has_alpha is the same for both classes: no shortcut there
    assert "has_alpha" not in found
    assert "24 images with alpha, 24 with fully transparent pixels" in report_markdown(report)


def _mixed_class(root: Path, name: str, white: int, black: int, seed: int) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(white + black):
        under = (255, 255, 255) if i < white else (0, 0, 0)
        shape_image(seed * 1000 + i, alpha=True, under=under).save(folder / f"{name}_{i:03d}.png")


def test_one_class_storing_light_colours_under_transparency_is_reported_against_the_rest(tmp_path):
    # as in the MATE icon theme: most mimetypes icons store white under transparent pixels,
    # almost no other icon does; over all three classes the balanced accuracy stays low
    _mixed_class(tmp_path / "data", "apps", 1, 19, seed=11)
    _mixed_class(tmp_path / "data", "mimetypes", 12, 8, seed=12)
    _mixed_class(tmp_path / "data", "status", 0, 20, seed=13)
    report = validate_dataset(tmp_path / "data")
    assert report["stats"]["shortcuts"]["transparent_colour"]["balanced_accuracy"] < 0.73  # chance + margin
    assert report["stats"]["transparency"]["light_by_class"] == {"apps": 1, "mimetypes": 12, "status": 0}
    problem = shortcut_problems(report)["transparent_colour"]
    assert problem["severity"] == "warning" and problem["classes"] == ["mimetypes"]
    assert problem["message"].startswith(
        "the colour under transparent pixels differs by class: a light colour is stored there in 60% of mimetypes "
        "(12 of 20) against 2% of the other classes.")
    assert "imgflow composites every image onto one background colour" in problem["message"]
    assert "- a light colour under the transparent pixels: apps 1 of 20, mimetypes 12 of 20, status 0 of 20" \
        in report_markdown(report)


def test_light_shares_that_differ_by_little_or_on_few_images_are_not_reported():
    from imgflow.tasks.shortcuts import odd_light_shares

    assert odd_light_shares({"a": (8, 20), "b": (5, 20), "c": (4, 20)}, 10) == []  # 40% vs 22%: under the gap
    assert odd_light_shares({"a": (9, 9), "b": (0, 40)}, 10) == []  # 9 images: under shortcut_min_files
    assert odd_light_shares({"a": (9, 9), "b": (0, 40)}, 5) == [("a", 1.0, 0.0), ("b", 0.0, 1.0)]
    assert odd_light_shares({"a": (4, 10), "b": (0, 10)}, 10) == []  # a 40-point gap, but 2.2 standard errors


def test_same_colour_under_transparency_is_no_shortcut(tmp_path):
    write_class(tmp_path / "data", "cats", 12, seed=7, alpha=True, under=(255, 255, 255))
    write_class(tmp_path / "data", "dogs", 12, seed=8, alpha=True, under=(255, 255, 255))
    report = validate_dataset(tmp_path / "data")
    assert "transparent_colour" not in shortcut_problems(report)
    assert report["stats"]["shortcuts"]["transparent_colour"]["balanced_accuracy"] == 0.5


def test_thresholds_are_options(tmp_path):
    write_class(tmp_path / "data", "cats", 6, seed=1, fmt="jpg")
    write_class(tmp_path / "data", "dogs", 6, seed=2, fmt="png")
    # 6 files a class is under the default minimum of 10: nothing is tested
    report = validate_dataset(tmp_path / "data")
    assert shortcut_problems(report) == {} and report["stats"]["shortcuts"] == {}
    lowered = validate_dataset(tmp_path / "data", options=ValidationOptions(shortcut_min_files=5))
    assert "format" in shortcut_problems(lowered)
    assert lowered["stats"]["shortcuts"]["format"]["folds"] == 5
    off = validate_dataset(tmp_path / "data", options=ValidationOptions(shortcut_min_files=5, shortcuts=False))
    assert shortcut_problems(off) == {} and off["stats"]["shortcuts"] == {}


def test_categorical_table_under_imbalance_stays_at_chance():
    fmt = next(p for p in PROPERTIES if p.name == "format")
    names = ["a"] * 30 + ["b"] * 10
    score = score_property(fmt, ["PNG"] * 40, names, ValidationOptions())
    # plain accuracy would be 75% by always saying "a"; balanced accuracy is 50%
    assert score["balanced_accuracy"] == 0.5 and score["files"] == 40 and score["classes"] == ["a", "b"]
    half = score_property(fmt, ["PNG"] * 30 + ["JPEG"] * 10, names, ValidationOptions())
    assert half["balanced_accuracy"] == 1.0
    # a class with too few files with a value is left out; one class left means no test
    assert score_property(fmt, ["PNG"] * 30 + [None] * 10, names, ValidationOptions()) is None


def test_transparent_colour_survives_large_images(tmp_path):
    rgba = np.zeros((300, 200, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)  # stored under alpha 0
    rgba[100:200, 50:150] = (250, 250, 250, 255)
    path = tmp_path / "big.png"
    Image.fromarray(rgba, "RGBA").save(path)
    info = inspect_image(path)
    assert info.has_alpha is True and info.transparent_rgb == (10.0, 200.0, 30.0)
    # the 1-pixel border of the reduced copy: transparent there, premultiplied to black by the reduction
    assert info.border_rgb == (0.0, 0.0, 0.0)
    opaque = Image.new("RGB", (40, 40), (100, 100, 100))
    opaque.paste((200, 200, 200), (1, 1, 39, 39))
    stats = pixel_properties(opaque, opaque, opaque.convert("L"))
    assert stats.border_rgb == (100.0, 100.0, 100.0) and stats.transparent_rgb is None
    assert stats.centre_rgb == (200.0, 200.0, 200.0)
    assert stats.brightness == round((100 * (40 * 40 - 38 * 38) + 200 * 38 * 38) / 1600, 2)


def backdrop_image(seed: int, backdrop: int, size: int = 32) -> Image.Image:
    """A random-colour object over the central half, on a grey-level backdrop with noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(backdrop + rng.integers(-15, 15, (size, size, 3)), 0, 255).astype(np.uint8)
    lo, hi = size // 4 - 2, size - size // 4 + 2
    pixels[lo:hi, lo:hi] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels, "RGB")


def test_backdrop_colour_is_a_shortcut_but_class_colours_are_not(tmp_path, shapes_dir):
    for name, backdrop, seed in (("cats", 245, 1), ("dogs", 10, 2)):
        (tmp_path / "data2" / name).mkdir(parents=True)
        for i in range(12):
            backdrop_image(seed * 100 + i, backdrop).save(tmp_path / "data2" / name / f"{i}.png")
    found = shortcut_problems(validate_dataset(tmp_path / "data2"))
    assert {"border_colour", "brightness"} <= set(found)
    assert found["border_colour"]["balanced_accuracy"] == 1.0
    assert "median per class — cats: #f" in found["border_colour"]["message"]
    # classes of solid colours: colour is the content, and the centre tells them apart as well
    solid = validate_dataset(shapes_dir)
    assert solid["problems"] == []
    assert solid["stats"]["shortcuts"]["border_colour"]["balanced_accuracy"] == 1.0


def test_real_digits_have_no_shortcut(tmp_path):
    from tests.imagefactory import make_digit_folder

    report = validate_dataset(make_digit_folder(tmp_path / "digits", per_class=20))
    # a "1" has less ink, so it compresses smaller: file size tells the classes apart,
    # but so does the detail of the content, and that is what the model should learn
    assert report["stats"]["shortcuts"]["file_size"]["balanced_accuracy"] >= 0.73
    assert shortcut_problems(report) == {}
