"""Plain JPEGs decoded by libjpeg-turbo directly (simplejpeg) give exactly the pixels of Pillow's path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgflow.tasks import images
from imgflow.tasks.drift import image_properties


def _photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: JPEG blocks with real detail at every scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    rgb = np.clip(rgb + rng.normal(0, 25, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def _jpeg(tmp_path, name: str, image: Image.Image, **save) -> str:
    path = tmp_path / name
    image.save(path, "JPEG", **save)
    return str(path)


def _through_pillow(monkeypatch, *args, **kwargs):
    monkeypatch.setattr(images, "simplejpeg", None)
    try:
        return images.load_image(*args, **kwargs)
    finally:
        monkeypatch.undo()


CASES = [
    # (name, size, mode, save options)
    ("baseline-420", (64, 64), "RGB", {"quality": 90}),
    ("odd-sides", (101, 77), "RGB", {"quality": 75}),
    ("scale-three-eighths-would-fit", (128, 128), "RGB", {}),  # libjpeg-turbo could pick 3/8 for 48 px; Pillow picks 1/2
    ("eighth", (400, 260), "RGB", {"quality": 95}),
    ("444", (90, 90), "RGB", {"subsampling": 0}),
    ("422", (90, 70), "RGB", {"subsampling": 1}),
    ("progressive", (150, 120), "RGB", {"progressive": True}),
    ("restart-markers", (96, 96), "RGB", {"restart_marker_blocks": 1}),
    ("grey", (80, 120), "L", {}),
    ("smaller-than-target", (20, 30), "RGB", {}),
    ("with-comment", (64, 64), "RGB", {"comment": b"made by a camera app"}),
]


@pytest.mark.parametrize("subsampling", ["440", "411"])
def test_subsamplings_pillow_cannot_write_decode_the_same(tmp_path, monkeypatch, subsampling):
    import simplejpeg

    pixels = np.asarray(_photo(130, 90))
    path = tmp_path / f"{subsampling}.jpg"
    path.write_bytes(simplejpeg.encode_jpeg(pixels, quality=85, colorsubsampling=subsampling))
    assert images._plain_jpeg(path, (32, 32)) is not None
    np.testing.assert_array_equal(images.load_image(path, 32, "crop"), _through_pillow(monkeypatch, path, 32, "crop"))


def test_header_segments_beyond_the_first_read_are_walked(tmp_path, monkeypatch):
    big_icc = bytes(range(256)) * 400  # 100 KiB ICC profile: several APP2 segments past the first 64 KiB
    path = _jpeg(tmp_path, "icc.jpg", _photo(80, 60), icc_profile=big_icc)
    assert images._plain_jpeg(path, (32, 32)) is not None
    np.testing.assert_array_equal(images.load_image(path, 32), _through_pillow(monkeypatch, path, 32))


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


SOF_8BIT_RGB = _segment(0xC0, bytes([8, 0, 16, 0, 16, 3]) + bytes(9))
SOS = b"\xff\xda"


@pytest.mark.parametrize("header,plain", [
    (SOF_8BIT_RGB + SOS, True),
    (b"\xff\xff" + SOF_8BIT_RGB + SOS, True),  # fill bytes
    (_segment(0xE0, b"JFIF\x00") + SOF_8BIT_RGB + SOS, True),
    (_segment(0xE2, b"ICC_PROFILE\x00") + SOF_8BIT_RGB + SOS, True),
    (SOS, False),  # no frame header
    (_segment(0xE1, b"Exif\x00\x00") + SOF_8BIT_RGB + SOS, False),
    (_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00") + SOF_8BIT_RGB + SOS, False),  # XMP
    (_segment(0xE2, b"MPF\x00") + SOF_8BIT_RGB + SOS, False),
    (b"\xff\xd0" + SOF_8BIT_RGB + SOS, False),  # a restart marker before the scan
    (_segment(0xC3, bytes([8, 0, 16, 0, 16, 3]) + bytes(9)) + SOS, False),  # lossless
    (_segment(0xC9, bytes([8, 0, 16, 0, 16, 3]) + bytes(9)) + SOS, False),  # arithmetic
    (_segment(0xC0, bytes([12, 0, 16, 0, 16, 3]) + bytes(9)) + SOS, False),  # 12-bit samples
    (_segment(0xC0, bytes([8, 0, 16, 0, 16, 4]) + bytes(12)) + SOS, False),  # CMYK
    (b"\x00\x00" + SOS, False),  # not a marker
    (SOF_8BIT_RGB, None),  # runs out before the scan: read more
    (_segment(0xE2, bytes(100))[:20], None),
    (_segment(0xE2, b"MPF\x00")[:6], None),  # an APP2 cut before it says what it is
])
def test_only_plain_header_segments_take_the_plain_path(header, plain):
    assert images._plain_markers(b"\xff\xd8" + header) is plain


def test_a_pillow_built_on_another_libjpeg_keeps_every_jpeg_on_its_path(tmp_path, monkeypatch):
    path = _jpeg(tmp_path, "plain.jpg", _photo(64, 64))
    assert images._plain_jpeg(path, (32, 32)) is not None
    monkeypatch.setattr(images, "_pillow_on_libjpeg_turbo", lambda: False)
    assert images._plain_jpeg(path, (32, 32)) is None


@pytest.mark.parametrize("name,dims,mode,save", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("aspect", images.ASPECTS)
def test_plain_jpegs_decode_to_the_same_pixels_and_header_as_through_pillow(tmp_path, monkeypatch, name, dims, mode,
                                                                            save, aspect):
    path = _jpeg(tmp_path, f"{name}.jpg", _photo(*dims, mode=mode), **save)
    assert images._plain_jpeg(path, (48, 48)) is not None, "this file should take the plain path"
    fast_info: dict = {}
    fast = images.load_image(path, 48, aspect, info=fast_info)
    pillow_info: dict = {}
    slow = _through_pillow(monkeypatch, path, 48, aspect, info=pillow_info)
    assert fast.shape == (48, 48, 3) and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, slow)
    assert fast_info == pillow_info
    assert image_properties(path, fast, fast_info) == image_properties(path, slow, pillow_info)


def test_jpegs_that_need_pillow_do_not_take_the_plain_path(tmp_path):
    rotated = _photo(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    with_exif = _jpeg(tmp_path, "exif.jpg", rotated, exif=exif.tobytes())
    cmyk = _jpeg(tmp_path, "cmyk.jpg", _photo(40, 40, "CMYK"))
    png = tmp_path / "not.jpg"
    _photo(40, 40).save(png, "PNG")
    whole = io.BytesIO()
    _photo(200, 200).save(whole, "JPEG", quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    for path in (with_exif, cmyk, png, truncated):
        assert images._plain_jpeg(path, (32, 32)) is None, path
    # the EXIF orientation is applied (Pillow's path): 64x32 turned to 32x64
    assert images.load_image(with_exif, 16, "pad").shape == (16, 16, 3)
    info: dict = {}
    images.load_image(with_exif, 16, "squash", info=info)
    assert (info["width"], info["height"]) == (64, 32)
    with pytest.raises(OSError, match="truncated"):
        images.load_image(truncated, 32)


def test_the_decompression_bomb_limit_still_applies(tmp_path, monkeypatch):
    path = _jpeg(tmp_path, "big.jpg", _photo(300, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    assert images._plain_jpeg(path, (32, 32)) is None
    with pytest.raises(Image.DecompressionBombError):
        images.load_image(path, 32)


@pytest.mark.parametrize("dims,target,scale", [((64, 64), 32, 2), ((128, 128), 48, 2), ((400, 260), 32, 8),
                                               ((63, 64), 32, 1), ((500, 90), 40, 2), ((30, 30), 48, 1)])
def test_the_dct_scale_is_pillows(dims, target, scale):
    assert images._draft_scale(*dims, (target, target)) == scale
    image = Image.open(io.BytesIO(_encoded(dims)))
    image.draft("RGB", (target, target))
    assert image.size == (-(-dims[0] // scale), -(-dims[1] // scale))


def _encoded(dims: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    _photo(*dims).save(buffer, "JPEG")
    return buffer.getvalue()
