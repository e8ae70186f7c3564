"""Probe: does fine-tuning the backbone's last stage on synthetic re-photographs raise instance
recall on products it never saw? (issue 11, "beyond a head on frozen features").

    python bench/finetune.py [--catalog ../shared/data/products-dev/catalog.csv]
        [--views 3] [--epochs 6] [--from-block 5] [--hard 0.5] [--json bench/results/finetune.json]

1. Split by product as the tuning stage does (`tuning.split_products`, seed 0).
2. The default backbone (efficientnet_lite0, GeM) is cut before block --from-block; the part
   before it stays frozen and its feature maps are computed once (fp16; kept in --cache for
   reruns with other training settings) for: every
   catalog photo, --views synthetic re-photographs of each train photo (make_queries' default
   "query" profile: crops, rotation, new backgrounds, colour, JPEG 50-90), and one shopper-profile
   query (crop keeping 70-90%, ±10°, background kept, JPEG 40) per validation and test product.
3. The rest (the last MBConv stage, conv_head, GeM) is trained with a symmetric InfoNCE loss
   (a view against the catalog photos of its batch, temperature 0.05) plus a term that keeps
   each catalog photo's vector near the frozen model's (weight --keep), batch norm frozen:
   lib/visual_search/finetune.py, the tuning stage's own code. --hard: that share of each batch
   comes from one k-means cluster of look-alike photos (hard negatives).
4. After each epoch: instance recall@1 of the validation queries among the whole catalog; the
   best epoch's model is measured once on the test queries (and the frozen model on both).
   Category precision@10 of the nearest products (leave-one-out, test products) too.
Vectors only (no re-rank, exact search). Prints plain lines, writes --json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jobs import make_queries  # noqa: E402
from visual_search import catalog, embedders, finetune, images, storage, tuning  # noqa: E402

DEFAULT_CATALOG = os.path.join(
    os.path.dirname(REPO), "shared", "data", "products-dev", "catalog.csv"
)
MODEL = "efficientnet_lite0_gem"


def _pixels(data: bytes, params: dict | None, pre: images.Preprocess) -> np.ndarray:
    """The catalog photo as the embed job sees it, or a synthetic re-photograph of it."""
    if params is not None:
        img, _ = make_queries.augment(images.decode(data), params)
        data = make_queries.encode_jpeg(img, params["jpeg_quality"])
    return images.load(data, pre)


def _say(msg: str) -> None:
    print(f"[finetune] {msg}", flush=True)


def cached_maps(path: str, compute) -> dict:
    """compute()'s feature maps, kept in `path` (the trunk is frozen and the jobs seeded, so a
    rerun with other training settings reuses them)."""
    if os.path.exists(path):
        _say(f"trunk maps from {path}")
        return torch.load(path)
    maps = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(maps, path + ".tmp")
    os.replace(path + ".tmp", path)
    return maps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument(
        "--from-block", type=int, default=finetune.Settings.at, help="first trained block (1-6)"
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--keep", type=float, default=1.0, help="weight of the keep-near-frozen term")
    p.add_argument("--hard", type=float, default=finetune.Settings.hard,
                   help="share of each batch from one cluster of look-alikes")  # fmt: skip
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "finetune-maps"))
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
    tail = finetune.Tail(embedders.create(MODEL, for_training=True), a.from_block)
    pre = tail.embedder.preprocess

    view_rows = np.repeat(np.flatnonzero(splits == "train"), a.views)
    q_rows = {s: np.flatnonzero(splits == s) for s in ("val", "test")}

    def compute() -> dict:
        rng, q_rng = np.random.default_rng(2), np.random.default_rng(3)
        view_jobs = [(int(r), make_queries.draw_params(rng, "query")) for r in view_rows]
        q_jobs = {s: [(int(r), make_queries.draw_params(q_rng, "shopper")) for r in rows]
                  for s, rows in q_rows.items()}  # fmt: skip

        def maps(jobs):
            return tail.trunk_maps(lambda j: _pixels(sources[jobs[j][0]], jobs[j][1], pre),
                                   len(jobs), _say)  # fmt: skip

        return {"catalog": maps([(i, None) for i in range(len(sources))]),
                "val": maps(q_jobs["val"]), "test": maps(q_jobs["test"]),
                "views": maps(view_jobs)}  # fmt: skip

    name = f"{os.path.basename(a.catalog)}-at{a.from_block}-views{a.views}.pt"
    maps = cached_maps(os.path.join(a.cache, name), compute)
    trunk_s = time.perf_counter() - started

    def measure(split: str) -> tuple[float, np.ndarray]:
        catv, qv = tail.vectors(maps["catalog"]), tail.vectors(maps[split])
        return tuning.instance_recall(catv, pids, qv, pids[q_rows[split]])["instance_r1"], catv

    frozen_val, frozen_cat = measure("val")
    frozen_test, _ = measure("test")
    settings = finetune.Settings(
        at=a.from_block, epochs=a.epochs, batch=a.batch, lr=a.lr, temperature=a.temperature,
        keep=a.keep, hard=a.hard,
    )  # fmt: skip
    t0 = time.perf_counter()
    history = finetune.train(
        tail, maps["views"], view_rows, maps["catalog"], lambda _: measure("val")[0], settings,
        _say,
    )[1:]  # fmt: skip
    train_s = time.perf_counter() - t0
    tuned_test, tuned_cat = measure("test")

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
