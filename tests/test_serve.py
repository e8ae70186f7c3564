"""The Ray Serve app end to end over HTTP (Contract 4), on one local Ray + Serve per module.

A tiny generated catalog (40 products, one with two photos, a rare category of 3) is embedded
with jobs/embed.py and indexed in 2 shards with jobs/build_index.py; the app from serve/app.py
then answers on 127.0.0.1. Covered: search by upload (multipart and raw body), one result per
product, k and category handling, the geometric re-rank and predicted_category (and the app
with rerank=0), similar products, product images, every error status with its JSON body,
garbage input never giving a 500, deterministic overload (503), health and version endpoints, a
hot reload to a new version with zero failed queries, and the web page. One catalog photo
(BROKEN) is made unreadable once indexed: its product is still found, verified with 0 inliers.
Near-duplicates (Contract 6): two products (TWINS) share one photo; jobs/dedup.py groups the
first version's products before the app starts, for collapse=true and /products/{id}/duplicates.

Logical CPU reservations: build_index's tasks ask for 1 CPU each, so the Serve replicas here
reserve 0.9 of the 2 logical CPUs in all, which leaves room to build the second version
while the app is serving it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import random
import re
import socket
import threading
import time
from datetime import UTC, datetime
from unittest.mock import ANY

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
from conftest import draw_product, serve_ray
from PIL import Image
from ports import free_port

from jobs import build_index, embed
from jobs import dedup as dedup_job
from visual_search import __version__, dedup, embedders, embeddings, heads, images, query, versions

API_KEY = "test-key"
KEY_ENV = "VISUAL_SEARCH_API_KEY"
N_PRODUCTS = 40
RARE = ("p037", "p038", "p039")
TWO_PHOTOS = "p000"
BROKEN = "p028"  # its photo (a JPEG) is truncated on disk after indexing
TWINS = ("p030", "p031")  # the same photo, listed as two products: one near-duplicate group
RERANK = 10  # AppArgs' default
SIZE = (160, 120)
MAX_UPLOAD = 300_000
MAX_INFLIGHT = 4
SHARDS = 2
TIMEOUT = 60  # seconds per HTTP request
UPLOAD_TIMEOUT = 4  # AppArgs.upload_timeout_s here: a slower upload gets a 408


# ------------------------------------------------------------------------------ fixtures


def _make_catalog(root) -> dict[str, bytes]:
    """Images + catalog.parquet under root; returns {image file name: bytes}."""
    rows, files = [], {}
    for i in range(N_PRODUCTS):
        pid = f"p{i:03d}"
        name = f"{pid}.png" if i % 5 == 4 else f"{pid}.jpg"
        img = draw_product(30 if pid == TWINS[1] else i, SIZE)
        if name.endswith(".png"):
            img.save(root / name)
        else:
            img.save(root / name, quality=95)
        files[name] = (root / name).read_bytes()
        rows.append(
            {
                "product_id": pid,
                "image_uri": name,
                "title": f"Product {i}",
                "category": "rare" if pid in RARE else "common",
                "price": 1.5 * i,
            }
        )
    # A second photo of one product.
    draw_product(1000, SIZE).save(root / "p000-back.jpg", quality=95)
    files["p000-back.jpg"] = (root / "p000-back.jpg").read_bytes()
    rows.append(
        {
            "product_id": TWO_PHOTOS,
            "image_uri": "p000-back.jpg",
            "title": "Product 0",
            "category": "common",
            "price": 0.0,
        }
    )
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    return files


class Service:
    def __init__(self, base: str, port: int, index_root: str, work: str, files, first_version):
        self.base, self.port = base, port
        self.index_root, self.work = index_root, work
        self.files = files
        self.first_version = first_version
        self.session = requests.Session()

    def get(self, path: str, **kw) -> requests.Response:
        return self.session.get(self.base + path, timeout=TIMEOUT, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.session.post(self.base + path, timeout=TIMEOUT, **kw)

    def request(self, method: str, path: str, **kw) -> requests.Response:
        return self.session.request(method, self.base + path, timeout=TIMEOUT, **kw)

    def search(self, data: bytes, session: requests.Session | None = None, **params):
        return (session or self.session).post(
            self.base + "/search",
            data=data,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            timeout=TIMEOUT,
        )


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from ray import serve

    from serve.app import AppArgs, build_app

    root = tmp_path_factory.mktemp("serve_catalog")
    files = _make_catalog(root)
    work = str(tmp_path_factory.mktemp("serve_work") / "emb")
    index_root = str(tmp_path_factory.mktemp("serve_index"))

    with serve_ray(KEY_ENV, API_KEY):
        embed.run(embed.Config(catalog=str(root / "catalog.parquet"), out=work, batch_size=16))
        manifest = build_index.run(
            build_index.Config(embeddings=work, index_root=index_root, shards=SHARDS)
        )
        dedup_job.run(dedup_job.Config(index_root=index_root))  # the default threshold
        broken = root / f"{BROKEN}.jpg"
        broken.write_bytes(files[broken.name][:200])
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_app(
                AppArgs(
                    index_root=index_root,
                    max_upload_bytes=MAX_UPLOAD,
                    max_inflight=MAX_INFLIGHT,
                    embedder_cpus=0.5,
                    shard_cpus=0.1,
                    ingress_cpus=0.1,
                    upload_timeout_s=UPLOAD_TIMEOUT,
                    follow_current=False,  # these tests move it by POST /admin/reload
                )
            ),
            name="vs",
            route_prefix="/",
        )
        service = Service(
            f"http://127.0.0.1:{port}", port, index_root, work, files, manifest.version
        )
        yield service
        service.session.close()


# ------------------------------------------------------------------------------- helpers


def assert_error(r: requests.Response, status: int, code: str | tuple[str, ...] | None = None):
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        codes = (code,) if isinstance(code, str) else code
        assert body["error"]["code"] in codes, body
    return body["error"]


def assert_answer(r: requests.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) >= {"results", "index_version", "took_ms", "partial"}, body
    # Searches by photo predict a category; /similar names the category it lists first.
    by_photo = r.request.path_url.split("?")[0].endswith("/search")
    assert ("predicted_category" in body) == by_photo != ("preferred_category" in body)
    assert body["partial"] is False and body["coverage"] == {"shards": SHARDS, "of": SHARDS}
    assert isinstance(body["index_version"], str) and body["index_version"]
    assert isinstance(body["took_ms"], int | float) and body["took_ms"] >= 0
    for row in body["results"]:
        assert set(row) >= {"product_id", "score", "image_uri", "title", "category", "image_url"}
        assert isinstance(row["score"], float)
    # Best first; /similar lists its preferred category's products first, each part best first.
    preferred = body.get("preferred_category")
    for part in (True, False):
        rows = [row for row in body["results"] if (row["category"] == preferred) == part]
        scores = [row["score"] for row in rows]
        assert scores == sorted(scores, reverse=True), scores
    first = [row["category"] == preferred for row in body["results"]]
    assert first == sorted(first, reverse=True), first
    return body


def pids(body: dict) -> list[str]:
    return [row["product_id"] for row in body["results"]]


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rotated_cropped(data: bytes, degrees: float) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = img.rotate(degrees, expand=True, fillcolor="white", resample=Image.BICUBIC)
    w, h = img.size
    cw, ch = int(w * 0.85), int(h * 0.85)
    left, top = (w - cw) // 2, (h - ch) // 2
    return jpeg(img.crop((left, top, left + cw, top + ch)))


def raw_exchange(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes; return the server's first answer (head and body, at most 64 KiB)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return _answer_of(s, timeout)


def poll(check, timeout: float, interval: float = 0.2, attempts: int = 200):
    """Call check() until it returns a truthy value (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    value = None
    for _ in range(attempts):
        value = check()
        if value or time.monotonic() > deadline:
            break
        time.sleep(interval)
    return value


# ---------------------------------------------------------------------------------- search


def test_search_multipart_and_raw_body_find_the_product(svc):
    data = svc.files["p007.jpg"]
    multipart = assert_answer(
        svc.post("/search", files={"image": ("query.jpg", data, "image/jpeg")})
    )
    raw = assert_answer(svc.search(data))
    for body in (multipart, raw):
        assert pids(body)[0] == "p007"
        assert len(body["results"]) == 10  # k defaults to 10
        top = body["results"][0]
        assert top["score"] > 0.99
        assert top["title"] == "Product 7"
        assert top["category"] == "common"
        assert top["image_uri"].endswith("p007.jpg")
        assert top["image_url"].startswith("/products/p007/image")
        assert body["index_version"] == svc.first_version
    assert pids(multipart) == pids(raw)
    # A PNG catalog photo, too.
    assert pids(assert_answer(svc.search(svc.files["p014.png"])))[0] == "p014"


def _server_timing(r: requests.Response) -> dict[str, float]:
    stages = {}
    for part in r.headers["Server-Timing"].split(","):
        name, dur = part.strip().split(";dur=")
        stages[name] = float(dur)
    return stages


def test_answers_carry_server_timing(svc):
    r = svc.search(svc.files["p007.jpg"])
    stages = _server_timing(r)
    assert list(stages) == ["read", "decode", "embed", "search", "rerank", "total"]
    assert all(ms >= 0 for ms in stages.values())
    assert stages["total"] >= sum(stages[s] for s in ("decode", "embed", "search", "rerank"))
    assert abs(stages["total"] - r.json()["took_ms"]) < 0.02
    similar = _server_timing(svc.get("/products/p010/similar", params={"k": 5}))
    assert list(similar) == ["vector", "search", "total"]


def test_rotated_and_cropped_copy_is_in_top_3(svc):
    for name, pid, degrees in (("p003.jpg", "p003", 12), ("p021.jpg", "p021", -14)):
        body = assert_answer(svc.search(rotated_cropped(svc.files[name], degrees), k=3))
        assert pid in pids(body), (pid, body["results"])


def reranked(row: dict) -> bool:
    return "inliers" in row


def test_search_reranks_the_top_products_by_inliers(svc):
    body = assert_answer(svc.search(svc.files["p007.jpg"], k=20))
    rows = body["results"]
    assert [reranked(r) for r in rows] == [True] * RERANK + [False] * (20 - RERANK)
    for r in rows[:RERANK]:
        assert r["score"] == pytest.approx(r["cosine"] + 0.005 * min(r["inliers"], 50), abs=2e-6)
        assert isinstance(r["inliers"], int) and r["inliers"] >= 0
    top = rows[0]
    # The catalog photo itself, but its tinted backdrop (conftest: 200-255 per channel) is
    # scaled to white first (backdrop_balance), so its vector is near the stored one, not equal.
    assert top["product_id"] == "p007" and 0.9 < top["cosine"] < 0.99
    balanced = images.balance_backdrop(Image.open(io.BytesIO(svc.files["p007.jpg"])).convert("RGB"))
    png = io.BytesIO()
    balanced.save(png, "PNG")
    again = assert_answer(svc.search(png.getvalue(), k=1))["results"][0]  # balanced: unchanged
    assert again["product_id"] == "p007"
    assert again["cosine"] == pytest.approx(top["cosine"], abs=2e-3)
    # Its own photo: every keypoint matches; the others share at most their padded frame.
    assert top["inliers"] >= 30 and top["inliers"] > max(r["inliers"] for r in rows[1:RERANK])
    # The re-ranked head is sorted by score and stays above the unverified tail.
    assert min(r["score"] for r in rows[:RERANK]) >= max(r["score"] for r in rows[RERANK:])
    # k below the re-rank depth: the same head, cut.
    short = assert_answer(svc.search(svc.files["p007.jpg"], k=3))
    assert pids(short) == pids(body)[:3]
    assert [r["inliers"] for r in short["results"]] == [r["inliers"] for r in rows[:3]]


def test_predicted_category(svc):
    body = assert_answer(svc.search(svc.files["p002.jpg"]))
    assert body["predicted_category"] == "common"  # 38 of the 41 photos
    assert (
        assert_answer(svc.search(svc.files["p002.jpg"], category="rare"))["predicted_category"]
        == "rare"
    )
    body = assert_answer(svc.search(svc.files["p038.jpg"], k=1))
    assert pids(body) == ["p038"] and body["predicted_category"] == "rare"  # from its one result
    body = assert_answer(svc.search(svc.files["p002.jpg"], category="no-such-category"))
    assert body["results"] == [] and body["predicted_category"] is None


def test_unreadable_catalog_photo_counts_zero_inliers(svc):
    for _ in range(2):  # the failed read is not cached: the second query reads it again
        body = assert_answer(svc.search(svc.files[f"{BROKEN}.jpg"]))
        row = next(r for r in body["results"] if r["product_id"] == BROKEN)
        assert row["inliers"] == 0 and row["score"] == row["cosine"] > 0.9  # its own photo


def test_rerank_off(svc):
    """rerank=0: the cosine ranking, no re-rank stage, still a predicted category."""
    from ray import serve

    from serve.app import AppArgs, build_app

    assert AppArgs(index_root="x").rerank == RERANK
    with pytest.raises(ValueError):
        AppArgs(index_root="x", rerank=-1)
    args = AppArgs(index_root=svc.index_root, rerank=0, ingress_cpus=0.1, embedder_cpus=0.3,
                   shard_cpus=0.05, api_key_env="VS_TEST_NO_SUCH_KEY")  # fmt: skip
    assert "VS_TEST_NO_SUCH_KEY" not in os.environ
    serve.run(build_app(args), name="vs-plain", route_prefix="/plain")
    try:
        # The proxy learns a new route a moment after serve.run returns.
        assert poll(lambda: svc.get("/plain/healthz").status_code == 200, timeout=30)
        # No key configured: admin endpoints fail closed, with or without a key sent.
        for headers in ({}, {"X-API-Key": API_KEY}):
            r = svc.post("/plain/admin/reload", headers=headers)
            assert_error(r, 403, "admin_disabled")
            assert "VS_TEST_NO_SUCH_KEY" in r.json()["error"]["message"]
        for name in ("p007.jpg", "p021.jpg"):
            query = rotated_cropped(svc.files[name], 8)
            r = svc.post("/plain/search", data=query,
                         headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            plain = assert_answer(r)
            assert list(_server_timing(r)) == ["read", "decode", "embed", "search", "total"]
            assert not any(reranked(row) for row in plain["results"])
            assert plain["predicted_category"] == "common"
            verified = assert_answer(svc.search(query))
            # The same ten products: their cosine order against the verified order.
            cosine = {row["product_id"]: row["cosine"] for row in verified["results"]}
            assert set(pids(plain)) == set(cosine)
            for row in plain["results"]:
                assert row["score"] == pytest.approx(cosine[row["product_id"]], abs=1e-4)
    finally:
        serve.delete("vs-plain")


def test_embedder_deployment_gives_the_same_answers(svc):
    """embed_in_ingress=False: a QueryEmbedder deployment (GPU nodes) instead of the model in
    the ingress (the CPU default): the same model, the same results."""
    from ray import serve

    from serve.app import AppArgs, build_app

    args = AppArgs(index_root=svc.index_root, embed_in_ingress=False, ingress_cpus=0.1,
                   embedder_cpus=0.3, shard_cpus=0.05, api_key_env="VS_TEST_NO_SUCH_KEY",
                   admin_open=True)  # fmt: skip
    assert not args.embeds_in_ingress and AppArgs(index_root="x").embeds_in_ingress
    assert not AppArgs(index_root="x", embedder_gpus=1).embeds_in_ingress
    assert not AppArgs(index_root="x", embedder_replicas=2).embeds_in_ingress
    with pytest.raises(ValueError, match="embedder_replicas > 1"):
        AppArgs(index_root="x", embedder_replicas=2, embed_in_ingress=True)
    serve.run(build_app(args), name="vs-local", route_prefix="/local")
    try:
        for name in ("p007.jpg", "p014.png"):
            want = assert_answer(svc.search(svc.files[name], k=5))
            got = assert_answer(
                svc.post("/local/search", params={"k": 5}, data=svc.files[name],
                         headers={"Content-Type": "application/octet-stream"})
            )  # fmt: skip
            assert pids(got) == pids(want)
            for a, b in zip(got["results"], want["results"], strict=True):
                assert abs(a["score"] - b["score"]) < 1e-4
        assert_error(svc.post("/local/search", data=b"not an image"), 415, "not_an_image")
        # admin_open with no key configured: reload needs no key (here nothing changed).
        r = svc.post("/local/admin/reload")
        assert r.status_code == 200 and r.json()["status"] == "unchanged", r.text
    finally:
        serve.delete("vs-local")


def test_one_result_per_product(svc):
    # Both photos of p000 are in the index; it must appear once, with its best photo.
    for photo in ("p000.jpg", "p000-back.jpg"):
        body = assert_answer(svc.search(svc.files[photo], k=40))
        ids = pids(body)
        assert ids[0] == TWO_PHOTOS
        assert len(ids) == len(set(ids)) == N_PRODUCTS
        assert ids.count(TWO_PHOTOS) == 1
        assert body["results"][0]["image_uri"].endswith(photo)
    # k above the number of products: every product once.
    body = assert_answer(svc.search(svc.files["p001.jpg"], k=100))
    assert sorted(pids(body)) == [f"p{i:03d}" for i in range(N_PRODUCTS)]


@pytest.mark.parametrize("k", ["0", "101", "abc", "-1", "2.5"])
def test_bad_k_is_400(svc, k):
    assert_error(svc.search(svc.files["p001.jpg"], k=k), 400, "bad_request")


def test_category_filter(svc):
    query = svc.files["p002.jpg"]  # a common product: the rare ones are not its neighbours
    body = assert_answer(svc.search(query, k=3, category="rare"))
    assert sorted(pids(body)) == list(RARE)
    assert all(row["category"] == "rare" for row in body["results"])
    body = assert_answer(svc.search(query, k=10, category="rare"))
    assert sorted(pids(body)) == list(RARE)  # all it has
    body = assert_answer(svc.search(svc.files["p038.jpg"], k=2, category="rare"))
    assert pids(body)[0] == "p038" and len(body["results"]) == 2
    body = assert_answer(svc.search(query, k=5, category="common"))
    assert len(body["results"]) == 5 and all(r["category"] == "common" for r in body["results"])
    body = assert_answer(svc.search(query, category="no-such-category"))
    assert body["results"] == []


def test_attribute_filters(svc):
    """filter= on the declared filterable columns (category, price; not the free-text title),
    inside the index: k results whenever k items match."""
    query = svc.files["p002.jpg"]
    by_shorthand = assert_answer(svc.search(query, k=3, category="rare"))
    assert assert_answer(svc.search(query, k=3, filter="category:rare")) == {
        **by_shorthand,
        "took_ms": ANY,
    }
    cheap = {f"p{i:03d}" for i in range(40) if 1.5 * i < 10}
    body = assert_answer(svc.search(query, k=20, filter="price<10"))
    assert set(pids(body)) == cheap
    body = assert_answer(svc.search(query, k=3, filter="price:3..30, category:common|rare"))
    assert len(body["results"]) == 3 and all(3 <= r["price"] <= 30 for r in body["results"])
    body = assert_answer(svc.search(query, k=5, filter="category:rare", category="common"))
    assert body["results"] == []  # both must hold
    body = assert_answer(svc.get("/products/p010/similar", params={"k": 5, "filter": "price>50"}))
    assert len(body["results"]) == 5 and all(r["price"] > 50 for r in body["results"])
    assert body["preferred_category"] is None  # a filter makes the own-category order moot
    for bad, named in [
        ("title:Product 1", "title"),
        ("nosuch:x", "nosuch"),
        ("category<3", "category"),
        ("price:abc", "abc"),
        (",", None),
    ]:
        error = assert_error(svc.search(query, filter=bad), 400, "bad_filter")
        assert named is None or named in error["message"], (bad, error)
    r = svc.get("/products/p010/similar", params={"filter": "nosuch:1"})
    assert_error(r, 400, "bad_filter")


def test_text_search(svc):
    """GET /search?q= by BM25 over the docs' title and text metadata, built into the version."""
    manifest = versions.open_version(svc.index_root).manifest
    assert manifest.filterable == {"category": "string", "price": "number"}
    assert manifest.text["columns"] == ["title", "category"]
    assert len(manifest.text["shards"]) == SHARDS

    def text(q: str, **params) -> requests.Response:
        return svc.get("/search", params={"q": q, **params})

    body = assert_text_answer(text("product 17"))
    assert pids(body)[0] == "p017" and len(body["results"]) == 10
    body = assert_text_answer(text("rare", k=10))
    assert sorted(pids(body)) == list(RARE)
    body = assert_text_answer(text("product", k=10, filter="price<6"))
    assert sorted(pids(body)) == ["p000", "p001", "p002", "p003"]
    body = assert_text_answer(text("the and of", k=5))  # stop words only: nothing matches
    assert body["results"] == []
    assert_error(text(""), 400, "bad_request")
    assert_error(text("x" * 501), 400, "bad_request")
    assert_error(text("product", filter="nosuch:1"), 400, "bad_filter")
    assert_error(svc.get("/search"), 400, "bad_request")


def test_hybrid_search_fuses_the_photo_and_the_words(svc):
    """POST /search?q=: the products matching the words first, in the photo's order, then the
    photo's ranking and the words' ranking fused by reciprocal rank."""
    photo = svc.files["p003.jpg"]
    alone = pids(assert_answer(svc.search(photo, k=N_PRODUCTS)))
    far = next(p for p in reversed(alone) if p != "p000")  # the photo's least like product
    assert alone[0] == "p003"
    # Its number alone: a word of its title only, so it alone matches the words.
    k = 5
    body = assert_answer(svc.search(photo, k=k, q=str(int(far[1:]))))
    words = 2 * (query.RRF_K + k + 1) / (query.RRF_K + 1)  # query.words_weight of image + text
    weights = {"image": 1.0, "text": 1.0, "words": words}
    assert body["fusion"] == {"method": "rrf", "k": 60, "weights": weights}
    assert len(body["results"]) == k
    assert pids(body)[:2] == [far, "p003"]  # the match, then the photo's first
    ranks = {row["product_id"]: row["ranks"] for row in body["results"]}
    assert ranks[far] == {"image": None, "text": 1, "words": 1}
    assert ranks["p003"] == {"image": 1, "text": None, "words": None}
    # A word many products share (their category's name): those products first, then others.
    body = assert_answer(svc.search(photo, k=len(RARE) + 2, q="rare"))
    assert set(pids(body)[: len(RARE)]) == set(RARE)
    assert [r["ranks"]["words"] for r in body["results"][len(RARE) :]] == [None, None]
    rare = assert_answer(svc.search(photo, k=3, q="product", category="rare"))
    assert set(pids(rare)) <= set(RARE)
    assert_error(svc.search(photo, q=""), 400, "bad_request")


def assert_text_answer(r: requests.Response) -> dict:
    assert r.status_code == 200, (r.status_code, r.text[:500])
    body = r.json()
    assert body["partial"] is False and body["coverage"] == {"shards": SHARDS, "of": SHARDS}
    scores = [row["score"] for row in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(x > 0 for x in scores), scores
    assert len(set(pids(body))) == len(body["results"])  # one result per product
    return body


# -------------------------------------------------------------------------------- products


def test_similar_products(svc):
    body = assert_answer(svc.get("/products/p010/similar", params={"k": 5}))
    assert len(body["results"]) == 5
    assert "p010" not in pids(body)
    assert len(set(pids(body))) == 5
    # The product with two photos is excluded with both of them.
    body = assert_answer(svc.get(f"/products/{TWO_PHOTOS}/similar", params={"k": 40}))
    assert TWO_PHOTOS not in pids(body)
    assert len(body["results"]) == N_PRODUCTS - 1
    body = assert_answer(svc.get("/products/p037/similar", params={"k": 5, "category": "rare"}))
    assert sorted(pids(body)) == ["p038", "p039"]
    # Unfiltered, the item's own category comes first (both other rare products, the nearest
    # first), then the nearest others; same_category=false ranks by score alone.
    body = assert_answer(svc.get("/products/p037/similar", params={"k": 6}))
    own_first = pids(body)
    assert body["preferred_category"] == "rare"
    params = {"k": 40, "same_category": "false"}
    body = assert_answer(svc.get("/products/p037/similar", params=params))
    plain = body["results"]
    assert body["preferred_category"] is None
    assert [r["score"] for r in plain] == sorted((r["score"] for r in plain), reverse=True)
    by_category = [
        [r["product_id"] for r in plain if r["category"] == c] for c in ("rare", "common")
    ]
    assert own_first == by_category[0] + by_category[1][:4]
    assert_error(svc.get("/products/p037/similar", params={"same_category": "maybe"}), 400)
    assert_error(svc.get("/products/nope/similar", params={"k": 5}), 404, "unknown_product")
    assert_error(svc.get("/products/p010/similar", params={"k": 0}), 400, "bad_request")


# ------------------------------------------------------------------------ near-duplicates

ALL = [f"p{i:03d}" for i in range(N_PRODUCTS)]


def first_groups(svc) -> dedup.Groups:
    """The groups jobs/dedup.py wrote for the first version (the fixture ran it)."""
    return dedup.load_groups(dedup.output_root(svc.index_root, svc.first_version))


def group_keys(body: dict, groups: dedup.Groups) -> list:
    return [groups.group_of.get(p, p) for p in pids(body)]


def test_dedup_job_groups_the_twins_and_the_service_loads_them(svc):
    groups = first_groups(svc)
    gid = groups.group_of[TWINS[0]]
    assert {p for p, _ in groups.members[gid]} == set(TWINS)
    assert svc.get("/version").json()["groups"] == len(groups.members)


def test_collapse_keeps_one_product_per_group(svc):
    groups = first_groups(svc)
    query = svc.files[f"{TWINS[0]}.jpg"]
    plain = assert_answer(svc.search(query, k=5))
    assert set(pids(plain)[:2]) == set(TWINS) and plain["collapsed"] is False
    body = assert_answer(svc.search(query, k=5, collapse="true"))
    assert body["collapsed"] is True and len(body["results"]) == 5
    assert pids(body)[0] in TWINS and len(set(TWINS) & set(pids(body))) == 1
    keys = group_keys(body, groups)
    assert len(set(keys)) == len(keys)
    # /similar (the item itself is never a result): k results while k groups remain, then all.
    others = {groups.group_of.get(p, p) for p in ALL if p != "p000"}
    params = {"k": N_PRODUCTS - 1}
    plain = assert_answer(svc.get("/products/p000/similar", params=params))
    assert set(TWINS) <= set(pids(plain)) and len(plain["results"]) == N_PRODUCTS - 1
    for k in (5, N_PRODUCTS - 1):
        body = assert_answer(svc.get("/products/p000/similar", params={"k": k, "collapse": 1}))
        keys = group_keys(body, groups)
        assert body["collapsed"] is True and len(keys) == len(set(keys)) == min(k, len(others))
    assert set(group_keys(body, groups)) == others
    # Collapsed, an item's own near-duplicates are not its "similar" products; plain, they are.
    plain = assert_answer(svc.get(f"/products/{TWINS[0]}/similar", params={"k": 5}))
    assert TWINS[1] in pids(plain)
    body = assert_answer(svc.get(f"/products/{TWINS[0]}/similar", params={"k": 5, "collapse": 1}))
    assert not set(TWINS) & set(pids(body)) and len(body["results"]) == 5
    # Text search too.
    text = {"q": "product", "k": N_PRODUCTS, "collapse": "true"}
    body = assert_text_answer(svc.get("/search", params=text))
    assert body["collapsed"] is True and set(group_keys(body, groups)) == {
        groups.group_of.get(p, p) for p in ALL
    }
    for path, method in (("/search", "POST"), ("/products/p000/similar", "GET")):
        r = svc.request(method, path, params={"collapse": "maybe"}, data=query)
        assert "collapse" in assert_error(r, 400, "bad_request")["message"]


def test_duplicates_of_a_product(svc):
    groups = first_groups(svc)
    for me, twin in (TWINS, TWINS[::-1]):
        r = svc.get(f"/products/{me}/duplicates")
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"product_id", "group_id", "duplicates", "index_version"}
        assert body["product_id"] == me and body["index_version"] == svc.first_version
        assert body["group_id"] == groups.group_of[me] == groups.group_of[twin]
        (row,) = body["duplicates"]  # the product itself is not listed
        assert row["product_id"] == twin and row["title"] == f"Product {int(twin[1:])}"
        assert row["category"] == "common" and row["image_uri"].endswith(f"{twin}.jpg")
        assert row["score"] == pytest.approx(1.0, abs=1e-4)  # the same photo
        assert svc.get(row["image_url"]).content == svc.files[f"{twin}.jpg"]
    alone = next(p for p in ALL if p not in groups.group_of)
    body = svc.get(f"/products/{alone}/duplicates").json()
    assert body == {"product_id": alone, "group_id": None, "duplicates": [],
                    "index_version": svc.first_version}  # fmt: skip
    assert_error(svc.get("/products/nope/duplicates"), 404, "unknown_product")


def test_openapi_describes_collapse_and_duplicates(svc):
    spec = svc.get("/openapi.json").json()
    (param,) = spec["paths"]["/products/{product_id}/duplicates"]["get"]["parameters"]
    assert param["name"] == "product_id" and param["in"] == "path"
    for path, method in (
        ("/search", "post"),
        ("/search", "get"),
        ("/products/{product_id}/similar", "get"),
    ):
        params = {p["name"]: p for p in spec["paths"][path][method]["parameters"]}
        assert params["collapse"]["schema"]["type"] == "boolean", (path, params)
        assert "near-duplicate group" in params["collapse"]["description"]


def test_product_image(svc):
    r = svc.get("/products/p005/image")
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"].startswith("image/")
    assert r.content == svc.files["p005.jpg"]
    assert Image.open(io.BytesIO(r.content)).size == SIZE
    # The image_url of a result points at that very photo.
    body = assert_answer(svc.search(svc.files["p000-back.jpg"], k=1))
    r = svc.get(body["results"][0]["image_url"])
    assert r.status_code == 200
    assert r.content == svc.files["p000-back.jpg"]
    assert_error(svc.get("/products/nope/image"), 404)
    assert_error(svc.get("/products/p005/image", params={"id": 999999}), 404)
    other = assert_answer(svc.search(svc.files["p001.jpg"], k=1))["results"][0]["id"]
    assert_error(svc.get("/products/p005/image", params={"id": other}), 404)  # p001's photo
    assert r.headers["x-content-type-options"] == "nosniff"


def test_product_image_serves_only_image_bytes(svc):
    """A docs row naming a file that is not an image (here: the photo replaced by text, as a row
    pointing at /proc/self/environ would read) gives a 404, never the bytes."""
    path = pathlib.Path(
        assert_answer(svc.search(svc.files["p008.jpg"], k=1))["results"][0]["image_uri"]
    )
    assert path.name == "p008.jpg"
    try:
        path.write_bytes(b"SECRET_TOKEN=abc\nHOME=/root\n")
        r = svc.get("/products/p008/image")
        assert_error(r, 404, "not_found")
        assert b"SECRET" not in r.content
        path.write_bytes(svc.files["p014.png"])  # PNG bytes under a .jpg name: served as PNG
        r = svc.get("/products/p008/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        path.write_bytes(svc.files["p008.jpg"])


# ---------------------------------------------------------------------------------- errors


def test_too_large_is_413(svc):
    big = random.Random(0).randbytes(MAX_UPLOAD + 20_000)
    assert_error(svc.search(big), 413, "too_large")
    files = {"image": ("big.jpg", big, "image/jpeg")}
    assert_error(svc.post("/search", files=files), 413, "too_large")
    # A declared length far over the limit is refused before the body is read.
    answer = raw_exchange(
        svc.port,
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 50000000\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"too_large"' in answer, answer[:500]
    # A client that sends its whole body before reading (no Expect: 100-continue) still reads
    # the JSON answer, not a connection reset.
    body = random.Random(1).randbytes(4 * MAX_UPLOAD)
    head = (
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    answer = raw_exchange(svc.port, head + body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"too_large"' in answer, answer[:500]


def test_not_an_image_is_415(svc):
    r = svc.post(
        "/search", data=b"hello, this is not a photo", headers={"Content-Type": "text/plain"}
    )
    assert_error(r, 415, "not_an_image")
    html = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
    r = svc.post("/search", files={"image": ("page.html", html, "text/html")})
    assert_error(r, 415, "not_an_image")
    # TIFF is a catalog format but not an upload one (AppArgs.upload_tiff turns it on).
    tiff = io.BytesIO()
    Image.open(io.BytesIO(svc.files["p008.jpg"])).save(tiff, format="TIFF")
    r = svc.search(tiff.getvalue())
    assert_error(r, 415, "unsupported")
    assert "image/tiff" in r.json()["error"]["message"]


def test_unusable_images_are_422(svc):
    assert_error(svc.search(png(Image.new("RGB", (1, 1), "red"))), 422, "too_small")
    truncated = svc.files["p011.jpg"][: len(svc.files["p011.jpg"]) // 2]
    assert_error(svc.search(truncated), 422, ("truncated", "decode_error"))
    r = svc.post("/search", files={"image": ("t.jpg", truncated, "image/jpeg")})
    assert_error(r, 422, ("truncated", "decode_error"))


def test_malformed_requests_are_400(svc):
    assert_error(svc.search(b""), 400, "bad_request")
    r = svc.post("/search", files={"photo": ("q.jpg", svc.files["p001.jpg"], "image/jpeg")})
    assert_error(r, 400, "bad_request")
    r = svc.post("/search", files={"image": (None, "just text")})  # a text field, not a file
    assert_error(r, 400, "bad_request")
    r = svc.post("/search", files={"image": ("empty.jpg", b"", "image/jpeg")})
    assert_error(r, 400, "bad_request")


def test_unknown_route_is_404_json(svc):
    assert_error(svc.get("/no/such/route"), 404, "not_found")
    assert_error(svc.post("/searchx", data=b"x"), 404, "not_found")


def test_garbage_never_gives_500_nor_takes_the_replica_down(svc):
    from ray import serve

    rng = random.Random(42)
    good = svc.files["p008.jpg"]
    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    cases = [
        ("POST", "/search", {"data": rng.randbytes(5000)}),
        ("POST", "/search", {"data": b"\x89PNG\r\n\x1a\n" + rng.randbytes(3000)}),
        ("POST", "/search", {"data": good[:20] + rng.randbytes(2000)}),
        ("POST", "/search", {"data": rng.randbytes(4000), "headers": multipart}),
        (
            "POST",
            "/search",
            {"data": b"--XyZ\r\nContent-Disposition: form-data\r\n\r\n", "headers": multipart},
        ),
        (
            "POST",
            "/search",
            {"data": b"abc", "headers": {"Content-Type": "multipart/form-data"}},
        ),
        (
            "POST",
            "/search",
            {"data": rng.randbytes(1000), "headers": {"X-Padding": "a" * 8000}},
        ),
        ("POST", "/search?k=99999999999999999999999", {"data": good}),
        ("POST", "/search?category=" + "c" * 300, {"data": good}),
        ("GET", "/search", {}),
        ("PUT", "/healthz", {"data": b"x"}),
        ("DELETE", "/products/p001/similar", {}),
        ("GET", "/products/%00%ff%fe/similar", {}),
        ("GET", "/products/p001/image?id=abc", {}),
        ("GET", "/products/p001/image?id=-5", {}),
        ("POST", "/admin/reload", {"headers": {"X-API-Key": "\u00e9" * 10}}),
    ]
    started = time.monotonic()
    for method, path, kw in cases:
        r = svc.request(method, path, **kw)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:300])
        assert_error(r, r.status_code)
        assert time.monotonic() - started < 120
    # Not even HTTP.
    answer = raw_exchange(svc.port, b"\x16\x03\x01garbage that is not http\r\n\r\n", timeout=10)
    assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
    # Still up: same replicas, healthy, answering.
    r = svc.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert pids(assert_answer(svc.search(good)))[0] == "p008"
    app = serve.status().applications["vs"]
    assert app.status == "RUNNING", app
    for name, dep in app.deployments.items():
        assert dep.status == "HEALTHY", (name, dep)
        assert set(dep.replica_states) == {"RUNNING"}, (name, dep.replica_states)


# ------------------------------------------------------------------------------ endpoints


def test_health_ready_version(svc):
    r = svc.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = svc.get("/readyz")
    assert r.status_code == 200
    live = r.json()["index_version"]
    assert live == versions.current(svc.index_root)
    r = svc.get("/version")
    assert r.status_code == 200
    body = r.json()
    manifest = versions.open_version(svc.index_root, live).manifest
    assert body["index_version"] == live
    assert body["model"]["model_id"] == manifest.model["model_id"]
    assert body["count"] == N_PRODUCTS + 1 == manifest.count
    assert body["factory"] == manifest.factory
    assert body["shards"] == SHARDS
    assert "recall_at_10" in body["recall"] and "curve" not in body["recall"]
    assert body["filterable"] == {"category": "string", "price": "number"}
    assert "title" in body["text"]
    assert body["updates"]["seq"] == 0 and body["updates"]["since_version"] == 0


def test_web_page(svc):
    r = svc.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<input" in r.text and 'type="file"' in r.text


# ------------------------------------------------------------------------------ hot reload


def test_hot_reload_with_zero_failed_queries(svc):
    old = svc.get("/readyz").json()["index_version"]
    manifest = build_index.run(
        build_index.Config(
            embeddings=svc.work, index_root=svc.index_root, shards=SHARDS, factory="IVF4,Flat"
        )
    )
    new = manifest.version
    assert new != old and versions.current(svc.index_root) == new
    assert svc.get("/readyz").json()["index_version"] == old  # nothing moves before a reload

    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()
    query = svc.files["p012.jpg"]

    def loop():
        deadline = time.monotonic() + 20
        with requests.Session() as session:
            for _ in range(300):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    r = svc.search(query, session=session, k=5)
                    body = r.json() if r.status_code == 200 else {}
                    if r.status_code == 200 and pids(body)[:1] != ["p012"]:
                        seen.append((-1, body.get("index_version")))
                    else:
                        seen.append((r.status_code, body.get("index_version")))
                except Exception as exc:  # a transport error counts as a failed query
                    seen.append((-2, repr(exc)))

    client = threading.Thread(target=loop, daemon=True)
    client.start()
    try:
        assert poll(lambda: len(seen) >= 3, timeout=15), seen
        assert_error(svc.post("/admin/reload"), 401, "unauthorized")
        assert_error(svc.post("/admin/reload", headers={"X-API-Key": "wrong"}), 401)
        r = svc.post("/admin/reload", headers={"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "reloaded"
        assert r.json()["index_version"] == new
        assert r.json()["previous"] == old
        after = len(seen)
        assert poll(lambda: len(seen) >= after + 3, timeout=15), seen
    finally:
        stop.set()
        client.join(timeout=TIMEOUT + 5)
    assert not client.is_alive()

    statuses = [s for s, _ in seen]
    assert statuses and all(s == 200 for s in statuses), seen
    names = [v for _, v in seen]
    assert names[0] == old and names[-1] == new, names
    switch = names.index(new)
    assert set(names[:switch]) == {old} and set(names[switch:]) == {new}, names

    r = svc.post("/admin/reload", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["status"] == "unchanged"
    assert r.json()["index_version"] == new
    # The new version answers everything: upload, category, similar, /version.
    body = assert_answer(svc.search(svc.files["p007.jpg"]))
    assert pids(body)[0] == "p007" and body["index_version"] == new
    body = assert_answer(svc.search(svc.files["p002.jpg"], k=10, category="rare"))
    assert sorted(pids(body)) == list(RARE)
    body = assert_answer(svc.get("/products/p010/similar", params={"k": 5}))
    assert len(body["results"]) == 5 and "p010" not in pids(body)
    version = svc.get("/version").json()
    assert version["index_version"] == new and version["factory"] == "IVF4,Flat"
    assert version["shards"] == SHARDS


def test_reload_switches_to_a_retuned_head_without_a_redeploy(svc, tmp_path):
    """A re-index that re-tunes the model (a new head on the same backbone) reloads in place."""
    torch.manual_seed(0)
    head = heads.Head("concat", 1280, 1280 + 16, hidden=32).eval()
    uri = str(tmp_path / "head.pt")
    heads.save(head, uri, backbone=embedders.DEFAULT_MODEL)
    src = embeddings.open_dataset(svc.work)
    model = embedders.describe(embedders.DEFAULT_MODEL, head=uri)

    def through_head(v):
        with torch.no_grad():
            return torch.nn.functional.normalize(head(torch.from_numpy(v.copy())), dim=1).numpy()

    embeddings.project(src, str(tmp_path / "tuned"), through_head, model)
    manifest = build_index.run(
        build_index.Config(embeddings=str(tmp_path / "tuned"), index_root=svc.index_root,
                           shards=SHARDS)
    )  # fmt: skip
    r = svc.post("/admin/reload", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["index_version"] == manifest.version, r.text
    assert svc.get("/version").json()["model"]["head"]["dim"] == 1296
    body = assert_answer(svc.search(svc.files["p007.jpg"]))
    assert pids(body)[0] == "p007" and body["index_version"] == manifest.version


def test_reload_reads_the_live_versions_groups_anew(svc):
    """A version without groups collapses nothing; a malformed dedup output is skipped (logged);
    the dedup job run on the live version, then a reload, turns collapse on."""
    live = svc.get("/readyz").json()["index_version"]
    assert live != svc.first_version and svc.get("/version").json()["groups"] is None
    query = svc.files[f"{TWINS[0]}.jpg"]

    def collapsed() -> dict:
        return assert_answer(svc.search(query, k=5, collapse="true"))

    body = collapsed()
    assert body["collapsed"] is False and set(pids(body)[:2]) == set(TWINS)
    assert svc.get(f"/products/{TWINS[0]}/duplicates").json()["duplicates"] == []
    out = pathlib.Path(dedup.output_root(svc.index_root, live))
    out.mkdir(parents=True)
    (out / "groups.parquet").write_bytes(b"not parquet")
    (out / "manifest.json").write_text("{}")
    r = svc.post("/admin/reload", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json() == {
        "status": "unchanged", "index_version": live, "groups": None
    }, r.text  # fmt: skip
    assert collapsed()["collapsed"] is False
    summary = dedup_job.run(dedup_job.Config(index_root=svc.index_root))
    assert summary["version"] == live
    r = svc.post("/admin/reload", headers={"X-API-Key": API_KEY})
    assert r.status_code == 200 and r.json()["groups"] == summary["groups"] >= 1, r.text
    body = collapsed()
    assert body["collapsed"] is True and len(body["results"]) == 5
    assert len(set(TWINS) & set(pids(body))) == 1
    (row,) = svc.get(f"/products/{TWINS[0]}/duplicates").json()["duplicates"]
    assert row["product_id"] == TWINS[1]


def test_reload_refuses_a_current_that_leaves_the_index_root(svc):
    current = pathlib.Path(svc.index_root, "CURRENT")
    live = current.read_text()
    try:
        current.write_text("../../elsewhere\n")
        r = svc.post("/admin/reload", headers={"X-API-Key": API_KEY})
        assert_error(r, 409, "bad_version")
        assert "not a version id" in r.json()["error"]["message"]
        assert assert_answer(svc.search(svc.files["p007.jpg"]))["index_version"] == live.strip()
    finally:
        current.write_text(live)


# -------------------------------------------------------------------------------- overload


def _held_upload(svc) -> socket.socket:
    """A POST /search that sends 1,000 of its 50,000 bytes and then nothing."""
    s = socket.create_connection(("127.0.0.1", svc.port), timeout=30)
    s.sendall(
        b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: 50000\r\n\r\n" + svc.files["p006.jpg"][:1000]
    )
    return s


def _answer_of(s: socket.socket, timeout: float) -> bytes:
    """The head and body of the server's answer (b"" when none came within timeout)."""
    s.settimeout(timeout)
    buf = b""
    for _ in range(16):  # at most 64 KiB
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        if not chunk or (sep and length and len(body) >= int(length.group(1))):
            break
    return buf


def test_slow_uploads_hold_no_search_slot_and_get_408(svc):
    """More slow uploads than search slots: searches still answer; each upload gets a 408 JSON
    once upload_timeout_s has passed."""
    held = [_held_upload(svc) for _ in range(2 * MAX_INFLIGHT)]
    started = time.monotonic()
    try:
        time.sleep(0.5)  # let them reach the ingress
        assert pids(assert_answer(svc.search(svc.files["p006.jpg"])))[0] == "p006"
        assert_answer(svc.get("/products/p001/similar"))
        answers = [_answer_of(s, UPLOAD_TIMEOUT + 20) for s in held]
    finally:
        for s in held:
            s.close()
    waited = time.monotonic() - started
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"timeout"' in answer, answer[:500]
    assert UPLOAD_TIMEOUT - 1 <= waited < UPLOAD_TIMEOUT + 20, waited


def test_overload_is_503_then_recovers(svc):
    """More concurrent searches than max_inflight: some are refused at once with a JSON 503,
    the others answer, and nothing else fails."""
    good = svc.files["p006.jpg"]
    statuses: list[int] = []
    errors: list[requests.Response] = []

    def burst():
        with requests.Session() as session:
            for _ in range(3):
                r = svc.search(good, session=session, k=5)
                statuses.append(r.status_code)
                if r.status_code != 200:
                    errors.append(r)

    threads = [threading.Thread(target=burst, daemon=True) for _ in range(6 * MAX_INFLIGHT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * TIMEOUT)
    assert len(statuses) == 3 * len(threads), statuses
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for r in errors:
        assert_error(r, 503, "overloaded")
    assert svc.get("/healthz").status_code == 200  # health is not admission-controlled

    def recovered():
        r = svc.search(good)
        return r if r.status_code == 200 else None

    r = poll(recovered, timeout=30, interval=0.3, attempts=60)
    assert r is not None, "the service still answers 503 after the burst"
    assert pids(assert_answer(r))[0] == "p006"


def _replica_actors(deployment: str, app: str = "") -> list:
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    found = [a for a in names if f"{app}#{deployment}#" in a["name"]]
    actors = []
    for a in found:
        with contextlib.suppress(ValueError):  # died between the listing and the lookup
            actors.append(ray.get_actor(a["name"], namespace=a["namespace"]))
    return actors


@contextlib.contextmanager
def kept_down(deployment: str):
    """Kill every replica of `deployment` as soon as it appears, until the block ends: the shard
    stays down however fast Serve restarts it (one kill alone races a quick restart)."""
    import ray

    stop = threading.Event()

    def killer():
        while not stop.is_set():
            for replica in _replica_actors(deployment):
                ray.kill(replica, no_restart=True)
            stop.wait(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def test_a_dead_shard_gives_partial_answers_then_full_coverage(svc):
    """One shard's replicas are killed: every answer is a 200 marked partial (the other
    shard's products) or a JSON 503, never a 500; full coverage returns after the restart."""
    seen: list[tuple[int, dict]] = []

    def partial_seen():
        r = svc.search(svc.files["p006.jpg"], k=5)
        body = r.json()
        seen.append((r.status_code, body))
        assert r.status_code in (200, 503), (r.status_code, r.text[:300])
        if r.status_code == 503:
            assert_error(r, 503)
        return r.status_code == 200 and body["partial"]

    assert _replica_actors("ShardSearcher-1")
    with kept_down("ShardSearcher-1"):
        assert poll(partial_seen, timeout=60, interval=0.2), seen[-3:]
    body = seen[-1][1]
    assert body["coverage"] == {"shards": SHARDS - 1, "of": SHARDS}, body
    assert body["results"], body

    def full():
        r = svc.search(svc.files["p006.jpg"], k=5)
        assert r.status_code in (200, 503), (r.status_code, r.text[:300])
        return r.status_code == 200 and not r.json()["partial"] and r

    r = poll(full, timeout=90, interval=0.5, attempts=400)
    assert r, "full coverage did not return after the shard replica restarted"
    assert pids(assert_answer(r))[0] == "p006"


def _replica_pids(app: str, deployment: str) -> list[int]:
    import ray

    pids = []
    for replica in _replica_actors(deployment, app):
        with contextlib.suppress(ray.exceptions.RayActorError):  # died after the listing
            pids.append(ray.get(replica.__ray_call__.remote(lambda _: os.getpid()), timeout=30))
    return pids


def test_killing_one_of_two_shard_replicas_fails_no_request(svc):
    """shard_replicas=2, four clients searching: SIGKILL of one replica of a shard fails no
    request and loses no coverage, and Serve brings the shard back to 2 replicas. (Serve's
    router keeps requests off the dead replica: this passed with fanout.call's retry off too.)"""
    import signal

    from ray import serve

    from serve.app import AppArgs, build_app

    args = AppArgs(index_root=svc.index_root, shard_replicas=2, rerank=0, follow_current=False,
                   ingress_cpus=0.02, embedder_cpus=0.1, shard_cpus=0.02)  # fmt: skip
    serve.run(build_app(args), name="vs-pair", route_prefix="/pair")
    seen: list[tuple[int, object]] = []
    stop = threading.Event()

    def client():
        with requests.Session() as session:
            for _ in range(600):
                if stop.is_set():
                    return
                try:
                    r = session.post(f"{svc.base}/pair/search", params={"k": 3},
                                     data=svc.files["p012.jpg"], timeout=TIMEOUT)  # fmt: skip
                    body = r.json()
                    seen.append((r.status_code, body.get("coverage") or body))
                except Exception as exc:  # a transport error counts as a failed query
                    seen.append((-2, repr(exc)))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    try:
        assert poll(lambda: len(_replica_pids("vs-pair", "ShardSearcher-1")) == 2, 60)
        for t in clients:
            t.start()
        assert poll(lambda: len(seen) >= 10, timeout=60), seen
        victim = _replica_pids("vs-pair", "ShardSearcher-1")[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = len(seen)

        def replaced() -> bool:
            now = _replica_pids("vs-pair", "ShardSearcher-1")
            return len(now) == 2 and victim not in now

        assert poll(replaced, timeout=90, interval=0.5, attempts=400)
        assert poll(lambda: len(seen) >= killed_at + 20, timeout=60), seen[killed_at:]
    finally:
        stop.set()
        for t in clients:
            if t.ident is not None:
                t.join(timeout=TIMEOUT + 5)
        serve.delete("vs-pair")
    full = {"shards": SHARDS, "of": SHARDS}
    failed = [(status, what) for status, what in seen if status != 200 or what != full]
    assert not failed, (len(seen), killed_at, failed[:5])


# Metrics on Ray's Prometheus endpoint (exported every few seconds, so polled) and /version.
SEARCH = "/search"
SENT = 3
SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+(\S+)$")


def scrape() -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on this node's metrics endpoint."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = []
    for line in text.splitlines():
        if m := SAMPLE.match(line):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
            samples.append((m.group(1), labels, float(m.group(3))))
    return samples


def total(samples, name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def test_request_and_error_metrics_reach_prometheus(svc):
    for i in range(SENT):
        assert_answer(svc.search(jpeg(draw_product(i, (160, 120))), k=3))
    assert_error(svc.search(b"this is not an image"), 415, "not_an_image")
    assert_error(svc.get("/no/such/route"), 404, "not_found")

    deadline, samples = time.monotonic() + 40, []
    while time.monotonic() < deadline:
        samples = scrape()
        if (
            total(samples, "ray_visual_search_requests_total", route=SEARCH, status="200") >= SENT
            and total(samples, "ray_visual_search_errors_total", code="not_an_image")
            and total(samples, "ray_visual_search_errors_total", code="not_found")
        ):
            break
        time.sleep(1)
    names = sorted({n for n, _, _ in samples if n.startswith("ray_visual_search")})

    ok = total(samples, "ray_visual_search_requests_total", route=SEARCH, status="200")
    assert ok >= SENT, names
    assert total(samples, "ray_visual_search_requests_total", route=SEARCH, status="415") >= 1
    bad = total(samples, "ray_visual_search_errors_total", route=SEARCH, code="not_an_image")
    assert bad >= 1 and total(samples, "ray_visual_search_errors_total", status="415") >= 1
    # Unknown paths are one series, not one per path.
    unmatched = total(
        samples, "ray_visual_search_errors_total", route="unmatched", code="not_found"
    )
    assert unmatched >= 1
    assert not any("/no/such/route" in lab.values() for _, lab, _ in samples)
    # The latency histogram counts every /search request (good and bad), with Serve's tags.
    timed = [
        lab
        for n, lab, _ in samples
        if n == "ray_visual_search_request_latency_ms_count" and lab.get("route") == SEARCH
    ]
    assert timed and timed[0]["deployment"] == "Ingress" and timed[0]["application"] == "vs"
    count = total(samples, "ray_visual_search_request_latency_ms_count", route=SEARCH)
    assert count >= SENT + 1
    assert total(samples, "ray_visual_search_request_latency_ms_bucket", route=SEARCH, le="+Inf")


def test_two_ingress_replicas_follow_a_new_current_together(svc, tmp_path):
    """ingress_replicas=2 (follow_current, the default): a publish that moves CURRENT reaches
    both replicas by itself within seconds, with no failed query while they switch."""
    import shutil

    from ray import serve

    from serve.app import AppArgs, build_app

    with pytest.raises(ValueError, match="follow_current"):
        AppArgs(index_root="x", ingress_replicas=2, follow_current=False)
    root = str(tmp_path / "index")  # its own copy: the module's app does not follow CURRENT
    shutil.copytree(svc.index_root, root)
    old = versions.current(root)
    # The re-index runs first (its training task needs a CPU the replicas would hold); it is
    # rolled back, so that publishing it again is what the replicas see.
    live = versions.open_version(root).manifest  # the same embeddings: the same model
    new = build_index.run(
        build_index.Config(embeddings=live.embeddings["uri"], index_root=root, shards=SHARDS)
    ).version
    assert new != old and versions.roll_back(root, old) == new
    args = AppArgs(index_root=root, ingress_replicas=2, embed_in_ingress=False, rerank=0,
                   ingress_cpus=0.02, embedder_cpus=0.1, shard_cpus=0.02)  # fmt: skip
    serve.run(build_app(args), name="vs-multi", route_prefix="/multi")
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def loop():
        with requests.Session() as session:
            for _ in range(400):
                if stop.wait(0.05):
                    return
                try:
                    r = session.post(f"{svc.base}/multi/search", params={"k": 3},
                                     data=svc.files["p012.jpg"], timeout=TIMEOUT)  # fmt: skip
                    seen.append((r.status_code, r.json().get("index_version")))
                except Exception as exc:  # a transport error counts as a failed query
                    seen.append((-2, repr(exc)))

    def replicas() -> dict[str, set[str]]:
        """replica -> the versions its /version answers named, over 16 requests, each on its
        own connection (HAProxy picks the replica per connection)."""
        out: dict[str, set[str]] = {}
        for _ in range(16):
            r = requests.get(
                f"{svc.base}/multi/version", timeout=TIMEOUT, headers={"Connection": "close"}
            )  # 404 until the route is known
            if r.status_code == 200:
                out.setdefault(r.json()["replica"], set()).add(r.json()["index_version"])
        return out

    client = threading.Thread(target=loop, daemon=True)
    try:
        assert poll(lambda: len(replicas()) == 2, timeout=60), replicas()
        client.start()
        assert poll(lambda: len(seen) >= 3, timeout=30), seen
        assert versions.set_current(root, new) == old  # the publish a re-index ends with

        def switched() -> bool:
            answers = replicas()
            return len(answers) == 2 and all(v == {new} for v in answers.values())

        assert poll(switched, timeout=20), replicas()
        after = len(seen)
        assert poll(lambda: len(seen) >= after + 3, timeout=30), seen
    finally:
        stop.set()
        if client.ident is not None:
            client.join(timeout=TIMEOUT + 5)
        serve.delete("vs-multi")
    assert all(status == 200 for status, _ in seen), seen
    assert {v for _, v in seen} == {old, new} and seen[-1][1] == new, seen


def test_version_reports_index_model_build_date_and_code(svc):
    body = svc.get("/version").json()
    live = versions.current(svc.index_root)
    manifest = versions.open_version(svc.index_root, live).manifest
    assert body["index_version"] == live
    assert body["model"] == manifest.model and body["model"]["model_id"]
    built = datetime.strptime(body["built"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(built.timestamp() - manifest.created_unix) < 1
    assert abs(time.time() - built.timestamp()) < 3600  # built by this module's fixture
    assert body["code_version"]["package"] == __version__
    assert body["index_code_version"] == manifest.code_version


def _fuzz(svc, operation, mode, seen: dict) -> None:
    """Send schemathesis's cases for one operation: no 5xx, and the JSON error on each 4xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    @settings(
        max_examples=5,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        kwargs = case.as_transport_kwargs(base_url=svc.base)  # requests' arguments
        r = svc.session.request(**kwargs, timeout=TIMEOUT)
        seen.setdefault(operation.label, set()).add(r.status_code)
        if r.status_code == 503:  # a min_seq past the applied updates: the documented answer
            assert_error(r, 503, "stale")
            return
        assert r.status_code < 500, (operation.label, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert_error(r, r.status_code)

    try:
        check()
    except Unsatisfiable:
        # An operation with no parameters or body has nothing a negative case can break.
        if mode != GenerationMode.NEGATIVE or operation.query or operation.body:
            raise AssertionError(f"{operation.label} {mode}: no case") from None
        seen.setdefault(operation.label, set())


def test_fuzzed_openapi_surface_never_answers_5xx(svc):
    """Every operation of the published schema, fed schema-valid and schema-breaking requests
    (schemathesis, no API key): never a 5xx, and every 4xx is the JSON error body."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{svc.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    seen: dict[str, set[int]] = {}
    for operation in operations:
        for mode in GenerationMode:
            _fuzz(svc, operation, mode, seen)
    # The admin and update operations refused the key-less requests rather than acting on them.
    writes = {
        op: codes
        for op, codes in seen.items()
        if op.split()[0] in ("PUT", "DELETE") or op.split()[-1].startswith("/admin")
    }
    assert writes and all(400 <= c < 500 for codes in writes.values() for c in codes), writes
