"""The quality gate of jobs/reindex.py: a new version is evaluated before CURRENT moves, and a
worse one is refused (non-zero exit, CURRENT kept, the report kept outside the version, the
refused version withdrawn)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import draw_product

from jobs import make_queries, reindex
from visual_search import embedders, heads, versions

N_PRODUCTS = 30


@pytest.fixture(scope="module")
def shop(ray_local, tmp_path_factory):
    """A 30-product catalog and an instance-level query set made from it."""
    root = tmp_path_factory.mktemp("gate")
    (root / "img").mkdir()
    rows = []
    for i in range(N_PRODUCTS):
        path = root / "img" / f"p{i:02d}.jpg"
        draw_product(i, (160, 120)).save(path, quality=95)
        rows.append({"product_id": f"p{i:02d}", "image_uri": str(path), "category": f"c{i % 3}"})
    catalog = str(root / "catalog.parquet")
    pq.write_table(pa.Table.from_pylist(rows), catalog)
    make_queries.run(make_queries.Config(catalog=catalog, out=str(root / "queries"), seed=1))
    return root, catalog, str(root / "queries" / "queries.parquet")


def gate_report(index_root: str, version: str) -> dict:
    with open(os.path.join(index_root, "evaluations", version, "gate.json")) as f:
        return json.load(f)


def evaluated(index_root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(index_root, "evaluations")))


def run_reindex(catalog, index_root, queries, *extra) -> int:
    return reindex.main(
        ["--catalog", catalog, "--index-root", index_root, "--eval-queries", queries, *extra]
    )


def test_gate_publishes_a_good_version_and_refuses_a_worse_one(shop, tmp_path, capsys):
    root, catalog, queries = shop
    index_root = str(tmp_path / "index")
    assert run_reindex(catalog, index_root, queries, "--min-recall", "0.5") == 0
    live = versions.current(index_root)
    first = gate_report(index_root, live)
    assert first["passed"] and first["live"] is None and first["level"] == "instance"
    assert first["recall_at_10"] >= 0.5
    assert os.path.exists(os.path.join(index_root, "evaluations", live, "report.json"))
    # Nothing is written into a version after its manifest.
    assert not os.path.exists(os.path.join(index_root, "versions", live, "evaluation"))

    # A worse model: the backbone squeezed through a random 2-d projection.
    torch.manual_seed(0)
    bad = heads.Head("linear", 1280, 2)
    bad_head = str(tmp_path / "bad.pt")
    heads.save(bad, bad_head, backbone=embedders.DEFAULT_MODEL)
    capsys.readouterr()
    assert run_reindex(catalog, index_root, queries, "--head", bad_head) == 2
    err = capsys.readouterr().err
    assert "quality gate refused" in err and f"CURRENT stays on {live}" in err
    assert versions.current(index_root) == live  # CURRENT did not move
    (refused,) = set(evaluated(index_root)) - {live}
    assert versions.list_versions(index_root) == {live: True}  # the refused one is withdrawn
    report = gate_report(index_root, refused)
    assert not report["passed"] and report["live"] == live
    assert report["recall_at_10"] < report["live_recall_at_10"] - report["gate"]["max_drop"]
    assert "below the live version" in report["reasons"][0]


def test_gate_refuses_below_min_recall_with_no_live_version(shop, tmp_path, capsys):
    _, catalog, queries = shop
    index_root = str(tmp_path / "index")
    assert run_reindex(catalog, index_root, queries, "--min-recall", "1.01") == 2
    assert "< --min-recall 1.01" in capsys.readouterr().err
    assert versions.current(index_root) is None  # nothing published
    assert versions.list_versions(index_root) == {}
    report = gate_report(index_root, evaluated(index_root)[-1])
    assert not report["passed"] and report["live"] is None
