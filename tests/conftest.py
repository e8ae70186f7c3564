"""Shared fixtures: one local Ray per test module, sample photos, generated images."""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid

import numpy as np
import pytest
from PIL import Image, ImageDraw
from ports import free_port

from visual_search import cluster

# Every Ray these tests start (local or `ray start --head`) inherits the environment: the
# service's data plane as in production (cluster.SERVE_ENV), with a short drain so that an
# ingress replica shuts down in 1 s instead of waiting Ray's 30 s for load balancers.
cluster.use_serve_env(drain_s=1)


# HAProxy's own metrics and stats listeners have fixed ports (9101, 8404): take free ones so a
# test run never collides with another Serve on this machine.
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))

SKLEARN_IMAGES = pathlib.Path(__import__("sklearn.datasets").datasets.__file__).parent / "images"
FLOWER = SKLEARN_IMAGES / "flower.jpg"
CHINA = SKLEARN_IMAGES / "china.jpg"


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for the module (never an address from the environment)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # address="local": never join a head node another test (or a person) started here.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def serve_ray(key_env: str, key: str):
    """A local Ray for a Serve app whose replicas see `key` in `key_env` (set before ray.init:
    they inherit the environment); Serve, then Ray, stopped and the variable restored after."""
    import ray
    from ray import serve

    previous = os.environ.get(key_env)
    os.environ[key_env] = key
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if previous is None:
                os.environ.pop(key_env, None)
            else:
                os.environ[key_env] = previous


def draw_product(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A deterministic 'product photo': coloured shapes on a light background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(10, size[0] // 2), y0 + rng.integers(10, size[1] // 2)
        colour = tuple(int(v) for v in rng.integers(0, 200, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    return img


def write_catalog(root: pathlib.Path, n: int, size: tuple[int, int], categories: int) -> str:
    """A catalog table of n drawn product photos (p000...), category c{i % categories}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        path = root / "img" / f"p{i:03d}.jpg"
        draw_product(i, size).save(path, quality=95)
        category = f"c{i % categories}"
        rows.append({"product_id": f"p{i:03d}", "image_uri": str(path), "category": category})
    catalog = str(root / "catalog.parquet")
    pq.write_table(pa.Table.from_pylist(rows), catalog)
    return catalog


@pytest.fixture(scope="module")
def s3():
    """One moto S3 server (127.0.0.1) for the test module."""
    from s3server import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path):
    """A fresh root URI on each backend: a temp folder, or a new prefix in the module's bucket."""
    if request.param == "local":
        return str(tmp_path / "index")
    return request.getfixturevalue("s3").uri(f"index-{uuid.uuid4().hex}")
