"""jobs/make_queries.py on a tiny generated catalog (no Ray, no model)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import draw_product
from PIL import Image, ImageDraw

from jobs import make_queries
from visual_search import catalog, images, storage

N = 6


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """N products (one with two photos, one PNG with transparency) + a missing file + a text
    file posing as a JPEG; returns the catalog table's path."""
    root = tmp_path_factory.mktemp("mq_catalog")
    rows = []
    for i in range(N):
        draw_product(i, (120, 90)).save(root / f"p{i}.jpg", quality=95)
        rows.append({"product_id": f"p{i}", "image_uri": f"p{i}.jpg", "category": f"c{i % 2}"})
    draw_product(100, (90, 120)).save(root / "p0-side.jpg", quality=95)
    rows.append({"product_id": "p0", "image_uri": "p0-side.jpg", "category": "c0"})
    cutout = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    ImageDraw.Draw(cutout).ellipse((20, 20, 80, 80), fill=(200, 30, 30, 255))
    cutout.save(root / "cutout.png")
    rows.append({"product_id": "cut", "image_uri": "cutout.png", "category": "c1"})
    rows.append({"product_id": "gone", "image_uri": "missing.jpg", "category": "c0"})
    (root / "text.jpg").write_bytes(b"this is not a photo")
    rows.append({"product_id": "text", "image_uri": "text.jpg", "category": "c1"})
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    return str(root / "catalog.parquet")


@pytest.fixture(scope="module")
def made(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mq_out") / "q")
    summary = make_queries.run(make_queries.Config(catalog=source, out=out, per_product=2))
    return out, summary, pq.read_table(os.path.join(out, "queries.parquet"))


def _files(out: str) -> dict[str, bytes]:
    folder = os.path.join(out, "images")
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def test_bad_sources_are_counted_not_fatal(made):
    _, summary, table = made
    assert summary["skipped_by_code"] == {"not_an_image": 2, "read_error": 2}  # 2 per product
    assert summary["queries"] == 2 * (N + 1) == table.num_rows
    assert "gone" not in table["product_id"].to_pylist()
    assert "text" not in table["product_id"].to_pylist()


def test_ground_truth_equals_the_source_rows(made, source):
    out, _, table = made
    assert table.column_names == ["image_uri", "product_id", "category", "source_uri", "augment"]
    cat = catalog.read_catalog(source).table.to_pylist()
    by_uri = {r["image_uri"]: r for r in cat}
    for row in table.to_pylist():
        src = by_uri[row["source_uri"]]
        assert (row["product_id"], row["category"]) == (src["product_id"], src["category"])
    # The table reads back as a catalog whose images are the generated files.
    queries = catalog.read_catalog(os.path.join(out, "queries.parquet")).table
    assert all(os.path.isfile(u) for u in queries["image_uri"].to_pylist())
    assert queries["product_id"].to_pylist() == table["product_id"].to_pylist()


def test_every_query_decodes_and_differs_from_its_source(made):
    out, _, table = made
    for row in table.to_pylist():
        data = storage.read_bytes(os.path.join(out, row["image_uri"]))
        img = images.decode(data)
        assert min(img.size) >= make_queries.MIN_SIDE
        assert data != storage.read_bytes(row["source_uri"])


def test_parameters_are_recorded_and_reproduce_the_image(made):
    out, _, table = made
    for row in table.to_pylist():
        p = json.loads(row["augment"])
        left, top, right, bottom = p["crop"]
        lo, hi = make_queries.CROP
        assert lo <= right - left <= hi + 1e-4 and lo <= bottom - top <= hi + 1e-4
        assert min(left, top) >= 0 and max(right, bottom) <= 1
        assert abs(p["rotate_deg"]) <= make_queries.MAX_ROTATE
        assert 50 <= p["jpeg_quality"] <= 90
        assert p["background"]["kind"] in make_queries.BACKGROUNDS
        assert 0 <= p["background_fraction"] <= 1
        # Re-applying the recorded parameters to the source gives the same bytes.
        img, facts = make_queries.augment(images.decode(storage.read_bytes(row["source_uri"])), p)
        data = make_queries.encode_jpeg(img, p["jpeg_quality"])
        assert data == storage.read_bytes(os.path.join(out, row["image_uri"]))
        assert facts["size"] == p["size"]


def test_transparent_source_gets_a_new_background(made):
    _, _, table = made
    rows = [r for r in table.to_pylist() if r["product_id"] == "cut"]
    assert rows and all(json.loads(r["augment"])["background_fraction"] > 0.2 for r in rows)


def test_same_seed_same_bytes_other_seed_other_images(made, source, tmp_path):
    out, _, table = made
    again = str(tmp_path / "again")
    make_queries.run(make_queries.Config(catalog=source, out=again, per_product=2, threads=3))
    assert _files(again) == _files(out)
    table_bytes = [storage.read_bytes(os.path.join(d, "queries.parquet")) for d in (again, out)]
    assert table_bytes[0] == table_bytes[1]
    other = str(tmp_path / "other")
    make_queries.run(make_queries.Config(catalog=source, out=other, per_product=2, seed=1))
    assert set(_files(other)) == set(_files(out))
    assert all(_files(other)[n] != data for n, data in _files(out).items())


def test_limit_samples_products(source, tmp_path):
    summary = make_queries.run(
        make_queries.Config(catalog=source, out=str(tmp_path / "q"), limit=3, per_product=1)
    )
    table = pq.read_table(tmp_path / "q" / "queries.parquet")
    assert summary["queries"] + summary["skipped"] == 3
    assert len(set(table["product_id"].to_pylist())) == table.num_rows


def test_background_mask_reaches_the_border_not_the_inside():
    img = Image.new("RGB", (200, 160), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 30, 160, 130), fill=(20, 60, 200))
    draw.rectangle((80, 60, 120, 100), fill=(255, 255, 255))  # a white label on the product
    mask = make_queries.background_mask(img)
    assert mask.shape == (160, 200)
    assert mask[5, 5] == pytest.approx(1) and mask[150, 190] == pytest.approx(1)
    assert mask[80, 100] == 0  # the label is not background
    assert mask[50, 60] == 0  # nor is the product
    assert make_queries.background_mask(Image.new("RGB", (50, 50), (90, 90, 90))).max() == 0


def test_nothing_usable_exits_2(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    pq.write_table(
        pa.table({"product_id": ["a"], "image_uri": ["a.jpg"]}), tmp_path / "catalog.parquet"
    )
    code = make_queries.main(
        ["--catalog", str(tmp_path / "catalog.parquet"), "--out", str(tmp_path / "q")]
    )
    assert code == 2
    assert "[make_queries] error:" in capsys.readouterr().err
    assert not (tmp_path / "q" / "queries.parquet").exists()
    assert make_queries.main(["--catalog", str(tmp_path / "none.csv"), "--out", "x"]) == 2


def test_profiles_keep_their_draws_and_train_mixes_backgrounds():
    """The mixed "train" profile keeps about half of the backgrounds and spans the other two
    profiles' crops and JPEG qualities; adding it left their seeded draws as they were."""

    def draws(profile, n=400):
        rng = np.random.default_rng(7)
        return [make_queries.draw_params(rng, profile) for _ in range(n)]

    train = draws("train")
    kept = sum(p["background"]["kind"] == "kept" for p in train)
    assert 0.4 * len(train) < kept < 0.6 * len(train)
    sides = [p["crop"][2] - p["crop"][0] for p in train]
    assert min(sides) < 0.7 and max(sides) > 0.9
    quality = [p["jpeg_quality"] for p in train]
    assert min(quality) < 40 and max(quality) > 85
    assert all(p["background"]["kind"] != "kept" for p in draws("query"))
    assert all(p["background"]["kind"] == "kept" for p in draws("shopper"))
    # "train" draws what "query" draws, then one number more: the pure profiles' streams are
    # the ones their seeds were made with.
    rng, after_train = np.random.default_rng(7), np.random.default_rng(7)
    make_queries.draw_params(rng, "query")
    make_queries.draw_params(after_train, "train")
    rng.uniform()
    assert after_train.uniform() == rng.uniform()
