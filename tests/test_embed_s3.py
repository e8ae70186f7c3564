"""The embedding job reading its catalog from, and writing to, a real S3 protocol server."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pytest
from conftest import draw_product
from s3server import S3Server

from jobs import embed as embed_job
from visual_search import storage


@pytest.fixture(scope="module")
def s3_then_ray():
    # The server (and its fake credentials in the environment) come first, so that the Ray
    # workers started next inherit the credentials the way cluster nodes get theirs.
    with S3Server() as s3:
        import ray

        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield s3
        finally:
            ray.shutdown()


def test_embed_from_and_to_s3(s3_then_ray):
    s3 = s3_then_ray
    rows = []
    for i in range(6):
        buf = io.BytesIO()
        draw_product(i).save(buf, format="PNG")
        storage.write_bytes(s3.uri("shop", "images", f"p{i}.png"), buf.getvalue())
        rows.append({"product_id": f"p{i}", "image_uri": f"images/p{i}.png"})
    rows.append({"product_id": "gone", "image_uri": "images/missing.png"})
    storage.write_parquet(s3.uri("shop", "catalog.parquet"), pa.Table.from_pylist(rows))

    out = s3.uri("datasets", "emb-v1")
    cfg = embed_job.Config(catalog=s3.uri("shop", "catalog.parquet"), out=out, partition_size=4)
    manifest = embed_job.run(cfg)

    assert manifest.counts["input"] == 7
    assert manifest.counts["embedded"] == 6
    assert manifest.counts["errors_by_code"] == {"read_error": 1}
    keys = s3.keys(prefix="datasets/emb-v1/")
    assert "datasets/emb-v1/manifest.json" in keys
    assert {
        "datasets/emb-v1/embeddings/part-00000.parquet",
        "datasets/emb-v1/errors/part-00001.parquet",
    } <= set(keys)
    assert not [k for k in keys if ".tmp" in k or "write-probe" in k]
    emb = storage.read_parquet(storage.join(out, "embeddings", "part-00000.parquet"))
    assert emb["image_uri"].to_pylist()[0] == s3.uri("shop", "images", "p0.png")


def test_unreachable_bucket_fails_fast_naming_the_uri(s3_then_ray):
    with pytest.raises(storage.StorageError, match="s3://no-such-bucket-here/catalog.parquet"):
        embed_job.run(
            embed_job.Config(catalog="s3://no-such-bucket-here/catalog.parquet", out="/tmp/x")
        )
