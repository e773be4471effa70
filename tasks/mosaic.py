"""Captioned image mosaics (gallery, confused pairs, saliency) drawn with Pillow.

A matplotlib grid of 16 image axes costs ~0.3-0.5 s to lay out and render on one CPU
core; the same mosaic pasted and captioned with Pillow costs a few milliseconds. The
text uses matplotlib's bundled DejaVu Sans (matplotlib is a dependency), falling back
to Pillow's default font.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imgflow.tasks.atomic import atomic_open

CELL_PX = 150  # images are enlarged (nearest neighbour) towards this side
_LINE_PX = 14
_PAD = 6


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 4:
        array = array[..., :3]
    return np.clip(array, 0, 255).astype(np.uint8)


def _scale(images: Sequence[np.ndarray]) -> int:
    side = max((max(np.asarray(i).shape[:2]) for i in images), default=CELL_PX)
    return max(1, round(CELL_PX / max(side, 1)))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(draw.textlength(text, font=font)) if text else 0


def write_mosaic(
    tiles: Sequence[np.ndarray],
    captions: Sequence[str],
    path: Path,
    ncols: int,
    title: str | None = None,
    colors: Sequence[str] | None = None,
) -> Path:
    """Paste ``tiles`` in rows of ``ncols``, each with its caption above it, and write a PNG.

    Args:
        tiles: uint8 HxWx3 (or HxW) arrays; enlarged by one integer factor (nearest).
        captions: one caption per tile (newlines allowed; empty for none).
        path: PNG file to write (atomically).
        ncols: tiles per row.
        title: a line above the mosaic.
        colors: caption colour per tile (any Pillow colour: ``#b00020``, ``black``).

    Returns:
        ``path``.
    """
    tiles = [_as_rgb(t) for t in tiles] or [np.full((32, 32, 3), 255, np.uint8)]
    factor = _scale(tiles)
    cell_h = max(t.shape[0] for t in tiles) * factor
    cell_w = max(t.shape[1] for t in tiles) * factor
    lines = max((c.count("\n") + 1 for c in captions if c), default=0)
    caption_h = lines * _LINE_PX + (_PAD if lines else 0)
    ncols = max(1, min(ncols, len(tiles)))
    nrows = -(-len(tiles) // ncols)
    font, title_font = _font(11), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((_text_width(probe, line, font) for c in captions for line in c.split("\n")), default=0)
    col_w = max(cell_w, widest) + 2 * _PAD
    title_h = 2 * _LINE_PX + _PAD if title else _PAD
    width = max(ncols * col_w, _text_width(probe, title or "", title_font) + 2 * _PAD)
    canvas = Image.new("RGB", (width, title_h + nrows * (caption_h + cell_h + _PAD)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, _PAD), title, fill="black", font=title_font, anchor="ma")
    for index, tile in enumerate(tiles):
        row, col = divmod(index, ncols)
        x0, y0 = col * col_w, title_h + row * (caption_h + cell_h + _PAD)
        caption = captions[index] if index < len(captions) else ""
        for k, line in enumerate(caption.split("\n") if caption else []):
            draw.text((x0 + col_w // 2, y0 + k * _LINE_PX), line, font=font, anchor="ma",
                      fill=(colors[index] if colors and index < len(colors) else "black"))
        big = Image.fromarray(tile).resize((tile.shape[1] * factor, tile.shape[0] * factor), Image.Resampling.NEAREST)
        canvas.paste(big, (x0 + (col_w - big.width) // 2, y0 + caption_h))
    with atomic_open(Path(path), "wb") as handle:
        canvas.save(handle, format="PNG")
    return Path(path)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``image`` with a jet-coloured ``heatmap`` (values in [0, 1]) blended over it.

    The opacity grows with the map (0.15 + 0.6 x value), so an empty map leaves the image
    visible. A map of another size is resized (bilinear) to the image's.
    """
    from matplotlib import colormaps

    rgb = _as_rgb(image).astype(np.float32)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heat.shape[:2] != rgb.shape[:2]:
        heat = np.asarray(Image.fromarray(heat).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR))
    colour = colormaps["jet"](heat)[..., :3] * 255.0
    alpha = (0.15 + 0.6 * heat)[..., None]
    return (rgb * (1.0 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
