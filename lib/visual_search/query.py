"""The query path shared by the Serve app and in-process callers: shard search with attribute
filters, docs lookup, and one result per product."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa

from visual_search import docstore, filters, fulltext, index, updates, versions
from visual_search.search import merge_topk

log = logging.getLogger(__name__)

# Oversampling rounds when several photos of one product crowd the top-k.
MAX_WIDEN = 6
# Hybrid search: each ranking contributes its top FUSION_DEPTH (at least), fused with
# reciprocal rank fusion, 1 / (RRF_K + rank) per list (Cormack et al.'s constant).
FUSION_DEPTH = 20
RRF_K = 60
# Filters whose matching ids a shard keeps (a category or filter a shopper repeats is cheap).
FILTER_CACHE = 64


@dataclass(frozen=True)
class Members:
    """The ids of a shard's items that pass one filter, sorted, with a FAISS selector over a
    bitmap of them: built once per cached filter, so a filtered search costs the same whatever
    share of the shard passes (a batch selector hashes every member on each search)."""

    ids: np.ndarray  # global ids, sorted
    bits: np.ndarray = field(repr=False)  # the selector reads this buffer: keep it alive
    selector: faiss.IDSelector = field(repr=False)

    @classmethod
    def of(cls, ids: np.ndarray, offset: int, n: int) -> Members:
        """ids are global; the selector sees ids - offset, in [0, n)."""
        ids = np.unique(np.asarray(ids, np.int64))
        mask = np.zeros(n, bool)
        mask[ids - offset] = True
        bits = np.packbits(mask, bitorder="little")
        return cls(ids, bits, faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits)))

    def without(self, dead: np.ndarray) -> int:
        """How many members are not in `dead` (sorted ids)."""
        pos = np.searchsorted(self.ids, dead)
        hit = pos < len(self.ids)
        return len(self.ids) - int((self.ids[pos[hit]] == dead[hit]).sum())


class ShardIndex:
    """One shard of one version, searchable by many threads at once (per-call parameters)."""

    def __init__(self, version: versions.Version, i: int, mmap: bool = True):
        self.version = version.manifest.version
        self.metric = version.manifest.metric
        self.index = version.load_shard(i, mmap=mmap)
        self.params = version.manifest.search_params
        lo, hi = version.manifest.shards[i].id_range
        # Filtered searches go to the index inside an IDMap with row numbers (ids are the
        # contiguous range [lo, hi) in row order, checked here), since IDMap cannot translate a
        # selector through a Refine stage.
        try:
            self.inner, self.offset = index.rows_of(self.index, lo, hi)
        except ValueError as e:
            raise ValueError(f"shard {i}: {e}") from None
        self.id_space = hi - self.offset  # the ids the inner index sees are below this
        # This shard's rows of the node's memory-mapped docs (docstore): not in the heap.
        table, self.products = docstore.open_docs(version)
        self.lo, self.hi = lo, hi
        self.docs = table.slice(lo, hi - lo)
        self.members: OrderedDict[str, Members] = OrderedDict()  # filter key -> its items
        self.lock = threading.Lock()
        self.map_lock = threading.Lock()
        text = version.manifest.text
        self.text = text and fulltext.load_shard(version.root, text["shards"][i])

    def _members(self, flt: filters.Filter) -> Members:
        """This shard's items that pass flt (cached for the latest filters)."""
        key = flt.key()
        with self.lock:  # searches run in several threads at once
            if key not in self.members:
                try:
                    ids = self._matching(flt)
                except filters.FilterError:  # e.g. a category filter on docs without categories
                    ids = np.zeros(0, np.int64)
                self.members[key] = Members.of(ids, self.offset, self.id_space)
                while len(self.members) > FILTER_CACHE:
                    self.members.popitem(last=False)
            self.members.move_to_end(key)
            return self.members[key]

    def _matching(self, flt: filters.Filter) -> np.ndarray:
        ids = filters.Filter(flt.conditions).ids(self.docs) if flt.conditions else None
        if flt.words:
            words = self.text.matching(flt.words) if self.text else np.zeros(0, np.int64)
            ids = words if ids is None else np.intersect1d(ids, words, assume_unique=True)
        return ids

    def search(self, vectors: np.ndarray, k: int, flt: filters.Filter | None = None, dead=None):
        """(scores, ids) (nq, k); with a filter, only the items that pass it, and never the ids
        in `dead` (tombstones of the update log), as many as there are up to k (an approximate
        search that comes back short is redone over every list)."""
        dead = np.zeros(0, np.int64) if dead is None else dead
        if not flt and not len(dead):
            return index.search(self.index, vectors, k, self.params)
        dead = np.unique(dead)
        alive = None  # the selector of the items not in dead (its parts must outlive the search)
        if len(dead):
            batch = faiss.IDSelectorBatch(dead - self.offset)
            alive = faiss.IDSelectorNot(batch)
        if flt:
            members = self._members(flt)
            expected = members.without(dead) if len(dead) else len(members.ids)
            if not expected:
                worst = -np.inf if self.metric == "ip" else np.inf
                n = len(vectors)
                return np.full((n, k), worst, np.float32), np.full((n, k), -1, np.int64)
            selector = members.selector
            if alive is not None:
                selector = faiss.IDSelectorAnd(members.selector, alive)
        else:
            selector, expected = alive, self.index.ntotal - len(dead)
        scores, ids = index.search(self.inner, vectors, k, self.params, selector)
        if (ids >= 0).sum(axis=1).min() < min(k, expected):
            scores, ids = index.search(self.inner, vectors, k, self.params, selector, True)
        return scores, np.where(ids >= 0, ids + self.offset, -1)

    def ids_of(self, product_id: str) -> np.ndarray:
        """This shard's ids of a product (a binary search of the sorted product index)."""
        rows = self.products.rows_of(product_id)
        return rows[(rows >= self.lo) & (rows < self.hi)]

    def text_search(self, text: str, k: int, flt: filters.Filter | None = None):
        """(scores, ids) (1, k) by BM25 over the docs' text (ids -1 when fewer match); empty
        when the version has no text index."""
        if not self.text:
            return np.full((1, k), -np.inf, np.float32), np.full((1, k), -1, np.int64)
        allowed = self._members(flt).ids if flt else None
        scores, ids = self.text.search(text, k, allowed)
        return scores[None], ids[None]

    def reconstruct(self, gid: int) -> np.ndarray:
        """The stored vector of a global id (exact with a Refine stage, else decoded)."""
        with self.map_lock:  # the first call on an IVF builds its direct map
            return index.reconstruct(self.inner, int(gid) - self.offset)


@dataclass(frozen=True)
class Docs:
    """The docs of a whole version, one row per global id (ids are dense, row == id), and,
    with `overlay`, the update log's effect on them (tombstones and new items). Loaded, they are
    memory-mapped with a sorted product index (docstore): neither memory nor a lookup's cost
    grows with the catalog."""

    version: str
    table: pa.Table
    products: docstore.ProductIndex = field(compare=False)
    overlay: updates.Overlay | None = field(default=None, compare=False)

    @classmethod
    def load(cls, version: versions.Version, overlay: updates.Overlay | None = None) -> Docs:
        table, products = docstore.open_docs(version)
        try:
            versions.evict_unused(version.index_root, version.manifest.version)
        except (OSError, ValueError) as exc:  # a cache left full must not fail a load
            log.warning("evicting unused versions' cached files failed: %s", exc)
        return cls(version.manifest.version, table, products, overlay)

    def base_ids_of(self, product_id: str) -> np.ndarray:
        return self.products.rows_of(product_id)

    def ids_of(self, product_id: str) -> np.ndarray:
        if self.overlay is not None and (ids := self.overlay.ids_of(product_id)) is not None:
            return ids
        return self.base_ids_of(product_id)

    @property
    def count(self) -> int:
        return self.table.num_rows + (len(self.overlay.live) if self.overlay else 0)

    def product_of(self, gid: int) -> str | None:
        """The product of an id; None for an id the update log has removed."""
        if self.overlay is not None:
            if gid in self.overlay.dead:
                return None
            if gid >= updates.DELTA_BASE:
                row = self.overlay.rows.get(gid)
                return None if row is None else row["product_id"]
        return self.table["product_id"][gid].as_py()

    def category_of(self, gid: int) -> str | None:
        """The category of one id (None when the docs have no category column or it is null)."""
        if gid >= updates.DELTA_BASE:
            value = self._delta_row(gid).get("category")
        elif "category" not in self.table.column_names:
            return None
        else:
            value = self.table["category"][gid].as_py()
        return None if value is None else str(value)

    def _delta_row(self, gid: int) -> dict:
        empty = dict.fromkeys(self.table.column_names)
        return {**empty, **(self.overlay.rows.get(gid, {}) if self.overlay else {}), "id": gid}

    def rows(self, ids: list[int]) -> list[dict]:
        base = [i for i in ids if i < updates.DELTA_BASE]
        taken = self.table.take(pa.array(base, pa.int64())).to_pylist()
        found = dict(zip(base, taken, strict=True))
        return [found[i] if i in found else self._delta_row(i) for i in ids]


def best_per_product(
    scores: np.ndarray,
    ids: np.ndarray,
    docs: Docs,
    k: int,
    exclude: str | None = None,
    group_of: dict | None = None,
) -> list[tuple[int, float]]:
    """One (id, score) per product, best photo first, from a merged sorted result row; with
    `group_of` (product -> near-duplicate group), one per group (collapse=true), and never one
    of the `exclude`d product's own group (its twins are the item itself, for a shopper)."""
    out, seen = [], set()
    if group_of and exclude is not None:
        seen.add(group_of.get(exclude, exclude))
    for gid, score in zip(ids.tolist(), scores.tolist(), strict=True):
        if gid < 0:
            break
        pid = docs.product_of(gid)
        key = (group_of or {}).get(pid, pid)
        if pid is None or key in seen or pid == exclude:
            continue
        seen.add(key)
        out.append((gid, score))
        if len(out) == k:
            break
    return out


def results(docs: Docs, hits: list[tuple[int, float]]) -> list[dict]:
    """Hits joined with their docs: product_id, score, image_uri, metadata."""
    rows = docs.rows([gid for gid, _ in hits])
    out = []
    for (gid, score), row in zip(hits, rows, strict=True):
        row = {key: value for key, value in row.items() if key != "id"}
        out.append({"id": gid, "score": round(float(score), 6), **row})
    return out


async def widening_search(
    fan_out, metric: str, docs: Docs, k: int, exclude: str | None = None, group_of=None
):
    """Await fan_out(k') -> per-shard [(scores, ids)] with a growing k' until k distinct products
    (or groups, with group_of) are found or the index is exhausted; [(id, score)], best first."""
    width = k + (1 if exclude else 0)
    n = docs.count
    hits: list[tuple[int, float]] = []
    for _ in range(MAX_WIDEN):
        scores, ids = merge_topk(await fan_out(width), width, metric)
        hits = best_per_product(scores[0], ids[0], docs, k, exclude, group_of)
        if len(hits) >= k or (ids[0] < 0).any() or width >= n:
            break
        width = min(width * 4, n)
    return hits


async def preferring_search(
    fan_out, metric: str, docs: Docs, k: int, exclude: str | None = None, prefer=None, group_of=None
):
    """widening_search over fan_out(k', filter or None): the k nearest products of category
    `prefer` first (GET /similar: the item's own), then, only when it has fewer than k, the
    nearest others; [(id, score)]."""
    args = (metric, docs, k, exclude, group_of)
    if prefer is None:
        return await widening_search(lambda w: fan_out(w, None), *args)
    own_category = filters.Filter.category(prefer)
    own = await widening_search(lambda w: fan_out(w, own_category), *args)
    if len(own) >= k:
        return own
    near = await widening_search(lambda w: fan_out(w, None), *args)
    keys = group_of or {}
    seen = {keys.get(p, p) for p in (docs.product_of(gid) for gid, _ in own)}
    rest = [(gid, s) for gid, s in near if keys.get(p := docs.product_of(gid), p) not in seen]
    return (own + rest)[:k]


def fuse(
    rankings: list[list[dict]],
    k: int,
    names: tuple[str, ...],
    weights: dict[str, float] | None = None,
) -> list[dict]:
    """Result rows of several rankings of products (best first) fused by reciprocal rank: the
    first row seen of each product, `score` = sum of weight / (RRF_K + rank) (weights by name,
    default 1; texttower tunes them), and `ranks` = its 1-based rank in each (None where
    absent); the best k, ties by first appearance. A product only rankings of weight 0 found
    is left out (a zero weight turns that ranking off)."""
    rows: dict[str, dict] = {}
    for name, ranking in zip(names, rankings, strict=True):
        weight = 1.0 if weights is None else weights.get(name, 1.0)
        for rank, row in enumerate(ranking, 1):
            fused = rows.setdefault(
                row["product_id"], {**row, "score": 0.0, "ranks": dict.fromkeys(names)}
            )
            fused["score"] += weight / (RRF_K + rank)
            fused["ranks"][name] = rank
    best = sorted(rows.values(), key=lambda r: -r["score"])  # stable: first appearance wins ties
    best = [row for row in best if row["score"] > 0]
    for row in best:
        row["score"] = round(row["score"], 6)
    return best[:k]


def words_weight(weights: dict[str, float] | None, names: tuple[str, ...], k: int) -> float:
    """The fusion weight of a "words" ranking (POST /search?q=: the photo's ranking among the
    products that match the words) that puts each of its first k ahead of every product it does
    not hold: its rank k outscores rank 1 in all the other rankings `names` together."""
    others = sum(1.0 if weights is None else weights.get(n, 1.0) for n in names)
    return others * (RRF_K + k + 1) / (RRF_K + 1)
