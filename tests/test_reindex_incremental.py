"""Incremental re-index (jobs/reindex.py): after a full re-index, a changed catalog embeds only
its new or changed rows, reuses the live model and template, and publishes the version a full
re-index of the same catalog would (same docs, same vectors); a reused template that misses the
recall target is retrained; the version records the update log's tail at the start."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import draw_product, write_catalog

from jobs import build_index, reindex
from visual_search import index, updates, versions

N = 24
SIZE = (120, 96)


def run_reindex(catalog: str, index_root: str, *extra: str) -> int:
    return reindex.main(["--catalog", catalog, "--index-root", index_root, *extra])


def changed_catalog(root, catalog: str) -> str:
    """The catalog with p003's photo replaced, p010 removed and a new p999 appended."""
    draw_product(1000, SIZE).save(root / "img" / "p003.jpg", quality=95)
    draw_product(999, SIZE).save(root / "img" / "p999.jpg", quality=95)
    rows = [r for r in pq.read_table(catalog).to_pylist() if r["product_id"] != "p010"]
    rows.append(
        {"product_id": "p999", "image_uri": str(root / "img" / "p999.jpg"), "category": "c0"}
    )
    out = str(root / "catalog-v2.parquet")
    pq.write_table(pq.read_table(catalog).from_pylist(rows), out)
    return out


def vectors_and_docs(index_root: str):
    """The published version's vectors (by id) and docs."""
    version = versions.open_version(index_root)
    shard = version.load_shard(0, mmap=False)
    vectors = np.stack([shard.reconstruct(i) for i in range(shard.ntotal)])
    return version.manifest, vectors, version.read_docs().to_pylist()


@pytest.fixture(scope="module")
def shop(ray_local, tmp_path_factory):
    """A full re-index of a 24-product catalog, then the changed catalog (one photo replaced, one
    row removed, one added) and an update acknowledged before the second re-index starts."""
    root = tmp_path_factory.mktemp("incremental")
    catalog = write_catalog(root, N, SIZE, 3)
    index_root = str(root / "index")
    assert run_reindex(catalog, index_root) == 0
    first = versions.open_version(index_root).manifest
    writer = updates.Writer(index_root, updates.Position(), first.dim)
    writer.append([updates.Update("DELETE", "p005")])
    return root, catalog, changed_catalog(root, catalog), index_root, first


def test_incremental_embeds_only_changed_rows_and_matches_a_full_reindex(shop, tmp_path, capsys):
    root, _, catalog, index_root, first = shop
    capsys.readouterr()
    assert run_reindex(catalog, index_root) == 0
    out = capsys.readouterr().out
    assert f"incremental re-index: live version {first.version} has the same base model" in out
    assert f"2 of {N} rows new or changed, {N - 2} reused" in out
    assert "[tune]" not in out  # the tuning stage is skipped on the incremental path
    inc, inc_vectors, inc_docs = vectors_and_docs(index_root)
    counts = inc.embeddings["counts"]
    assert counts["embedded_this_run"] == 2 and counts["reused"] == N - 2
    assert counts["embedded"] == N and counts["input"] == N
    assert inc.template["sha256"] == first.template["sha256"]  # the template was reused
    assert "reusing the live version's template (Flat)" in out
    assert inc.model == first.model
    assert inc.updates_through == {"seq": 1, "segment": 1}

    full_root = str(tmp_path / "full")
    assert run_reindex(catalog, full_root, "--full") == 0
    assert "full re-index: --full" in capsys.readouterr().out
    full, full_vectors, full_docs = vectors_and_docs(full_root)
    assert inc_docs == full_docs
    assert [d["product_id"] for d in inc_docs][-1] == "p999"
    np.testing.assert_allclose(inc_vectors, full_vectors, atol=1e-5)
    assert (inc.factory, inc.count) == (full.factory, full.count)


def test_a_reused_template_below_the_recall_target_is_retrained(shop, tmp_path, capsys):
    root, catalog, changed, _, _ = shop
    index_root = str(tmp_path / "index")
    assert run_reindex(catalog, index_root, "--factory", "SQ8", "--no-tune") == 0
    live = versions.open_version(index_root).manifest
    # A live version filled from a scalar quantizer trained on noise 100x wider than the
    # vectors: every component falls into one or two of its 256 steps.
    noise = np.random.default_rng(0).normal(0, 10, (256, live.dim)).astype(np.float32)
    bad = index.train(index.make_template("SQ8", live.dim, "ip"), noise)
    bad_uri = str(tmp_path / "bad.faiss")
    with open(bad_uri, "wb") as f:
        f.write(index.to_bytes(bad))
    cfg = build_index.Config(
        live.embeddings["uri"], index_root, factory="SQ8", template=bad_uri, target_recall=0.0
    )
    bad_live = build_index.run(cfg)
    assert bad_live.recall["recall_at_10"] < 0.9
    capsys.readouterr()
    assert run_reindex(changed, index_root, "--factory", "SQ8", "--target-recall", "0.9") == 0
    out = capsys.readouterr().out
    assert "reusing the live version's template (SQ8)" in out
    assert "the reused template failed (recall@10" in out and "retraining the template" in out
    new = versions.open_version(index_root).manifest
    assert new.template["sha256"] != bad_live.template["sha256"]
    assert new.recall["recall_at_10"] >= 0.9 and new.timings["train_vectors"] > 0
    # p003 changed before this test's first re-index: only the new p999 is embedded.
    assert new.embeddings["counts"]["embedded_this_run"] == 1


def test_a_dataset_without_content_keys_takes_the_full_path_then_nothing_is_embedded(
    shop, tmp_path, capsys
):
    root, catalog, _, _, _ = shop
    index_root = str(tmp_path / "index")
    assert run_reindex(catalog, index_root, "--no-tune") == 0
    live = versions.open_version(index_root).manifest
    os.remove(os.path.join(live.embeddings["uri"], "content_keys.parquet"))
    capsys.readouterr()
    assert run_reindex(catalog, index_root, "--no-tune") == 0
    out = capsys.readouterr().out
    assert "full re-index: the embeddings" in out and "have no content keys" in out
    assert os.path.exists(os.path.join(live.embeddings["uri"], "content_keys.parquet"))
    # Nothing changed since: the live embeddings are used as they are.
    assert run_reindex(catalog, index_root) == 0
    out = capsys.readouterr().out
    assert f"0 of {N} rows new or changed" in out and "[embed]" not in out
    assert versions.open_version(index_root).manifest.embeddings["uri"] == live.embeddings["uri"]


LITE0 = {"model_id": "efficientnet_lite0", "weights": "sha256:a", "dim": 1280,
         "preprocess": {"size": 224, "mode": "pad"}}  # fmt: skip


@pytest.mark.parametrize(
    "live, requested, mismatch",
    [
        (LITE0, LITE0, None),
        ({**LITE0, "weights": "sha256:tuned", "weights_uri": "/m/b.pt", "tuning": {}}, LITE0, None),
        ({**LITE0, "preprocess": {"size": 224, "mode": "crop"}}, LITE0, "preprocess"),
        ({**LITE0, "model_id": "resnet50", "weights": "sha256:r"}, LITE0, "model_id, weights"),
        ({**LITE0, "head": {"sha256": "sha256:h", "tuning": {}}}, LITE0, None),
        ({**LITE0, "head": {"sha256": "sha256:h"}}, LITE0, "head"),
        (LITE0, {**LITE0, "weights": "sha256:b"}, "weights"),
    ],
)
def test_model_mismatch(live, requested, mismatch):
    got = reindex.model_mismatch(live, requested)
    assert got == (mismatch and f"the live model differs from the requested one in {mismatch}")
