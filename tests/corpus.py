"""A deterministic corpus of broken and odd image files, generated on the fly.

`make_corpus(folder)` writes the files (nothing downloaded, no committed binaries) and
returns one CorpusItem per case, including one file that is deliberately NOT written
("read_error": the caller lists it in a catalog to exercise the missing-file path).

Run `python tests/corpus.py OUT_DIR` to write the corpus somewhere and list it.
"""

from __future__ import annotations

import io
import pathlib
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

# Exif tag number of Orientation.
ORIENTATION = 0x0112


@dataclass(frozen=True)
class CorpusItem:
    name: str  # path relative to the corpus folder, "/"-separated
    expected: str | None  # None for a usable image, else the expected ImageError code
    note: str

    @property
    def usable(self) -> bool:
        return self.expected is None


# Names of items the behaviour tests look at directly.
ZERO = "broken/zero_bytes.jpg"
TEXT = "broken/text.png"
HTML = "broken/error_page.png"
TRUNCATED = "broken/truncated.jpg"
HUGE_HEADER = "broken/header_10000x10000.png"
BOMB_HEADER = "broken/header_100000x100000.png"
CMYK = "odd/cmyk.jpg"
GRAY16 = "odd/gray16_gradient.png"
PALETTE_TRNS = "odd/palette_transparent.png"
ANIMATED = "odd/animated.gif"
TIFF = "odd/plain.tiff"
WEBP = "odd/plain.webp"
JPEG_AS_PNG = "odd/really_a_jpeg.png"
TINY = "odd/one_pixel.png"
STRIP = "odd/strip_4000x50.png"
EXIF_ROTATED = "photos/china_exif_rotated.jpg"
UPRIGHT = "photos/china_upright.jpg"
RGB_PNG = "plain_rgb.png"
GRAY_JPEG = "plain_gray.jpg"
RGBA_PNG = "rgba_alpha.png"
MISSING = "missing/not_there.jpg"

# Geometry the behaviour tests rely on.
CMYK_CYAN_BOX = (8, 8, 40, 40)  # pure cyan (C=255, M=Y=K=0) on the left of the CMYK image
CMYK_SIZE = (96, 64)
GRAY16_SIZE = (256, 32)  # horizontal gradient 0..65535 along x
PALETTE_SIZE = (64, 48)
PALETTE_TRANSPARENT_BOX = (0, 0, 64, 16)  # top band is palette index 0, fully transparent
RGBA_SIZE = (80, 60)
RGBA_TRANSPARENT_BOX = (0, 0, 80, 20)  # top band alpha 0 (RGB underneath is black)
GIF_FRAME_COLOURS = ((220, 30, 30), (30, 200, 40), (30, 60, 220), (240, 200, 20))
GIF_SIZE = (48, 40)
STRIP_SIZE = (4000, 50)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and a valid IHDR (8-bit RGB) claiming width x height, then a
    tiny garbage IDAT and IEND: enough for Pillow to open it, not to decode it."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _scene(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB picture with a gradient background and a few shapes, different per seed."""
    w, h = size
    x = np.linspace(0.0, 1.0, w)[None, :]
    y = np.linspace(0.0, 1.0, h)[:, None]
    phase = seed * 0.7
    r = 40 + 180 * (0.5 + 0.5 * np.sin(3 * x + phase)) * np.ones_like(y)
    g = 40 + 180 * y * np.ones_like(x)
    b = 40 + 180 * (0.5 + 0.5 * np.cos(2 * (x + y) + phase))
    img = Image.fromarray(np.stack([r, g, b], axis=-1).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    k = seed % 3
    draw.ellipse((w * 0.1, h * 0.15, w * 0.45, h * 0.6), fill=(200 - 60 * k, 30, 60 + 60 * k))
    draw.rectangle((w * 0.55, h * 0.4, w * 0.9, h * 0.85), fill=(20, 120 + 40 * k, 90))
    draw.line((0, h - 1, w - 1, 0), fill=(250, 250, 250), width=max(1, min(w, h) // 20))
    return img


def _truncated_jpeg() -> bytes:
    data = _encode(_scene((160, 120), 1), "JPEG", quality=90)
    return data[: len(data) // 2]


def _cmyk_jpeg() -> bytes:
    w, h = CMYK_SIZE
    img = Image.new("CMYK", CMYK_SIZE, (0, 0, 0, 0))  # white paper
    draw = ImageDraw.Draw(img)
    draw.rectangle(CMYK_CYAN_BOX, fill=(255, 0, 0, 0))  # pure cyan
    draw.rectangle((52, 8, 88, 40), fill=(0, 255, 0, 0))  # pure magenta
    draw.ellipse((20, 44, 76, h - 2), fill=(0, 0, 0, 255))  # black
    return _encode(img, "JPEG", quality=95)


def _gray16_png() -> bytes:
    w, h = GRAY16_SIZE
    ramp = np.round(np.linspace(0, 65535, w)).astype(np.uint16)
    arr = np.repeat(ramp[None, :], h, axis=0)
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode == "I;16", img.mode
    return _encode(img, "PNG")


def _palette_transparent_png() -> bytes:
    w, h = PALETTE_SIZE
    img = Image.new("P", PALETTE_SIZE, 1)
    palette = [0, 0, 0, 200, 40, 40, 40, 160, 60, 30, 60, 200] + [0] * (256 - 4) * 3
    img.putpalette(palette)
    draw = ImageDraw.Draw(img)
    draw.rectangle(PALETTE_TRANSPARENT_BOX, fill=0)  # index 0: transparent (black underneath)
    draw.ellipse((8, 20, 36, h - 2), fill=2)
    draw.rectangle((40, 22, 60, 44), fill=3)
    return _encode(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = []
    for i, colour in enumerate(GIF_FRAME_COLOURS):
        img = Image.new("RGB", GIF_SIZE, colour)
        draw = ImageDraw.Draw(img)
        draw.rectangle((4 + 6 * i, 4, 14 + 6 * i, 14), fill=(255, 255, 255))
        frames.append(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=8))
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _rgba_png() -> bytes:
    w, h = RGBA_SIZE
    img = _scene(RGBA_SIZE, 5).convert("RGBA")
    arr = np.asarray(img).copy()
    x0, y0, x1, y1 = RGBA_TRANSPARENT_BOX
    arr[y0:y1, x0:x1] = (0, 0, 0, 0)  # transparent black: must come out white
    arr[y1:, :, 3] = np.linspace(255, 64, w).round().astype(np.uint8)[None, :]
    return _encode(Image.fromarray(arr, "RGBA"), "PNG")


def _strip_png() -> bytes:
    w, h = STRIP_SIZE
    x = np.linspace(0.0, 1.0, w)[None, :, None]
    base = np.array([20.0, 60.0, 140.0])[None, None, :]
    arr = np.broadcast_to(base + 80 * x, (h, w, 3)).round().astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    draw = ImageDraw.Draw(img)
    for i in range(0, w, 400):
        draw.ellipse((i + 10, 5, i + 50, 45), fill=(180, 30 + i // 40, 30))
    return _encode(img, "PNG", optimize=False)


def _china() -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg"), "RGB")


@cache
def _exif_pair() -> tuple[bytes, bytes]:
    """(upright JPEG, rotated JPEG whose Exif Orientation restores the upright view).

    Orientation 6 means "rotate 90 degrees clockwise to display": exif_transpose applies
    ROTATE_270 (clockwise), so the stored pixels are the upright photo turned counter-clockwise.
    """
    upright = _china()
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return (
        _encode(upright, "JPEG", quality=95),
        _encode(stored, "JPEG", quality=95, exif=exif.tobytes()),
    )


def _text() -> bytes:
    return b"this is not an image, just some text\nsecond line\n" * 3


def _html() -> bytes:
    return (
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
        b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n"
    )


# (item, builder of the file's bytes); the missing file has no builder.
_CASES: list[tuple[CorpusItem, Callable[[], bytes]]] = [
    (CorpusItem(ZERO, "not_an_image", "zero-byte file"), lambda: b""),
    (CorpusItem(TEXT, "not_an_image", "plain text named .png"), _text),
    (CorpusItem(HTML, "not_an_image", "HTML error page named .png"), _html),
    (CorpusItem(TRUNCATED, "truncated", "JPEG cut in half"), _truncated_jpeg),
    (
        CorpusItem(HUGE_HEADER, "too_large", "PNG header claiming 10000x10000"),
        lambda: png_header_only(10_000, 10_000),
    ),
    (
        CorpusItem(BOMB_HEADER, "too_large", "PNG header claiming 100000x100000 (bomb)"),
        lambda: png_header_only(100_000, 100_000),
    ),
    (CorpusItem(CMYK, None, "CMYK JPEG (Adobe)"), _cmyk_jpeg),
    (CorpusItem(GRAY16, None, "16-bit grayscale PNG, 0..65535 gradient"), _gray16_png),
    (CorpusItem(PALETTE_TRNS, None, "palette PNG with tRNS"), _palette_transparent_png),
    (CorpusItem(ANIMATED, None, "animated GIF, 4 frames"), _animated_gif),
    (CorpusItem(TIFF, None, "RGB TIFF"), lambda: _encode(_scene((120, 80), 2), "TIFF")),
    (
        CorpusItem(WEBP, None, "lossy WebP"),
        lambda: _encode(_scene((128, 96), 3), "WEBP", quality=80, method=0),
    ),
    (
        CorpusItem(JPEG_AS_PNG, None, "JPEG named .png"),
        lambda: _encode(_scene((100, 100), 4), "JPEG", quality=90),
    ),
    (
        CorpusItem(TINY, "too_small", "1x1 tracking pixel"),
        lambda: _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
    ),
    (CorpusItem(STRIP, None, "4000x50 banner strip"), _strip_png),
    (CorpusItem(EXIF_ROTATED, None, "photo rotated, Exif Orientation 6"), lambda: _exif_pair()[1]),
    (CorpusItem(UPRIGHT, None, "same photo upright (twin)"), lambda: _exif_pair()[0]),
    (
        CorpusItem(RGB_PNG, None, "ordinary RGB PNG"),
        lambda: _encode(_scene((160, 120), 0), "PNG"),
    ),
    (
        CorpusItem(GRAY_JPEG, None, "grayscale JPEG"),
        lambda: _encode(_scene((120, 90), 7).convert("L"), "JPEG", quality=90),
    ),
    (CorpusItem(RGBA_PNG, None, "RGBA PNG with alpha"), _rgba_png),
]

MISSING_ITEM = CorpusItem(MISSING, "read_error", "missing file")

# Every item, known without writing anything (handy for pytest.mark.parametrize).
ITEMS: tuple[CorpusItem, ...] = (*(item for item, _ in _CASES), MISSING_ITEM)


def make_corpus(folder: pathlib.Path) -> list[CorpusItem]:
    """Write the corpus under folder and return ITEMS (the missing file, not written, is last)."""
    folder = pathlib.Path(folder)
    for item, build in _CASES:
        path = folder / item.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(build())
    (folder / MISSING).unlink(missing_ok=True)
    return list(ITEMS)


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    for it in make_corpus(out):
        p = out / it.name
        size = p.stat().st_size if p.exists() else "-"
        print(f"{it.name:40} {it.expected or 'usable':14} {size:>8}  {it.note}")
