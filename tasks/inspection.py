"""Decode one file for real and say what it is, or why it cannot be trained on.

:func:`inspect_image` is the per-file check of validation (run in threads or worker
processes by :mod:`imgflow.tasks.dataset`): it reads the bytes, identifies the format,
decodes (JPEGs in the DCT domain at thumbnail scale; very large non-JPEG images from
their header only) and computes the hashes duplicate detection needs. It never raises
for a bad file: the reason is a stable problem code (``empty_file``, ``truncated``,
``corrupt``, ``not_an_image``, ``unsupported_format``, ``decompression_bomb``,
``unreadable``) with a message, plus warnings (``extension_mismatch``, ``animated``,
``large_image``).
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgflow.tasks import shortcuts

# Formats imgflow trains on. Pillow reads more (PSD, ICO, EPS ...) but those are
# rarely real photos and some need external programs: they are reported instead.
SUPPORTED_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF"}
# Image formats Pillow does not decode here (or that need external programs): a file
# with one of these extensions that Pillow cannot identify is reported as unsupported.
UNSUPPORTED_EXTENSIONS = {
    ".heic", ".heif", ".jxl", ".svg", ".raw", ".cr2", ".nef", ".arw", ".dng", ".psd", ".jp2", ".eps", ".pdf",
}
FORMAT_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png", ".apng"},
    "GIF": {".gif"},
    "BMP": {".bmp", ".dib"},
    "TIFF": {".tif", ".tiff"},
    "WEBP": {".webp"},
    "PPM": {".ppm", ".pgm", ".pbm", ".pnm"},
    "AVIF": {".avif", ".avifs"},
}
# The extension a renamed file should get (the sets above also hold rarer spellings).
PREFERRED_EXTENSION = {
    "JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif",
    "WEBP": ".webp", "PPM": ".ppm", "AVIF": ".avif",
}
# Images above this many pixels (8000x8000 is 64 M) are reported as large_image; those
# that are not JPEG (which decode at 1/8 scale) are checked from their header only.
LARGE_IMAGE_PIXELS = 50_000_000
# Near-duplicates: a coarse 8x8 difference hash finds candidates, a fine 16x16 one
# confirms them (at most NEAR_DUPLICATE_BITS of its 256 bits differ). Re-encoding or
# resizing an image moves a few fine bits; different photos move dozens.
COARSE_HASH_SIDE, FINE_HASH_SIDE = 8, 16
NEAR_DUPLICATE_BITS = 6
# Hashes and the "same image" key come from a reduced copy, which costs a fraction of
# the decode. Two files are the same image when their mode, size and reduced pixels
# are identical (a JPEG saved again as PNG, a copy with other metadata).
THUMBNAIL_SIDE = 64


@dataclass
class ImageInfo:
    """What decoding one file found: its properties, or the reason it is unusable."""

    byte_size: int = 0
    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    frames: int = 1
    content_hash: str | None = None
    pixel_hash: str | None = None
    coarse_hash: int | None = None
    fine_hash: int | None = None
    # cheap properties for the shortcut test (see imgflow.tasks.shortcuts)
    has_alpha: bool = False
    brightness: float | None = None
    border_rgb: tuple[float, float, float] | None = None
    centre_rgb: tuple[float, float, float] | None = None
    detail: float | None = None
    transparent_rgb: tuple[float, float, float] | None = None
    error_code: str | None = None
    error_message: str | None = None
    warnings: list[tuple[str, str]] = field(default_factory=list)


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE) -> Image.Image:
    """A cheap reduced copy (integer box reduction in C) with its short side near ``side``."""
    factor = max(1, min(image.size) // side)
    if factor > 1 and image.mode in ("1", "P", "I;16", "I;16B", "I;16L"):
        # Image.reduce rejects these modes ("image has wrong mode"): a palette or 1-bit PNG is not corrupt
        image = image.convert("RGBA" if image.mode == "P" else "L" if image.mode == "1" else "I")
    return image.reduce(factor) if factor > 1 else image


def difference_hash(gray: Image.Image, side: int) -> int:
    """Difference hash of a grey image: one bit per neighbouring-pixel comparison, ``side`` rows."""
    pixels = np.asarray(gray.resize((side + 1, side), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = np.packbits((pixels[:, :-1] > pixels[:, 1:]).ravel())
    return int.from_bytes(bits.tobytes(), "big")


# Signatures of the formats imgflow trains on, to name a file Pillow could not identify.
MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
         (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


def _format_from_magic(data: bytes) -> str | None:
    for signature, name in MAGIC:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes, image_format: str | None, message: str) -> bool:
    """True when a decode failure comes from missing bytes at the end, not from damaged ones.

    Pillow says so in several ways ("image file is truncated", "Truncated File Read",
    "cannot load this image" when the scan data is cut); the file's own end marker decides.
    """
    text = message.lower()
    if "truncat" in text or "broken data stream" in text:
        return True
    tail = data.rstrip(b"\0")
    if image_format in ("JPEG", "MPO"):
        return not tail.endswith(b"\xff\xd9")  # no EOI marker
    if image_format == "PNG":
        return b"IEND" not in tail[-12:]
    if image_format == "GIF":
        return not tail.endswith(b";")  # no trailer byte
    if image_format == "WEBP" and len(data) >= 8:
        return len(data) < 8 + int.from_bytes(data[4:8], "little")  # shorter than the RIFF size says
    return False


def inspect_image(path: Path) -> ImageInfo:
    """Read and fully decode one file; report what it is or why it cannot be used.

    (One function on purpose: it runs in worker processes, and every branch maps one
    Pillow outcome to one problem code; split up, the mapping would be harder to read.)

    Never raises for a bad file: the reason is in ``error_code``/``error_message``.
    """
    info = ImageInfo()
    try:
        data = path.read_bytes()
    except PermissionError:
        info.error_code, info.error_message = "unreadable", "permission denied; make the file readable (chmod a+r)"
        return info
    except OSError as exc:
        info.error_code, info.error_message = "unreadable", f"cannot read the file: {exc.strerror or exc}"
        return info
    info.byte_size = len(data)
    if not data:
        info.error_code, info.error_message = "empty_file", "the file is empty (0 bytes)"
        return info
    info.content_hash = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                info.format, info.mode = image.format, image.mode
                info.width, info.height = image.size
                info.frames = getattr(image, "n_frames", 1)
                if info.format not in SUPPORTED_FORMATS:
                    info.error_code = "unsupported_format"
                    info.error_message = (
                        f"Pillow reads it as {info.format}, which imgflow does not train on; convert it to PNG or JPEG"
                    )
                    return info
                large = info.width * info.height > LARGE_IMAGE_PIXELS
                if large:
                    info.warnings.append(("large_image", f"very large image ({info.width}x{info.height}, "
                                          f"{info.width * info.height / 1e6:.0f} megapixels): slow to decode, "
                                          "and it is resized to image_size anyway; consider downscaling it"))
                if info.format in ("JPEG", "MPO"):
                    # DCT-domain downscaling: every byte of the compressed stream is still
                    # entropy-decoded, so truncated and corrupt files fail exactly as in a
                    # full decode, but the inverse DCT makes the small copy directly.
                    image.draft(None, (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                elif large:
                    # Checked from its header only: a full decode would cost seconds and
                    # hundreds of MB. Only a byte-identical copy counts as a duplicate.
                    info.pixel_hash = f"undecoded:{info.content_hash}"
                    return info
                image.load()  # the real decode: truncated and corrupt data fail here
                small = thumbnail(image)
                gray = small.convert("L")
                info.coarse_hash = difference_hash(gray, COARSE_HASH_SIDE)
                info.fine_hash = difference_hash(gray, FINE_HASH_SIDE)
                info.pixel_hash = f"{image.mode}{image.size}{zlib.crc32(small.tobytes()):08x}{info.fine_hash:x}"
                info.has_alpha = shortcuts.has_alpha(image)
                (info.brightness, info.border_rgb, info.centre_rgb, info.detail,
                 info.transparent_rgb) = shortcuts.pixel_properties(image, small, gray)
        for warning in caught:
            if issubclass(warning.category, Image.DecompressionBombWarning) and not any(
                    code == "large_image" for code, _ in info.warnings):
                info.warnings.append(("large_image", f"very large image ({info.width}x{info.height}): {warning.message}"))
    except Image.DecompressionBombError as exc:
        info.error_code = "decompression_bomb"
        info.error_message = f"refused by Pillow's decompression-bomb limit: {exc}"
        return info
    except UnidentifiedImageError:
        magic = _format_from_magic(data)
        if magic is not None:  # an image whose header is cut or damaged: Pillow gave up identifying it
            truncated = _looks_truncated(data, magic, "")
            info.error_code = "truncated" if truncated else "corrupt"
            info.error_message = (f"{info.error_code} {magic} data: the file starts as {magic} but its header "
                                  f"cannot be read{' (the file ends early)' if truncated else ''}")
        elif suffix in UNSUPPORTED_EXTENSIONS:
            info.error_code = "unsupported_format"
            info.error_message = f"{suffix} images cannot be decoded here; convert it to PNG or JPEG"
        else:
            info.error_code = "not_an_image"
            info.error_message = (
                "not an image: Pillow does not recognise its content (a misnamed document or a file "
                "damaged from its first bytes); move it out of the dataset"
            )
        return info
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        truncated = _looks_truncated(data, info.format or _format_from_magic(data), text) or isinstance(exc, EOFError)
        info.error_code = "truncated" if truncated else "corrupt"
        info.error_message = f"{'truncated' if truncated else 'corrupt'} {info.format or ''} data: {text}".replace("  ", " ")
        return info
    expected = FORMAT_EXTENSIONS.get(info.format or "", set())
    if expected and suffix not in expected:
        info.warnings.append(
            ("extension_mismatch", f"the extension says {suffix or '(none)'} but the content is {info.format}; rename to {PREFERRED_EXTENSION[info.format or '']}")
        )
    if info.frames > 1:
        info.warnings.append(("animated", f"{info.frames} frames; only the first is used"))
    return info
