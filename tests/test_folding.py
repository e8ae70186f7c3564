"""BatchNorm folding: the same vectors from fewer layers, never a silently different model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import draw_product
from torch import nn

from visual_search import embedders, finetune, folding


def _pixels(n: int) -> np.ndarray:
    return np.stack([np.asarray(draw_product(i, (224, 224))) for i in range(n)])


def _batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def _real_stats(net: nn.Module) -> None:
    """Random weights leave BatchNorm at mean 0, variance 1: give it stats that do something."""
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def test_default_model_folded_gives_the_same_vectors():
    plain = embedders.create(device="cpu", for_training=True)
    fast = embedders.create(device="cpu")
    assert not plain.folded and fast.folded
    assert _batchnorms(plain.net) == 49 and _batchnorms(fast.net) == 0
    px = _pixels(4)
    np.testing.assert_allclose(fast.embed(px), plain.embed(px), atol=1e-5)


def test_resnet50_folds_every_batchnorm_with_the_same_output():
    plain = embedders.create("resnet50", device="cpu", random_weights=True, for_training=True)
    _real_stats(plain.net)
    fast = embedders.Embedder(
        "resnet50", "random", plain.net, 2048, plain.preprocess,
        embedders.IMAGENET_MEAN, embedders.IMAGENET_STD, torch.device("cpu"),
    )  # fmt: skip
    fast.fold_batchnorm()
    assert _batchnorms(plain.net) == 53 and _batchnorms(fast.net) == 0
    px = _pixels(2)
    np.testing.assert_allclose(fast.embed(px), plain.embed(px), atol=1e-5)


class _BnFirst(nn.Module):
    """Declares conv before bn but runs bn first: folding by declared order would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(x)).mean(dim=(2, 3))


def test_a_fold_that_changes_the_output_is_refused(caplog):
    net = _BnFirst()
    _real_stats(net)
    net.eval()
    sample = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="visual_search.folding"):
        kept = folding.folded(net, sample)
    assert kept is net and _batchnorms(kept) == 1
    assert "runs unfolded" in caplog.text


def test_nothing_to_fold_keeps_the_network():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    assert folding.folded(net, torch.zeros(1, 3, 8, 8)) is net


def test_fine_tuning_refuses_a_folded_embedder():
    with pytest.raises(ValueError, match="for_training=True"):
        finetune.Tail(embedders.create(device="cpu"), 8)
    tail = finetune.Tail(embedders.create(device="cpu", for_training=True), 5)
    assert _batchnorms(tail.tail) > 0
