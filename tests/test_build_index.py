"""jobs/build_index.py on local Ray with synthetic embeddings datasets (tests/synthetic.py).

Happy path (Flat and IVF, 3 shards), merged shards == one exact index, a crash at every step
leaves CURRENT on the previous complete version, pruning, invalid datasets, the recall gate and
the command line. Failures inside Ray tasks are injected by replacing the task functions as the
driver sees them (jobs/build_index.py wraps them with ray.remote at call time); the
replacements live at module level here so Ray can pickle them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import sys

import faiss
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle
from synthetic import clustered_vectors, read_in_manifest_order, write_embeddings_dataset

from jobs import build_index
from visual_search import dedup, filters, index, query, shards, storage, versions
from visual_search.embeddings import DatasetError
from visual_search.manifest import IndexManifest
from visual_search.search import merge_topk

N, D, SHARDS = 600, 32, 3
FACTORIES = ("Flat", "IVF16,Flat")
TEXT_FILES = (
    "data.csc.index.npy",
    "ids.npy",
    "indices.csc.index.npy",
    "indptr.csc.index.npy",
    "meta.json",
    "params.index.json",
    "vocab.index.json",
)


# Ray workers cannot import this module (tests/ is not on their sys.path): ship the
# fault-injection stand-ins below by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class InjectedFailure(RuntimeError):
    """Raised by the fault-injection stand-ins below."""


# ----------------------------------------------------------------- fault-injection stand-ins
# (module level, so Ray can pickle them; they run in Ray worker processes)


def train_fails(*args, **kwargs):
    raise InjectedFailure("injected: training failed")


def fill_fails_on_shard_1(dataset, template, i, *args):
    if i == 1:
        raise InjectedFailure("injected: fill of shard 1 failed")
    return shards.fill_shard(dataset, template, i, *args)


def fill_with_torn_write_on_shard_1(dataset, template, i, *args):
    """Shard 1's index file write dies half way through (storage error mid-shard)."""
    if i != 1:
        return shards.fill_shard(dataset, template, i, *args)

    def torn_write(idx, uri):
        data = index.to_bytes(idx)
        with storage.staged_file(uri) as path:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise InjectedFailure(f"injected: storage write of {uri} failed mid-file")

    real = index.write_index
    index.write_index = torn_write  # this worker process only; restored below
    try:
        return shards.fill_shard(dataset, template, i, *args)
    finally:
        index.write_index = real


def verify_fails(*args, **kwargs):
    raise InjectedFailure("injected: verification failed")


def _raise_in_driver(*args, **kwargs):
    raise InjectedFailure("injected: driver-side step failed")


# --------------------------------------------------------------------------------- helpers


def cfg_for(embeddings: str, index_root: str, **kw) -> build_index.Config:
    kw.setdefault("shards", SHARDS)
    kw.setdefault("factory", "Flat")
    return build_index.Config(embeddings=str(embeddings), index_root=str(index_root), **kw)


def version_dirs(index_root) -> list[str]:
    folder = os.path.join(str(index_root), "versions")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def read_current(index_root) -> str | None:
    path = pathlib.Path(index_root, "CURRENT")
    return path.read_text().strip() if path.exists() else None


def assert_nothing_new_published(index_root, live: str | None) -> None:
    """CURRENT still names `live` (or is absent), `live` opens and loads, and no other version
    folder is complete (has a manifest.json)."""
    assert read_current(index_root) == live
    assert versions.current(str(index_root)) == live
    if live is not None:
        v = versions.open_version(str(index_root))
        assert v.manifest.version == live
        for i in range(len(v.manifest.shards)):
            assert v.load_shard(i).ntotal == v.manifest.shards[i].count
        assert v.read_docs().num_rows == v.manifest.count
    for name in version_dirs(index_root):
        if name != live:
            manifest = os.path.join(str(index_root), "versions", name, "manifest.json")
            assert not os.path.exists(manifest), f"{name} has a manifest but was never published"


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def search_version(v: versions.Version, queries: np.ndarray, k: int):
    parts = [v.load_shard(i).search(queries, k) for i in range(len(v.manifest.shards))]
    return merge_topk(parts, k, v.manifest.metric)


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """600 clustered vectors in 12 parts, listed in the manifest in a shuffled order."""
    root = tmp_path_factory.mktemp("emb")
    order = [int(i) for i in np.random.default_rng(7).permutation(N // 50)]
    assert order != sorted(order)
    write_embeddings_dataset(root, clustered_vectors(N, D, seed=1), manifest_order=order)
    return str(root)


@pytest.fixture(scope="module")
def builds(ray_local, dataset, tmp_path_factory):
    """factory -> (index_root, manifest) of one 3-shard build each."""
    out = {}
    for factory in FACTORIES:
        root = tmp_path_factory.mktemp("idx-" + factory.replace(",", "-"))
        manifest = build_index.run(cfg_for(dataset, root, factory=factory, target_recall=0.95))
        out[factory] = (str(root), manifest)
    return out


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return write_embeddings_dataset(root, clustered_vectors(120, 16, seed=3), part_rows=40)


@pytest.fixture(scope="module")
def published_a(ray_local, small_dataset, tmp_path_factory):
    """An index root with one complete, live version A (Flat, 2 shards)."""
    root = tmp_path_factory.mktemp("root-a")
    manifest = build_index.run(cfg_for(small_dataset, root, shards=2))
    return str(root), manifest.version


@pytest.fixture
def root_with_a(published_a, tmp_path):
    """A private copy of the index root holding version A."""
    src, version = published_a
    dst = tmp_path / "index"
    shutil.copytree(src, dst)
    return str(dst), version


# ------------------------------------------------------------------------------ happy path


@pytest.mark.parametrize("factory", FACTORIES)
def test_build_publishes_a_complete_version(builds, dataset, factory):
    index_root, manifest = builds[factory]
    version = manifest.version
    assert read_current(index_root) == version
    folder = os.path.join(index_root, "versions", version)
    assert version_dirs(index_root) == [version]
    files = sorted(
        os.path.relpath(os.path.join(dp, f), folder) for dp, _, fs in os.walk(folder) for f in fs
    )
    expected = [f"docs/shard-{i:05d}.parquet" for i in range(SHARDS)]
    expected += ["manifest.json", "template.faiss", "texttower.pt"]  # the docs have titles
    expected += [f"shard-{i:05d}.faiss" for i in range(SHARDS)]
    expected += [f"text/shard-{i:05d}/{f}" for i in range(SHARDS) for f in TEXT_FILES]
    assert files == sorted(expected)  # and no temp files left behind

    on_disk = IndexManifest.read(folder)
    assert on_disk == manifest
    assert json.loads(pathlib.Path(folder, "manifest.json").read_text())["version"] == version
    assert (manifest.factory, manifest.dim, manifest.metric) == (factory, D, "ip")
    assert manifest.model["model_id"] == "synthetic"
    assert manifest.count == N
    assert sum(s.count for s in manifest.shards) == N
    assert manifest.recall["recall_at_10"] >= manifest.recall["target"] == 0.95
    if factory == "Flat":
        assert manifest.search_params == {}
    else:
        assert 1 <= manifest.search_params["nprobe"] <= 16

    # Shard files: checksums and sizes as recorded; ids dense and contiguous 0..n-1.
    assert [s.file for s in manifest.shards] == [f"shard-{i:05d}.faiss" for i in range(SHARDS)]
    next_id = 0
    for rec in manifest.shards:
        path = os.path.join(folder, rec.file)
        assert sha256(path) == rec.sha256
        assert os.path.getsize(path) == rec.bytes
        lo, hi = rec.id_range
        assert lo == next_id and hi - lo == rec.count > 0
        next_id = hi
    assert next_id == N

    # Docs: id i -> the i-th row of the dataset in manifest file order.
    pids, vecs = read_in_manifest_order(dataset)
    all_ids = []
    for rec in manifest.shards:
        docs = pq.read_table(os.path.join(folder, rec.docs))
        assert "embedding" not in docs.column_names
        assert {"id", "product_id", "image_uri", "category", "title"} <= set(docs.column_names)
        ids = docs["id"].to_numpy()
        assert docs.schema.field("id").type == "int64"
        np.testing.assert_array_equal(ids, np.arange(*rec.id_range))
        assert docs["product_id"].to_pylist() == [pids[i] for i in ids]
        assert docs["image_uri"].to_pylist() == [f"images/{pids[i]}.jpg" for i in ids]
        all_ids.append(ids)
    np.testing.assert_array_equal(np.concatenate(all_ids), np.arange(N))

    # Readers: open through CURRENT, load every shard, search; a dataset vector finds itself.
    v = versions.open_version(index_root)
    assert v.manifest == manifest
    for i, rec in enumerate(manifest.shards):
        shard = v.load_shard(i)
        assert shard.ntotal == rec.count
        # The shard holds exactly its global ids: each of its vectors finds its own id.
        lo, hi = rec.id_range
        _, got = shard.search(vecs[lo:hi], 1)
        np.testing.assert_array_equal(got[:, 0], np.arange(lo, hi))
    probe = np.array([0, 1, 199, 200, 201, 399, 400, 457, 599])
    scores, ids = search_version(v, vecs[probe], 10)
    np.testing.assert_array_equal(ids[:, 0], probe)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
    assert [v.read_docs()["product_id"][int(i)].as_py() for i in ids[:, 0]] == [
        pids[i] for i in probe
    ]


@pytest.mark.parametrize("factory", FACTORIES)
def test_merged_shards_equal_one_exact_index(builds, dataset, factory):
    """Global ids and one shared template: the merged top-k of the shards is the top-k of one
    unsharded exact index (IVF searched with every list probed)."""
    index_root, manifest = builds[factory]
    _, vecs = read_in_manifest_order(dataset)
    rng = np.random.default_rng(11)
    queries = rng.standard_normal((25, D)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    queries = np.concatenate([queries, vecs[[3, 250, 598]] + 0.01])

    exact = faiss.IndexFlatIP(D)
    exact.add(vecs)
    want_scores, want_ids = exact.search(queries, 10)

    v = versions.open_version(index_root)
    parts, centroids = [], []
    for i in range(SHARDS):
        shard = v.load_shard(i)
        if index.is_ivf(shard):
            ivf = faiss.extract_index_ivf(shard)
            index.apply_params(shard, {"nprobe": ivf.nlist})
            centroids.append(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        parts.append(shard.search(queries, 10))
    for c in centroids[1:]:  # one template: every shard has the same coarse quantizer
        np.testing.assert_array_equal(c, centroids[0])
    got_scores, got_ids = merge_topk(parts, 10, "ip")
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory", (*FACTORIES, "IDMap,IVF16,PQ8x4fs,RFlat"))
def test_every_stored_vector_reads_back_by_global_id(builds, dataset, factory, tmp_path):
    """GET /products/{id}/similar and the dedup job read a vector back by its global id: for
    IVF shards whose ids do not start at 0, and for the IDMap over a Refine stage that catalogs
    above 50,000 items get (FAISS cannot reconstruct through an IDMap; the Refine stage's
    flat copy gives the exact vector)."""
    if factory in builds:
        index_root, _ = builds[factory]
    else:
        index_root = str(tmp_path / "index")
        build_index.run(cfg_for(dataset, index_root, factory=factory, target_recall=0.0))
    _, vecs = read_in_manifest_order(dataset)
    v = versions.open_version(index_root)
    probe = []
    for i, entry in enumerate(v.manifest.shards):
        lo, hi = entry.id_range
        shard = query.ShardIndex(v, i)
        for gid in (lo, (lo + hi) // 2, hi - 1):
            np.testing.assert_allclose(shard.reconstruct(gid), vecs[gid], atol=1e-6)
        probe += [lo, hi - 1]
    rows = [index.rows_of(v.load_shard(i), *s.id_range) for i, s in enumerate(v.manifest.shards)]
    got = dedup._exact_vectors(v, None, np.array(probe), rows)
    np.testing.assert_allclose(got, vecs[probe], atol=1e-6)


@pytest.mark.parametrize("factory", FACTORIES)
def test_filtered_search_without_tombstones_is_exact(builds, dataset, factory):
    """ShardIndex.search with a category filter and tombstoned ids: the top-k of exactly the
    shard's items of that category that are not dead, however large a share they are."""
    index_root, _ = builds[factory]
    _, vecs = read_in_manifest_order(dataset)
    v = versions.open_version(index_root)
    q = vecs[[5, 300, 555]] + 0.01
    for i in range(SHARDS):
        shard = query.ShardIndex(v, i)
        ids, names = shard.docs["id"].to_pylist(), shard.docs["category"].to_pylist()
        cats = dict(zip(ids, names, strict=True))
        for cat, dead in (("cat2", []), ("cat2", sorted(cats)[::3]), ("cat0|cat1|cat3", [1, 2])):
            flt = filters.Filter((filters.Condition("category", "in", tuple(cat.split("|"))),))
            ok = [g for g, c in cats.items() if c in cat.split("|") and g not in set(dead)]
            exact = faiss.IndexFlatIP(D)
            exact.add(vecs[ok])
            want = np.array(ok)[exact.search(q, 10)[1]]
            _, got = shard.search(q, 10, flt, np.array(dead, np.int64))
            assert got.tolist() == want.tolist(), (i, cat, len(dead))


# ------------------------------------------------------------------- crash at every step


def _patch_train(mp):
    mp.setattr(build_index, "train_template", train_fails)


def _patch_fill(mp):
    mp.setattr(build_index, "fill_shard", fill_fails_on_shard_1)


def _patch_write(mp):
    mp.setattr(build_index, "fill_shard", fill_with_torn_write_on_shard_1)


def _patch_verify(mp):
    mp.setattr(build_index, "verify_shard", verify_fails)


def _patch_manifest(mp):
    mp.setattr(IndexManifest, "write", _raise_in_driver)


def _patch_current(mp):
    mp.setattr(versions, "set_current", _raise_in_driver)


CRASHES = {  # step -> (patch, what the error must say)
    "train": (_patch_train, "injected: training failed"),
    "fill": (_patch_fill, "injected: fill of shard 1 failed"),
    "storage-write-mid-shard": (_patch_write, "injected: storage write of .*shard-00001.faiss"),
    "verify": (_patch_verify, "injected: verification failed"),
    "manifest-write": (_patch_manifest, "injected: driver-side step failed"),
    "current-move": (_patch_current, "injected: driver-side step failed"),
}


@pytest.mark.parametrize("step", list(CRASHES))
def test_crash_leaves_current_on_previous_version(
    ray_local, small_dataset, root_with_a, monkeypatch, step
):
    index_root, a = root_with_a
    patch, message = CRASHES[step]
    patch(monkeypatch)
    # From a Ray task it comes back as RayTaskError(InjectedFailure): match the message.
    with pytest.raises(RuntimeError, match=message):
        build_index.run(cfg_for(small_dataset, index_root, shards=2))
    monkeypatch.undo()

    if step != "current-move":
        assert_nothing_new_published(index_root, a)
    else:
        # A crash between manifest.json and CURRENT necessarily leaves a complete version that
        # was never published; it must not be live, and A must stay live and loadable.
        new = [name for name in version_dirs(index_root) if name != a]
        assert len(new) == 1
        assert read_current(index_root) == a
        v = versions.open_version(index_root)
        assert v.manifest.version == a and v.load_shard(1).ntotal == v.manifest.shards[1].count

    if step == "storage-write-mid-shard":
        (new,) = [name for name in version_dirs(index_root) if name != a]
        folder = os.path.join(index_root, "versions", new)
        assert not os.path.exists(os.path.join(folder, "shard-00001.faiss"))
        assert not [f for f in os.listdir(folder) if f.endswith("shard-00001.faiss")]


def test_failed_pruning_does_not_fail_the_build(ray_local, small_dataset, root_with_a, monkeypatch):
    index_root, a = root_with_a
    monkeypatch.setattr(versions, "prune", _raise_in_driver)
    manifest = build_index.run(cfg_for(small_dataset, index_root, shards=2, keep=1))
    monkeypatch.undo()
    assert read_current(index_root) == manifest.version != a
    assert versions.open_version(index_root).load_shard(0).ntotal > 0
    assert versions.list_versions(index_root) == {a: True, manifest.version: True}


# --------------------------------------------------------------------------------- pruning


def test_version_ids_sort_in_creation_order():
    """prune() and "newest" rely on name order; ids made within one second must sort too."""
    ids = [versions.new_version_id() for _ in range(40)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_pruning_keeps_the_newest_complete_versions(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "RECENT_S", 0.0)  # no version counts as still served
    data = write_embeddings_dataset(tmp_path / "emb", clustered_vectors(40, 8, seed=5))
    index_root = tmp_path / "index"
    dead = index_root / "versions" / "00000000T000000Z-dead"
    dead.mkdir(parents=True)
    (dead / "shard-00000.faiss").write_bytes(b"half a file")
    in_flight = index_root / "versions" / "99991231T235959Z-next"  # a newer build, still going
    in_flight.mkdir()
    (in_flight / "shard-00000.faiss").write_bytes(b"being written")

    published = []
    for _ in range(5):
        m = build_index.run(cfg_for(data, index_root, shards=1, keep=2))
        published.append(m.version)
        assert read_current(index_root) == m.version
        assert not dead.exists()
    assert len(set(published)) == 5
    assert versions.list_versions(str(index_root)) == {
        published[-2]: True,
        published[-1]: True,
        in_flight.name: False,
    }
    assert read_current(index_root) == published[-1]
    v = versions.open_version(str(index_root), published[-2])
    assert v.load_shard(0).ntotal == 40


@pytest.mark.parametrize(
    "bad", ["../../etc", "/etc/passwd", "a/b", "..", "v\\..\\x", "s3://other/bucket", "x" * 200]
)
def test_current_and_manifest_names_are_validated(root_with_a, bad):
    """CURRENT and the manifest's file names are data others wrote: a name that climbs out of
    the index root (or its version folder) is refused with a message, never followed."""
    root, version = root_with_a
    current = pathlib.Path(root, "CURRENT")
    current.write_text(bad + "\n")
    with pytest.raises(ValueError, match="not a version id"):
        versions.current(root)
    with pytest.raises(ValueError, match="not a version id"):
        versions.open_version(root, bad)
    current.write_text(version + "\n")
    manifest = pathlib.Path(root, "versions", version, "manifest.json")
    good = json.loads(manifest.read_text())
    # Shard and docs files may sit in sub-folders (docs/shard-00000.parquet), nowhere else.
    for key in ("file", "docs") if bad not in ("a/b", "x" * 200) else ():
        m = json.loads(json.dumps(good))
        m["shards"][1][key] = bad
        manifest.write_text(json.dumps(m))
        with pytest.raises(ValueError, match="not a relative path inside the version"):
            versions.open_version(root)
    manifest.write_text(json.dumps(good))
    assert versions.open_version(root).manifest.version == version
    # A stray folder under versions/ is not a version: listed and pruned never.
    stray = pathlib.Path(root, "versions", "..x")
    stray.mkdir()
    assert list(versions.list_versions(root)) == [version]
    assert versions.prune(root, 1, version) == [] and stray.exists()


def _complete_version(index_root, name: str) -> None:
    folder = pathlib.Path(index_root, "versions", name)
    folder.mkdir(parents=True)
    (folder / "shard-00000.faiss").write_bytes(b"x")
    (folder / "manifest.json").write_text("{}")


def test_prune_keep_zero_is_refused(tmp_path):
    names = [f"2026010{i}T000000Z-aaaaaa" for i in range(1, 4)]
    for name in names:
        _complete_version(tmp_path, name)
    (tmp_path / "CURRENT").write_text(names[-1] + "\n")
    with pytest.raises(ValueError, match="keep must be >= 1"):
        versions.prune(str(tmp_path), 0, names[-1])
    assert versions.list_versions(str(tmp_path)) == dict.fromkeys(names, True)


# ------------------------------------------------------------------------ invalid datasets


def _edit_manifest(root, fn) -> None:
    path = pathlib.Path(root, "manifest.json")
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def _no_manifest(root):
    os.remove(os.path.join(root, "manifest.json"))
    return "manifest.json"


def _count_mismatch(root):
    _edit_manifest(root, lambda m: m["counts"].update(embedded=m["counts"]["embedded"] + 5))
    return "105"


def _rows_mismatch(root):
    _edit_manifest(root, lambda m: m["embeddings"][1].update(rows=7))
    return "part-00001.parquet"


def _corrupt_manifest(root):
    pathlib.Path(root, "manifest.json").write_text('{"format_version": 1, "model": ')
    return "manifest.json"


def _unknown_format(root):
    _edit_manifest(root, lambda m: m.update(format_version=99))
    return "format_version"


def _part_deleted(root):
    os.remove(os.path.join(root, "embeddings", "part-00001.parquet"))
    return "part-00001.parquet"


INVALID = {
    "no-manifest": (_no_manifest, None),
    "corrupt-manifest": (_corrupt_manifest, None),
    "unknown-format": (_unknown_format, None),
    "counts-mismatch": (_count_mismatch, None),
    "rows-mismatch": (_rows_mismatch, None),
    "part-deleted": (_part_deleted, None),
    "mixed-dimensions": (lambda root: "part-00001.parquet", {1: 24}),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_dataset_fails_clearly_and_publishes_nothing(tmp_path, case):
    edit, dims = INVALID[case]
    root = write_embeddings_dataset(
        tmp_path / "emb", clustered_vectors(100, 16, seed=2), part_rows=40, dim_override=dims
    )
    named = edit(root)
    index_root = tmp_path / "index"
    with pytest.raises(DatasetError) as err:
        build_index.run(cfg_for(root, index_root, shards=1))
    assert named in str(err.value)
    assert str(tmp_path / "emb") in str(err.value)
    assert read_current(index_root) is None
    assert_nothing_new_published(index_root, None)


def test_missing_dataset_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        build_index.run(cfg_for(missing, tmp_path / "index", shards=1))
    assert not (tmp_path / "index").exists() or read_current(tmp_path / "index") is None


def test_zero_embeddings(tmp_path):
    root = write_embeddings_dataset(tmp_path / "emb", np.zeros((0, 16), np.float32))
    with pytest.raises(DatasetError, match="no embeddings") as err:
        build_index.run(cfg_for(root, tmp_path / "index", shards=1))
    assert root in str(err.value)
    assert read_current(tmp_path / "index") is None


def test_more_shards_than_vectors(tmp_path):
    root = write_embeddings_dataset(tmp_path / "emb", clustered_vectors(3, 8))
    with pytest.raises(build_index.BuildError, match="3 vectors cannot fill 4 shards"):
        build_index.run(cfg_for(root, tmp_path / "index", shards=4))
    assert read_current(tmp_path / "index") is None


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_vector_fails_and_keeps_current(ray_local, root_with_a, tmp_path, bad):
    index_root, a = root_with_a
    x = clustered_vectors(120, 16, seed=3)
    x[77, 5] = bad
    root = write_embeddings_dataset(tmp_path / "emb", x, part_rows=40)
    with pytest.raises(DatasetError, match="NaN/inf") as err:
        build_index.run(cfg_for(root, index_root, shards=2))
    assert root in str(err.value)
    assert "id 77" in str(err.value) and "part-00001.parquet row 37" in str(err.value)
    assert_nothing_new_published(index_root, a)


# ----------------------------------------------------------------------------- recall gate


def test_unreachable_recall_target_publishes_nothing(ray_local, dataset, tmp_path):
    index_root = tmp_path / "index"
    cfg = cfg_for(dataset, index_root, factory="IVF16,PQ2x4", target_recall=0.99)
    with pytest.raises(build_index.BuildError, match="recall") as err:
        build_index.run(cfg)
    assert "0.99" in str(err.value)
    assert read_current(index_root) is None
    assert_nothing_new_published(index_root, None)


# ------------------------------------------------------------------ text indexes, filterable


def test_text_indexes_and_filterable_are_in_the_manifest(builds):
    """One BM25 index per shard, listed with checksums that match the files, found by title."""
    index_root, manifest = builds["Flat"]
    assert manifest.filterable == {"category": "string"}
    assert manifest.text["columns"] == ["title", "category"]
    v = versions.open_version(index_root)
    assert v.filterable == {"category": "string"} and v.has_text
    for i, (shard, rec) in enumerate(zip(manifest.shards, manifest.text["shards"], strict=True)):
        assert rec["folder"] == f"text/shard-{i:05d}" and rec["count"] == shard.count
        assert sorted(rec["files"]) == sorted(TEXT_FILES)
        for name, f in rec["files"].items():
            path = pathlib.Path(v.root, rec["folder"], name)
            assert (sha256(path), path.stat().st_size) == (f["sha256"], f["size"])
        text = v.load_text(i)
        docs = v.read_docs(i)
        assert text.ids.tolist() == docs.column("id").to_pylist()
        titles = dict(zip(docs["id"].to_pylist(), docs["title"].to_pylist(), strict=True))
        for gid in shard.id_range[0], shard.id_range[1] - 1:
            _, ids = text.search(titles[gid], 5)
            assert ids[0] == gid  # the only doc with that number in its title
    assert manifest.timings["text_s"] > 0


def test_corrupt_text_index_is_refused(builds, tmp_path):
    src, manifest = builds["Flat"]
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    v = versions.open_version(str(root))
    path = pathlib.Path(v.root, "text/shard-00001/ids.npy")
    ids = np.load(path)
    ids[0] += 1
    np.save(path, ids)
    assert v.load_text(0) is not None
    with pytest.raises(ValueError, match="sha256"):
        v.load_text(1)


def test_no_text_skips_text_indexes(ray_local, small_dataset, tmp_path):
    manifest = build_index.run(cfg_for(small_dataset, tmp_path, shards=2, text=False))
    v = versions.open_version(str(tmp_path))
    assert manifest.text is None and v.load_text(0) is None and not v.has_text
    assert manifest.filterable == {"category": "string"}
    assert not os.path.exists(os.path.join(v.root, "text"))


def test_no_string_columns_means_no_text_index(ray_local, tmp_path):
    root = tmp_path / "emb"
    n = 60
    metadata = {"price": [float(k % 7) for k in range(n)]}
    write_embeddings_dataset(root, clustered_vectors(n, 8, seed=2), metadata=metadata)
    manifest = build_index.run(cfg_for(root, tmp_path / "idx", shards=2))
    assert manifest.text is None
    assert manifest.filterable == {"price": "number"}


def test_manifest_without_text_fields_still_loads(root_with_a):
    """Versions written before filters and text search keep opening."""
    root, version = root_with_a
    path = pathlib.Path(root, "versions", version, "manifest.json")
    m = json.loads(path.read_text())
    del m["filterable"], m["text"]
    path.write_text(json.dumps(m))
    v = versions.open_version(root)
    assert v.manifest.text is None and v.filterable == {} and v.load_text(0) is None
    assert v.load_shard(0).ntotal == v.manifest.shards[0].count


# ---------------------------------------------------------------------------- command line


def test_main_builds_and_returns_0(ray_local, small_dataset, tmp_path, capsys):
    index_root = str(tmp_path / "index")
    rc = build_index.main(
        ["--embeddings", small_dataset, "--index-root", index_root, "--shards", "2"]
    )
    assert rc == 0
    version = read_current(index_root)
    assert version is not None and f"published {version}" in capsys.readouterr().out
    assert versions.open_version(index_root).manifest.shards[1].id_range == (60, 120)


def test_main_rejects_zero_shards(small_dataset, tmp_path, capsys):
    argv = ["--embeddings", small_dataset, "--index-root", str(tmp_path), "--shards", "0"]
    assert build_index.main(argv) == 2
    assert "[build_index] error: --shards must be >= 1" in capsys.readouterr().err


def test_main_reports_a_missing_dataset(tmp_path, capsys):
    missing = str(tmp_path / "no-such-dataset")
    rc = build_index.main(["--embeddings", missing, "--index-root", str(tmp_path / "index")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "[build_index] error:" in err and "no-such-dataset" in err
    assert read_current(tmp_path / "index") is None


def test_shard_docs_are_its_rows_of_the_mapped_docs(builds):
    """ShardIndex.docs is its id range of the node's mapped docs (not a heap copy), and
    ids_of finds a product's ids in this shard by the sorted product index."""
    index_root, _ = builds[FACTORIES[0]]
    v = versions.open_version(index_root)
    for i, entry in enumerate(v.manifest.shards):
        shard = query.ShardIndex(v, i)
        want = v.read_docs(i).sort_by("id")
        assert shard.docs["id"].to_pylist() == list(range(*entry.id_range))
        assert shard.docs.select(want.column_names).equals(want.combine_chunks())
        for pid in want["product_id"].to_pylist()[::37] + ["no-such-product"]:
            scan = want.filter(pc.equal(want["product_id"], pid))["id"].to_numpy()
            np.testing.assert_array_equal(shard.ids_of(pid), scan)
