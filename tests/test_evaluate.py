"""jobs/evaluate.py end to end on a tiny real index.

A generated catalog (20 products in 3 categories, one with two photos) is embedded with the
default model by jobs/embed.py and indexed twice by jobs/build_index.py (2 shards, Flat: the
second build becomes CURRENT, the first stays complete but not current). jobs/make_queries.py
turns the catalog into instance-level queries. The instance recall@1 and predicted-category
accuracy the job reports are checked against a brute-force reference computed here from the
catalog vectors, with and without the geometric re-rank of the top 10 products.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import draw_product
from synthetic import read_in_manifest_order

from jobs import build_index, embed, evaluate, make_queries
from visual_search import catalog, embedders, images, query, storage, verify, versions

N_PRODUCTS = 20
CATEGORIES = ("bags", "lamps", "shoes")


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_catalog")
    rows = []
    for i in range(N_PRODUCTS):
        draw_product(i, (160, 120)).save(root / f"p{i:02d}.jpg", quality=95)
        rows.append(
            {"product_id": f"p{i:02d}", "image_uri": f"p{i:02d}.jpg", "category": CATEGORIES[i % 3]}
        )
    draw_product(500, (160, 120)).save(root / "p00-back.jpg", quality=95)
    rows.append({"product_id": "p00", "image_uri": "p00-back.jpg", "category": CATEGORIES[0]})
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    work = str(tmp_path_factory.mktemp("eval_work") / "emb")
    index_root = str(tmp_path_factory.mktemp("eval_index"))
    embed.run(embed.Config(catalog=str(root / "catalog.parquet"), out=work, batch_size=16))
    build = build_index.Config(embeddings=work, index_root=index_root, shards=2, factory="Flat")
    first = build_index.run(build).version
    current = build_index.run(build).version
    queries = str(tmp_path_factory.mktemp("eval_queries"))
    make_queries.run(make_queries.Config(catalog=str(root / "catalog.parquet"), out=queries))
    return {
        "index_root": index_root,
        "work": work,
        "first": first,
        "current": current,
        "queries": os.path.join(queries, "queries.parquet"),
    }


@pytest.fixture(scope="module")
def result(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval_out"))
    cfg = evaluate.Config(index_root=world["index_root"], queries=world["queries"], out=out)
    return evaluate.run(cfg), out


def reference(world, rerank: int, backdrop: bool = True) -> tuple[float, float]:
    """(instance recall@1, predicted-category accuracy) by brute force: embed each query (its
    backdrop balanced, as POST /search does), its 10 best products by inner product (best photo
    each), re-ranked by inliers with their photos."""
    pids, vectors = read_in_manifest_order(world["work"])
    version = versions.open_version(world["index_root"])
    uris = query.Docs.load(version).table["image_uri"].to_pylist()
    embedder = embedders.from_model_dict(version.manifest.model)
    table = catalog.read_catalog(world["queries"]).table.to_pylist()
    pixels = [
        images.load(storage.read_bytes(r["image_uri"]), embedder.preprocess, backdrop=backdrop)
        for r in table
    ]
    scores = embedder.embed(np.stack(pixels)) @ vectors.T
    categories = {r["product_id"]: r["category"] for r in table}
    hits, predicted = [], []
    for row, pix in zip(scores, pixels, strict=True):
        best: dict[str, dict] = {}
        for gid in np.argsort(-row, kind="stable").tolist():
            pid = pids[gid]
            best.setdefault(pid, {"id": gid, "product_id": pid, "score": float(row[gid])})
        top = list(best.values())[:10]
        if rerank:
            top = verify.rerank(
                top,
                verify.local_features(pix),
                lambda r: verify.read_features(uris[r["id"]], embedder.preprocess),
                rerank,
            )
        hits.append(top[0]["product_id"])
        predicted.append(
            verify.predicted_category([{**r, "category": categories[r["product_id"]]} for r in top])
        )
    truth = [(r["product_id"], r["category"]) for r in table]
    recall = np.mean([h == p for h, (p, _) in zip(hits, truth, strict=True)])
    accuracy = np.mean([g == c for g, (_, c) in zip(predicted, truth, strict=True)])
    return float(recall), float(accuracy)


def test_instance_and_category_metrics(world, result):
    report, _ = result
    assert report["version"] == world["current"]
    assert report["queries"] == N_PRODUCTS and report["errors"] == 0
    assert report["model"]["model_id"] == embedders.DEFAULT_MODEL
    for level in ("instance", "category"):
        summary = report[level]
        assert summary["queries"] == N_PRODUCTS
        for k in (1, 5, 10, 50):
            for key in (f"recall@{k}", f"precision@{k}", f"map@{k}"):
                assert 0 <= summary[key] <= 1, (level, key)
        assert summary["recall@1"] <= summary["recall@5"] <= summary["recall@50"]
    # One product per answer and 20 products in the index: every query finds its own by k=50.
    assert report["instance"]["recall@50"] == 1.0
    recall, accuracy = reference(world, rerank=10)  # Config's default, as the service's
    assert report["rerank"] == report["config"]["rerank"] == 10
    assert report["instance"]["recall@1"] == pytest.approx(recall)
    assert report["instance"]["recall@1"] >= 0.25  # chance is 1/20 (seeded: 0.45 when written)
    assert report["predicted_category_accuracy"] == pytest.approx(accuracy)
    # Category level: all 7 (or 6) products of the category are within the 20 answers.
    assert report["category"]["recall@50"] == 1.0
    assert set(report["per_category"]) == set(CATEGORIES)
    assert sum(e["queries"] for e in report["per_category"].values()) == N_PRODUCTS
    assert report["index_recall_at_10"] == 1.0  # Flat: the index is exact search
    for stage in ("decode", "embed", "search", "rerank"):
        assert report["latency_ms"][stage]["p50"] > 0
    worst = report["worst_categories"]
    assert worst["level"] == "instance" and worst["by"] == "map@10"
    assert [w["map@10"] for w in worst["rows"]] == sorted(w["map@10"] for w in worst["rows"])


def test_rerank_off(world, tmp_path, capsys):
    args = ["--index-root", world["index_root"], "--queries", world["queries"], "--rerank", "0"]
    assert evaluate.main(args + ["--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rerank"] == report["config"]["rerank"] == 0
    recall, accuracy = reference(world, rerank=0)
    assert report["instance"]["recall@1"] == pytest.approx(recall)
    assert report["config"]["backdrop_balance"] is True
    assert report["predicted_category_accuracy"] == pytest.approx(accuracy)
    assert report["latency_ms"]["rerank"] is None
    assert "- re-rank: off" in (tmp_path / "summary.md").read_text()
    assert "[evaluate] predicted category accuracy " in capsys.readouterr().out
    raw = tmp_path / "raw"
    assert evaluate.main(args + ["--no-backdrop-balance", "--out", str(raw)]) == 0
    report = json.loads((raw / "report.json").read_text())
    assert report["config"]["backdrop_balance"] is False
    recall, _ = reference(world, rerank=0, backdrop=False)
    assert report["instance"]["recall@1"] == pytest.approx(recall)
    with pytest.raises(evaluate.EvalError, match="--rerank must be >= 0"):
        evaluate.run(evaluate.Config(index_root=world["index_root"], leave_one_out=True, rerank=-1))


def test_report_files(result):
    report, out = result
    assert json.loads(storage.read_text(os.path.join(out, "report.json"))) == json.loads(
        json.dumps(report)
    )
    summary = storage.read_text(os.path.join(out, "summary.md"))
    assert "| instance (20 q) | recall@k |" in summary
    assert "worst categories by instance map@10" in summary
    assert "- re-rank: top 10 by geometric verification" in summary
    assert f"- predicted category accuracy: {report['predicted_category_accuracy']:.3f}" in summary
    assert storage.read_bytes(os.path.join(out, "recall.png")).startswith(b"\x89PNG")


def test_unreadable_query_is_an_error_not_a_crash(world, tmp_path):
    """Also: without a category column, instance metrics only, grouped by the docs' categories."""
    table = pq.read_table(world["queries"]).drop_columns(["category"]).to_pylist()
    root = os.path.dirname(world["queries"])
    for row in table:
        row["image_uri"] = os.path.join(root, row["image_uri"])
    table.append({**table[0], "image_uri": str(tmp_path / "missing.jpg")})
    (tmp_path / "garbage.jpg").write_bytes(b"not an image")
    table.append({**table[1], "image_uri": str(tmp_path / "garbage.jpg")})
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "queries.parquet")
    cfg = evaluate.Config(
        index_root=world["index_root"], queries=str(tmp_path / "queries.parquet"), ks=(1, 5)
    )
    report = evaluate.run(cfg)
    assert report["errors"] == 2 and report["queries"] == N_PRODUCTS + 2
    assert report["errors_by_code"] == {"not_an_image": 1, "read_error": 1}
    assert report["evaluated"] == N_PRODUCTS
    assert report["instance"]["queries"] == N_PRODUCTS
    assert set(report["instance"]) == {"queries", "no_relevant"} | {
        f"{m}@{k}" for m in ("recall", "precision", "map") for k in (1, 5)
    }
    assert report["category"] is None and report["predicted_category_accuracy"] is None
    assert set(report["per_category"]) == set(CATEGORIES)


def test_version_that_is_not_current(world, capsys):
    assert versions.current(world["index_root"]) != world["first"]
    cfg = evaluate.Config(
        index_root=world["index_root"], version=world["first"], queries=world["queries"], ks=(1,)
    )
    report = evaluate.run(cfg)
    assert report["version"] == world["first"]
    assert report["instance"]["recall@1"] is not None
    assert f"version {world['first']}" in capsys.readouterr().out


def test_leave_one_out(world, tmp_path, capsys):
    code = evaluate.main(
        ["--index-root", world["index_root"], "--leave-one-out", "--limit", "0", "--k", "1,5"]
        + ["--out", str(tmp_path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "[evaluate] category mAP@5 " in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "leave-one-out" and report["instance"] is None
    assert report["queries"] == N_PRODUCTS + 1 and report["errors"] == 0
    # The own product is excluded: with 7, 7 and 6 products per category, at most 6 others.
    cat = report["category"]
    assert cat["queries"] == N_PRODUCTS + 1
    assert 0 <= cat["map@5"] <= 1 and cat["recall@5"] >= cat["recall@1"]
    assert report["index_recall_at_10"] == 1.0
    assert report["latency_ms"]["embed"] is None and report["latency_ms"]["search"]["p50"] > 0
    # Like GET /products/{id}/similar, leave-one-out is not re-ranked; it predicts categories.
    assert report["rerank"] == 0 and report["latency_ms"]["rerank"] is None
    assert 0 <= report["predicted_category_accuracy"] <= 1
    # Like /similar, the own category's products come first: each category has 5 others.
    assert cat["precision@5"] == 1.0 and cat["recall@1"] == 1.0
    nearest = evaluate.run(
        evaluate.Config(world["index_root"], leave_one_out=True, limit=0, ks=(1, 5),
                        same_category=False)
    )  # fmt: skip
    assert nearest["config"]["same_category"] is False
    assert nearest["category"]["queries"] == N_PRODUCTS + 1


def test_without_the_embeddings_dataset(world, tmp_path):
    """Leave-one-out falls back to the vectors stored in the index; index recall is skipped."""
    root = tmp_path / "index"
    shutil.copytree(world["index_root"], root)
    manifest = root / "versions" / world["current"] / "manifest.json"
    m = json.loads(manifest.read_text())
    m["embeddings"]["uri"] = str(tmp_path / "gone")
    manifest.write_text(json.dumps(m))
    cfg = evaluate.Config(index_root=str(root), leave_one_out=True, ks=(1, 5))
    report = evaluate.run(cfg)
    assert report["index_recall_at_10"] is None
    assert "embeddings dataset unavailable" in report["index_recall_note"]
    reference = evaluate.run(dataclasses.replace(cfg, index_root=world["index_root"]))
    assert report["category"] == reference["category"]  # Flat: the stored vectors are exact


def test_category_only_ground_truth(world, tmp_path):
    table = pq.read_table(world["queries"])
    root = os.path.dirname(world["queries"])
    uris = [os.path.join(root, u) for u in table["image_uri"].to_pylist()]
    unknown = [f"query-{i}" for i in range(table.num_rows)]  # not products of the index
    table = pa.table(
        {"product_id": unknown, "image_uri": uris, "category": table["category"].to_pylist()}
    )
    pq.write_table(table, tmp_path / "q.parquet")
    report = evaluate.run(
        evaluate.Config(index_root=world["index_root"], queries=str(tmp_path / "q.parquet"))
    )
    assert report["instance"] is None
    assert report["category"]["queries"] == N_PRODUCTS
    assert report["worst_categories"]["level"] == "category"


def test_bad_input_exits_2_with_one_line(world, tmp_path, capsys):
    missing = str(tmp_path / "no-such-index")
    assert evaluate.main(["--index-root", missing, "--queries", world["queries"]]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"[evaluate] error: {missing}: index root not found"

    (tmp_path / "empty").mkdir()
    args = ["--index-root", str(tmp_path / "empty"), "--leave-one-out"]
    assert evaluate.main(args) == 2
    assert "no CURRENT version" in capsys.readouterr().err

    args = ["--index-root", world["index_root"], "--leave-one-out", "--version", "nope"]
    assert evaluate.main(args) == 2
    assert "no manifest.json" in capsys.readouterr().err

    args = ["--index-root", world["index_root"], "--queries", str(tmp_path / "none.parquet")]
    assert evaluate.main(args) == 2
    assert "none.parquet: not found" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--index-root", world["index_root"], "--k", "0,5", "--leave-one-out"])
    assert exc.value.code == 2
    with pytest.raises(evaluate.EvalError, match="exactly one"):
        evaluate.run(evaluate.Config(index_root=world["index_root"]))
