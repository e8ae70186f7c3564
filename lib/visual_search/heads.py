"""Projection heads: a small map from a backbone's L2-normalised features to the final vector.

A head is fitted or trained on stored backbone features (an embeddings dataset), so it is cheap,
and the embedder registry runs backbone + head as one model (`embedders.create(..., head=URI)`).
Two ways to make one:
- `pca_whitening(x, dim)`: PCA-whitening learned on the catalog, with reduced dimension;
- `jobs/train_head.py`: a metric-learning projection trained on catalog labels (Ray Train).

A head file is `torch.save` of plain values and tensors (loadable with `weights_only=True`):
    {"format": 1, "backbone": model_id, "kind": "linear" | "mlp", "in_dim", "out_dim",
     "hidden": int | None, "state_dict": {...}, "info": {...}}
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from visual_search import storage

HEAD_FORMAT = 1
KINDS = ("linear", "mlp")


class Head(nn.Module):
    """L2-normalise the backbone features, then project (the caller normalises the output)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown head kind {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.in_dim, self.out_dim, self.hidden = kind, in_dim, out_dim, hidden
        if kind == "linear":
            self.proj = nn.Linear(in_dim, out_dim)
        else:
            hidden = hidden or 2 * in_dim
            self.hidden = hidden
            self.proj = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.normalize(feats.float(), dim=1))


def save(head: Head, uri: str, backbone: str, info: dict | None = None) -> None:
    """Write the head file atomically (temp + rename locally, one PUT on S3)."""
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
    storage.write_bytes(uri, buf.getvalue())


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
