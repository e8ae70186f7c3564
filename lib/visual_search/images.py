"""Safe image decoding (limits checked on the header first) and square preprocessing to uint8."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats a catalog may hold. Anything else (EPS, PSD, ICO, ...) is refused before parsing.
# (MPO files open through the JPEG plugin.)
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
# Uploads leave TIFF out unless enabled: a large parser surface for a format no phone sends.
UPLOAD_FORMATS = tuple(f for f in FORMATS if f != "TIFF")
SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".tif", ".tiff", ".bmp")

# Leading bytes of each catalog format -> the media type it is served as.
_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
    (b"BM", "image/bmp"),
)


def media_type(data: bytes) -> str | None:
    """The image media type the bytes themselves show (never the file name), or None when they
    are not one of the catalog formats."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media in _MAGIC if data.startswith(magic)), None)


# Contract 2 error codes produced here ("read_error" comes from storage).
ERROR_CODES = (
    "read_error",
    "not_an_image",
    "truncated",
    "too_large",
    "too_small",
    "unsupported",
    "decode_error",
)


# A decompression bomb is an error, never a warning. A process-wide filter, because
# warnings.catch_warnings() is not thread-safe and decoding runs in threads.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class ImageError(ValueError):
    """An image that cannot be used; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 32 * 1024 * 1024
    # About 120 MB once decoded to RGB. Pillow's own bomb error fires only at 179 Mpx.
    max_pixels: int = 40_000_000
    # Smaller images (tracking pixels, placeholders) carry no product.
    min_side: int = 16
    # Pillow decodes WebP whole, in about three full-size RGBA copies (16 Mpx: about 250 MB).
    max_webp_pixels: int = 16_000_000
    formats: tuple[str, ...] = FORMATS  # the Pillow formats accepted


@dataclass(frozen=True)
class Preprocess:
    """PIL RGB image -> uint8 array (size, size, 3).

    "pad" keeps the whole product (fit the longest side, pad with white); "crop" is the
    classic ImageNet evaluation transform (resize the shorter side to size / crop_pct, center crop).
    """

    size: int = 224
    mode: Literal["pad", "crop"] = "pad"
    crop_pct: float = 0.875

    def __call__(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        if self.mode == "pad":
            scale = self.size / max(w, h)
        else:
            scale = self.size / self.crop_pct / min(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        if self.mode == "pad":
            canvas = Image.new("RGB", (self.size, self.size), (255, 255, 255))
            canvas.paste(resized, ((self.size - nw) // 2, (self.size - nh) // 2))
        else:
            left, top = (nw - self.size) // 2, (nh - self.size) // 2
            canvas = resized.crop((left, top, left + self.size, top + self.size))
        return np.asarray(canvas, dtype=np.uint8)


def _white_background(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _scaled_to_8bit(img: Image.Image, top: float | None = None) -> Image.Image:
    """16/32-bit integer and float grayscale to 8 bits by scaling, never by clipping.

    I;16* modes scale by their bit depth; "I" (32-bit, how Pillow opens some 16-bit files) and
    "F" carry no depth, so their range is taken from the values (`top`: the whole image's
    maximum, when `img` is one strip of it).
    """
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) * 255.0 / 65535.0
    elif arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        top = arr.max(initial=0) if top is None else top
        out = arr * 255.0 if top <= 1.0 else arr
    else:
        top = int(arr.max(initial=0)) if top is None else top
        depth = 255 if top <= 255 else 65535 if top <= 65535 else top
        out = arr.astype(np.float64) * (255.0 / depth)
    return Image.fromarray(np.round(np.clip(out, 0, 255)).astype(np.uint8), "L").convert("RGB")


def to_rgb(img: Image.Image, top: float | None = None) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white.

    `top` is the maximum value of the whole image when `img` is one strip of a 32-bit one."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _white_background(img)
    if mode.startswith("I") or mode == "F":
        return _scaled_to_8bit(img, top)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported", f"cannot convert mode {mode} to RGB: {exc}") from exc


# A draft_size caller resamples at the end; reduction keeps 3x that (resize's reducing_gap).
REDUCE_MARGIN = 3
# Pixels converted at a time when a large image is reduced strip by strip (4 MB as RGBA).
STRIP_PIXELS = 1 << 20


def _reduced_rgb(img: Image.Image, factor: int) -> Image.Image:
    """A loaded image -> RGB box-reduced `factor` times, converted one strip of rows at a time,
    so that memory stays near the decoded image's own size (a 40 Mpx RGBA or 16-bit image
    would otherwise take several full-size copies). Strips are whole multiples of `factor`
    rows, so the result equals converting the whole image and then reducing it."""
    w, h = img.size
    top = None
    if img.mode in ("I", "F"):  # their scale comes from the whole image's range
        top = float(np.nan_to_num(np.float64(img.getextrema()[1])))
    rows = max(factor, STRIP_PIXELS // w // factor * factor)
    out = Image.new("RGB", (math.ceil(w / factor), math.ceil(h / factor)))
    for y in range(0, h, rows):
        strip = to_rgb(img.crop((0, y, w, min(h, y + rows))), top)
        out.paste(strip.reduce(factor), (0, y // factor))
    orientation = img.getexif().get(ExifTags.Base.Orientation)
    if orientation:
        out.getexif()[ExifTags.Base.Orientation] = orientation
    return out


def _classify(exc: Exception) -> ImageError:
    msg = str(exc)
    if isinstance(exc, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return ImageError("too_large", msg)
    if "truncated" in msg or "premature end" in msg.lower() or isinstance(exc, EOFError):
        return ImageError("truncated", msg)
    if isinstance(exc, NotImplementedError) or "not supported" in msg or "unknown" in msg:
        return ImageError("unsupported", msg)
    return ImageError("decode_error", f"{type(exc).__name__}: {msg}")


def decode(data: bytes, limits: Limits = Limits(), draft_size: int | None = None) -> Image.Image:
    """Bytes -> upright 8-bit RGB PIL image (first frame). Raises ImageError.

    The header (format, size) is checked against the limits before any pixel is decoded.
    draft_size lets JPEG decode at a reduced scale when the caller will shrink anyway.
    """
    if not data:
        raise ImageError("not_an_image", "empty file")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"{len(data)} bytes > limit {limits.max_bytes}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncation would be hidden")
    try:
        img = Image.open(io.BytesIO(data), formats=limits.formats)
    except UnidentifiedImageError as exc:
        media = media_type(data)
        if media is not None:  # a catalog format this caller does not accept
            raise ImageError("unsupported", f"{media} is not accepted here") from exc
        raise ImageError("not_an_image", f"not a {'/'.join(limits.formats)} image") from exc
    except Exception as exc:
        raise _classify(exc) from exc
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError("too_large", f"{w}x{h} pixels > limit {limits.max_pixels}")
    if img.format == "WEBP" and w * h > limits.max_webp_pixels:
        raise ImageError("too_large", f"{w}x{h} WebP pixels > limit {limits.max_webp_pixels}")
    if min(w, h) < limits.min_side:
        raise ImageError("too_small", f"{w}x{h} pixels, smaller than {limits.min_side}")
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except Exception as exc:
        raise _classify(exc) from exc
    # Formats without a reduced-scale decode are reduced before conversion (keeping a margin
    # of REDUCE_MARGIN over draft_size for the final resampling).
    factor = min(img.size) // (draft_size * REDUCE_MARGIN) if draft_size else 0
    try:
        if factor >= 2:
            img = _reduced_rgb(img, factor)
        # A malformed EXIF block should not cost a good image.
        with contextlib.suppress(Exception):
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        raise _classify(exc) from exc


# A query's border is a backdrop when its median level is at least BACKDROP_LEVEL and its
# channels' median absolute deviation at most BACKDROP_SPREAD (0-255 scale); the border ring is
# BACKDROP_RING of the shorter side. Chosen on products-dev validation queries
# (bench/quality_levers.py, "query_white_balance").
BACKDROP_RING, BACKDROP_SPREAD, BACKDROP_LEVEL = 0.04, 18.0, 90.0


def balance_backdrop(img: Image.Image) -> Image.Image:
    """img with its border colour scaled to white per channel (von Kries), when the border looks
    like a backdrop (near-uniform and bright); else img itself. Catalog shots sit on white: a
    shopper's photo of one keeps the backdrop with the camera's colour cast on everything."""
    a = np.asarray(img, np.float32)
    r = max(2, int(min(a.shape[:2]) * BACKDROP_RING))
    border = np.concatenate([e.reshape(-1, 3) for e in (a[:r], a[-r:], a[:, :r], a[:, -r:])])
    med = np.median(border, 0)
    spread = np.median(np.abs(border - med), 0).max()
    if spread > BACKDROP_SPREAD or med.mean() < BACKDROP_LEVEL:
        return img
    return Image.fromarray(np.clip(a * (255.0 / np.maximum(med, 1.0)), 0, 255).astype(np.uint8))


def load(
    data: bytes, preprocess: Preprocess, limits: Limits = Limits(), backdrop: bool = False
) -> np.ndarray:
    """Bytes -> preprocessed uint8 (size, size, 3). Raises ImageError. backdrop: a query photo,
    balance_backdrop'ed before preprocessing."""
    draft = (
        preprocess.size
        if preprocess.mode == "pad"
        else math.ceil(preprocess.size / preprocess.crop_pct)
    )
    img = decode(data, limits, draft_size=draft)
    try:
        return preprocess(balance_backdrop(img) if backdrop else img)
    except Exception as exc:
        raise _classify(exc) from exc
