"""Embedders: the packaged default weights are real, and every registered model behaves.

resnet50 and clip-vit-b-32 run here with RANDOM weights (no weights exist offline): those tests
check shapes, normalisation and that a weights file is really loaded, not retrieval quality.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHINA, FLOWER, draw_product

from visual_search import devices, embedders, images

DAISY, PALACE = 985, 698


@pytest.fixture(scope="module")
def lite0():
    return embedders.create("efficientnet_lite0", device="cpu")


def _pixels(n: int, size: int = 224) -> np.ndarray:
    return np.stack([np.asarray(draw_product(i, (size, size))) for i in range(n)])


@pytest.mark.parametrize("path, expected", [(FLOWER, DAISY), (CHINA, PALACE)])
def test_packaged_weights_classify_real_photos(path, expected):
    model = embedders.efficientnet_lite0_classifier()
    px = images.load(path.read_bytes(), images.Preprocess(224, "crop"))
    x = (torch.from_numpy(px.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        logits = model(x[None])
    assert logits.argmax().item() == expected


def test_default_embedder_vectors(lite0):
    assert (lite0.model_id, lite0.dim) == ("efficientnet_lite0", 1280)
    assert lite0.weights_id.startswith("sha256:")
    px = _pixels(5)
    vecs = lite0.embed(px)
    assert vecs.dtype == np.float32 and vecs.shape == (5, 1280)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # Batch composition does not change a row's vector.
    np.testing.assert_allclose(lite0.embed(px[2:3])[0], vecs[2], atol=1e-5)
    # Different images, different vectors; the same image, the same vector.
    sims = vecs @ vecs.T
    assert sims[0, 1] < 0.99
    np.testing.assert_allclose(lite0.embed(px[:1]), vecs[:1], atol=1e-6)


def test_embedder_features_are_the_classifier_pooled_features(lite0):
    model = embedders.efficientnet_lite0_classifier()
    px = _pixels(2)
    x = (torch.from_numpy(px.copy()).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    ref = torch.nn.functional.normalize(feats, dim=1).numpy()
    np.testing.assert_allclose(lite0.embed(px), ref, atol=1e-4)


def test_embed_rejects_wrong_input(lite0):
    with pytest.raises(ValueError, match="expected uint8"):
        lite0.embed(np.zeros((2, 100, 100, 3), np.uint8))
    with pytest.raises(ValueError, match="expected uint8"):
        lite0.embed(np.zeros((2, 224, 224, 3), np.float32))
    assert lite0.embed(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 1280)


def _random_checkpoint(name: str, path) -> torch.nn.Module:
    """Save a randomly initialised checkpoint in the model's own layout; return its feature net."""
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        full = torchvision.models.resnet50(weights=None)
        torch.save(full.state_dict(), path)
        full.fc = torch.nn.Identity()
        return full
    import open_clip

    full = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save(full.state_dict(), path)
    return full.visual


@pytest.mark.parametrize("name, dim", [("resnet50", 2048), ("clip-vit-b-32", 512)])
def test_other_models_with_random_weights(name, dim, tmp_path):
    emb = embedders.create(name, device="cpu", random_weights=True)
    assert emb.dim == dim and emb.weights_id == "random"
    vecs = emb.embed(_pixels(3))
    assert vecs.shape == (3, dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)

    # A weights file is really loaded: the vectors equal those of the checkpoint's own network.
    path = tmp_path / f"{name}.pt"
    ref_net = _random_checkpoint(name, path)
    loaded = embedders.create(name, weights=str(path), device="cpu")
    spec = embedders.REGISTRY[name]
    ref = embedders.Embedder(
        name, "ref", ref_net, dim, loaded.preprocess, spec.mean, spec.std, torch.device("cpu")
    )
    assert loaded.weights_id.startswith("sha256:")
    px = _pixels(2)
    np.testing.assert_allclose(loaded.embed(px), ref.embed(px), atol=1e-5)
    assert not np.allclose(loaded.embed(px), emb.embed(px), atol=1e-3)


@pytest.mark.parametrize("name", ["resnet50", "clip-vit-b-32"])
def test_models_without_weights_must_ask_for_random(name):
    with pytest.raises(ValueError, match="needs weights"):
        embedders.create(name, device="cpu")


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        embedders.create("nope")
    with pytest.raises(ValueError, match="unknown model"):
        embedders.preprocess_for("nope")


def test_load_state_by_position_checks_shapes():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    good = {f"other.{i}": v.clone() + 1 for i, v in enumerate(net.state_dict().values())}
    embedders.load_state_by_position(net, good)
    np.testing.assert_allclose(net[1].bias.detach().numpy(), list(good.values())[3].numpy())
    bad = dict(good)
    bad["other.0"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="does not fit"):
        embedders.load_state_by_position(net, bad)
    with pytest.raises(ValueError, match="tensors"):
        embedders.load_state_by_position(net, dict(list(good.items())[:2]))


def test_describe_without_building_matches_the_model(lite0):
    assert embedders.describe("efficientnet_lite0") == lite0.describe()
    assert embedders.describe("resnet50", random_weights=True)["weights"] == "random"


KEEP_FREED_PROBE = """
import resource, sys, threading
import numpy as np
from visual_search import devices
if sys.argv[1] == "keep":
    assert devices.keep_freed_memory()
faults = []
def loop():  # off the main thread, as a Ray actor runs its calls
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = np.ones(96 << 20, np.uint8)  # a batch activation: over glibc's mmap ceiling
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=loop)
thread.start()
thread.join()
print(sum(faults[1:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_kept_freed_memory_is_reused_without_page_faults():
    """The embedding workers' allocator setting: a freed 96 MB tensor is reused in place
    (no fresh, zero-filled pages from the kernel), where by default each one is mapped anew."""

    def faults(mode: str, env: dict | None = None) -> int:
        cmd = [sys.executable, "-c", KEEP_FREED_PROBE, mode]
        env = {**os.environ, **(env or {})}
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)

    huge_pages = (96 << 20) // (2 << 20)  # numpy asks for transparent huge pages: the fewest
    assert faults("default") >= 4 * huge_pages  # each allocation faults its pages in again
    assert faults("keep") < huge_pages
    # The embedding actors get the same setting from their environment (runtime_env).
    assert faults("default", devices.KEEP_FREED_ENV) < huge_pages
