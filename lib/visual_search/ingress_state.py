"""What one ingress query pins and the pieces of its answer: the State (an index version, its
docs with the update log's overlay, near-duplicate groups, text tower) swapped as a whole on
reload, how a version is loaded into one, the ingress Settings, and the helpers that build
answers from a State (filters, fusion, image URLs, GET /version)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from visual_search import dedup, filters, live, query, storage, texttower, updates, versions
from visual_search.httpapi import ApiError

log = logging.getLogger("visual_search.serving")


@dataclass(frozen=True)
class Settings:
    """The ingress's limits and switches (serve/app.py's AppArgs sets them)."""

    max_upload_bytes: int = 10 << 20
    max_inflight: int = 64  # searches in flight before 503
    api_key_env: str = "VISUAL_SEARCH_API_KEY"  # /admin/* needs this key; none: 403
    rerank: int = 10  # top products of POST /search re-ranked by geometric verification
    backdrop_balance: bool = True  # a query's backdrop scaled to white (images.balance_backdrop)
    admin_open: bool = False  # /admin/* without a key when none is configured
    upload_tiff: bool = False
    upload_timeout_s: float = 30.0  # a slower upload gets a 408
    shard_timeout_s: float = 5.0  # a slower shard is left out of the answer (partial)
    follow_current: bool = True  # switch to a new CURRENT by itself (every replica)

    @property
    def max_reading(self) -> int:
        """Uploads being received at once (they hold memory, not search slots)."""
        return 4 * self.max_inflight


@dataclass(frozen=True)
class Narrowing:
    """The query parameters every search endpoint shares."""

    k: int = 10
    category: str | None = None
    filter_text: str | None = None
    collapse: bool = False
    min_seq: int = 0


class State:
    """What one query needs, swapped as a whole on reload."""

    def __init__(self, version: versions.Version, docs: query.Docs, local=None, groups=None):
        self.version = version
        self.docs = docs  # with the update log's overlay, kept caught up by `follower`
        self.name = version.manifest.version
        self.filterable = filters.filterable_columns(docs.table)
        self.local = local  # the version's own model, when the ingress embeds (BatchedEmbedder)
        self.groups: dedup.Groups | None = groups  # near-duplicate groups; None: not available
        self.follower: live.Follower | None = None
        self.committer: live.Committer | None = None
        self.tower: texttower.Tower | None = None  # semantic text search; None: BM25 alone

    def with_groups(self, groups: dedup.Groups | None) -> State:
        state = State(self.version, self.docs, self.local, groups)
        state.follower, state.committer = self.follower, self.committer
        state.tower = self.tower
        return state

    def weights(self, kind: str) -> dict | None:
        """The version's tuned fusion weights ("text": GET, "hybrid": POST), None: equal."""
        return texttower.weights(self.version.manifest.text_tower, kind)

    def semantic(self, kind: str) -> bool:
        """Whether the tower's ranking counts in this fusion (a tuned weight of 0: not run)."""
        weights = self.weights(kind)
        return self.tower is not None and (weights is None or weights.get("semantic", 1.0) > 0)

    @property
    def seq(self) -> int:
        return self.docs.overlay.seq

    @property
    def group_count(self) -> int | None:
        """How many near-duplicate groups are loaded (None: none for this version)."""
        return None if self.groups is None else len(self.groups.members)


def load_state(index_root: str, version: versions.Version, n_shards: int, local=None) -> State:
    """A State for `version`, its docs caught up with the update log; 409 when the version
    has another shard count than the app serves."""
    m = version.manifest
    if len(m.shards) != n_shards:
        raise ApiError(
            409,
            "incompatible_version",
            f"version {m.version} has {len(m.shards)} shards, "
            f"the app serves {n_shards}: redeploy with the new shard count",
        )
    groups = load_groups(index_root, m.version)
    base = query.Docs.load(version)
    start = updates.check_reachable(index_root, updates.Position.of(m.updates_through))
    overlay = updates.Overlay(base.base_ids_of, start, updates.model_key(m.model))
    overlay.catch_up(index_root)
    state = State(version, dataclasses.replace(base, overlay=overlay), local, groups)
    state.follower = live.Follower(index_root, overlay)
    state.committer = live.Committer(updates.Writer(index_root, overlay.position, m.dim))
    state.tower = texttower.load(version.root, m.text_tower)
    return state


def load_groups(index_root: str, version: str) -> dedup.Groups | None:
    """The version's near-duplicate groups at dedup.output_root; None when the dedup job has not
    (fully) written them, or when they cannot be read (logged: collapse=true is then a no-op)."""
    out = dedup.output_root(index_root, version)
    try:
        if not storage.exists(storage.join(out, "manifest.json")):
            return None
        return dedup.load_groups(out)
    except (dedup.DedupError, storage.StorageError) as exc:
        log.warning("version %s: near-duplicate groups not loaded: %s", version, exc)
        return None


def check_product_id(product_id: str) -> str:
    if not 0 < len(product_id) <= 512 or not product_id.isprintable():
        raise ApiError(400, "bad_product_id", "a product id is 1 to 512 printable characters")
    return product_id


def stale(wanted: int, seq: int) -> ApiError:
    message = f"updates through seq {wanted} are not all applied yet (at {seq}); retry"
    return ApiError(503, "stale", message)


def with_image_urls(rows: list[dict]) -> list[dict]:
    """query.results rows with the URL of their photo on this service."""
    for row in rows:
        row["image_url"] = f"/products/{row['product_id']}/image?id={row['id']}"
    return rows


def parse_filter(state: State, category: str | None, text: str | None):
    """`category=` and `filter=` as one filters.Filter (None: no filter); 400 when malformed
    or naming a field the version does not declare filterable."""
    try:
        flt = filters.parse(text or "", state.filterable)
    except filters.FilterError as exc:
        raise ApiError(400, "bad_filter", str(exc)) from exc
    if category is not None:
        flt = flt.and_(filters.Filter.category(category))
    return flt or None


def fusion_width(k: int) -> int:
    """Results each ranking gives a fused answer (query.FUSION_DEPTH at least)."""
    return min(max(2 * k, query.FUSION_DEPTH), 100)


def fused(answers: list[dict], names: tuple[str, ...], k: int, weights: dict | None) -> dict:
    """One answer from several rankings' answers (the first's fields), results fused by
    weighted reciprocal rank (query.fuse), each saying its `ranks`."""
    answer = dict(answers[0])
    answer["results"] = query.fuse([a["results"] for a in answers], k, names, weights)
    answer["seq"] = min(a["seq"] for a in answers)
    answer["partial"] = any(a["partial"] for a in answers)
    answer["took_ms"] = max(a["took_ms"] for a in answers)
    answer["fusion"] = {"method": "rrf", "k": query.RRF_K}
    if weights:
        answer["fusion"]["weights"] = weights
    answer.pop("preferred_category", None)
    return answer


def tower_summary(record: dict) -> dict:
    """What /version says of the semantic text tower."""
    fusion = record["fusion"]
    return {
        "kind": record["kind"],
        "rows": record["rows"],
        "heldout_title_r10": record["heldout"]["title_r10"],
        "weights": {"text": fusion["text"]["weights"], "hybrid": fusion["hybrid"]["weights"]},
    }


def describe(state: State, code_version: str) -> dict:
    """GET /version: the live version, its model, index, text search and update log."""
    m = state.version.manifest
    built = datetime.fromtimestamp(m.created_unix, UTC)
    return {
        "index_version": m.version,
        "model": m.model,
        "built": built.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "built_unix": m.created_unix,
        "code_version": code_version,
        "index_code_version": m.code_version,
        "count": m.count,
        "factory": m.factory,
        "search_params": m.search_params,
        "shards": len(m.shards),
        "recall": {k: v for k, v in m.recall.items() if k != "curve"},
        "groups": state.group_count,
        # what filter= accepts ({field: "string" | "number"}) and whether ?q= is served
        "filterable": state.filterable,
        "text": m.text["columns"] if m.text else None,
        "semantic_text": tower_summary(m.text_tower) if state.tower else None,
        "updates": {
            "seq": state.seq,
            "through": updates.Position.of(m.updates_through).as_dict(),
            # applied on top of the version: what the next compaction folds in
            "since_version": state.seq - (m.updates_through or {}).get("seq", 0),
            "unsearchable": state.docs.overlay.unusable,
        },
    }
