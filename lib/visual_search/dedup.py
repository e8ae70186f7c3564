"""Near-duplicate product groups (Contract 6): candidates, mutual top-k edges, complete groups.

Items are photos (global ids of a version); groups are of products. Candidate pairs of products
come from the index: their best exact inner product over their photos, and the photo pair that
gave it (which dedup_verify then scores as a copy or not); two photos of one product never make
a pair. An edge joins two products when each is among the other's k best-scoring products at or
above the threshold (mutual top-k); edges make components (union-find), and a component is
kept as one group only when it is complete: every two members score >= the threshold. One that
is not is split around its medoid, so a chain a~b~c with a and c unrelated never merges, while
3-4 copies of one photo (all pairs verified) form one group.

For the service: `load_groups(uri)` reads `{out}/groups.parquet` of a complete output (its
manifest.json written) into a `Groups` lookup (product -> group, group -> members).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from visual_search import embeddings, index, storage
from visual_search.search import merge_topk
from visual_search.versions import Version

GROUPS_SCHEMA = pa.schema(
    [("product_id", pa.string()), ("group_id", pa.int64()), ("score", pa.float32())]
)


class DedupError(ValueError):
    """The dedup job cannot run on what it was given (missing version, bad output)."""


# ------------------------------------------------------------------------- candidates (Ray)


def _exact_vectors(version: Version, dataset, ids: np.ndarray, rows: list) -> np.ndarray:
    """Exact vectors of ids: from the embeddings dataset when given, else reconstructed from
    the shards' (inner index, offset) views (`index.rows_of`)."""
    if dataset is not None:
        got, x = dataset.read_ids(ids)
        pos = np.searchsorted(got, ids)
        return x[pos]
    starts = np.array([s.id_range[0] for s in version.manifest.shards])
    out = np.empty((len(ids), version.manifest.dim), np.float32)
    for j, gid in enumerate(ids.tolist()):
        inner, offset = rows[int(np.searchsorted(starts, gid, side="right") - 1)]
        out[j] = index.reconstruct(inner, gid - offset)
    return out


def matching_dataset(version: Version, product_ids: pa.Array):
    """The embeddings dataset the version was built from when it is there and holds exactly the
    version's rows (count, dimension, product per id), else None (vectors are reconstructed)."""
    m = version.manifest
    uri = (m.embeddings or {}).get("uri")
    if not uri:
        return None
    try:
        dataset = embeddings.open_dataset(uri)
    except (embeddings.DatasetError, storage.StorageError):
        return None
    if dataset.count != m.count or dataset.dim != m.dim:
        return None
    for p in dataset.parts:
        pids = storage.read_parquet(p.uri, columns=["product_id"])["product_id"].combine_chunks()
        if not pids.equals(product_ids.slice(p.first_id, p.rows)):
            return None
    return dataset


def query_items(
    version: Version, dataset, qids: np.ndarray, k: int, batch: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray task body: k-NN of the items qids against every shard, re-scored exactly.

    Returns (query ids (m,), candidate ids (m, k), exact scores (m, k) float32); the query's
    own id and padding are -1 with score -inf.
    """
    shards = [version.load_shard(i) for i in range(len(version.manifest.shards))]
    ranges = [s.id_range for s in version.manifest.shards]
    rows = None  # the vectors come from the dataset
    if dataset is None:
        rows = [index.rows_of(s, lo, hi) for s, (lo, hi) in zip(shards, ranges, strict=True)]
    qids = np.asarray(qids, np.int64)
    out_i = np.full((len(qids), k), -1, np.int64)
    out_s = np.full((len(qids), k), -np.inf, np.float32)
    params = version.manifest.search_params
    for a in range(0, len(qids), batch):
        q = qids[a : a + batch]
        x = _exact_vectors(version, dataset, q, rows)
        parts = [index.search(s, x, k + 1, params) for s in shards]
        _, ids = merge_topk(parts, k + 1, version.manifest.metric)
        ids = np.where(ids == q[:, None], -1, ids)
        uniq = np.unique(ids[ids >= 0])
        cand = _exact_vectors(version, dataset, uniq, rows) if len(uniq) else None
        for r in range(len(q)):
            row = ids[r][ids[r] >= 0][:k]
            if len(row):
                out_i[a + r, : len(row)] = row
                out_s[a + r, : len(row)] = cand[np.searchsorted(uniq, row)] @ x[r]
    return qids, out_i, out_s


# ---------------------------------------------------------------------------- pure stages


def product_pairs(
    qids: np.ndarray, cand: np.ndarray, scores: np.ndarray, product_of: np.ndarray
) -> tuple[np.ndarray, ...]:
    """Item candidates -> product pairs (a, b, score, item_a, item_b): codes a < b, their best
    score over their photos, and the global ids of the photos of a and of b that gave it.

    `product_of`: product code (int) per global id. Same-product pairs are dropped."""
    rows = np.repeat(np.asarray(qids, np.int64), cand.shape[1])
    cols, s = cand.ravel(), scores.ravel()
    ok = cols >= 0
    rows, cols, s = rows[ok], cols[ok], s[ok]
    pa_, pb = product_of[rows], product_of[cols]
    diff = pa_ != pb
    rows, cols, s, pa_, pb = rows[diff], cols[diff], s[diff], pa_[diff], pb[diff]
    swap = pa_ > pb
    return merge_pairs(
        (
            np.where(swap, pb, pa_),
            np.where(swap, pa_, pb),
            s,
            np.where(swap, cols, rows),
            np.where(swap, rows, cols),
        )
    )


def merge_pairs(*lists: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Union of (a, b, score, *extra) pair lists (a < b), keeping each pair's best-scoring
    row (its extra columns with it)."""
    a = np.concatenate([p[0] for p in lists]).astype(np.int64)
    b = np.concatenate([p[1] for p in lists]).astype(np.int64)
    s = np.concatenate([p[2] for p in lists]).astype(np.float32)
    extra = [np.concatenate([p[j] for p in lists]) for j in range(3, len(lists[0]))]
    if not len(a):
        return (a, b, s, *extra)
    order = np.lexsort((-s, b, a))
    first = np.ones(len(a), bool)
    first[1:] = (a[order][1:] != a[order][:-1]) | (b[order][1:] != b[order][:-1])
    keep = order[first]
    return (a[keep], b[keep], s[keep], *(e[keep] for e in extra))


def top_neighbours(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst): each product's k best other products (score desc, ties by smaller code)."""
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])
    order = np.lexsort((dst, -np.concatenate([s, s]), src))
    src, dst = src[order], dst[order]
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    rank = np.arange(len(src)) - np.repeat(starts, np.diff(np.r_[starts, len(src)]))
    keep = rank < k
    return src[keep], dst[keep]


def mutual_edges(
    a: np.ndarray, b: np.ndarray, s: np.ndarray, threshold: float, k: int = 1
) -> list[tuple[int, int, float]]:
    """Pairs (a, b, score) that are mutual top-k products with score >= threshold (among the
    pairs at or above it: a pair below never takes a place in a top k)."""
    a, b, s = np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(s, np.float32)
    above = s >= threshold
    a, b, s = a[above], b[above], s[above]
    if not len(a):
        return []
    src, dst = top_neighbours(a, b, s, k)
    n = int(max(a.max(), b.max())) + 1
    top = src * n + dst
    mutual = np.isin(a * n + b, top) & np.isin(b * n + a, top) & (s >= threshold)
    return list(zip(a[mutual].tolist(), b[mutual].tolist(), s[mutual].tolist(), strict=True))


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.setdefault(root, root) != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def _complete(nodes: list[int], score, threshold: float, name) -> list[tuple[int, list[int]]]:
    """Split one component into (medoid, members) groups in which every two members score >=
    threshold: the medoid (highest sum of scores to the others) takes, best first, each node
    that scores >= threshold with every member taken so far; the rest is split again."""
    rest = sorted(nodes, key=name)
    out = []
    while len(rest) > 1:
        total = {x: sum(max(score(x, y), 0.0) for y in rest if y != x) for x in rest}
        medoid = min(rest, key=lambda x: (-round(total[x], 6), name(x)))
        group = [medoid]
        for y in sorted(rest, key=lambda y: (-score(medoid, y), name(y))):
            if y != medoid and all(score(y, g) >= threshold for g in group):
                group.append(y)
        if len(group) > 1:
            out.append((medoid, group))
        rest = [x for x in rest if x not in group]
    return out


def groups_from_edges(
    edges: list[tuple[int, int, float]],
    names: list[str],
    scores: dict[tuple[int, int], float] | None = None,
    threshold: float | None = None,
) -> list[dict]:
    """Union-find components of product codes, each split into complete groups ->
    [{group_id, representative, members: {name: score}}], group_id by the order of each
    group's smallest product name (deterministic).

    `scores`: every scored pair (x, y) with x < y (default: the edges); a pair absent scores
    -inf. `threshold`: what two members of one group must score (default: the lowest edge).
    Representative: the medoid; a member's score is its score with it (1.0 for itself)."""
    if not edges:
        return []
    pair = dict(scores) if scores is not None else {(x, y): sc for x, y, sc in edges}
    t = min(sc for _, _, sc in edges) if threshold is None else threshold
    uf = UnionFind()
    for x, y, _ in edges:
        uf.union(x, y)
    components: dict[int, list[int]] = {}
    for node in {n for x, y, _ in edges for n in (x, y)}:
        components.setdefault(uf.find(node), []).append(node)

    def score(x: int, y: int) -> float:
        return pair.get((min(x, y), max(x, y)), -np.inf)

    out = []
    for nodes in components.values():
        for rep, members in _complete(nodes, score, t, names.__getitem__):
            out.append(
                {
                    "representative": names[rep],
                    "members": {names[n]: 1.0 if n == rep else score(n, rep) for n in members},
                }
            )
    out.sort(key=lambda g: min(g["members"]))
    for gid, g in enumerate(out):
        g["group_id"] = gid
    return out


def groups_table(groups: list[dict]) -> pa.Table:
    rows = [(pid, g["group_id"], sc) for g in groups for pid, sc in sorted(g["members"].items())]
    return pa.table(
        {
            "product_id": pa.array([r[0] for r in rows], pa.string()),
            "group_id": pa.array([r[1] for r in rows], pa.int64()),
            "score": pa.array([r[2] for r in rows], pa.float32()),
        },
        schema=GROUPS_SCHEMA,
    )


# ------------------------------------------------------------------------- calibration


def pr_curve(
    scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, positives: int | None = None
) -> list[dict]:
    """Precision/recall of "pair score >= t" per threshold; labels: 1 duplicate, 0 not.
    `positives`: how many true pairs exist (default: the labelled ones; more when some true
    pairs never became candidates, so recall counts them as missed)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    pos = int(labels.sum()) if positives is None else positives
    curve = []
    for t in np.asarray(thresholds, np.float64).tolist():
        hit = scores >= t
        tp, fp = int((hit & labels).sum()), int((hit & ~labels).sum())
        precision = tp / (tp + fp) if tp + fp else 1.0
        curve.append(
            {
                "threshold": round(t, 4),
                "precision": precision,
                "recall": tp / max(pos, 1),
                "tp": tp,
                "fp": fp,
            }
        )
    return curve


def choose_threshold(curve: list[dict], min_precision: float = 0.99) -> dict:
    """The lowest threshold whose precision (and every higher one's) is >= min_precision."""
    ok = None
    for point in sorted(curve, key=lambda p: -p["threshold"]):
        if point["precision"] < min_precision:
            break
        ok = point
    if ok is None:
        raise DedupError(f"no threshold reaches precision {min_precision}")
    return ok


# ------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Groups:
    """product_id -> group_id, and group_id -> [(product_id, score)] best first."""

    group_of: dict[str, int]
    members: dict[int, list[tuple[str, float]]]

    def duplicates(self, product_id: str) -> list[tuple[str, float]]:
        """The other products of product_id's group (empty when it is in none)."""
        gid = self.group_of.get(product_id)
        if gid is None:
            return []
        return [m for m in self.members[gid] if m[0] != product_id]


def groups_from_table(table: pa.Table) -> Groups:
    group_of: dict[str, int] = {}
    members: dict[int, list[tuple[str, float]]] = {}
    for pid, gid, sc in zip(
        table["product_id"].to_pylist(),
        table["group_id"].to_pylist(),
        table["score"].to_pylist(),
        strict=True,
    ):
        group_of[pid] = gid
        members.setdefault(gid, []).append((pid, float(sc)))
    for lst in members.values():
        lst.sort(key=lambda m: (-m[1], m[0]))
    return Groups(group_of, members)


def load_groups(out: str) -> Groups:
    """Groups of a complete dedup output folder (manifest.json present), for the service;
    DedupError when it is incomplete or its groups.parquet does not hold GROUPS_SCHEMA's
    columns (nulls included)."""
    if not storage.exists(storage.join(out, "manifest.json")):
        raise DedupError(f"{out}: no manifest.json (dedup output missing or incomplete)")
    uri = storage.join(out, "groups.parquet")
    table = storage.read_parquet(uri)
    for field in GROUPS_SCHEMA:
        column = table.column(field.name) if field.name in table.column_names else None
        if column is None or column.type != field.type or column.null_count:
            raise DedupError(f"{uri}: needs a column {field.name} of {field.type} without nulls")
    return groups_from_table(table)


def output_root(index_root: str, version: str) -> str:
    """Where the dedup of a version goes by default (outside the immutable version folder)."""
    return storage.join(index_root, "dedup", version)
