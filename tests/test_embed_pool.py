"""The warm embedding actor pool: reuse across jobs, idle exit, a killed actor's blocks redone,
decoding in the actors or in Ray Data tasks giving the same vectors."""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_catalog

from jobs import embed as embed_job
from visual_search import embed_pool, embedders, images, schema, storage

N = 40


@pytest.fixture(scope="module")
def catalog_uri(tmp_path_factory):
    return write_catalog(tmp_path_factory.mktemp("cat"), N, (96, 80), categories=4)


def _pool(keep_warm_s: float = 300.0, mode: str = "pad", threads=None) -> embed_pool.Pool:
    name = embedders.DEFAULT_MODEL
    build = functools.partial(embedders.create, name, random_weights=True, preprocess_mode=mode)
    model = embedders.describe(name, random_weights=True, preprocess_mode=mode)
    return embed_pool.Pool(build, model, threads=threads, keep_warm_s=keep_warm_s)


def _blocks(catalog_uri: str, size: int = 8) -> list[pa.Table]:
    uris = storage.read_parquet(catalog_uri)["image_uri"]
    table = pa.table({"row": pa.array(range(len(uris)), pa.int64()), "image_uri": uris})
    return [table.slice(i, size) for i in range(0, len(table), size)]


def _decode_args(mode: str = "pad") -> tuple:
    return embedders.preprocess_for(embedders.DEFAULT_MODEL, mode), images.Limits()


def _pid(pool: embed_pool.Pool) -> int:
    import ray

    return ray.get(pool.actors[0].info.remote())["pid"]


def test_a_second_job_finds_the_actors_warm_and_another_model_gets_its_own(ray_local):
    first = _pool().start()
    assert first.started["actors"] == 1 and first.started["actors_warm"] == 0
    again = _pool().start()
    assert again.started["actors_warm"] == 1 and _pid(again) == _pid(first)
    other = _pool(mode="crop").start()  # other preprocessing: another actor
    assert other.started["actors_warm"] == 0 and _pid(other) != _pid(first)


def test_ordered_map_embeds_every_row_in_input_order_as_the_model_would(ray_local, catalog_uri):
    pool = _pool().start()
    out = pa.concat_tables(pool.map(_blocks(catalog_uri), _decode_args(), ordered=True))
    assert out["row"].to_pylist() == list(range(N)) and out["embedding"].null_count == 0
    uris = storage.read_parquet(catalog_uri)["image_uri"].to_pylist()
    emb = embedders.create(random_weights=True)
    pixels = np.stack([images.load(storage.read_bytes(u), emb.preprocess) for u in uris[:4]])
    got = schema.embedding_matrix(out["embedding"])[:4]
    np.testing.assert_allclose(got, emb.embed(pixels), atol=1e-4)


def test_an_actor_killed_mid_job_loses_no_block(ray_local, catalog_uri):
    pool = _pool().start()
    victim = _pid(pool)
    blocks = _blocks(catalog_uri, size=4)
    outputs = pool.map(blocks, _decode_args())
    done = [next(outputs)]
    os.kill(victim, signal.SIGKILL)
    done += list(outputs)
    rows = pa.concat_tables(done)["row"].to_pylist()
    assert sorted(rows) == list(range(N))  # each block once, the lost ones redone
    assert _pid(pool) != victim  # a new actor under the same name


def test_an_idle_actor_exits_after_keep_warm_s(ray_local):
    pool = _pool(keep_warm_s=1.0, threads=1).start()  # a new actor (t1), not a warm one
    name = pool._name(pool.placements[0])
    deadline = time.monotonic() + 30
    while embed_pool._find(name) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert embed_pool._find(name) is None


def test_release_idle_frees_the_actors_for_a_job_that_needs_their_gpus(ray_local):
    pool = _pool().start()
    name = pool._name(pool.placements[0])
    time.sleep(0.3)
    assert embed_pool.release_idle(min_idle_s=0.1) >= 1
    deadline = time.monotonic() + 20
    while embed_pool._find(name) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert embed_pool._find(name) is None


def test_decoding_in_ray_data_tasks_gives_the_actors_own_vectors(ray_local, catalog_uri, tmp_path):
    runs = {}
    for mode in ("actors", "tasks"):
        out = str(tmp_path / mode)
        cfg = embed_job.Config(catalog=catalog_uri, out=out, random_weights=True, decode=mode)
        manifest = embed_job.run(cfg)
        assert manifest.counts["embedded"] == N
        table = storage.read_parquet(storage.join(out, manifest.embeddings[0].path))
        runs[mode] = schema.embedding_matrix(table["embedding"])
    np.testing.assert_allclose(runs["actors"], runs["tasks"], atol=1e-5)
