"""Geometric verification (verify.py): RootSIFT features, inlier counts, the re-rank and the
predicted category, on seeded generated images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from visual_search import images, verify

PREPROCESS = images.Preprocess()


def textured(seed: int, size: tuple[int, int] = (320, 256)) -> Image.Image:
    """A 'product' on a white background: 40 random coloured polygons (corners at any angle;
    axis-aligned rectangles would match any other such image in a few places)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        cx, cy = rng.integers(0, size[0]), rng.integers(0, size[1])
        n = rng.integers(3, 7)
        radii, angles = rng.uniform(6, 40, n), np.sort(rng.uniform(0, 2 * np.pi, n))
        points = [
            (cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)
        ]
        draw.polygon(
            [(float(x), float(y)) for x, y in points], fill=tuple(rng.integers(0, 256, 3).tolist())
        )
    return img


def encode(img: Image.Image, quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if quality is None:
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rephotographed(img: Image.Image, degrees: float, keep: float, colour: float) -> bytes:
    """The shopper's photo: rotated, cropped to `keep` of each side, colour shifted, JPEG 40."""
    img = img.rotate(degrees, expand=True, fillcolor="white", resample=Image.Resampling.BICUBIC)
    w, h = img.size
    cw, ch = int(w * keep), int(h * keep)
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.crop((left, top, left + cw, top + ch))
    img = ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(colour)).enhance(2 - colour)
    return encode(img, quality=40)


def features(data: bytes) -> verify.Features:
    return verify.local_features(images.load(data, PREPROCESS))


@pytest.fixture(scope="module")
def catalog() -> list[verify.Features]:
    return [features(encode(textured(seed))) for seed in range(4)]


def test_local_features_are_rootsift():
    f = features(encode(textured(0)))
    assert 50 < len(f) <= verify.N_FEATURES + 10  # SIFT may keep a few ties past nfeatures
    assert f.xy.dtype == np.float32 and f.xy.shape == (len(f), 2)
    assert f.descriptors.dtype == np.float16 and f.descriptors.shape == (len(f), 128)
    assert (f.xy >= 0).all() and (f.xy < 224).all()  # pixels of the preprocessed image
    d = f.descriptors.astype(np.float64)
    assert (d >= 0).all()
    # sqrt of an L1-normalised vector has unit L2 norm.
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=2e-3)
    assert f.nbytes == f.xy.nbytes + f.descriptors.nbytes


@pytest.mark.parametrize(
    "degrees, keep, colour",
    [(0, 0.9, 1.0), (10, 0.8, 1.15), (-10, 0.7, 0.85), (5, 0.85, 1.1)],
)
def test_rephotographed_copy_has_many_inliers_an_unrelated_image_few(
    catalog, degrees, keep, colour
):
    query = features(rephotographed(textured(0), degrees, keep, colour))
    same = verify.inliers(query, catalog[0])
    others = [verify.inliers(query, f) for f in catalog[1:]]
    assert same >= 50, same  # 83-120 when written
    assert max(others) <= 15, others  # 4-10 when written
    assert verify.inliers(query, catalog[0]) == same  # RANSAC is seeded: deterministic


def test_featureless_images_give_zero_inliers(catalog):
    blank = features(encode(Image.new("RGB", (200, 200), (240, 240, 240))))
    assert len(blank) == 0 and blank.descriptors.shape == (0, 128)
    assert verify.inliers(blank, catalog[0]) == 0
    assert verify.inliers(catalog[0], blank) == 0
    assert verify.inliers(blank, blank) == 0


def rows(*scores: float) -> list[dict]:
    return [{"id": i, "product_id": f"p{i}", "score": s} for i, s in enumerate(scores)]


@pytest.mark.parametrize(
    "scores, counts, k, order, new_scores",
    [
        # A verified candidate passes one with a slightly higher cosine.
        ((0.90, 0.89), {0: 0, 1: 30}, 2, [1, 0], [1.04, 0.90]),
        # Inliers are capped: 200 count as 50 (+0.25); a tie keeps the cosine order.
        ((0.95, 0.70), {0: 0, 1: 200}, 2, [0, 1], [0.95, 0.95]),
        # Rows past k stay where they are, unverified, even with a better inlier count.
        (
            (0.9, 0.8, 0.7, 0.6),
            {0: 0, 1: 40, 2: 100, 3: 100},
            2,
            [1, 0, 2, 3],
            [1.0, 0.9, 0.7, 0.6],
        ),
        # k past the end verifies every row.
        ((0.9, 0.8), {0: 4, 1: 10}, 10, [0, 1], [0.92, 0.85]),
        # k = 0: unchanged.
        ((0.9, 0.8), {0: 0, 1: 50}, 0, [0, 1], [0.9, 0.8]),
        # No features (image unusable): 0 inliers.
        ((0.9, 0.89), {0: 0, 1: None}, 2, [0, 1], [0.9, 0.89]),
    ],
)
def test_rerank(monkeypatch, scores, counts, k, order, new_scores):
    # features_of hands the row's planned inlier count through as its "features".
    monkeypatch.setattr(verify, "inliers", lambda query, n: n)
    results = rows(*scores)
    out = verify.rerank(results, None, lambda row: counts[row["id"]], k)
    assert [row["id"] for row in out] == order
    assert [row["score"] for row in out] == pytest.approx(new_scores)
    for row in out:
        original = results[row["id"]]
        if row["id"] in [r["id"] for r in results[:k]]:
            assert row["cosine"] == original["score"]
            assert row["inliers"] == (counts[row["id"]] or 0)
        else:
            assert row == original  # untouched
    assert [row["score"] for row in results] == list(scores)  # the input is not modified


def test_rerank_with_real_features_and_an_unreadable_image(catalog, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    uris = {
        "unrelated": str(tmp_path / "unrelated.png"),
        "right": str(tmp_path / "right.png"),
        "broken": str(tmp_path / "broken.jpg"),
        "missing": str(tmp_path / "missing.png"),
    }
    textured(1).save(uris["unrelated"])
    textured(0).save(uris["right"])
    results = [
        {"id": i, "product_id": name, "score": score, "image_uri": uris[name]}
        for i, (name, score) in enumerate(
            [("unrelated", 0.86), ("broken", 0.85), ("right", 0.84), ("missing", 0.83)]
        )
    ]
    query = features(rephotographed(textured(0), 8, 0.8, 1.1))
    out = verify.rerank(
        results, query, lambda r: verify.read_features(r["image_uri"], PREPROCESS), 4
    )
    assert [r["product_id"] for r in out][0] == "right"
    by_name = {r["product_id"]: r for r in out}
    assert by_name["right"]["inliers"] >= 50
    assert by_name["unrelated"]["inliers"] <= 15
    assert by_name["broken"]["inliers"] == by_name["missing"]["inliers"] == 0
    assert by_name["broken"]["score"] == by_name["broken"]["cosine"] == 0.85


def test_read_features_of_unusable_images_is_none(tmp_path):
    (tmp_path / "text.png").write_text("hello")
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")  # under Limits.min_side
    textured(2).save(tmp_path / "good.png")
    assert verify.read_features(str(tmp_path / "missing.png"), PREPROCESS) is None
    assert verify.read_features(str(tmp_path / "text.png"), PREPROCESS) is None
    assert verify.read_features(str(tmp_path / "tiny.png"), PREPROCESS) is None
    good = verify.read_features(str(tmp_path / "good.png"), PREPROCESS)
    assert good is not None and len(good) > 50


def cat(category, score):
    return {"category": category, "score": score}


@pytest.mark.parametrize(
    "results, n, metric, expected",
    [
        ([], 10, "ip", None),
        ([{"score": 0.9}, cat(None, 0.8)], 10, "ip", None),
        ([cat("shoes", 0.9), cat("bags", 0.5), cat("bags", 0.5)], 10, "ip", "bags"),
        ([cat("shoes", 0.9), cat("bags", 0.4), cat("bags", 0.4)], 10, "ip", "shoes"),
        ([cat("shoes", 0.9), cat("bags", 0.5), cat("bags", 0.5)], 2, "ip", "shoes"),  # top n only
        ([cat("shoes", 0.5), cat("bags", 0.5)], 10, "ip", "shoes"),  # a tie: the first to show
        ([cat(None, 0.9), cat("hats", 0.2)], 10, "ip", "hats"),
        ([cat("shoes", 0.3), cat("bags", -0.4), cat("bags", -0.4)], 10, "ip", "shoes"),
        # l2: squared distances of unit vectors (0.2 -> cosine 0.9, 1.0 -> 0.5).
        ([cat("shoes", 0.2), cat("bags", 1.0), cat("bags", 1.0)], 10, "l2", "bags"),
        ([cat("shoes", 0.2), cat("bags", 1.4), cat("bags", 1.4)], 10, "l2", "shoes"),
    ],
)
def test_predicted_category(results, n, metric, expected):
    assert verify.predicted_category(results, n=n, metric=metric) == expected


def test_feature_cache_is_an_lru_bounded_by_bytes():
    def of(n):
        return verify.Features(np.zeros((n, 2), np.float32), np.zeros((n, 128), np.float16))

    size = of(10).nbytes
    cache = verify.FeatureCache(3 * size)
    for key in "abc":
        cache.put(key, of(10))
    assert len(cache) == 3 and cache.nbytes == 3 * size
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", of(10))
    assert cache.get("b") is None and {"a", "c", "d"} == set(cache.entries)
    cache.put("a", of(20))  # replaced: its bytes counted once, older ones make room
    assert cache.nbytes <= 3 * size and cache.get("a") is not None
    assert cache.nbytes == sum(f.nbytes for f in cache.entries.values())
    cache.put("huge", of(100))  # bigger than the whole cache: not kept
    assert len(cache) == 0 and cache.nbytes == 0


def test_feature_cache_reads_once_and_retries_a_failed_read(tmp_path):
    uri = str(tmp_path / "later.png")
    cache = verify.FeatureCache(1 << 24)
    assert cache.get_or_read("k", uri, PREPROCESS) is None and len(cache) == 0  # not cached
    textured(3).save(uri)
    first = cache.get_or_read("k", uri, PREPROCESS)
    assert first is not None and len(cache) == 1
    (tmp_path / "later.png").unlink()
    assert cache.get_or_read("k", uri, PREPROCESS) is first  # served from the cache
