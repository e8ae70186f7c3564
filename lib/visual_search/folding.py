"""Inference only: each eval-mode BatchNorm folded into the convolution that feeds it.

On CPU a quarter of the default model's forward pass was BatchNorm (a py-spy profile of the
embed actor); folded, the same weights give the same vectors (within 1e-5, tests/test_folding.py)
and the bare model runs 1.07-1.34x as fast (`bench/embed.py --model-sweep`). A folded network
cannot be fine-tuned (its BatchNorm layers are gone) and its state dict has other keys, so
`embedders.create` folds only embedders not made for training.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest |difference| of unit vectors accepted; folding gives about 1e-6


def _rest(bn: nn.Module) -> nn.Module | None:
    """What stays of a BatchNorm once folded: nothing, or timm's activation after it."""
    from timm.layers import BatchNormAct2d

    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if type(bn) is BatchNormAct2d:
        return nn.Sequential(bn.drop, bn.act)
    return None  # an unknown subclass: its forward may do more, so it is left alone


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.running_mean is not None
        and conv.out_channels == bn.num_features
        and not (conv.training or bn.training)
    )


def _fold_children(module: nn.Module) -> int:
    """Fold each Conv2d directly followed by a BatchNorm2d sibling, in every submodule.

    That a sibling declared next is the next call of forward holds for the registered models
    (timm EfficientNet, torchvision ResNet); `folded` checks it on the real network anyway."""
    count, names = 0, list(module._modules)
    for a, b in zip(names, names[1:], strict=False):
        conv, bn = module._modules[a], module._modules[b]
        rest = _rest(bn) if _foldable(conv, bn) else None
        if rest is not None:
            module._modules[a], module._modules[b] = fuse_conv_bn_eval(conv, bn), rest
            count += 1
    return count + sum(_fold_children(child) for child in module.children())


def folded(net: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A copy of the eval-mode `net` with its BatchNorm folded, or `net` itself when there is
    nothing to fold or the copy's output on `sample` (a normalised input batch) differs."""
    out = copy.deepcopy(net)
    count = _fold_children(out)
    if count == 0:
        return net
    with torch.inference_mode():
        want = nn.functional.normalize(net(sample).float(), dim=1)
        got = nn.functional.normalize(out(sample).float(), dim=1)
    err = float((want - got).abs().max())
    if not err <= TOLERANCE:
        log.warning("BatchNorm folding changed the output by %.2g: the model runs unfolded", err)
        return net
    log.debug("folded %d BatchNorm layers (max |difference| %.2g)", count, err)
    return out
