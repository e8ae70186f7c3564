"""jobs/compact.py on local Ray: folding the update log (Contract 5) into a new version.

The reference: a version compacted from live version + log equals a fresh build, from the same
template, of the catalog the log describes (written here with plain pyarrow): same docs, same
ids and scores for seeded queries. Plus: nothing to compact, deletes and re-upserts, segment
retirement across two compactions, metadata that does not fit, vectors of another model.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synthetic import clustered_vectors, product_id, write_embeddings_dataset

from jobs import build_index, compact
from visual_search import embeddings, storage, updates, versions
from visual_search.manifest import EmbeddingsManifest, FileRecord
from visual_search.search import merge_topk
from visual_search.updates import DELETE, UPSERT, Position, Update, Writer

N, D, SHARDS, FACTORY = 400, 16, 2, "IVF8,Flat"


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    return write_embeddings_dataset(root, clustered_vectors(N, D, seed=1), part_rows=100)


@pytest.fixture(scope="module")
def published(ray_local, base_dataset, tmp_path_factory):
    """An index root whose live version (IVF, 2 shards) has no update folded in yet."""
    root = tmp_path_factory.mktemp("root")
    cfg = build_index.Config(
        embeddings=base_dataset, index_root=str(root), shards=SHARDS, factory=FACTORY
    )
    build_index.run(cfg)
    return str(root)


@pytest.fixture
def root(published, tmp_path):
    """A private copy of the published index root."""
    dst = tmp_path / "index"
    shutil.copytree(published, dst)
    return str(dst)


def vec(seed: int) -> np.ndarray:
    return clustered_vectors(1, D, seed=seed)[0]


def upsert(pid: str, seed: int, model: str | None = None, **metadata) -> Update:
    """An upsert with a vector; model None: the live version's (filled in by `append`)."""
    return Update(UPSERT, pid, f"img/{pid}-{seed}.jpg", metadata, vec(seed), model)


def append(root: str, *batches: list[Update]) -> Position:
    """Write each batch as one segment, as the service does (a writer starts where the live
    version's log position is: segments before it may be retired); returns the tail."""
    live = versions.open_version(root).manifest
    key = updates.model_key(live.model)
    w = Writer(root, Position.of(live.updates_through), D)
    for batch in batches:
        w.append([dataclasses.replace(u, model=u.model or key) for u in batch])
    return w.position


def reference_dataset(out, base: str, log: list[Update]) -> str:
    """The catalog after the log, written independently of jobs/compact.py: the base rows of
    untouched products in order, then each product whose last update is an upsert, by seq."""
    manifest = EmbeddingsManifest.read(base)
    table = pa.concat_tables(pq.read_table(os.path.join(base, r.path)) for r in manifest.embeddings)
    last = {}
    for u in log:
        last.pop(u.product_id, None)
        last[u.product_id] = u
    kept = table.filter(pa.array([p not in last for p in table["product_id"].to_pylist()]))
    ups = [u for u in last.values() if u.op == UPSERT]
    new = pa.table(
        {
            "product_id": [u.product_id for u in ups],
            "image_uri": [u.image_uri for u in ups],
            "category": pa.array([u.metadata.get("category") for u in ups], pa.string()),
            "title": pa.array([u.metadata.get("title") for u in ups], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack([u.vector for u in ups]).reshape(-1)), D
            ),
        }
    ).cast(kept.schema)
    os.makedirs(os.path.join(out, "embeddings"))
    pq.write_table(pa.concat_tables([kept, new]), os.path.join(out, "embeddings", "all.parquet"))
    n = kept.num_rows + new.num_rows
    EmbeddingsManifest(
        model=manifest.model,
        catalog=manifest.catalog,
        counts={"input": n, "embedded": n, "errors": 0, "errors_by_code": {}},
        partition_size=n,
        embeddings=[FileRecord("embeddings/all.parquet", n)],
        errors=[],
        timings={},
    ).write(str(out))
    return str(out)


def search(v: versions.Version, queries: np.ndarray, k: int = 10) -> list[list[tuple]]:
    """Per query, the top k as sorted (score rounded, id) pairs: ties may come in any order."""
    parts = [v.load_shard(i).search(queries, k) for i in range(len(v.manifest.shards))]
    scores, ids = merge_topk(parts, k, v.manifest.metric)
    return [
        sorted(zip(np.round(s, 5).tolist(), i.tolist(), strict=True))
        for s, i in zip(scores, ids, strict=True)
    ]


def segments(root: str) -> list[int]:
    folder = os.path.join(root, "updates", "segments")
    return sorted(int(name.split(".")[0]) for name in os.listdir(folder))


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "ops, touched, survivors",
    [
        ([("upsert", "a"), ("delete", "a")], {"a"}, []),
        ([("delete", "a"), ("upsert", "a")], {"a"}, ["a"]),
        ([("upsert", "b"), ("upsert", "a"), ("upsert", "b")], {"a", "b"}, ["a", "b"]),
        ([("delete", "x")], {"x"}, []),
    ],
)
def test_last_upserts(ops, touched, survivors):
    log = [Update(op, pid, seq=i + 1) for i, (op, pid) in enumerate(ops)]
    got_touched, got = compact.last_upserts(log)
    assert got_touched == touched and [u.product_id for u in got] == survivors


def test_compacted_version_equals_a_fresh_build_from_the_same_template(root, tmp_path, capsys):
    live = versions.open_version(root)
    assert Position.of(live.manifest.updates_through) == Position() and live.manifest.template
    tail = append(
        root,
        [
            upsert(product_id(3), 101, title="new 3", category="cat9", colour="red"),
            upsert("n1", 102, title="N1"),  # a new product; category missing -> null
            Update(DELETE, product_id(7)),
            upsert("n2", 103, title="N2"),
        ],
        [
            Update(DELETE, "n2"),  # upserted, then deleted: gone
            Update(DELETE, product_id(10)),
            upsert(product_id(10), 104, title="back", category="cat1"),  # deleted, re-upserted
            Update(DELETE, "never-seen"),
        ],
    )
    manifest = compact.run(compact.Config(index_root=root))
    assert "dropped: colour" in capsys.readouterr().out
    assert versions.current(root) == manifest.version != live.manifest.version
    assert manifest.updates_through == tail.as_dict() == {"seq": 8, "segment": 2}
    assert manifest.template["sha256"] == live.manifest.template["sha256"]
    assert (manifest.factory, len(manifest.shards)) == (FACTORY, SHARDS)

    log = [u for _, found in updates.follow(root, Position()) for u in found]
    ref_data = reference_dataset(tmp_path / "ref", live.manifest.embeddings["uri"], log)
    ref_root = str(tmp_path / "ref-index")
    template = os.path.join(live.root, "template.faiss")
    ref_cfg = build_index.Config(
        ref_data, ref_root, shards=SHARDS, factory=FACTORY, template=template
    )
    build_index.run(ref_cfg)
    got, want = versions.open_version(root), versions.open_version(ref_root)
    assert got.read_docs().to_pylist() == want.read_docs().to_pylist()
    assert got.manifest.count == N  # 3 base products gone, 2 of them back and 1 new
    docs = {r["product_id"]: r for r in got.read_docs().to_pylist()}
    assert docs[product_id(3)]["title"] == "new 3" and docs["n1"]["category"] is None
    assert "n2" not in docs and product_id(7) not in docs and docs[product_id(10)]["id"] == N - 1
    assert got.manifest.search_params == want.manifest.search_params
    queries = np.concatenate([clustered_vectors(20, D, seed=9), np.stack([vec(101), vec(104)])])
    assert search(got, queries) == search(want, queries)
    assert search(got, vec(104)[None], 1)[0][0][1] == docs[product_id(10)]["id"]


def test_nothing_to_compact_publishes_nothing(root, capsys):
    before = versions.current(root)
    assert compact.run(compact.Config(index_root=root)) is None
    assert "nothing to compact" in capsys.readouterr().out
    assert versions.current(root) == before
    assert list(versions.list_versions(root)) == [before]
    assert compact.main(["--index-root", root]) == 0


def test_a_second_compaction_retires_the_first_ones_segments(root, monkeypatch):
    monkeypatch.setattr(versions, "RECENT_S", 0.0)  # no version counts as still served
    append(root, [upsert("a", 1)], [upsert("b", 2)])
    first = compact.run(compact.Config(index_root=root))
    assert first.updates_through == {"seq": 2, "segment": 2}
    assert segments(root) == [1, 2]  # the version before had folded in nothing: none retired
    append(root, [Update(DELETE, "a")], [upsert("c", 3)])
    second = compact.run(compact.Config(index_root=root))
    assert second.updates_through == {"seq": 4, "segment": 4}
    assert segments(root) == [3, 4]  # a service still on `first` can catch up from here
    assert updates.floor(root) == Position(2, 2)  # so no writer re-creates segments 1 and 2
    tail, found = compact.read_log(root, Position.of(first.updates_through))
    assert [u.seq for u in found] == [3, 4] and tail == Position(4, 4)
    pids = set(versions.open_version(root).read_docs()["product_id"].to_pylist())
    assert {"b", "c"} <= pids and "a" not in pids
    append(root, [upsert("d", 4)])
    assert compact.run(compact.Config(index_root=root, min_updates=2)) is None  # 1 pending
    assert compact.run(compact.Config(index_root=root, keep=1)).updates_through["seq"] == 5
    assert segments(root) == [5]
    # keep=1 pruned the base and `first` (the previous live one stays): the dataset `first` was
    # built from is used by no version and made from one that is gone, so it is deleted.
    names = versions.list_versions(root)
    left = {versions.open_version(root, v).manifest.embeddings["uri"] for v in names}
    folders = sorted(os.listdir(os.path.join(root, "compactions")))
    assert len(left) == 2 and first.embeddings["uri"] not in left
    assert folders == sorted(os.path.basename(u) for u in left)


def test_metadata_that_does_not_fit_the_catalog_is_refused(root):
    append(root, [upsert("a", 1, category=5)])
    with pytest.raises(compact.CompactError, match="'category' does not fit"):
        compact.run(compact.Config(index_root=root))
    assert compact.main(["--index-root", root]) == 2


def test_vectors_of_another_model_need_re_embedding(root):
    """The synthetic model cannot embed photos: the refusal names how many rows are at stake."""
    append(root, [upsert("a", 1, model="another"), upsert("b", 2)])
    before = versions.current(root)
    with pytest.raises(compact.CompactError, match="1 upsert.s. need re-embedding"):
        compact.run(compact.Config(index_root=root))
    assert versions.current(root) == before


def test_no_live_version_is_an_error(tmp_path):
    with pytest.raises(compact.CompactError, match="no CURRENT"):
        compact.run(compact.Config(index_root=str(tmp_path)))
    assert storage.exists(str(tmp_path))


@pytest.mark.slow
def test_upserts_without_a_live_model_vector_are_embedded_again(ray_local, tmp_path):
    """A real model (efficientnet_lite0, the offline default): the photo of an upsert that
    carries no vector is embedded with the live version's model, as the embed job would."""
    from conftest import draw_product

    from visual_search import embedders, images

    model = embedders.describe("efficientnet_lite0")
    data = write_embeddings_dataset(tmp_path / "emb", clustered_vectors(40, model["dim"], seed=2))
    manifest = EmbeddingsManifest.read(data)
    dataclasses.replace(manifest, model=model).write(data)
    root = str(tmp_path / "index")
    build_index.run(build_index.Config(data, root, factory="Flat", text=False))
    photo = str(tmp_path / "new.jpg")
    draw_product(5).save(photo, quality=95)
    Writer(root, Position(), model["dim"]).append([Update(UPSERT, "new", photo, {})])

    compact.run(compact.Config(index_root=root))
    docs = versions.open_version(root).read_docs()
    assert docs["product_id"].to_pylist()[-1] == "new"
    ds = embeddings.open_dataset(versions.open_version(root).manifest.embeddings["uri"])
    _, got = ds.read_ids(np.array([ds.count - 1]))
    embedder = embedders.from_model_dict(model)
    want = embedder.embed(images.load(pathlib.Path(photo).read_bytes(), embedder.preprocess)[None])
    np.testing.assert_allclose(got, want, atol=1e-5)
