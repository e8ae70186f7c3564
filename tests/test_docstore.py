"""docstore: a version's docs memory-mapped from this node's cache, with a sorted product index.

The version here is a stand-in with the three things docstore reads (its docs, its name and its
shards' checksums); every Serve and evaluation test loads real versions through the same path.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from visual_search import docstore, query


@dataclass
class FakeVersion:
    index_root: str
    name: str
    docs: pa.Table
    sums: tuple[str, ...] = ("a" * 64,)
    reads: list = field(default_factory=list)

    @property
    def root(self) -> str:
        return os.path.join(self.index_root, "versions", self.name)

    @property
    def manifest(self):
        count = self.docs.num_rows // len(self.sums)
        shards = [SimpleNamespace(sha256=s, count=count) for s in self.sums]
        return SimpleNamespace(version=self.name, shards=shards)

    def read_docs(self) -> pa.Table:
        self.reads.append(1)
        return self.docs


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")


def docs_table(n: int, seed: int = 0) -> pa.Table:
    """Shuffled rows; products of 1 to 5 photos, a unicode one, and a null."""
    rng = np.random.default_rng(seed)
    pids = [f"p{int(i):05d}" for i in rng.integers(0, n // 3, n)]
    pids[1], pids[2], pids[3] = "é-ü 商品", "é-ü 商品", None
    order = rng.permutation(n)
    table = pa.table(
        {
            "id": pa.array(np.arange(n), pa.int64()),
            "product_id": pa.array(pids, pa.string()),
            "title": pa.array([f"title {i}" for i in range(n)]),
        }
    )
    return table.take(pa.array(order))


def test_product_index_finds_what_a_column_scan_finds(tmp_path):
    version = FakeVersion(str(tmp_path / "root"), "v1", docs_table(3000))
    table, products = docstore.open_docs(version)
    assert table["id"].to_pylist() == list(range(3000))  # sorted by id: row == id
    pids = table["product_id"]
    for pid in [*{p for p in pids.to_pylist() if p}, "missing", "", "p0"]:
        scan = pc.indices_nonzero(pc.equal(pids, pid)).to_numpy()
        assert products.rows_of(pid).tolist() == scan.tolist(), pid
    assert products.rows_of("é-ü 商品").tolist() == [1, 2]
    assert len(products) == 2999  # the null product is not indexed


def test_a_second_open_maps_the_cached_files_without_reading_or_copying(tmp_path):
    version = FakeVersion(str(tmp_path / "root"), "v1", docs_table(60_000))
    docstore.open_docs(version)
    before = pa.total_allocated_bytes()
    table, products = docstore.open_docs(version)
    assert len(version.reads) == 1  # built once
    assert pa.total_allocated_bytes() - before < 1 << 16  # mapped, not in the heap
    assert table.num_rows == 60_000 and table.nbytes > 1 << 20
    assert table["title"][59_999].as_py() == "title 59999"


def test_large_versions_are_written_by_a_child_process(tmp_path, monkeypatch):
    """Past CHILD_ROWS the build runs in a child (its peak memory leaves with it): this
    process reads nothing, and maps the same files an in-process build writes."""
    monkeypatch.setattr(docstore, "CHILD_ROWS", 1000)
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))
    big = FakeVersion(str(tmp_path / "big"), "v1", docs_table(3000))
    table, products = docstore.open_docs(big)
    assert big.reads == []  # the child read the docs
    small = FakeVersion(str(tmp_path / "small"), "v1", docs_table(3000))
    monkeypatch.setattr(docstore, "CHILD_ROWS", 10_000)
    want, want_products = docstore.open_docs(small)
    assert len(small.reads) == 1
    assert table.equals(want)
    assert products.pids.equals(want_products.pids)
    assert products.rows.tolist() == want_products.rows.tolist()


def test_a_failed_child_build_raises_its_error_and_leaves_no_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(docstore, "CHILD_ROWS", 10)
    monkeypatch.setenv("PYTHONPATH", os.path.dirname(os.path.abspath(__file__)))
    gaps = docs_table(100).filter(pc.not_equal(docs_table(100)["id"], 7))  # ids not dense
    version = FakeVersion(str(tmp_path / "root"), "v1", gaps)
    with pytest.raises(RuntimeError, match="docs ids are not dense"):
        docstore.open_docs(version)
    assert not os.path.exists(os.path.join(docstore._folder(version), docstore.DOCS))


def test_other_shards_under_the_same_name_get_fresh_files(tmp_path):
    first = FakeVersion(str(tmp_path / "root"), "v1", docs_table(50, seed=1))
    docstore.open_docs(first)
    rebuilt = FakeVersion(first.index_root, "v1", docs_table(50, seed=2), sums=("b" * 64,))
    table, _ = docstore.open_docs(rebuilt)
    assert len(rebuilt.reads) == 1
    want = rebuilt.docs.sort_by("id")["product_id"].to_pylist()
    assert table["product_id"].to_pylist() == want


def test_evict_keeps_versions_in_use_and_drops_vanished_roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("v1", "v2", "v3"):
        docstore.open_docs(FakeVersion(str(root), name, docs_table(30)))
    table, products = docstore.open_docs(FakeVersion(str(root), "v1", docs_table(30)))
    gone = tmp_path / "gone"
    gone.mkdir()
    docstore.open_docs(FakeVersion(str(gone), "v9", docs_table(30)))
    gone.rmdir()

    removed = docstore.evict(str(root), {"v1", "v3"})
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [os.path.basename(docstore._folder(FakeVersion(str(root), "v2", docs_table(30)))),
         os.path.basename(docstore.cache_root(str(gone)))]
    )  # fmt: skip
    left = sorted(n.rsplit("-", 1)[0] for n in os.listdir(docstore.cache_root(str(root))))
    assert left == ["index_root.txt", "v1", "v3"]
    assert not os.path.exists(docstore.cache_root(str(gone)))
    pid = table["product_id"][0].as_py()
    assert 0 in products.rows_of(pid).tolist()  # files mapped before eviction stay readable


def test_docs_lookups_use_the_product_index(tmp_path):
    version = FakeVersion(str(tmp_path / "root"), "v1", docs_table(300))
    table, products = docstore.open_docs(version)
    docs = query.Docs("v1", table, products)
    pid = table["product_id"][10].as_py()
    assert 10 in docs.ids_of(pid).tolist()
    assert docs.product_of(10) == pid
    assert docs.rows([10])[0]["title"] == "title 10"
