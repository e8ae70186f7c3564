"""Projection heads: a small map from a backbone's L2-normalised features to the final vector.

A head is fitted or trained on stored backbone features (an embeddings dataset), so it is cheap,
and the embedder registry runs backbone + head as one model (`embedders.create(..., head=URI)`).
Three ways to make one:
- `pca_whitening(x, dim)`: PCA-whitening learned on the catalog, with reduced dimension;
- `jobs/train_head.py`: a metric-learning projection trained on catalog labels (Ray Train);
- `tuning.py` (the re-index's tuning stage): a "concat" head, the backbone's own vector next to
  a metric-learning projection, so category structure is added without losing the instance
  detail that a projection alone gives up.

A head file is `torch.save` of plain values and tensors (loadable with `weights_only=True`):
    {"format": 1, "backbone": model_id, "kind": "linear" | "mlp" | "concat", "in_dim", "out_dim",
     "hidden": int | None, "state_dict": {...}, "info": {...}}
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from visual_search import storage

HEAD_FORMAT = 1
KINDS = ("linear", "mlp", "concat")


class Head(nn.Module):
    """L2-normalise the backbone features, then project (the caller normalises the output).

    kind "concat": out = [sqrt(1 - mix) * x, sqrt(mix) * unit(mlp(x))] with x the normalised
    backbone vector, so the cosine of two outputs is (1 - mix) * backbone cosine + mix *
    projection cosine; the MLP maps to out_dim - in_dim and `mix` is a stored buffer.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.in_dim, self.out_dim, self.hidden = kind, in_dim, out_dim, hidden
        proj_dim = out_dim - in_dim if kind == "concat" else out_dim
        if proj_dim < 1:
            raise ValueError(f"a {kind} head needs out_dim > in_dim, got {out_dim} <= {in_dim}")
        if kind == "linear":
            self.proj = nn.Linear(in_dim, proj_dim)
        else:
            hidden = hidden or 2 * in_dim
            self.hidden = hidden
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, proj_dim)
            )
        if kind == "concat":
            self.register_buffer("mix", torch.tensor(0.5))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(feats.float(), dim=1)
        if self.kind != "concat":
            return self.proj(x)
        z = nn.functional.normalize(self.proj(x), dim=1)
        return torch.cat([torch.sqrt(1 - self.mix) * x, torch.sqrt(self.mix) * z], dim=1)


def to_bytes(head: Head, backbone: str, info: dict | None = None) -> bytes:
    """The head file's bytes (torch.save of plain values and tensors)."""
    buf = io.BytesIO()
    torch.save(
        {
            "format": HEAD_FORMAT,
            "backbone": backbone,
            "kind": head.kind,
            "in_dim": head.in_dim,
            "out_dim": head.out_dim,
            "hidden": head.hidden,
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
            "info": info or {},
        },
        buf,
    )
    return buf.getvalue()


def save(head: Head, uri: str, backbone: str, info: dict | None = None) -> None:
    """Write the head file atomically (temp + rename locally, one PUT on S3)."""
    storage.write_bytes(uri, to_bytes(head, backbone, info))


def load(uri: str) -> tuple[Head, dict]:
    """(head in eval mode, its file's metadata without the tensors)."""
    path = storage.local_copy(uri)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a head
        raise ValueError(f"{uri}: not a head file ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT:
        raise ValueError(f"{uri}: not a head file of format {HEAD_FORMAT}")
    head = Head(blob["kind"], int(blob["in_dim"]), int(blob["out_dim"]), blob.get("hidden"))
    head.load_state_dict(blob["state_dict"], strict=True)
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return head.eval(), meta


def pca_whitening(features: np.ndarray, dim: int, shrinkage: float = 0.1) -> Head:
    """A linear head that centres, rotates onto the top `dim` principal axes and whitens.

    features: (n, d) backbone vectors (normalised again here, as the head sees them).
    shrinkage blends each eigenvalue with the mean one before whitening: full whitening
    (0) over-amplifies the noisy trailing axes, which costs retrieval accuracy.
    """
    x = features.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n, d = x.shape
    if not 0 < dim <= min(n - 1, d):
        raise ValueError(f"PCA dimension {dim} must be in [1, {min(n - 1, d)}] for {n}x{d}")
    mean = x.mean(axis=0)
    cov = np.cov(x - mean, rowvar=False)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dim]
    eigval, eigvec = eigval[order], eigvec[:, order]
    scale = 1.0 / np.sqrt((1 - shrinkage) * eigval + shrinkage * eigval.mean() + 1e-12)
    w = (eigvec * scale).T  # (dim, d)
    head = Head("linear", d, dim)
    with torch.no_grad():
        head.proj.weight.copy_(torch.from_numpy(w))
        head.proj.bias.copy_(torch.from_numpy(-(w @ mean)))
    return head.eval()
