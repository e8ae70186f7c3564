"""Per-shard BM25 text index: against a brute-force BM25, filters, save/load (local and S3)."""

from __future__ import annotations

import math
import os
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from visual_search import filters, fulltext, storage
from visual_search.fulltext import TextIndex, text_columns, tokenize

TITLES = [
    "Red floral summer dress",
    "Blue denim jacket for men",
    "Red running shoes",
    "Red floral summer dress",  # exact duplicate: a tie
    "Black leather boots",
    "Floral print cushion cover red",
    "Men's red T-shirt, cotton",
    None,
    "Blue cotton T-shirts pack of three",
    "Wooden table lamp",
    "Lamp shade, red fabric",
    "the and of",  # only stop words
]
CATS = ["Dresses", "Jackets", "Shoes", "Dresses", "Shoes", "Home", "Tshirts", "Shoes", None,
        "Home", "Home", "Misc"]  # fmt: skip
QUERIES = [
    "red floral dress",
    "red",
    "blue cotton t-shirt",
    "lamp",
    "shoes",
    "men red",
    "RED red Red",
    "dresses",
    "home lamp red",
    "zzz unknown words",
]


def _docs(first_id: int = 100) -> pa.Table:
    n = len(TITLES)
    return pa.table(
        {
            "id": pa.array(range(first_id, first_id + n), pa.int64()),
            "product_id": [f"p{i // 2}" for i in range(n)],
            "image_uri": [f"s3://b/img/{i}.jpg" for i in range(n)],
            "title": TITLES,
            "category": CATS,
            "price": [float(i) for i in range(n)],
        }
    )


def _reference(docs: pa.Table, query: str, allowed=None) -> dict[int, float]:
    """Lucene BM25 (k1=1.5, b=0.75) by hand over title + category; {id: score} of matches."""
    texts = [
        " ".join(x for x in (t, c) if x)
        for t, c in zip(docs["title"].to_pylist(), docs["category"].to_pylist(), strict=True)
    ]
    tokens = [tokenize(t) for t in texts]
    n, avg = len(tokens), sum(map(len, tokens)) / len(tokens)
    df = Counter(t for doc in tokens for t in set(doc))
    out = {}
    for doc_id, doc in zip(docs["id"].to_pylist(), tokens, strict=True):
        tf = Counter(doc)
        score = 0.0
        for term in set(tokenize(query)):
            if tf[term]:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                norm = fulltext.K1 * (1 - fulltext.B + fulltext.B * len(doc) / avg)
                score += idf * tf[term] / (tf[term] + norm)
        if score > 0 and (allowed is None or doc_id in allowed):
            out[doc_id] = score
    return out


def _check_against_reference(scores, ids, ref: dict[int, float], k: int):
    """Same results as the reference, up to the order of ties (as faiss' check with draws)."""
    assert scores.dtype == np.float32 and ids.dtype == np.int64 and len(ids) == k
    n = min(k, len(ref))
    assert (ids[n:] == -1).all() and np.isneginf(scores[n:]).all()
    found = ids[:n].tolist()
    assert len(set(found)) == n and all(i in ref for i in found)
    np.testing.assert_allclose(scores[:n], [ref[i] for i in found], rtol=1e-5)
    assert (np.diff(scores[:n]) <= 1e-6).all()
    if n:
        kth = scores[n - 1]
        must = {i for i, s in ref.items() if s > kth + 1e-5}
        assert must <= set(found)
    for a, b in zip(found, found[1:], strict=False):  # exact ties go to the smaller id
        if scores[found.index(a)] == scores[found.index(b)]:
            assert a < b


def test_tokenize_and_columns():
    assert tokenize("The Men's RUNNING Shoes, t-shirts!") == [
        "men",
        "s",
        "run",
        "shoe",
        "t",
        "shirt",
    ]
    assert tokenize("the and of") == [] and tokenize("") == []
    assert tokenize("Ｒｅｄ") == ["red"]  # NFKC
    assert text_columns(_docs()) == ["title", "category"]
    assert text_columns(pa.table({"colour": ["x"], "title": ["t"], "thumb_uri": ["u"]})) == [
        "title",
        "colour",
    ]


@pytest.mark.parametrize("k", [1, 2, 3, 5, 20])
def test_matches_brute_force_bm25(k):
    docs = _docs()
    index = TextIndex.build(docs)
    for query in QUERIES:
        scores, ids = index.search(query, k)
        _check_against_reference(scores, ids, _reference(docs, query), k)


def test_tie_is_broken_by_id():
    index = TextIndex.build(_docs(first_id=0))
    scores, ids = index.search("red floral summer dress", 2)
    assert ids.tolist() == [0, 3] and scores[0] == scores[1]


@pytest.mark.parametrize("k, shuffled", [(1, False), (3, False), (10, False), (3, True)])
def test_allowed_ids_restrict_and_still_fill_k(k, shuffled):
    docs = _docs()
    if shuffled:  # ids not a contiguous range
        ids = np.random.default_rng(0).permutation(1000)[: docs.num_rows].astype(np.int64)
        docs = docs.set_column(0, "id", pa.array(ids))
    index = TextIndex.build(docs)
    f = filters.parse("category:Home|Shoes", filters.filterable_columns(docs))
    allowed = f.ids(docs)
    for query in QUERIES:
        ref = _reference(docs, query, allowed=set(allowed.tolist()))
        scores, ids = index.search(query, k, allowed_ids=allowed)
        _check_against_reference(scores, ids, ref, k)
        assert set(ids[ids >= 0].tolist()) <= set(allowed.tolist())
    scores, ids = index.search("red", 3, allowed_ids=np.array([], np.int64))
    assert (ids == -1).all()
    outside = np.array([-5, 10**9, docs["id"][2].as_py()], np.int64)  # unknown ids are ignored
    assert index.search("red", 3, allowed_ids=outside)[1].tolist() == [
        docs["id"][2].as_py(),
        -1,
        -1,
    ]


def test_matching_keeps_the_docs_near_the_best_score():
    """A words filter's docs: a score at least MATCH_SHARE of the best doc's, by the reference."""
    docs = _docs()
    index = TextIndex.build(docs)
    for query in QUERIES:
        ref = _reference(docs, query)
        best = max(ref.values(), default=0.0)
        expected = sorted(i for i, s in ref.items() if s >= fulltext.MATCH_SHARE * best - 1e-5)
        assert index.matching(query).tolist() == expected, query
    # "red" names a dress once in a long title and once in a short one: both match; the rest
    # have no "red" at all.
    assert index.matching("red").tolist() == [100, 102, 103, 105, 106, 110]
    assert index.matching("the and of").tolist() == []
    with pytest.raises(ValueError):
        index.matching("x" * (fulltext.MAX_QUERY_CHARS + 1))


def test_empty_queries_and_limits():
    index = TextIndex.build(_docs())
    for query in ["", "   ", "the of and", "!!!", "qqqq"]:
        scores, ids = index.search(query, 4)
        assert (ids == -1).all() and np.isneginf(scores).all()
    assert index.search("red", 0)[1].shape == (0,)
    index.search("x" * fulltext.MAX_QUERY_CHARS, 3)
    with pytest.raises(ValueError, match="at most 500"):
        index.search("x" * (fulltext.MAX_QUERY_CHARS + 1), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search("red", -1)


def test_docs_without_text_and_empty_shards(tmp_path):
    for docs in [
        pa.table({"id": pa.array([1, 2], pa.int64()), "title": [None, "the"]}),
        pa.table({"id": pa.array([], pa.int64()), "title": pa.array([], pa.string())}),
        pa.table({"id": pa.array([3], pa.int64()), "price": [1.0]}),
    ]:
        index = TextIndex.build(docs)
        assert (index.search("red", 2)[1] == -1).all()
        folder = str(tmp_path / uuid.uuid4().hex)
        index.save(folder)
        again = TextIndex.load(folder)
        assert (again.search("red", 2)[1] == -1).all() and len(again) == docs.num_rows
    with pytest.raises(ValueError, match="'id'"):
        TextIndex.build(pa.table({"title": ["x"]}))
    with pytest.raises(ValueError, match="colour"):
        TextIndex.build(_docs(), columns=["colour"])


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_build_step_round_trip(backend, tmp_path, request):
    if backend == "local":
        root = str(tmp_path / "v1")
    else:
        root = request.getfixturevalue("s3").uri(f"v-{uuid.uuid4().hex}")
    docs = _docs()
    storage.write_parquet(storage.join(root, "docs/shard-00002.parquet"), docs)
    record = fulltext.build_shard_from_docs(root, 2, "docs/shard-00002.parquet")
    assert record["folder"] == "text/shard-00002" and record["count"] == docs.num_rows
    folder = storage.join(root, record["folder"])
    meta = storage.read_json(storage.join(folder, fulltext.META_FILE))
    assert set(record["files"]) == {*meta["files"], fulltext.META_FILE}
    for name, rec in record["files"].items():
        data = storage.read_bytes(storage.join(folder, name))
        assert len(data) == rec["size"]
    built, loaded = TextIndex.build(docs), fulltext.load_shard(root, record)
    assert loaded.columns == ["title", "category"]
    for query in QUERIES:
        for got, want in zip(loaded.search(query, 5), built.search(query, 5), strict=True):
            np.testing.assert_array_equal(got, want)
    stale = {**record, "files": {fulltext.META_FILE: {"sha256": "0" * 64}}}
    with pytest.raises(ValueError, match="meta.json: sha256 mismatch"):
        fulltext.load_shard(root, stale)
    with pytest.raises(ValueError, match="expected 3"):
        fulltext.load_shard(root, {**record, "count": 3})


def test_load_detects_corruption(tmp_path):
    folder = str(tmp_path / "t")
    TextIndex.build(_docs()).save(folder)
    with open(os.path.join(folder, fulltext.IDS_FILE), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    with pytest.raises(ValueError, match="sha256"):
        TextIndex.load(folder)
    meta_path = os.path.join(folder, fulltext.META_FILE)
    meta = storage.read_json(meta_path)
    meta["format"] = 99
    storage.write_json(meta_path, meta)
    with pytest.raises(ValueError, match="format 99"):
        TextIndex.load(folder)
