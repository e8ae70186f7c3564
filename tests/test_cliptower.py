"""texttower.ClipTower: CLIP's own text tower for a clip-vit-b-32 catalog, on a randomly
initialised checkpoint (no download). Random weights make titles alike, but a title's own
vector is still its nearest, which is what the build's held-out measure checks."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs import build_index
from visual_search import embedders, embeddings, manifest, texttower

ROWS = texttower.MIN_ROWS


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(checkpoint path, the open_clip model it holds, a ClipTower on it)."""
    import open_clip

    path = tmp_path_factory.mktemp("clip") / "clip_random.pt"
    torch.manual_seed(0)
    full = open_clip.create_model(embedders.CLIP_ARCH, pretrained=None).eval()
    torch.save(full.state_dict(), path)
    return str(path), full, texttower.ClipTower(str(path), "cpu")


@pytest.fixture(scope="module")
def catalog(clip):
    """(docs, vectors): each row's vector is its own title through the tower."""
    *_, tower = clip
    colours, types = ("red", "blue", "green", "black"), ("shirt", "shoe", "bag", "hat", "cup")
    names = [f"{c} {t}" for c in colours for t in types]
    titles = [f"{names[i % len(names)]} number {i}" for i in range(ROWS)]
    docs = pa.table(
        {
            "product_id": [f"p{i:04d}" for i in range(ROWS)],
            "image_uri": [f"img/{i}.jpg" for i in range(ROWS)],
            "title": titles,
        }
    )
    return docs, tower.encode(titles)


def test_encode_is_open_clips_normalized_text_embedding(clip):
    import open_clip

    _, full, tower = clip
    texts = ["a red shirt", "blue running shoes", ""]
    with torch.no_grad():
        tokens = open_clip.get_tokenizer(embedders.CLIP_ARCH)(texts)
        ref = full.encode_text(tokens, normalize=True).numpy()
    out = tower.encode(texts, batch=2)  # two batches
    assert out.shape == (3, 512) and tower.dim == 512 and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert tower.model.visual is None  # the image side is not kept twice
    assert tower.encode([]).shape == (0, 512)


def test_for_model_only_for_clips_own_vectors(clip, tmp_path):
    path, _, tower = clip
    model = {"model_id": "clip-vit-b-32", "weights": tower.weights_id}
    assert texttower.ClipTower.for_model({**model, "model_id": "resnet50"}, path) is None
    assert texttower.ClipTower.for_model({**model, "head": {"dim": 128}}, path) is None
    assert texttower.ClipTower.for_model(model, None) is None
    for given in (None, "/no/such/base.pt"):  # tuned weights, named by the entry, come first
        named = texttower.ClipTower.for_model({**model, "weights_uri": path}, given)
        assert named.weights_id == tower.weights_id and named.uri == tower.uri
    with pytest.raises(ValueError, match="differ from the catalog vectors"):
        texttower.ClipTower.for_model({**model, "weights": "sha256:" + "0" * 64}, path)


def test_build_names_the_weights_and_load_checks_them(clip, catalog, tmp_path):
    path, _, tower = clip
    docs, vectors = catalog
    record = texttower.build(docs, vectors, str(tmp_path), pretrained=tower)
    assert record["kind"] == "clip" and "file" not in record and not os.listdir(tmp_path)
    assert record["weights_uri"] == tower.uri and record["weights"] == tower.weights_id
    assert "epochs" not in record and "settings" not in record  # nothing was trained
    assert record["rows"] == ROWS and record["heldout"]["title_r10"] == 1.0
    for kind, grid in (("text", texttower.TEXT_GRID), ("hybrid", texttower.HYBRID_GRID)):
        assert tuple(texttower.weights(record, kind).values()) in grid
    loaded = texttower.load(str(tmp_path), record, "cpu")
    assert isinstance(loaded, texttower.ClipTower)
    np.testing.assert_allclose(loaded.encode(["red shirt"]), tower.encode(["red shirt"]), atol=1e-6)
    with pytest.raises(ValueError, match="changed since the build"):
        texttower.load(str(tmp_path), {**record, "weights": "sha256:" + "0" * 64})


def test_build_index_uses_clip_with_weights_and_trains_without(clip, catalog, tmp_path, capsys):
    path, _, tower = clip
    docs, vectors = catalog
    like = manifest.EmbeddingsManifest(
        model={"model_id": "clip-vit-b-32", "dim": 512, "weights": tower.weights_id},
        catalog={}, counts={}, partition_size=ROWS, embeddings=[], errors=[], timings={},
    )  # fmt: skip
    part = docs.append_column("embedding", pa.FixedSizeListArray.from_arrays(vectors.ravel(), 512))
    dataset = embeddings.write_dataset(str(tmp_path / "emb"), [part], like)
    root = str(tmp_path / "root")
    cfg = build_index.Config(embeddings=dataset.uri, index_root=root, weights=path)
    record = build_index._text_tower(cfg, str(tmp_path / "v"), dataset, {"columns": ["title"]})
    assert record["kind"] == "clip" and record["weights"] == tower.weights_id
    assert "text tower (clip) on 200 rows" in capsys.readouterr().out
    assert build_index._clip_tower(dataclasses.replace(cfg, weights=None), like.model) is None
    assert "no --weights: a text tower is trained instead" in capsys.readouterr().out
    assert (
        build_index.build_parser()
        .parse_args(["--embeddings", dataset.uri, "--index-root", "r", "--weights", path])
        .weights
        == path
    )
