"""Probe: does fine-tuning the backbone's last stage on synthetic re-photographs raise instance
recall on products it never saw? (issue 11, "beyond a head on frozen features").

    python bench/finetune.py [--catalog ../shared/data/products-dev/catalog.csv]
        [--views 3] [--epochs 6] [--from-block 6] [--json bench/results/finetune.json]

1. Split by product as the tuning stage does (`tuning.split_products`, seed 0).
2. The default backbone (efficientnet_lite0, GeM) is cut before block --from-block; the part
   before it stays frozen and its feature maps are computed once (fp16, in memory) for: every
   catalog photo, --views synthetic re-photographs of each train photo (make_queries' default
   "query" profile: crops, rotation, new backgrounds, colour, JPEG 50-90), and one shopper-profile
   query (crop keeping 70-90%, ±10°, background kept, JPEG 40) per validation and test product.
3. The rest (the last MBConv stage, conv_head, GeM) is trained with a symmetric InfoNCE loss
   (a view against the catalog photos of its batch, temperature 0.05) plus a term that keeps
   each catalog photo's vector near the frozen model's (weight --keep), batch norm frozen.
4. After each epoch: instance recall@1 of the validation queries among the whole catalog; the
   best epoch's model is measured once on the test queries (and the frozen model on both).
   Category precision@10 of the nearest products (leave-one-out, test products) too.
Vectors only (no re-rank, exact search). Prints plain lines, writes --json.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np
import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jobs import make_queries  # noqa: E402
from visual_search import catalog, embedders, images, storage, tuning  # noqa: E402

DEFAULT_CATALOG = os.path.join(
    os.path.dirname(REPO), "shared", "data", "products-dev", "catalog.csv"
)
PRE = images.Preprocess(size=224, mode="pad")


class Split(nn.Module):
    """efficientnet_lite0 cut before block `at`: frozen `trunk`, trainable `tail` (+ GeM)."""

    def __init__(self, at: int):
        super().__init__()
        m = embedders.efficientnet_lite0_classifier()
        self.trunk = nn.Sequential(m.conv_stem, m.bn1, *m.blocks[:at]).eval()
        self.tail = nn.Sequential(*m.blocks[at:], m.conv_head, m.bn2)

    def embed_tail(self, fmap: torch.Tensor) -> torch.Tensor:
        f = self.tail(fmap.float()).clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
        return nn.functional.normalize(f, dim=1)


def _pixels(data: bytes, params: dict | None) -> np.ndarray:
    """The catalog photo as the embed job sees it, or a synthetic re-photograph of it."""
    if params is not None:
        img, _ = make_queries.augment(images.decode(data), params)
        data = make_queries.encode_jpeg(img, params["jpeg_quality"])
    return images.load(data, PRE)


@torch.no_grad()
def trunk_maps(model: Split, sources, jobs, batch: int = 64) -> torch.Tensor:
    """fp16 feature maps of (source index, params or None) jobs, in order."""
    mean = torch.full((1, 3, 1, 1), 0.5 * 255)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(jobs), batch):
        px = np.stack([_pixels(sources[s], p) for s, p in jobs[i : i + batch]])
        x = (torch.from_numpy(px).permute(0, 3, 1, 2).float() - mean) / mean
        out.append(model.trunk(x).half())
        if (i // batch) % 20 == 0:
            rate = (i + len(px)) / (time.perf_counter() - t0)
            print(f"[finetune] trunk {i + len(px)}/{len(jobs)} ({rate:.1f}/s)", flush=True)
    return torch.cat(out)


@torch.inference_mode()
def vectors(model: Split, maps: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.tail.eval()
    return torch.cat(
        [model.embed_tail(maps[i : i + batch]) for i in range(0, len(maps), batch)]
    ).numpy()


def train(model, maps, view_rows, cat_maps, frozen, args, evaluate) -> tuple[nn.Module, list]:
    """InfoNCE of views against their catalog photo; returns the best tail and the history."""
    for m in model.tail.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    opt = torch.optim.AdamW(model.tail.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    best, history = (evaluate(model), copy.deepcopy(model.tail.state_dict())), []
    print(f"[finetune] epoch 0 val_r1 {best[0]:.4f}", flush=True)
    for epoch in range(1, args.epochs + 1):
        t0, order, losses = time.perf_counter(), rng.permutation(len(maps)), []
        model.tail.train()
        for m in model.tail.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        for i in range(0, len(order) - args.batch + 1, args.batch):
            idx = order[i : i + args.batch]
            rows = view_rows[idx]
            rows, keep = np.unique(rows, return_index=True)  # one view per photo in a batch
            a = model.embed_tail(maps[idx[keep]])
            c = model.embed_tail(cat_maps[rows])
            logits = a @ c.T / args.temperature
            target = torch.arange(len(rows))
            loss = (nn.functional.cross_entropy(logits, target)
                    + nn.functional.cross_entropy(logits.T, target)) / 2  # fmt: skip
            loss = loss + args.keep * (1 - (c * frozen[rows]).sum(dim=1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        score = evaluate(model)
        loss, took = round(float(np.mean(losses)), 4), round(time.perf_counter() - t0, 1)
        history.append({"epoch": epoch, "loss": loss, "val_r1": round(score, 4), "s": took})
        print(f"[finetune] {history[-1]}", flush=True)
        if score > best[0]:
            best = (score, copy.deepcopy(model.tail.state_dict()))
    model.tail.load_state_dict(best[1])
    return model, history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--from-block", type=int, default=6, help="first trained block (0-6)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--keep", type=float, default=1.0, help="weight of the keep-near-frozen term")
    p.add_argument("--json", default=os.path.join(REPO, "bench", "results", "finetune.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    cat = catalog.read_catalog(a.catalog)
    table = cat.table
    pids = np.asarray(table["product_id"].to_pylist()).astype(str)
    labels = np.asarray(table["category"].to_pylist()).astype(str)
    splits = tuning.split_products(pids, seed=0)
    sources = [storage.read_bytes(u) for u in table["image_uri"].to_pylist()]
    model = Split(a.from_block)

    view_rows = np.repeat(np.flatnonzero(splits == "train"), a.views)
    rng = np.random.default_rng(2)
    view_jobs = [(int(r), make_queries.draw_params(rng, "query")) for r in view_rows]
    q_rows = {s: np.flatnonzero(splits == s) for s in ("val", "test")}
    q_rng = np.random.default_rng(3)
    q_jobs = {s: [(int(r), make_queries.draw_params(q_rng, "shopper")) for r in rows]
              for s, rows in q_rows.items()}  # fmt: skip
    cat_maps = trunk_maps(model, sources, [(i, None) for i in range(len(sources))])
    q_maps = {s: trunk_maps(model, sources, jobs) for s, jobs in q_jobs.items()}
    view_maps = trunk_maps(model, sources, view_jobs)
    trunk_s = time.perf_counter() - started

    def measure(m: Split, split: str) -> tuple[float, np.ndarray]:
        catv = vectors(m, cat_maps)
        qv = vectors(m, q_maps[split])
        return tuning.instance_recall(catv, pids, qv, pids[q_rows[split]])["instance_r1"], catv

    frozen_val, frozen_cat = measure(model, "val")
    frozen_test, _ = measure(model, "test")
    t0 = time.perf_counter()
    model, history = train(
        model, view_maps, view_rows, cat_maps, torch.from_numpy(frozen_cat), a,
        lambda m: measure(m, "val")[0],
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    tuned_test, tuned_cat = measure(model, "test")

    def p10(catv: np.ndarray) -> float:  # nearest-only category precision, test products
        return tuning.category_precision(catv, pids, labels, q_rows["test"])

    out = {
        "config": vars(a),
        "views": len(view_rows),
        "frozen": {"val_r1": frozen_val, "test_r1": frozen_test,
                   "test_nearest_p10": p10(frozen_cat)},
        "tuned": {"val_r1": max(h["val_r1"] for h in history) if history else frozen_val,
                  "test_r1": tuned_test,
                  "test_nearest_p10": p10(tuned_cat)},
        "history": history,
        "trunk_s": round(trunk_s, 1),
        "train_s": round(train_s, 1),
    }  # fmt: skip
    for name in ("frozen", "tuned"):
        print(name, " ".join(f"{k} {v:.4f}" for k, v in out[name].items()))
    print(f"trunk_s {out['trunk_s']} train_s {out['train_s']}")
    storage.write_json(a.json, out)
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
