"""The default app fits a 2-CPU machine (issue: a 4-shard index once asked 2.25 CPUs and
`serve run` waited forever): at AppArgs' defaults an 8-shard index starts and answers with every
shard, and reservations the cluster cannot hold are named in a warning before Serve waits."""

from __future__ import annotations

import io
import logging

import pytest
import requests
from conftest import draw_product, serve_ray, write_catalog
from ports import free_port

from jobs import build_index, embed

SHARDS = 8
KEY_ENV = "VISUAL_SEARCH_API_KEY"


@pytest.fixture(scope="module")
def index_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fits")
    catalog = write_catalog(root, n=24, size=(96, 80), categories=3)
    with serve_ray(KEY_ENV, "fits-key"):
        embed.run(embed.Config(catalog=catalog, out=str(root / "emb")))
        build_index.run(
            build_index.Config(
                embeddings=str(root / "emb"), index_root=str(root / "index"), shards=SHARDS
            )
        )
        yield str(root / "index")


@pytest.mark.timeout(240)  # an app that does not fit waits for CPUs forever
def test_default_app_with_8_shards_starts_on_2_cpus(index_root):
    import ray
    from ray import serve

    from serve.app import AppArgs, build_app

    assert ray.cluster_resources()["CPU"] == 2
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(index_root=index_root)), name="vs", route_prefix="/")
    photo = io.BytesIO()
    draw_product(5, (96, 80)).save(photo, format="JPEG", quality=95)
    r = requests.post(f"http://127.0.0.1:{port}/search", data=photo.getvalue(), timeout=60)
    assert r.status_code == 200, r.text[:300]
    body = r.json()
    assert body["coverage"] == {"shards": SHARDS, "of": SHARDS} and not body["partial"], body
    assert body["results"][0]["product_id"] == "p005", body["results"][:3]
    serve.delete("vs")


def test_reservations_over_the_cluster_are_named(index_root, caplog):
    from serve.app import AppArgs, build_app

    with caplog.at_level(logging.WARNING, logger="visual_search.app"):
        build_app(AppArgs(index_root=index_root, shard_cpus=0.5))  # 8 x 0.5 + 1.25
    assert "reserves 5.25 logical CPUs but the cluster has 2.00" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visual_search.app"):
        build_app(AppArgs(index_root=index_root))
    assert "logical CPUs" not in caplog.text, caplog.text
