"""Fine-tune the backbone's last stages for instance retrieval (the re-index's tuning stage).

A head on frozen features trades instance recall for category structure (issue 11); training
the backbone's last blocks on synthetic re-photographs of the catalog raises instance recall on
products it never saw. The model is cut before block `at`: the part before it stays frozen and
its feature maps are computed once (fp16, in memory), so each epoch runs only the tail.

Loss: symmetric InfoNCE of a view against the catalog photos of its batch (one view per photo
per batch), plus a term that keeps each catalog photo's vector near the frozen model's (the
catalog side must not drift away from what made the model good), batch norm frozen.

The result is a full backbone state dict in the registry's own weights format, so the service
and the embed job load it as `weights` (embedders.create) and nothing else changes.
"""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import nn

from visual_search import embedders

FINETUNABLE = ("efficientnet_lite0", "efficientnet_lite0_gem")


@dataclass(frozen=True)
class Settings:
    # First trained block (lite0 has 7): 5 trains the last two stages, conv_head and bn2. On
    # products-dev (bench/finetune.py, 3 views) validation R@1 after 2 epochs was 0.918 from
    # block 5 against 0.898 from block 6, for about 3x the time per epoch on CPU.
    at: int = 5
    epochs: int = 4
    batch: int = 128
    lr: float = 1e-4
    temperature: float = 0.05
    keep: float = 1.0  # weight of the keep-near-frozen term
    hard: float = 0.0  # share of each batch drawn from one cluster of look-alike photos
    seed: int = 0


class Tail:
    """A lite0 embedder cut before block `at`: frozen trunk, trainable tail, the model's pooling."""

    def __init__(self, embedder: embedders.Embedder, at: int):
        if embedder.model_id not in FINETUNABLE or embedder.head:
            raise ValueError(f"fine-tuning supports {', '.join(FINETUNABLE)} without a head")
        if embedder.folded:
            raise ValueError(
                "fine-tuning needs the model's BatchNorm layers: "
                "build it with embedders.create(..., for_training=True)"
            )
        self.embedder, self.net = embedder, embedder.net  # embedders._PreLogits
        m = self.net.model
        if not 0 < at < len(m.blocks):
            raise ValueError(f"at must be in 1..{len(m.blocks) - 1}, got {at}")
        self.trunk = nn.Sequential(m.conv_stem, m.bn1, *m.blocks[:at]).eval()
        self.tail = nn.Sequential(*m.blocks[at:], m.conv_head, m.bn2)
        self.device = embedder.device

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.net.pooling == "gem":
            p = self.net.p
            f = fmap.float().clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        else:
            f = fmap.float().mean(dim=(2, 3))
        return nn.functional.normalize(f, dim=1)

    def embed_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return self._pool(self.tail(maps.to(self.device).float()))

    @torch.inference_mode()
    def trunk_maps(self, pixels: Callable[[int], np.ndarray], n: int, say, batch: int = 64):
        """fp16 CPU feature maps of pixels(0..n-1), in order."""
        out, t0 = [], time.perf_counter()
        for i in range(0, n, batch):
            px = np.stack([pixels(j) for j in range(i, min(n, i + batch))])
            x = self.embedder.normalise(torch.from_numpy(px))
            out.append(self.trunk(x).half().cpu())
            if (i // batch) % 25 == 0:
                done = i + len(px)
                say(f"trunk maps {done:,}/{n:,} ({done / (time.perf_counter() - t0):.1f}/s)")
        return torch.cat(out) if out else torch.zeros(0)

    @torch.inference_mode()
    def vectors(self, maps: torch.Tensor, batch: int = 256) -> np.ndarray:
        self.tail.eval()
        parts = [self.embed_maps(maps[i : i + batch]).cpu() for i in range(0, len(maps), batch)]
        return torch.cat(parts).numpy().astype(np.float32)

    def _train_mode(self) -> None:
        self.tail.train()
        for m in self.tail.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()

    def weights_bytes(self) -> bytes:
        """The whole classifier's state dict (embedders' lite0 weights format), tail trained."""
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.net.model.state_dict().items()}, buf)
        return buf.getvalue()


def _step(tail: Tail, opt, views, catalog, frozen, idx, rows, s: Settings) -> float:
    rows, keep = np.unique(rows, return_index=True)  # one view per photo in a batch
    a = tail.embed_maps(views[idx[keep]])
    c = tail.embed_maps(catalog[rows])
    logits = a @ c.T / s.temperature
    target = torch.arange(len(rows), device=tail.device)
    loss = (nn.functional.cross_entropy(logits, target)
            + nn.functional.cross_entropy(logits.T, target)) / 2  # fmt: skip
    loss = loss + s.keep * (1 - (c * frozen[rows].to(tail.device)).sum(dim=1)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


def look_alikes(frozen: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """Each catalog photo's k-means cluster of the frozen model's vectors (photos alike)."""
    clusters = max(1, min(clusters, len(frozen) // 4))
    km = faiss.Kmeans(frozen.shape[1], clusters, niter=20, seed=seed, spherical=True)
    km.train(np.ascontiguousarray(frozen, dtype=np.float32))
    return km.index.search(np.ascontiguousarray(frozen, dtype=np.float32), 1)[1][:, 0]


def epoch_batches(view_rows: np.ndarray, clusters, s: Settings, rng) -> list[np.ndarray]:
    """One epoch: every view once, in batches of s.batch. With s.hard > 0 that share of each
    batch is one run of views sorted by their photo's cluster, so the batch holds look-alike
    products the loss must tell apart (random batches are mostly easy: a shirt against a shoe);
    the rest of the batch stays random, which keeps the easy negatives too."""
    order = rng.permutation(len(view_rows))
    n = len(order) // s.batch
    nh = int(round(s.batch * s.hard)) if clusters is not None else 0
    if nh == 0:
        return [order[i * s.batch : (i + 1) * s.batch] for i in range(n)]
    hard, easy, ne = order[: n * nh], order[n * nh :], s.batch - nh
    hard = hard[np.argsort(clusters[view_rows[hard]], kind="stable")]
    out = [np.concatenate([hard[i * nh : (i + 1) * nh], easy[i * ne : (i + 1) * ne]])
           for i in range(n)]  # fmt: skip
    return [out[i] for i in rng.permutation(n)]


def train(
    tail: Tail,
    views: torch.Tensor,
    view_rows: np.ndarray,
    catalog: torch.Tensor,
    evaluate: Callable[[Tail], float],
    s: Settings,
    say,
) -> list[dict]:
    """Train the tail; keeps the epoch with the best evaluate() (the frozen model counts as
    epoch 0). Returns the history."""
    torch.manual_seed(s.seed)
    frozen = torch.from_numpy(tail.vectors(catalog))
    opt = torch.optim.AdamW(tail.tail.parameters(), lr=s.lr, weight_decay=1e-4)
    rng = np.random.default_rng(s.seed)
    clusters = None
    if s.hard > 0:  # clusters of about one hard run each
        runs = max(1, len(view_rows) // s.batch)
        clusters = look_alikes(frozen.numpy(), runs * len(frozen) // len(np.unique(view_rows)),
                               s.seed)  # fmt: skip
    best = (evaluate(tail), copy.deepcopy(tail.tail.state_dict()))
    history = [{"epoch": 0, "val_r1": round(best[0], 4)}]
    say(f"epoch 0 (frozen) val_r1 {best[0]:.4f}")
    for epoch in range(1, s.epochs + 1):
        t0, losses = time.perf_counter(), []
        tail._train_mode()
        for idx in epoch_batches(view_rows, clusters, s, rng):
            losses.append(_step(tail, opt, views, catalog, frozen, idx, view_rows[idx], s))
        score = evaluate(tail)
        loss = round(float(np.mean(losses or [0.0])), 4)
        took = round(time.perf_counter() - t0, 1)
        history.append({"epoch": epoch, "loss": loss, "val_r1": round(score, 4), "s": took})
        say(f"epoch {history[-1]}")
        if score > best[0]:
            best = (score, copy.deepcopy(tail.tail.state_dict()))
    tail.tail.load_state_dict(best[1])
    tail.tail.eval()
    return history
