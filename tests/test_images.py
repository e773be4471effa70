"""The one image loader: transparency composited onto a background before resizing, colours, modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks import images, tfrecords


def _sprite(under: tuple[int, int, int]) -> Image.Image:
    """A 16x16 RGBA sprite: opaque red square in the middle, transparent pixels holding ``under``."""
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[..., :3] = under
    pixels[4:12, 4:12] = (200, 30, 40, 255)
    return Image.fromarray(pixels, "RGBA")


@pytest.mark.parametrize("background", ["black", "white", "#336699"])
def test_hidden_colour_under_transparent_pixels_does_not_matter(tmp_path, background):
    _sprite((0, 0, 0)).save(tmp_path / "black_under.png")
    _sprite((255, 255, 255)).save(tmp_path / "white_under.png")
    a = images.load_image(tmp_path / "black_under.png", 8, background=background)
    b = images.load_image(tmp_path / "white_under.png", 8, background=background)
    assert np.array_equal(a, b)
    assert a[0, 0].tolist() == list(images.parse_background(background))  # corner: the background
    assert a[4, 4].tolist() == [200, 30, 40]  # centre: the opaque sprite


def test_without_background_the_hidden_colour_shows_as_before():
    # background None is how models trained before the option saw their images
    black = np.asarray(images.to_rgb(_sprite((0, 0, 0)), None))
    white = np.asarray(images.to_rgb(_sprite((255, 255, 255)), None))
    assert black[0, 0].tolist() == [0, 0, 0] and white[0, 0].tolist() == [255, 255, 255]


def test_composited_before_resizing_so_edges_blend_with_the_background(tmp_path):
    # the hidden colour is bright green; resizing first would smear it into the sprite's edge
    _sprite((0, 255, 0)).save(tmp_path / "green_under.png")
    small = images.load_image(tmp_path / "green_under.png", 4, background="black")
    assert small[..., 1].max() < 40  # no green anywhere


def test_half_transparent_pixels_blend_and_la_and_palette_modes_composite(tmp_path):
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(tmp_path / "half.png")
    blended = images.load_image(tmp_path / "half.png", 8, background="white")[0, 0]
    assert blended.tolist() == pytest.approx([132, 137, 142], abs=2)  # 0.5 * colour + 0.5 * 255

    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[:4, :, 1] = 90, 255  # top half opaque grey 90, bottom half transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = images.load_image(tmp_path / "la.png", 8, background="white")
    assert out[0, 0].tolist() == [90, 90, 90] and out[7, 0].tolist() == [255, 255, 255]

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 8, 4))  # top half index 0, declared transparent
    palette.save(tmp_path / "p.png", transparency=0)
    out = images.load_image(tmp_path / "p.png", 8, background="#00ff00")
    assert out[0, 0].tolist() == [0, 255, 0] and out[7, 0].tolist() == [250, 0, 0]


def test_background_values_and_errors():
    assert images.parse_background("WHITE") == (255, 255, 255)
    assert images.parse_background("#0a0B0c") == (10, 11, 12)
    assert images.parse_background("fff") == (255, 255, 255)
    with pytest.raises(ValueError, match="background: expected black, white or a hex colour such as #808080, found 'grey'"):
        images.parse_background("grey")


def test_preprocess_option_checks_the_background_and_tfrecords_reexports_the_loader():
    from imgflow.flows.config import ConfigError, ImgflowConfig

    assert ImgflowConfig.from_flat({"background": "#FFFFFF"}).preprocess.background == "#ffffff"
    with pytest.raises(ConfigError, match="background"):
        ImgflowConfig.from_flat({"background": "purple"})
    assert tfrecords.load_image is images.load_image


def test_pad_uses_the_background_colour(tmp_path):
    Image.new("RGB", (16, 8), (200, 0, 0)).save(tmp_path / "wide.png")
    out = images.load_image(tmp_path / "wide.png", 16, "pad", background="white")
    assert out[0, 8].tolist() == [255, 255, 255] and out[8, 8].tolist() == [200, 0, 0]


def test_validation_keeps_large_palette_and_one_bit_pngs(tmp_path):
    """Pillow's reduce() rejects P and 1 modes: validation used to call such stamps corrupt."""
    from imgflow.tasks.dataset import thumbnail, validate_dataset

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, (200, 200, 3)).astype(np.uint8)
            image = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE)
            image.save(tmp_path / cls / f"p{i}.png", transparency=0)
            Image.fromarray(pixels[..., 0] > 128).save(tmp_path / cls / f"bit{i}.png")
    assert 64 <= min(thumbnail(Image.open(tmp_path / "a" / "p0.png")).size) < 70
    report = validate_dataset(tmp_path)
    assert [p for p in report["problems"] if p["code"] == "corrupt"] == []
    assert report["classes"] == {"a": 6, "b": 6}
