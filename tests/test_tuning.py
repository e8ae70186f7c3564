"""The catalog-tuning stage: product splits, metrics, the concat head, the keep-or-drop decision,
and jobs/tune.py + jobs/reindex.py on a tiny generated catalog (real Ray, real model)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import write_catalog

from jobs import embed, reindex, tune
from visual_search import (
    embedders,
    embeddings,
    finetune,
    heads,
    images,
    storage,
    tuning,
    versions,
)


def test_split_is_by_product_seeded_and_stable():
    pids = [f"p{i}" for i in range(3000)]
    a = tuning.split_products(pids + pids[:50], seed=0)
    assert list(a[3000:]) == list(a[:50])  # every photo of a product in one split
    assert list(tuning.split_products(pids[:100], seed=0)) == list(a[:100])  # growth-stable
    shares = {s: float(np.mean(a[:3000] == s)) for s in tuning.SPLITS}
    assert abs(shares["train"] - 0.6) < 0.03 and abs(shares["test"] - 0.2) < 0.03
    assert list(tuning.split_products(pids, seed=1)) != list(a[:3000])
    with pytest.raises(ValueError, match="fractions"):
        tuning.split_products(pids, fractions=(0.5, 0.2, 0.2))


def test_concat_head_matches_the_numpy_mix():
    torch.manual_seed(0)
    head = heads.Head("concat", 8, 12, hidden=16)
    head.mix.fill_(0.3)
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    with torch.no_grad():
        out = head(torch.from_numpy(x)).numpy()
        proj = head.proj(torch.nn.functional.normalize(torch.from_numpy(x), dim=1)).numpy()
    np.testing.assert_allclose(out, tuning.concat(x, proj, 0.3), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    cos = out @ out.T
    xb, pb = tuning.unit(x), tuning.unit(proj)
    np.testing.assert_allclose(cos, 0.7 * xb @ xb.T + 0.3 * pb @ pb.T, atol=1e-5)
    with pytest.raises(ValueError, match="out_dim > in_dim"):
        heads.Head("concat", 8, 8)


def test_metrics_on_hand_made_vectors():
    g = np.eye(4, dtype=np.float32)
    pids, labels = ["a", "b", "c", "d"], ["x", "x", "y", "y"]
    q = np.array([[1, 0.1, 0, 0], [0, 0, 0.2, 1]], np.float32)  # a first, then d
    assert tuning.instance_recall(g, pids, q, ["a", "c"], ks=(1, 2)) == {
        "instance_r1": 0.5,
        "instance_r2": 1.0,
    }
    near = np.array([[1, 0.5, 0, 0], [0.5, 1, 0, 0], [0, 0, 1, 0.1], [0, 0, 0.9, 1]], np.float32)
    assert tuning.category_precision(near, pids, labels, np.arange(4), k=1) == 1.0
    assert tuning.category_precision(near, pids, labels, np.arange(4), k=3) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "untuned, tuned, keep",
    [
        ((0.80, 0.70), (0.80, 0.80), True),  # better category, same instance recall
        ((0.80, 0.70), (0.79, 0.90), False),  # instance recall lost: never kept
        ((0.80, 0.70), (0.798, 0.75), True),  # within the allowed instance drop
        ((0.80, 0.70), (0.80, 0.70), False),  # no better
        ((0.80, 0.70), (0.85, 0.60), False),  # worse overall
    ],
)
def test_decide_never_keeps_a_worse_model(untuned, tuned, keep):
    def m(pair):
        return {"instance_r1": pair[0], "category_p10": pair[1]}

    assert tuning.decide(m(untuned), m(tuned), max_instance_drop=0.005)[0] is keep


def test_choose_mix_keeps_instance_recall():
    untuned = {"instance_r1": 0.80, "category_p10": 0.60}
    by_mix = {
        0.1: {"instance_r1": 0.81, "category_p10": 0.62},
        0.2: {"instance_r1": 0.795, "category_p10": 0.66},
        0.4: {"instance_r1": 0.70, "category_p10": 0.80},  # best objective, loses recall
    }
    assert tuning.choose_mix(untuned, by_mix, max_instance_drop=0.01) == 0.2
    assert tuning.choose_mix(untuned, by_mix, max_instance_drop=0.0) == 0.1
    worse = {m: {"instance_r1": 0.5, "category_p10": 0.9} for m in by_mix}
    assert tuning.choose_mix(untuned, worse, max_instance_drop=0.01) == 0.1


def test_hard_batches_hold_look_alikes_and_every_view_once():
    # 8 tight clusters of 30 photos, 2 views each
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    frozen = np.repeat(centres, 30, axis=0) + 0.05 * rng.normal(size=(240, 16))
    frozen /= np.linalg.norm(frozen, axis=1, keepdims=True)
    truth = np.repeat(np.arange(8), 30)
    clusters = finetune.look_alikes(frozen.astype(np.float32), 16, seed=0)
    pairs = {(c, t) for c, t in zip(clusters, truth, strict=True)}
    assert len(pairs) == len(set(clusters)), pairs  # no cluster mixes two groups
    view_rows = np.repeat(np.arange(240), 2)
    for hard in (0.0, 0.5):
        s = finetune.Settings(batch=32, hard=hard)
        batches = finetune.epoch_batches(view_rows, clusters, s, np.random.default_rng(1))
        assert len(batches) == 15 and all(len(b) == 32 for b in batches)
        assert len(np.unique(np.concatenate(batches))) == 480  # every view once
        # the hard half of a batch: mostly one cluster (random halves spread over all 8)
        top = [np.bincount(clusters[view_rows[b[:16]]]).max() for b in batches]
        assert (np.mean(top) >= 12) == (hard > 0), (hard, top)


@pytest.mark.parametrize(
    "n, labels, skipped",
    [
        (100, ["a", "b"] * 50, "too few"),
        (1000, None, "no label column"),
        (1000, ["a"] * 997 + ["b"] * 3, "fewer than 2 labels"),
        (1000, ["a", "b"] * 500, None),
    ],
)
def test_skip_reason(n, labels, skipped):
    reason = tuning.skip_reason(n, labels, min_images=500, min_per_label=5)
    assert reason is None if skipped is None else skipped in reason


N = 80  # products, 4 categories


@pytest.fixture(scope="module")
def shop(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    return root, write_catalog(root, N, (96, 80), categories=4)


@pytest.fixture(scope="module")
def backbone(shop):
    """The catalog's untuned embeddings (read-only: each test tunes into its own folder)."""
    root, catalog = shop
    work = str(root / "emb")
    embed.run(embed.Config(catalog=catalog, out=work))
    return work


def small(cfg: tune.Config, **changes) -> tune.Config:
    return tune.Config(
        **{**cfg.__dict__, "min_images": 50, "eval_products": 20, "epochs": 3, **changes}
    )


def test_tune_measures_decides_and_records(backbone, tmp_path, monkeypatch):
    index_root, work = str(tmp_path / "index"), backbone
    out = str(tmp_path / "emb-tuned")
    cfg = small(tune.Config(work, index_root, out), refit=False, method="head")
    # The real decision is taken and recorded; the kept path is then forced, so both run.
    real, decisions = tuning.decide, []

    def forced(untuned, tuned, max_drop):
        decisions.append((untuned, tuned, real(untuned, tuned, max_drop)))
        return True, "forced for the test"

    monkeypatch.setattr(tuning, "decide", forced)
    record = tune.run(cfg)
    for level in ("untuned", "tuned"):
        assert set(record[level]) == set(tuning.SPLITS)
        assert {"instance_r1", "instance_r10", "category_p10"} <= set(record[level]["test"])
    untuned, tuned, decision = decisions[0]
    assert (untuned, tuned) == (record["untuned"]["test"], record["tuned"]["test"])
    assert decision[0] is (tuning.objective(tuned) > tuning.objective(untuned)
                           and untuned["instance_r1"] - tuned["instance_r1"] <= 0.01)  # fmt: skip
    assert record["mix"] in cfg.mixes and record["train_s"] >= 0
    assert sum(record["products"].values()) == N

    # Kept: head file, tuned vectors = backbone + head, recorded in the model.
    assert record["kept"] and storage.exists(record["head"])
    assert record["head"].startswith(storage.join(index_root, "models"))
    ds = embeddings.open_dataset(record["embeddings"])
    model = ds.manifest.model
    assert model["head"]["kind"] == "concat" and model["head"]["tuning"]["decision"]
    assert ds.dim == 1280 + cfg.dim and ds.count == N
    embedder = embedders.from_model_dict(model)
    table = ds.read_range(0, 3)
    uris = table["image_uri"].to_pylist()
    pixels = np.stack([images.load(storage.read_bytes(u), embedder.preprocess) for u in uris])
    np.testing.assert_allclose(embedder.embed(pixels), ds.vectors(table), atol=2e-4)


def test_finetune_measures_decides_and_records(backbone, tmp_path, monkeypatch):
    """The default method: the backbone's last stage trained on re-photographs; kept, its
    weights file is what the service loads, and the tuned vectors are that model's."""
    index_root, work = str(tmp_path / "index"), backbone
    cfg = small(tune.Config(work, index_root, str(tmp_path / "emb-tuned")), finetune_epochs=2)
    monkeypatch.setattr(tuning, "decide", lambda *a: (False, "forced: not kept"))
    record = tune.run(cfg)
    assert record["method"] == "finetune" and not record["kept"]
    assert not storage.exists(storage.join(index_root, "models")) and "embeddings" not in record
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]
    # epoch 0 is the frozen model: its validation figure is the untuned one
    assert record["history"][0]["val_r1"] == record["untuned"]["val"]["instance_r1"]
    assert record["trained"]["views"] == 2 * record["products"]["train"]  # one photo each
    assert record["trained"]["view_profile"] == "train"
    with pytest.raises(tune.TuneError, match="view-profile"):
        tune.run(dataclasses.replace(cfg, view_profile="studio"))

    monkeypatch.setattr(tuning, "decide", lambda *a: (True, "forced: kept"))
    record = tune.run(cfg)
    assert record["kept"] and record["weights"].startswith(storage.join(index_root, "models"))
    ds = embeddings.open_dataset(record["embeddings"])
    model = ds.manifest.model
    assert model["weights_uri"] == record["weights"] and model["tuning"]["decision"]
    assert model["weights"] != embeddings.open_dataset(work).manifest.model["weights"]
    assert ds.dim == 1280 and ds.count == N
    embedder = embedders.from_model_dict(model)  # the query path: weights from the manifest
    table = ds.read_range(0, 4)
    uris = table["image_uri"].to_pylist()
    pixels = np.stack([images.load(storage.read_bytes(u), embedder.preprocess) for u in uris])
    np.testing.assert_allclose(embedder.embed(pixels), ds.vectors(table), atol=5e-3)


def test_reindex_tunes_by_default_and_no_tune_keeps_the_backbone(shop, tmp_path, monkeypatch):
    _, catalog = shop
    monkeypatch.setattr(tuning, "decide", lambda *a, **k: (True, "forced for the test"))
    monkeypatch.setattr(reindex, "tune_config", lambda args, work: small(
        tune.Config(work, args.index_root, f"{work}-tuned", labels=args.tune_labels),
        finetune_epochs=1,
    ))  # fmt: skip
    tuned_root, plain_root = str(tmp_path / "tuned"), str(tmp_path / "plain")
    assert reindex.main(["--catalog", catalog, "--index-root", tuned_root]) == 0
    manifest = versions.open_version(tuned_root).manifest
    assert manifest.model["tuning"]["kept"] and manifest.model["weights_uri"]
    assert reindex.main(["--catalog", catalog, "--index-root", plain_root, "--no-tune"]) == 0
    plain = versions.open_version(plain_root).manifest
    assert "tuning" not in plain.model and "weights_uri" not in plain.model
    assert plain.model["weights"] != manifest.model["weights"]
    with open(os.path.join(tuned_root, "CURRENT")) as f:
        assert f.read().strip() == manifest.version


def test_reindex_skips_tuning_on_a_small_catalog_and_says_why(shop, tmp_path, capsys):
    _, catalog = shop
    root = str(tmp_path / "index")
    assert reindex.main(["--catalog", catalog, "--index-root", root]) == 0
    assert f"[tune] skipped: {N} images < 500" in capsys.readouterr().out
    assert "head" not in versions.open_version(root).manifest.model
