"""End-to-end embedding job on local Ray: odd and broken files, equality with direct calls."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import draw_product
from corpus import EXIF_ROTATED, UPRIGHT, make_corpus

from jobs import embed as embed_job
from visual_search import catalog, embedders, images, schema, storage

N_PRODUCTS = 30
PARTITION = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog")
    items = make_corpus(root / "corpus")
    rows = []
    for it in items:
        rows.append(
            {
                "product_id": f"odd-{it.name}",
                "image_uri": f"corpus/{it.name}",
                "title": it.note,
                "category": "odd",
                "price": 1.0,
            }
        )
    for i in range(N_PRODUCTS):
        draw_product(i).save(root / f"p{i:03d}.jpg", quality=95)
        rows.append(
            {
                "product_id": f"p{i:03d}",
                "image_uri": f"p{i:03d}.jpg",
                "title": f"Product {i}",
                "category": f"cat{i % 3}",
                "price": float(i),
            }
        )
    # A second photo of one product.
    draw_product(1000).save(root / "p000-back.png")
    rows.append(
        {
            "product_id": "p000",
            "image_uri": "p000-back.png",
            "title": "Product 0",
            "category": "cat0",
            "price": 0.0,
        }
    )
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    return root, items, rows


@pytest.fixture(scope="module")
def result(ray_local, data, tmp_path_factory):
    root, _, _ = data
    out = str(tmp_path_factory.mktemp("out") / "emb")
    cfg = embed_job.Config(catalog=str(root / "catalog.parquet"), out=out, partition_size=PARTITION)
    return cfg, embed_job.run(cfg)


def _read(out: str, sub: str) -> pa.Table:
    return pa.concat_tables(
        storage.read_parquet(e.uri) for e in storage.list_files(storage.join(out, sub))
    )


def test_manifest_counts_and_files(data, result):
    _, _, rows = data
    cfg, manifest = result
    on_disk = json.loads(pathlib.Path(cfg.out, "manifest.json").read_text())
    assert on_disk == manifest.to_dict()
    c = manifest.counts
    assert c["input"] == len(rows) == c["embedded"] + c["errors"]
    assert manifest.model["model_id"] == embedders.DEFAULT_MODEL and manifest.dim == 1280
    n_parts = -(-len(rows) // PARTITION)
    assert len(manifest.embeddings) == len(manifest.errors) == n_parts
    for rec in [*manifest.embeddings, *manifest.errors]:
        assert storage.parquet_num_rows(storage.join(cfg.out, rec.path)) == rec.rows
    assert sum(r.rows for r in manifest.embeddings) == c["embedded"]
    assert manifest.timings["processed_this_run"] == len(rows)


def test_timings_are_end_to_end_and_say_where_the_time_went(data, result):
    _, _, rows = data
    t = result[1].timings
    assert t["images_per_s"] == round(len(rows) / t["pipeline_s"], 2)  # end to end
    assert t["ray_start_s"] >= 0 and t["total_s"] >= t["pipeline_s"]
    assert 0 < t["first_output_s"] <= t["pipeline_s"]
    # The actors' model time is a share of the run; the rest of their time was input wait.
    assert 0 < t["embed_actors_busy_s"] < t["pipeline_s"]
    assert 0 <= t["embed_actors_waited_s"] < t["pipeline_s"]


def _progress(points: list[tuple[float, int]], decode_end: float) -> embed_job._Progress:
    progress = embed_job._Progress(100, every_s=1e9)
    progress.start, progress.points, progress.decode_end = 0.0, points, decode_end
    return progress


def test_steady_rate_counts_only_while_decoding_ran():
    # Both stages busy all along: 10 images/s from 25% to 75% of the rows.
    even = [(t, 10 * t) for t in range(1, 11)]
    assert _progress(even, decode_end=10.0).steady_rate() == pytest.approx(10.0)
    # Decoding ended at t=6, ahead of the model, which then caught up alone at 40 images/s.
    # The window stops at t=6: 10 images/s, where 25%..75% uncut would read 20.
    ahead = [(3, 10), (4, 20), (5, 30), (6, 40), (6.5, 60), (7, 80), (7.5, 100)]
    assert _progress(ahead, decode_end=6.0).steady_rate() == pytest.approx(10.0)
    # Decoding was over before the window began: no steady state to report.
    assert _progress(ahead, decode_end=5.5).steady_rate() is None
    assert _progress(ahead, decode_end=5.5).first_output_s() == 3


def test_decoding_threads_yield_the_cores_to_the_model(monkeypatch):
    """The embed job's decode threads run as SCHED_IDLE: on a shared machine the model keeps its
    cores."""
    from visual_search import pipeline

    policies = []

    def record(uri, preprocess, limits):
        policies.append(os.sched_getscheduler(0))  # Linux: the calling thread's
        return None, "read_error", uri

    monkeypatch.setattr(pipeline, "read_and_decode", record)
    batch = pa.table({"row": [0, 1, 2], "image_uri": ["a", "b", "c"]})
    pre, limits = images.Preprocess(224, "pad"), images.Limits()
    out = pipeline.decode_batch(batch, pre, limits, yield_cores=True)
    assert out["detail"].to_pylist() == ["a", "b", "c"] and out.schema == pipeline.DECODED_SCHEMA
    assert policies == [os.SCHED_IDLE] * 3
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the task's own thread is untouched
    pipeline.decode_batch(batch, pre, limits)  # the stream job's: at the worker's priority
    assert policies[3:] == [os.SCHED_OTHER] * 3


def test_every_file_gets_the_right_outcome(data, result):
    _, items, _ = data
    cfg, manifest = result
    emb, err = _read(cfg.out, "embeddings"), _read(cfg.out, "errors")
    assert err.schema == schema.ERRORS_SCHEMA
    errors = dict(zip(err["product_id"].to_pylist(), err["error"].to_pylist(), strict=True))
    embedded = emb["product_id"].to_pylist()
    for it in items:
        pid = f"odd-{it.name}"
        if it.usable:
            assert pid in embedded, it
        else:
            assert errors.get(pid) == it.expected, it
    assert all(f"p{i:03d}" in embedded for i in range(N_PRODUCTS))
    assert embedded.count("p000") == 2  # both photos of the product
    assert len(set(zip(embedded, emb["image_uri"].to_pylist(), strict=True))) == emb.num_rows
    assert manifest.counts["errors_by_code"] == {
        code: sum(1 for it in items if it.expected == code)
        for code in sorted({it.expected for it in items if not it.usable})
    }
    assert all(err["detail"].to_pylist())


def test_schema_and_metadata_travel(result):
    cfg, _ = result
    emb = _read(cfg.out, "embeddings")
    assert emb.column_names == [
        "product_id",
        "image_uri",
        "title",
        "category",
        "price",
        "embedding",
    ]
    assert emb.schema.field("embedding").type == schema.embedding_type(1280)
    row = emb.filter(pa.compute.equal(emb["product_id"], "p007")).to_pylist()[0]
    assert (row["title"], row["category"], row["price"]) == ("Product 7", "cat1", 7.0)
    vecs = schema.embedding_matrix(emb["embedding"])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_job_embeddings_equal_direct_calls(result):
    cfg, _ = result
    emb = _read(cfg.out, "embeddings")
    model = embedders.create(device="cpu")
    pixels = np.stack(
        [images.load(storage.read_bytes(u), model.preprocess) for u in emb["image_uri"].to_pylist()]
    )
    np.testing.assert_allclose(
        schema.embedding_matrix(emb["embedding"]), model.embed(pixels), atol=2e-5
    )


def test_exif_rotated_twin_matches_upright(result):
    cfg, _ = result
    emb = _read(cfg.out, "embeddings")
    by_pid = dict(
        zip(emb["product_id"].to_pylist(), schema.embedding_matrix(emb["embedding"]), strict=True)
    )
    cos = float(by_pid[f"odd-{EXIF_ROTATED}"] @ by_pid[f"odd-{UPRIGHT}"])
    assert cos >= 0.99


def test_rerun_skips_finished_partitions_and_redoes_lost_ones(result):
    cfg, first = result
    again = embed_job.run(cfg)
    assert again.timings["processed_this_run"] == 0
    assert again.counts == first.counts and again.embeddings == first.embeddings

    lost = storage.join(cfg.out, first.embeddings[1].path)
    storage.delete(lost)
    redo = embed_job.run(cfg)
    assert redo.timings["processed_this_run"] == PARTITION
    assert redo.counts == first.counts and redo.embeddings == first.embeddings
    emb = _read(cfg.out, "embeddings")
    pairs = list(zip(emb["product_id"].to_pylist(), emb["image_uri"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == first.counts["embedded"]


def test_other_catalog_into_same_out_is_refused(data, result, tmp_path):
    root, _, rows = data
    cfg, _ = result
    other = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist(rows[-5:]).drop_columns(["price"]), other)
    import dataclasses

    with pytest.raises(embed_job.JobError, match="different run"):
        embed_job.run(dataclasses.replace(cfg, catalog=str(other)))


def test_missing_catalog_fails_fast_naming_it(tmp_path, capsys):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(storage.StorageError, match="nope.parquet"):
        embed_job.run(embed_job.Config(catalog=missing, out=str(tmp_path / "o")))
    assert embed_job.main(["--catalog", missing, "--out", str(tmp_path / "o")]) == 2
    assert "nope.parquet" in capsys.readouterr().err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_invalid_catalog_fails_before_work(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("product_id,image_uri\na,a.jpg\n,b.jpg\n")
    with pytest.raises(catalog.CatalogError, match="row 2, column 'product_id'"):
        embed_job.run(embed_job.Config(catalog=str(bad), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()
