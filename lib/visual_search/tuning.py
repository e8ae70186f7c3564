"""Pure parts of the catalog-tuning stage (jobs/tune.py): product splits, retrieval metrics on
vectors, the concat mix and the keep-or-drop decision.

Measured the way the service answers: instance recall@k of a re-photographed query among the
whole catalog (its own product relevant), and category precision@10 of /similar (a catalog
photo's 10 nearest other products, relevant when they share its label).
"""

from __future__ import annotations

import hashlib

import faiss
import numpy as np

SPLITS = ("train", "val", "test")


def split_products(product_ids, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> np.ndarray:
    """Each row's split name, by a seeded hash of its product id: every photo of a product
    lands in the same split, and a product keeps its split when the catalog grows."""
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 3 non-negative shares summing to 1, got {fractions}")
    edges = np.cumsum(fractions)[:2]

    def share(pid: str) -> float:
        digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    shares = np.fromiter((share(str(p)) for p in product_ids), float, len(product_ids))
    return np.asarray(SPLITS)[np.searchsorted(edges, shares, side="right")]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def concat(backbone: np.ndarray, projection: np.ndarray, mix: float) -> np.ndarray:
    """What a "concat" head outputs (heads.Head): cosine = (1-mix) backbone + mix projection."""
    return np.concatenate(
        [np.sqrt(1 - mix) * unit(backbone), np.sqrt(mix) * unit(projection)], axis=1
    ).astype(np.float32)


def _neighbours(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(unit(gallery))
    return index.search(unit(queries), min(k, len(gallery)))[1]


def instance_recall(
    gallery: np.ndarray, gallery_pids, queries: np.ndarray, query_pids, ks=(1, 10)
) -> dict[str, float]:
    """Share of queries whose own product is among the first k distinct products."""
    gallery_pids = np.asarray(gallery_pids).astype(str)
    hits = _neighbours(gallery, queries, 4 * max(ks))
    out = {}
    for k in ks:
        found = [
            str(q) in gallery_pids[_first_distinct(row, gallery_pids, k)]
            for q, row in zip(query_pids, hits, strict=True)
        ]
        out[f"instance_r{k}"] = float(np.mean(found))
    return out


def _first_distinct(row: np.ndarray, pids: np.ndarray, k: int, exclude: str | None = None):
    """Positions in `row` of its first k distinct products (one per product, `exclude` left
    out), as the API's one-result-per-product answers."""
    chosen, seen = [], {exclude}
    for j in row:
        if pids[j] not in seen:
            seen.add(pids[j])
            chosen.append(j)
            if len(chosen) == k:
                break
    return chosen


def category_precision(gallery: np.ndarray, pids, labels, rows: np.ndarray, k: int = 10) -> float:
    """/similar's label precision@k for the given gallery rows (their own product excluded)."""
    pids, labels = np.asarray(pids).astype(str), np.asarray(labels).astype(str)
    hits = _neighbours(gallery, gallery[rows], 4 * k + 1)
    precisions = []
    for r, row in zip(rows, hits, strict=True):
        chosen = _first_distinct(row, pids, k, exclude=pids[r])
        if chosen:
            precisions.append(float(np.mean(labels[chosen] == labels[r])))
    return float(np.mean(precisions)) if precisions else 0.0


def measure(gallery, pids, labels, queries, query_pids, rows) -> dict[str, float]:
    """Instance recall@1/@10 of `queries` and category precision@10 of gallery `rows` (when
    there are labels)."""
    out = instance_recall(gallery, pids, queries, query_pids)
    if labels is not None:
        out["category_p10"] = category_precision(gallery, pids, labels, rows)
    return {k: round(v, 4) for k, v in out.items()}


def objective(m: dict[str, float]) -> float:
    """What the mix is chosen for: the shopper's two questions weigh the same."""
    return m["instance_r1"] + m.get("category_p10", 0.0)


def choose_mix(untuned: dict, by_mix: dict[float, dict], max_instance_drop: float) -> float:
    """The mix with the best objective among those that keep instance recall@1 (within
    max_instance_drop of the untuned model's); the smallest mix when none does."""
    floor = untuned["instance_r1"] - max_instance_drop
    fine = [m for m, v in by_mix.items() if v["instance_r1"] >= floor]
    return max(fine, key=lambda m: objective(by_mix[m])) if fine else min(by_mix)


def decide(untuned: dict, tuned: dict, max_instance_drop: float) -> tuple[bool, str]:
    """Keep the tuned model only when it is better overall and costs no instance recall."""
    drop = untuned["instance_r1"] - tuned["instance_r1"]
    if drop > max_instance_drop:
        return False, f"instance recall@1 drops by {drop:.4f} (> {max_instance_drop})"
    if objective(tuned) <= objective(untuned):
        return False, "no better than the untuned model on held-out products"
    return True, "better on held-out products"


def skip_reason(n_images: int, labels, min_images: int, min_per_label: int) -> str | None:
    """Why tuning is not worth it for this catalog, or None."""
    if n_images < min_images:
        return f"{n_images} images < {min_images} (too few to learn from and measure)"
    if labels is None:
        return "no label column (self-supervised tuning needs re-photographed views: not built)"
    values, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    usable = int((counts >= min_per_label).sum())
    if usable < 2:
        return f"fewer than 2 labels with >= {min_per_label} images"
    return None
