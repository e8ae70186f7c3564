"""Geometric verification: RootSIFT keypoints, ratio-test matches and a RANSAC similarity
transform between the query and each top candidate, whose inlier count re-ranks the top results.

Re-ranked rows keep the order key in "score" (cosine + WEIGHT * min(inliers, CAP)), so an
answer stays sorted by score, and carry the raw similarity in "cosine" and "inliers".
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import cv2
import numpy as np

from visual_search import images, storage

log = logging.getLogger("visual_search.verify")

# Serve replicas share a node's cores, and a query verifies its candidates in parallel threads:
# OpenCV's own thread pool on top would oversubscribe them.
cv2.setNumThreads(1)

N_FEATURES = 500
RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 6.0  # reprojection threshold, in pixels of the 224 px preprocessed image
MIN_MATCHES = 4
WEIGHT = 0.005  # score bonus per inlier: 50 inliers are worth +0.25 of cosine
CAP = 50
CATALOG_LIMITS = images.Limits()  # what the embed job reads catalog photos with by default


@dataclass(frozen=True)
class Features:
    """Keypoints of one image: xy float32 (n, 2) in pixels, RootSIFT descriptors float16 (n, 128)
    (half the cache; an inlier count now and then differs by one from float32's)."""

    xy: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)

    @property
    def nbytes(self) -> int:
        return self.xy.nbytes + self.descriptors.nbytes


def local_features(pixels: np.ndarray) -> Features:
    """Preprocessed uint8 RGB pixels (h, w, 3), as images.load returns them -> Features."""
    gray = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    keypoints, desc = cv2.SIFT_create(nfeatures=N_FEATURES).detectAndCompute(gray, None)
    if desc is None or not keypoints:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float16))
    # RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, then sqrt; L2 distances between
    # these compare descriptors by the Hellinger kernel.
    desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7))
    xy = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2)
    return Features(xy, desc.astype(np.float16))


def inliers(a: Features, b: Features) -> int:
    """Matches of a's keypoints in b consistent with one rotation + scale + shift (0 when fewer
    than MIN_MATCHES survive the ratio test, or RANSAC finds no model)."""
    return match(a, b)[0]


def match(a: Features, b: Features) -> tuple[int, np.ndarray | None]:
    """(inliers, the 2x3 similarity transform mapping a's pixels onto b's, or None)."""
    if len(a) < MIN_MATCHES or len(b) < 2:  # the ratio test needs two neighbours in b
        return 0, None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(
        a.descriptors.astype(np.float32), b.descriptors.astype(np.float32), k=2
    )
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_MATCHES:
        return 0, None
    src = a.xy[[m.queryIdx for m in good]]
    dst = b.xy[[m.trainIdx for m in good]]
    model, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX
    )
    if model is None or mask is None:
        return 0, None
    return int(mask.sum()), model


def rerank(
    results: list[dict],
    query: Features,
    features_of: Callable[[dict], Features | None],
    k: int,
    weight: float = WEIGHT,
    cap: int = CAP,
) -> list[dict]:
    """Re-score the first k result rows ("score": a cosine) as score + weight * min(inliers, cap)
    and sort them by it (stably); rows past k are left as they are. Verified rows get "cosine"
    (their original score) and "inliers"; features_of(row) -> None (image unusable) counts 0."""
    head = []
    for row in results[:k]:
        features = features_of(row)
        n = 0 if features is None else inliers(query, features)
        score = round(row["score"] + weight * min(n, cap), 6)
        head.append({**row, "score": score, "cosine": row["score"], "inliers": n})
    head.sort(key=lambda row: row["score"], reverse=True)
    return head + results[k:]


def predicted_category(results: list[dict], n: int = 10, metric: str = "ip") -> str | None:
    """The category with the largest summed similarity among the top n results (None when none
    has a category). metric "l2": scores are squared distances of unit vectors, 2 - 2 cosine."""
    votes: dict[str, float] = {}
    for row in results[:n]:
        category = row.get("category")
        if category is None:
            continue
        similarity = row["score"] if metric == "ip" else 1 - row["score"] / 2
        votes[category] = votes.get(category, 0.0) + max(similarity, 0.0)
    if not votes:
        return None
    # Ties go to the category that reached the top first (dicts keep insertion order).
    return max(votes, key=votes.__getitem__)


def read_features(
    uri: str, preprocess: images.Preprocess, limits: images.Limits = CATALOG_LIMITS
) -> Features | None:
    """A catalog image's features, from the same pixels the embedder saw; None when the image
    cannot be read or decoded (the candidate then counts 0 inliers)."""
    try:
        pixels = images.load(storage.read_bytes(uri, limits.max_bytes), preprocess, limits)
    except (storage.StorageError, images.ImageError) as exc:
        log.warning("verification skips %s: %s", uri, exc)
        return None
    return local_features(pixels)


class FeatureCache:
    """LRU of Features bounded by their bytes (500 keypoints are about 130 kB); safe to share
    between threads (the reads themselves run outside the lock)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.entries: OrderedDict[Hashable, Features] = OrderedDict()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Hashable) -> Features | None:
        with self.lock:
            features = self.entries.get(key)
            if features is not None:
                self.entries.move_to_end(key)
            return features

    def put(self, key: Hashable, features: Features) -> None:
        with self.lock:
            if key in self.entries:
                self.nbytes -= self.entries.pop(key).nbytes
            self.entries[key] = features
            self.nbytes += features.nbytes
            while self.nbytes > self.max_bytes and self.entries:
                self.nbytes -= self.entries.popitem(last=False)[1].nbytes

    def get_or_read(self, key: Hashable, uri: str, preprocess: images.Preprocess):
        """The cached features of `key`, else read_features(uri) (cached unless None: a failed
        read is retried next time)."""
        features = self.get(key)
        if features is None:
            features = read_features(uri, preprocess)
            if features is not None:
                self.put(key, features)
        return features
