"""texttower.py: the LiT-style text tower on synthetic clustered vectors (no Ray, no photos).

Each cluster has a word that only half of its titles carry; the tower, trained with the image
side frozen, must find the other half through their vectors, which BM25 cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pyarrow as pa
import pytest

from jobs import build_index
from visual_search import embeddings, fulltext, manifest, query, texttower, tuning

WORDS = ("zorblat", "quennic", "vashtor", "plimmo", "drexil", "sunwove")
PER_CLUSTER, D = 40, 32
SMALL = texttower.Settings(buckets=1 << 12, width=32, hidden=64, epochs=30, batch=64, device="cpu")


def clustered_docs(per_cluster: int = PER_CLUSTER, seed: int = 0):
    """(docs, vectors, cluster of each row): titles name the cluster word on even rows only."""
    rng = np.random.default_rng(seed)
    centres = np.eye(D)[: len(WORDS)]  # orthogonal: each cluster its own look
    cluster = np.repeat(np.arange(len(WORDS)), per_cluster)
    vectors = tuning.unit(centres[cluster] + 0.1 * rng.normal(size=(len(cluster), D)))
    titles = [f"item {i} {WORDS[c]}" if i % 2 == 0 else f"item {i}" for i, c in enumerate(cluster)]
    docs = pa.table(
        {
            "product_id": [f"p{i:04d}" for i in range(len(cluster))],
            "image_uri": [f"img/{i}.jpg" for i in range(len(cluster))],
            "title": titles,
        }
    )
    return docs, vectors.astype(np.float32), cluster


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build_index's text step on an embeddings dataset of clustered_docs (one training)."""
    tmp = tmp_path_factory.mktemp("tower")
    docs, vectors, _ = clustered_docs()
    like = manifest.EmbeddingsManifest(
        model={"model_id": "synthetic", "dim": D},
        catalog={},
        counts={},
        partition_size=len(vectors),
        embeddings=[],
        errors=[],
        timings={},
    )
    part = docs.append_column("embedding", pa.FixedSizeListArray.from_arrays(vectors.ravel(), D))
    dataset = embeddings.write_dataset(str(tmp / "emb"), [part], like)
    cfg = build_index.Config(embeddings=dataset.uri, index_root=str(tmp / "root"))
    root = str(tmp / "version")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(texttower.build, "__defaults__", (SMALL, None))
        record = build_index._text_tower(cfg, root, dataset, {"columns": ["title"]})
    return cfg, dataset, root, record


@pytest.fixture(scope="module")
def trained():
    docs, vectors, cluster = clustered_docs()
    tower = texttower.train(fulltext.doc_texts(docs, ["title"]), vectors, SMALL)
    return docs, vectors, cluster, tower


def test_features_share_trigrams_across_spellings():
    a, b = (set(texttower.features(t, 1 << 16)) for t in ("tshirt", "T-shirts"))
    assert len(a & b) >= 3 and a != b  # shi, hir, irt
    assert texttower.features("", 1 << 16) == [0]
    assert texttower.features("!!! ...", 1 << 16) == [0]


def test_the_tower_transfers_a_word_to_products_whose_titles_lack_it(trained):
    docs, vectors, cluster, tower = trained
    titles = docs["title"].to_pylist()
    words = tower.encode(list(WORDS))
    assert words.shape == (len(WORDS), D)
    np.testing.assert_allclose(np.linalg.norm(words, axis=1), 1.0, rtol=1e-5)
    text = fulltext.TextIndex.build(docs.append_column("id", pa.array(np.arange(len(titles)))))
    for c, word in enumerate(WORDS):
        top = np.argsort(-(vectors @ words[c]))[:PER_CLUSTER]
        lacking = [i for i in top if word not in titles[i]]
        assert np.mean(cluster[top] == c) >= 0.8, word  # chance: 1 / 6
        # Half the cluster lacks the word; the tower finds most of that half.
        assert np.sum(cluster[lacking] == c) >= 0.6 * PER_CLUSTER / 2, word
        _, bm25 = text.search(word, PER_CLUSTER)
        assert all(word in titles[i] for i in bm25[bm25 >= 0])  # BM25 cannot reach them


def test_saved_tower_encodes_as_trained(trained, tmp_path):
    *_, tower = trained
    data = tower.to_bytes()
    again = texttower.Tower.from_bytes(data, "cpu")
    texts = ["item 3 zorblat", "plimmo", ""]
    np.testing.assert_allclose(again.encode(texts), tower.encode(texts), atol=5e-3)


def test_compose_moves_the_photo_toward_the_words():
    photo, words = np.eye(4, dtype=np.float32)[:1], np.eye(4, dtype=np.float32)[1:2]
    out = texttower.compose(photo, words)
    np.testing.assert_allclose(out, [[2**-0.5, 2**-0.5, 0, 0]], rtol=1e-6)


def test_weighted_fusion_follows_the_weights():
    a = [{"product_id": "x"}, {"product_id": "y"}]
    b = [{"product_id": "y"}, {"product_id": "z"}]
    names = ("text", "semantic")
    equal = query.fuse([a, b], 3, names)
    assert [r["product_id"] for r in equal] == ["y", "x", "z"]
    assert equal == query.fuse([a, b], 3, names, {"text": 1.0, "semantic": 1.0})
    only_b = query.fuse([a, b], 3, names, {"text": 0.0, "semantic": 1.0})
    assert [r["product_id"] for r in only_b] == ["y", "z"]  # x: only a weight-0 ranking has it
    assert only_b[0]["ranks"] == {"text": 2, "semantic": 1}


def test_build_records_the_tower_and_its_fusion_weights(built):
    cfg, dataset, root, record = built
    path = os.path.join(root, record["file"])
    assert record["file"] == texttower.FILE
    with open(path, "rb") as f:
        assert record["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert record["rows"] == dataset.count and record["epochs"] == SMALL.epochs
    assert 0 < record["heldout"]["rows"] < dataset.count
    # (Its quality: too few held-out titles here; test_the_tower_transfers_... checks that.)
    assert 0.0 <= record["heldout"]["title_r10"] <= 1.0
    for kind, names in (("text", {"text", "semantic"}), ("hybrid", {"image", "semantic", "text"})):
        weights = texttower.weights(record, kind)
        assert set(weights) == names
        grid = texttower.TEXT_GRID if kind == "text" else texttower.HYBRID_GRID
        assert tuple(weights.values()) in grid
    loaded = texttower.load(root, record, "cpu")
    assert loaded.encode(["zorblat"]).shape == (1, D)
    with pytest.raises(ValueError, match="sha256"):
        texttower.load(root, {**record, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="relative path"):
        texttower.load(root, {**record, "file": "../x.pt"})
    # No tower without BM25 text (--no-text) or with --no-text-tower.
    assert build_index._text_tower(cfg, root, dataset, None) is None
    off = dataclasses.replace(cfg, text_tower=False)
    assert build_index._text_tower(off, root, dataset, {"columns": ["title"]}) is None


def test_build_skips_with_the_reason(tmp_path):
    docs, vectors, _ = clustered_docs(per_cluster=10)
    record = texttower.build(docs, vectors, str(tmp_path), SMALL)
    assert record == {"skipped": f"60 rows, fewer than {texttower.MIN_ROWS}"}
    no_text = docs.drop_columns(["title"])
    assert texttower.build(no_text, vectors, str(tmp_path), SMALL)["skipped"].startswith("the docs")
    assert texttower.load(str(tmp_path), record) is None
    assert texttower.weights(record, "text") is None
    assert not os.listdir(tmp_path)
