"""Copy verification of candidate pairs (Contract 6): is one photo a re-listed copy of another
(resized, re-encoded, slightly cropped)?

A global embedding scores different products photographed alike (colour variants, one studio
setup) as high as true copies, so every candidate pair above the embedding threshold is checked
with a signal made for copies: photo b is aligned onto photo a, by the RANSAC similarity of
their local features (verify.match) or, for plain objects with few keypoints, by their
foreground boxes, and the two are compared as small colour thumbnails. The copy score is
1 - (mean absolute difference over the foreground, in 0-255 units) / 255, with the best of the
alignments: a copy scores about 0.99, a look-alike rarely above 0.96.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from visual_search import images, verify

THUMB = 48  # px side of the compared thumbnails
WHITE = 245  # a pixel whose darkest channel is below this is foreground (catalog photos on white)
MIN_FOREGROUND = 8  # thumbnail pixels; fewer: nothing to compare, score 0
MAX_ASPECT = 0.05  # |log| of the aspect-ratio change a box alignment may absorb
SCALES = (0.5, 2.0)  # plausible scale of one photo onto another (copies: about 0.9-1.15)
VERSION = f"align-sift-box/thumb{THUMB}/white{WHITE}"  # what a reused score was computed with


@dataclass(frozen=True)
class Photo:
    """What verification needs of one photo: the preprocessed pixels and their keypoints."""

    pixels: np.ndarray  # uint8 (s, s, 3), as the embedder saw them
    features: verify.Features
    box: tuple[int, int, int, int] | None  # foreground x0, y0, x1, y1 (None: all white)


def photo_of(pixels: np.ndarray) -> Photo:
    fg = pixels.min(axis=2) < WHITE
    ys, xs = np.nonzero(fg)
    box = None if len(xs) < 4 else (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return Photo(pixels, verify.local_features(pixels), box)


def read_photo(
    uri: str, preprocess: images.Preprocess, limits: images.Limits = verify.CATALOG_LIMITS
) -> Photo | None:
    """The photo at uri through the catalog's preprocessing; None when it cannot be read."""
    from visual_search import storage

    try:
        pixels = images.load(storage.read_bytes(uri, limits.max_bytes), preprocess, limits)
    except (storage.StorageError, images.ImageError) as exc:
        verify.log.warning("dedup verification skips %s: %s", uri, exc)
        return None
    return photo_of(pixels)


def box_transform(a: Photo, b: Photo) -> np.ndarray | None:
    """The 2x3 similarity mapping a's foreground box onto b's (None when their aspect ratios
    differ: a plain panel in two sizes is two products, not a copy)."""
    if a.box is None or b.box is None:
        return None
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    sx, sy = (bx1 - bx0) / (ax1 - ax0), (by1 - by0) / (ay1 - ay0)
    if abs(np.log(sx / sy)) > MAX_ASPECT:
        return None
    s = float(np.sqrt(sx * sy))
    cx, cy = (ax0 + ax1) / 2, (ay0 + ay1) / 2
    return np.array([[s, 0, (bx0 + bx1) / 2 - s * cx], [0, s, (by0 + by1) / 2 - s * cy]])


def _plausible(model: np.ndarray) -> bool:
    scale = float(np.sqrt(abs(np.linalg.det(model[:, :2]))))
    return SCALES[0] <= scale <= SCALES[1]


def aligned_difference(a: np.ndarray, b: np.ndarray, model: np.ndarray) -> float:
    """Mean absolute difference (0-255) of a and b warped onto a by `model` (a's pixels -> b's),
    as THUMB px thumbnails, over the pixels both cover that are foreground in either; inf when
    fewer than MIN_FOREGROUND are."""
    h, w = a.shape[:2]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(b, model, (w, h), flags=flags, borderValue=(255, 255, 255))
    covered = cv2.warpAffine(np.ones((h, w), np.float32), model, (w, h), flags=flags)
    size = (THUMB, THUMB)
    ta = cv2.resize(a, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    tb = cv2.resize(warped, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    inside = cv2.resize(covered, size, interpolation=cv2.INTER_AREA) > 0.99
    mask = inside & ((ta.min(axis=2) < WHITE) | (tb.min(axis=2) < WHITE))
    if mask.sum() < MIN_FOREGROUND:
        return float("inf")
    return float(np.abs(ta[mask] - tb[mask]).mean())


def copy_score(a: Photo, b: Photo) -> float:
    """1 - the best aligned difference / 255 in [0, 1]; 0 when no alignment is plausible."""
    models = [verify.match(a.features, b.features)[1], box_transform(a, b)]
    diffs = [
        aligned_difference(a.pixels, b.pixels, m) for m in models if m is not None and _plausible(m)
    ]
    best = min(diffs, default=float("inf"))
    return max(0.0, 1.0 - best / 255.0) if np.isfinite(best) else 0.0


def score_pairs(pairs: list[tuple[str, str]], read: Callable[[str], Photo | None]) -> np.ndarray:
    """Copy scores float32 (n,) of photo-uri pairs; each photo read once (0 when unreadable)."""
    cache: dict[str, Photo | None] = {}
    out = np.zeros(len(pairs), np.float32)
    for j, (ua, ub) in enumerate(pairs):
        for u in (ua, ub):
            if u not in cache:
                cache[u] = read(u)
        pa, pb = cache[ua], cache[ub]
        if pa is not None and pb is not None:
            out[j] = copy_score(pa, pb)
    return out


def score_uri_pairs(pairs: list[tuple[str, str]], preprocess: images.Preprocess) -> np.ndarray:
    """Ray task body: copy scores of photo-uri pairs read with the catalog's preprocessing."""
    return score_pairs(pairs, lambda uri: read_photo(uri, preprocess))
