"""The one image loader: every imgflow stage decodes files here, so they see the same pixels.

Preprocessing (the TFRecord shards), evaluation of a folder and prediction all call
:func:`load_image` with the model's recorded ``image_size``, ``aspect`` and
``background``; a model can therefore never be fed differently prepared pixels than it
was trained on.

Transparency: a PNG's transparent pixels still hold colour values (often black in one
tool's export and white in another's). Dropping the alpha channel shows the model those
hidden colours, which can differ by class and become a false cue. Images with alpha
(RGBA, LA, PA, palette with a transparent colour) are therefore composited onto one
``background`` colour *before* resizing, so transparent pixels look the same whatever
colour they hide.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

try:  # libjpeg-turbo without Pillow's per-file Python (see _plain_jpeg); Pillow decodes everything without it
    import simplejpeg
except ImportError:  # a platform without its wheel
    simplejpeg = None

ASPECTS = ("squash", "crop", "pad")
# Named backgrounds; any "#rrggbb" or "#rgb" hex colour works too.
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
# The background when an option or a model's metadata names none (chosen by bench/recipe.py).
DEFAULT_BACKGROUND = "black"
_RESAMPLE = Image.Resampling.BILINEAR
_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def parse_background(value: str) -> tuple[int, int, int]:
    """The RGB colour of a ``background`` option: ``black``, ``white`` or a hex colour.

    Args:
        value: ``black``, ``white``, ``#rrggbb`` or ``#rgb`` (the ``#`` may be left out).

    Returns:
        ``(r, g, b)`` in 0-255.

    Raises:
        ValueError: any other value (the message names the accepted forms).
    """
    text = str(value).strip().lower()
    if text in BACKGROUNDS:
        return BACKGROUNDS[text]
    match = _HEX.match(text)
    if not match:
        raise ValueError(f"background: expected black, white or a hex colour such as #808080, found {value!r}")
    digits = match.group(1)
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` carries transparency (an alpha band, or a palette/grey transparent colour)."""
    return image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def to_rgb(image: Image.Image, background: str | None = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto ``background``.

    Args:
        image: a decoded (and oriented) image of any mode.
        background: colour under transparent pixels (see :func:`parse_background`), or
            None to drop the alpha channel as Pillow's ``convert("RGB")`` does (what
            models trained before the option existed saw).

    Returns:
        An RGB image of the same size.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(image, dtype=np.float64)
        top = max(float(arr.max()), 1.0)
        image = Image.fromarray((arr * (255.0 / (65535.0 if top > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if background is not None and has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, parse_background(background))
        # paste with the alpha band as mask: out = image * a + background * (1 - a)
        canvas.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return canvas
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(
    path: Path | str,
    image_size: int,
    aspect: str = "squash",
    background: str | None = DEFAULT_BACKGROUND,
    info: dict | None = None,
) -> np.ndarray:
    """Decode an image file the way every imgflow stage does, as ``image_size`` square RGB.

    Pillow decodes (JPEGs at a reduced DCT scale when they are at least twice the target
    size, which is both faster and antialiased), applies the EXIF orientation, converts any
    mode (grey, palette, CMYK, 16-bit) to RGB, composites images with transparency onto
    ``background``, then resizes.

    Args:
        path: image file.
        image_size: side of the square output, in pixels.
        aspect: ``squash`` (resize, ignoring the aspect ratio), ``crop`` (scale the short
            side to ``image_size`` and cut the centre) or ``pad`` (scale the long side to
            ``image_size`` and pad the rest with the background colour, black when None).
        background: colour under transparent pixels: ``black``, ``white`` or a hex colour;
            None drops the alpha channel (models trained before the option existed).
        info: when given, filled with the file's ``format``, ``mode``, ``width``, ``height``
            and ``has_alpha`` as opened (the drift report reads them without a second open).

    Returns:
        uint8 array of shape ``(image_size, image_size, 3)``.

    Raises:
        ValueError: unknown ``aspect`` or ``background``, or a non-positive ``image_size``.
        OSError: the file cannot be read or decoded (Pillow's own error).
    """
    if aspect not in ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    fill = parse_background(background) if background is not None else (0, 0, 0)
    size = (image_size, image_size)
    plain = _plain_jpeg(path, size)
    if plain is not None:
        pixels, header = plain
        if info is not None:
            info.update(header)
        if pixels.shape[:2] == size[::-1]:
            return pixels
        return _fit(Image.fromarray(pixels), size, aspect, fill)
    with Image.open(path) as img:
        if info is not None:
            info.update(format=img.format, mode=img.mode, width=img.size[0], height=img.size[1],
                        has_alpha=img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info)
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", size)  # DCT scaling: see _draft_scale
        ImageOps.exif_transpose(img, in_place=True)  # turned only when EXIF says so: no copy otherwise
        return _fit(to_rgb(img, background), size, aspect, fill)


def _fit(img: Image.Image, size: tuple[int, int], aspect: str, fill: tuple[int, int, int]) -> np.ndarray:
    """An RGB image at ``size`` by ``aspect``, as a fresh uint8 array."""
    if aspect == "squash":
        out = img.resize(size, _RESAMPLE) if img.size != size else img
    elif aspect == "crop":
        out = ImageOps.fit(img, size, _RESAMPLE)
    else:
        out = ImageOps.pad(img, size, _RESAMPLE, color=fill)
    return np.asarray(out, dtype=np.uint8).copy()


def _draft_scale(width: int, height: int, size: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) of Pillow's ``draft``: the largest that keeps both sides >= ``size``."""
    fits = min(width // size[0], height // size[1])
    return next(scale for scale in (8, 4, 2, 1) if fits >= scale or scale == 1)


#: JPEG colour spaces the plain path decodes, and the Pillow mode each opens as
_PLAIN_JPEG_MODES = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "L"}
_HEAD_BYTES = 64 * 1024  # a JPEG's header segments usually fit: an EXIF file is not read twice in full


def _same_libjpeg() -> bool:
    """Whether simplejpeg is there and Pillow decodes JPEGs with libjpeg-turbo too (IJG libjpeg scales differently)."""
    return simplejpeg is not None and _pillow_on_libjpeg_turbo()


@functools.cache
def _pillow_on_libjpeg_turbo() -> bool:
    from PIL import features

    return bool(features.check_feature("libjpeg_turbo"))


def _plain_jpeg(path: Path | str, size: tuple[int, int]) -> tuple[np.ndarray, dict] | None:
    """A plain JPEG's RGB pixels exactly as Pillow's draft + load + convert give them, and its header; else None.

    Pillow spends ~100 µs of Python per file opening a small JPEG (parsing its markers),
    several times libjpeg-turbo's own decode of a 64 px one; ``simplejpeg`` calls the same
    libjpeg-turbo decode (the same DCT method, upsampling and scale) from C. Only files
    for which that is the same as the Pillow path take it: an 8-bit baseline, extended or
    progressive JPEG in YCbCr, RGB or grey, with no APP1 segment (EXIF or XMP can carry
    an orientation) and no multi-picture (MPO) index, within Pillow's decompression-bomb
    limit, that libjpeg-turbo decodes without a warning, when Pillow itself is built on
    libjpeg-turbo. Everything else (and every error) returns None, and Pillow decodes the
    file as ever, raising its own errors.
    """
    if not _same_libjpeg():
        return None
    try:
        with open(path, "rb") as handle:
            data = handle.read(2)
            if data != b"\xff\xd8":  # not a JPEG: no more of it read here
                return None
            data += handle.read(_HEAD_BYTES - 2)
            plain = _plain_markers(data)
            if plain is None:  # header segments beyond the first read (a large ICC profile)
                data += handle.read()
                plain = _plain_markers(data)
            if not plain:
                return None
            data += handle.read()
    except OSError:
        return None  # Pillow raises the error the file deserves
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        mode = _PLAIN_JPEG_MODES.get(colorspace)
        if mode is None or (Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS):
            return None
        scale = _draft_scale(width, height, size)
        out_w, out_h = -(-width // scale), -(-height // scale)
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=out_h, min_width=out_w, strict=True)
    except ValueError:  # corrupt or truncated, or a libjpeg warning: Pillow's path decides
        return None
    if pixels.shape != (out_h, out_w, 3):
        return None
    return pixels, {"format": "JPEG", "mode": mode, "width": width, "height": height, "has_alpha": False}


_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive Huffman; other SOFs (lossless, arithmetic): Pillow


def _plain_markers(data: bytes) -> bool | None:
    """Whether a JPEG's segments before its first scan make it plain (see :func:`_plain_jpeg`); None: ``data`` ends first.

    Plain: a frame header (SOF0-2) of 8-bit samples with 1 or 3 components, no APP1
    (EXIF, XMP) and no APP2 MPF index, and nothing but length-prefixed segments.
    """
    at, frame = 2, False
    while at + 2 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: every header segment seen
            return frame
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD9:  # stuffing, TEM, RSTn, SOI, EOI: not in a plain header
            return False
        if at + 4 > len(data):
            return None
        length = (data[at + 2] << 8) | data[at + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header
            if marker not in _SOF_PLAIN:
                return False
            if at + 10 > len(data):
                return None
            if data[at + 4] != 8 or data[at + 9] not in (1, 3):  # sample precision, components
                return False
            frame = True
        if marker == 0xE2 and at + 8 > len(data):
            return None  # whether it is an MPF index lies past what was read
        if marker == 0xE1 or (marker == 0xE2 and data[at + 4 : at + 8] == b"MPF\x00"):
            return False
        at += 2 + length
    return None
