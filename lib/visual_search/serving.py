"""The FastAPI ingress deployment (Contract 4); its back ends are in searchers.py and its HTTP
layer (errors, metrics, timing, uploads) in httpapi.py.

The ingress decodes uploads (CPU, off the event loop), embeds them in batches of concurrent
queries (itself on CPU, or through the QueryEmbedder deployment), fans out to one searcher
deployment per shard with asyncio.gather, merges with merge_topk and joins the docs. POST /search
then re-ranks its top products by geometric verification (verify.py) against their catalog
photos. Every query pins one index version end to end, so a reload never mixes two. The
version's near-duplicate groups (jobs/dedup.py's output, Contract 6), when there are any, serve
collapse=true and GET /products/{id}/duplicates.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoint types at run time.
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Query, Request, Response
from fastapi.responses import HTMLResponse
from ray import serve

from visual_search import (
    dedup,
    embedders,
    fanout,
    filters,
    fulltext,
    httpapi,
    images,
    live,
    query,
    storage,
    texttower,
    updates,
    verify,
    versions,
)
from visual_search.httpapi import ApiError, Stages
from visual_search.manifest import code_version
from visual_search.searchers import BatchedEmbedder

log = logging.getLogger("visual_search.serving")
STATIC = Path(__file__).parent / "static"

# Local features of re-ranked catalog photos, per ingress replica (500 keypoints: about 130 kB).
FEATURE_CACHE_BYTES = 256 << 20

TopK = Annotated[int, Query(ge=1, le=100)]
Category = Annotated[str | None, Query(min_length=1, max_length=200)]
FilterText = Annotated[
    str | None,
    Query(
        alias="filter",
        max_length=filters.MAX_FILTER_CHARS,
        description="field:value, field:v1|v2, field<N, field>N, field:lo..hi; comma = and",
    ),
]
MinSeq = Annotated[
    int,
    Query(
        ge=0,
        description="answer only once every update up to this seq (PUT/DELETE's answer) is "
        f"reflected; 503 stale after about {live.STALE_WAIT_S:g} s",
    ),
]
HybridText = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=fulltext.MAX_QUERY_CHARS,
        description="words to search with the photo (hybrid: both rankings fused by RRF)",
    ),
]
Collapse = Annotated[
    bool,
    Query(
        description="at most one product per near-duplicate group (the best-scoring one), from "
        "the live version's jobs/dedup.py groups; without them a no-op, answered collapsed=false",
    ),
]


@dataclass(frozen=True)
class Settings:
    """The ingress's limits and switches (serve/app.py's AppArgs sets them)."""

    max_upload_bytes: int = 10 << 20
    max_inflight: int = 64  # searches in flight before 503
    api_key_env: str = "VISUAL_SEARCH_API_KEY"  # /admin/* needs this key; none: 403
    rerank: int = 10  # top products of POST /search re-ranked by geometric verification
    admin_open: bool = False  # /admin/* without a key when none is configured
    upload_tiff: bool = False
    upload_timeout_s: float = 30.0  # a slower upload gets a 408
    shard_timeout_s: float = 5.0  # a slower shard is left out of the answer (partial)

    @property
    def max_reading(self) -> int:
        """Uploads being received at once (they hold memory, not search slots)."""
        return 4 * self.max_inflight


class _State:
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

    def with_groups(self, groups: dedup.Groups | None) -> "_State":
        state = _State(self.version, self.docs, self.local, groups)
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


def _load_groups(index_root: str, version: str) -> dedup.Groups | None:
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


def _check_product_id(product_id: str) -> str:
    if not 0 < len(product_id) <= 512 or not product_id.isprintable():
        raise ApiError(400, "bad_product_id", "a product id is 1 to 512 printable characters")
    return product_id


def _stale(wanted: int, seq: int) -> ApiError:
    message = f"updates through seq {wanted} are not all applied yet (at {seq}); retry"
    return ApiError(503, "stale", message)


def _with_image_urls(rows: list[dict]) -> list[dict]:
    """query.results rows with the URL of their photo on this service."""
    for row in rows:
        row["image_url"] = f"/products/{row['product_id']}/image?id={row['id']}"
    return rows


def _parse_filter(state: _State, category: str | None, text: str | None):
    """`category=` and `filter=` as one filters.Filter (None: no filter); 400 when malformed
    or naming a field the version does not declare filterable."""
    try:
        flt = filters.parse(text or "", state.filterable)
    except filters.FilterError as exc:
        raise ApiError(400, "bad_filter", str(exc)) from exc
    if category is not None:
        flt = flt.and_(filters.Filter.category(category))
    return flt or None


def _fusion_width(k: int) -> int:
    """Results each ranking gives a fused answer (query.FUSION_DEPTH at least)."""
    return min(max(2 * k, query.FUSION_DEPTH), 100)


def _fused(answers: list[dict], names: tuple[str, ...], k: int, weights: dict | None) -> dict:
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


def _tower_summary(record: dict) -> dict:
    """What /version says of the semantic text tower."""
    fusion = record["fusion"]
    return {
        "kind": record["kind"],
        "rows": record["rows"],
        "heldout_title_r10": record["heldout"]["title_r10"],
        "weights": {"text": fusion["text"]["weights"], "hybrid": fusion["hybrid"]["weights"]},
    }


app = httpapi.make_app("visual_search")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        embedder,
        shards: list,
        index_root: str,
        s3_endpoint: str | None,
        settings: Settings,
        local_embedder: dict | None = None,
    ):
        """`embedder`: the QueryEmbedder handle, or None with `local_embedder` = the
        BatchedEmbedder arguments (weights, device, threads) to embed in this replica."""
        if s3_endpoint:
            storage.configure(s3_endpoint)
        self.embedder, self.shards = embedder, shards
        self.index_root, self.settings = index_root, settings
        self.api_key = os.environ.get(settings.api_key_env) or None
        self.searching = self.reading = 0
        self.reload_lock = asyncio.Lock()
        self.following: asyncio.Task | None = None
        self.local_args = local_embedder if embedder is None else None
        version = versions.open_version(index_root)
        local = None
        if self.local_args is not None:
            local = BatchedEmbedder(version.manifest.model, **self.local_args)
        self.state = self._load(version, local)
        self.preprocess = embedders.preprocess_for(
            self.state.version.manifest.model["model_id"],
            self.state.version.manifest.model.get("preprocess", {}).get("mode", "pad"),
        )
        formats = images.FORMATS if settings.upload_tiff else images.UPLOAD_FORMATS
        self.limits = images.Limits(max_bytes=settings.max_upload_bytes, formats=formats)
        self.features = verify.FeatureCache(FEATURE_CACHE_BYTES)
        self.code_version = code_version()

    def _load(self, version: versions.Version, local=None) -> _State:
        if len(version.manifest.shards) != len(self.shards):
            raise ApiError(
                409,
                "incompatible_version",
                f"version {version.manifest.version} has {len(version.manifest.shards)} shards, "
                f"the app serves {len(self.shards)}: redeploy with the new shard count",
            )
        groups = _load_groups(self.index_root, version.manifest.version)
        m = version.manifest
        base = query.Docs.load(version)
        start = updates.check_reachable(self.index_root, updates.Position.of(m.updates_through))
        overlay = updates.Overlay(base.base_ids_of, start, updates.model_key(m.model))
        overlay.catch_up(self.index_root)
        state = _State(version, dataclasses.replace(base, overlay=overlay), local, groups)
        state.follower = live.Follower(self.index_root, overlay)
        writer = updates.Writer(self.index_root, overlay.position, m.dim)
        state.committer = live.Committer(writer)
        state.tower = texttower.load(version.root, m.text_tower)
        return state

    def _ensure_following(self) -> None:
        """The replica's log follower (a task of the serving event loop, started by the first
        request since the constructor has no loop of its own to start it on)."""
        if self.following is None or self.following.done():
            loop = asyncio.get_running_loop()
            self.following = loop.create_task(live.follow_forever(lambda: [self.state.follower]))

    # --- helpers -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admit(self, counter: str, limit: int):
        """Admission control: past `limit` requests in `counter`, answer 503 at once (JSON)."""
        if getattr(self, counter) >= limit:
            raise ApiError(503, "overloaded", "too many requests in flight; retry shortly")
        setattr(self, counter, getattr(self, counter) + 1)
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) - 1)

    async def _upload(self, request: Request, stage: Stages) -> bytes:
        """The query photo, read before a search slot is taken: a slow client holds only a
        reading slot, and for at most upload_timeout_s (then 408)."""
        limit = self.settings.upload_timeout_s
        with stage("read"):
            async with self._admit("reading", self.settings.max_reading):
                try:
                    async with asyncio.timeout(limit):
                        return await httpapi.read_upload(request, self.settings.max_upload_bytes)
                except TimeoutError as exc:
                    raise ApiError(408, "timeout", f"upload not received within {limit} s") from exc

    async def _embed(
        self, state: _State, data: bytes, stage: Stages
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query vector (1, d), the preprocessed pixels it was embedded from)."""
        with stage("decode"):
            try:
                pixels = await asyncio.to_thread(images.load, data, self.preprocess, self.limits)
            except images.ImageError as exc:
                raise ApiError(
                    httpapi.IMAGE_STATUS.get(exc.code, 422), exc.code, exc.detail
                ) from exc
        with stage("embed"):
            if state.local is not None:
                vector = await state.local.embed(pixels)
            else:
                vector = await self.embedder.embed.remote(pixels)
        return np.asarray(vector, np.float32)[None], pixels

    async def _search(self, state: _State, coverage, probe, k, flt, exclude, prefer, group_of):
        """Results for `probe` (a query vector (1, d), or text for BM25) that pass `flt` (a
        filters.Filter or None), or with `prefer`'s products first; one per near-duplicate
        group with `group_of` (product -> group), else one per product."""
        text = isinstance(probe, str)

        async def fan_out(width: int, preferred):
            calls = [
                functools.partial(
                    s.text_search.remote if text else s.search.remote,
                    state.name,
                    probe,
                    width,
                    flt or preferred,
                    coverage.min_seq,
                )
                for s in self.shards
            ]
            try:
                parts = await fanout.gather(calls, self.settings.shard_timeout_s, coverage)
            except fanout.Unavailable as exc:
                raise ApiError(503, "unavailable", str(exc)) from exc
            for *_, seq in parts:
                coverage.saw(seq)
            return [(scores, ids) for scores, ids, _ in parts]

        metric = "ip" if text else state.version.manifest.metric  # BM25: higher is better
        args = (metric, state.docs, k, exclude, prefer, group_of)
        hits = await query.preferring_search(fan_out, *args)
        return _with_image_urls(query.results(state.docs, hits))

    async def _rerank(self, state: _State, results: list[dict], pixels: np.ndarray, n: int):
        """The top n results re-ranked by inliers between the query and each catalog photo."""
        query_features, *found = await asyncio.gather(
            asyncio.to_thread(verify.local_features, pixels),
            # The catalog's own limits, not the upload limit: the embed job read it with these.
            *(
                asyncio.to_thread(
                    self.features.get_or_read,
                    (state.name, row["id"]),
                    row["image_uri"],
                    self.preprocess,
                )
                for row in results[:n]
            ),
        )
        by_id = {row["id"]: f for row, f in zip(results[:n], found, strict=True)}
        return await asyncio.to_thread(
            verify.rerank, results, query_features, lambda row: by_id.get(row["id"]), n
        )

    async def _query(
        self,
        response: Response,
        stage: Stages,
        query_of,
        k: int,
        where,
        exclude=None,
        collapse=False,
        min_seq=0,
        words=None,
    ) -> dict:
        """Admit, pin the current version, get the query (vector or text, the photo's pixels or
        None, the category to prefer or None), search among the items `where` = (category, filter
        text) lets through (with `collapse`, one per near-duplicate group when the version has
        groups); for a photo, re-rank the top products and predict its category. The answer's
        seq is the update log seq it reflects; with min_seq, at least that one or 503 stale. With
        `words`, only the items whose text matches them (filters.Filter.words)."""
        self._ensure_following()
        coverage = fanout.Coverage(len(self.shards), min_seq)
        async with self._admit("searching", self.settings.max_inflight):
            state = self.state
            if min_seq > state.seq and not await state.follower.wait_for(min_seq):
                raise _stale(min_seq, state.seq)
            metric = state.version.manifest.metric
            flt = _parse_filter(state, *where)
            if words:
                flt = (flt or filters.Filter()).and_(filters.Filter(words=words))
            group_of = state.groups.group_of if collapse and state.groups else None
            probe, pixels, prefer = await query_of(state, stage)
            prefer = None if flt else prefer  # a filter makes the preference moot
            # The bonus is added to a cosine: an "l2" version (distances) is not re-ranked.
            rerank = self.settings.rerank if pixels is not None and metric == "ip" else 0
            with stage("search"):
                width = max(k, rerank)
                args = (probe, width, flt, exclude, prefer, group_of)
                results = await self._search(state, coverage, *args)
            if rerank and results:
                with stage("rerank"):
                    results = await self._rerank(state, results, pixels, rerank)
            results = results[:k]
            seq = min(state.seq, state.seq if coverage.seq is None else coverage.seq)
            if seq < min_seq:
                raise _stale(min_seq, seq)
        took = stage.total_ms()
        response.headers["Server-Timing"] = stage.header() + f", total;dur={took:.2f}"
        answer = {
            "results": results,
            "index_version": state.name,
            "took_ms": round(took, 2),
            "partial": coverage.partial,
            "coverage": coverage.as_dict(),
            "collapsed": group_of is not None,
            "seq": seq,
        }
        if pixels is not None:
            answer["predicted_category"] = verify.predicted_category(results, metric=metric)
        elif not isinstance(probe, str):
            answer["preferred_category"] = prefer
        return answer

    # --- endpoints ------------------------------------------------------------------------

    @app.post("/search")
    async def search(
        self,
        request: Request,
        response: Response,
        k: TopK = 10,
        category: Category = None,
        filter_text: FilterText = None,
        collapse: Collapse = False,
        min_seq: MinSeq = 0,
        q: HybridText = None,
    ) -> dict:
        """Products like the photo; with `q`, hybrid: the photo's ranking, the words' rankings
        and the photo's ranking among the products whose text matches the words ("words"),
        fused by weighted reciprocal rank, the words ranking weighted to come first; each
        result says its `ranks`."""
        stage = Stages()
        data = await self._upload(request, stage)
        photo = {}

        async def upload_query(state: _State, stage: Stages):
            vector, pixels = await self._embed(state, data, stage)
            photo["vector"] = vector
            return vector, pixels, None

        where = (category, filter_text)
        width = k if q is None else _fusion_width(k)
        more = dict(collapse=collapse, min_seq=min_seq)
        answer = await self._query(response, stage, upload_query, width, where, **more)
        if q is None:
            return answer
        state = self.state
        queries = {"text": self._text_query(q)}
        if state.semantic("hybrid"):
            queries["semantic"] = self._semantic_query(q, photo["vector"])

        async def photo_query(state: _State, stage: Stages):
            return photo["vector"], None, None  # not re-ranked: the words decide, not the item

        matching, *found = await asyncio.gather(
            self._query(response, Stages(), photo_query, k, where, words=q, **more),
            *(self._query(response, Stages(), f, width, where, **more) for f in queries.values()),
        )
        names = ("image", *queries)
        weights = {n: 1.0 for n in names} | (state.weights("hybrid") or {})
        weights["words"] = query.words_weight(weights, names, k)
        return _fused([answer, *found, matching], (*names, "words"), k, weights)

    @app.get("/search")
    async def text_search(
        self,
        response: Response,
        q: Annotated[str, Query(min_length=1, max_length=fulltext.MAX_QUERY_CHARS)],
        k: TopK = 10,
        category: Category = None,
        filter_text: FilterText = None,
        collapse: Collapse = False,
        min_seq: MinSeq = 0,
    ) -> dict:
        """Products whose title and text metadata match q (BM25), best first; with the version's
        text tower, BM25 fused with the words' vector search (`ranks` per ranking)."""
        where = (category, filter_text)
        more = dict(collapse=collapse, min_seq=min_seq)
        state = self.state
        if not state.semantic("text"):
            return await self._query(response, Stages(), self._text_query(q), k, where, **more)
        width = _fusion_width(k)
        queries = (self._text_query(q), self._semantic_query(q))
        found = await asyncio.gather(
            *(self._query(response, Stages(), f, width, where, **more) for f in queries)
        )
        return _fused(found, ("text", "semantic"), k, state.weights("text"))

    @staticmethod
    def _semantic_query(q: str, photo: np.ndarray | None = None):
        """The words' vector from the version's text tower (moved from the photo's, with one)."""

        async def semantic_query(state: _State, stage: Stages):
            if state.tower is None:  # a reload to a version without one, mid-query
                raise ApiError(409, "no_text_tower", f"version {state.name} has no text tower")
            with stage("encode_text"):
                words = await asyncio.to_thread(state.tower.encode, [q])
            vector = words if photo is None else texttower.compose(photo, words)
            return vector, None, None

        return semantic_query

    @staticmethod
    def _text_query(q: str):
        async def text_query(state: _State, stage: Stages):
            if not state.version.manifest.text:
                raise ApiError(409, "no_text_index", f"version {state.name} has no text index")
            return q, None, None

        return text_query

    @app.get("/products/{product_id:path}/similar")
    async def similar(
        self,
        product_id: str,
        response: Response,
        k: TopK = 10,
        category: Category = None,
        same_category: bool = True,
        filter_text: FilterText = None,
        collapse: Collapse = False,
        min_seq: MinSeq = 0,
    ) -> dict:
        """Nearest products; by default those of the item's own category (when the catalog has
        categories) come first, then the nearest others."""

        async def stored_vector(state: _State, stage: Stages):
            gid = self._first_id(state, product_id)
            shard = self._shard_of(state, gid)
            reconstruct = functools.partial(self.shards[shard].reconstruct.remote, state.name, gid)
            with stage("vector"):
                try:
                    vector = await fanout.call(reconstruct, self.settings.shard_timeout_s)
                except Exception as exc:
                    log.warning("shard %d could not give the vector of %d: %r", shard, gid, exc)
                    raise ApiError(503, "unavailable", f"shard {shard} is unavailable") from exc
            own = state.docs.category_of(gid) if same_category else None
            return np.asarray(vector, np.float32)[None], None, own

        where = (category, filter_text)
        args = (response, Stages(), stored_vector, k, where, product_id)
        return await self._query(*args, collapse=collapse, min_seq=min_seq)

    @app.get("/products/{product_id:path}/duplicates")
    async def duplicates(self, product_id: str) -> dict:
        """The other products of the item's near-duplicate group in the live version
        (jobs/dedup.py), best first; each one's `score` is its similarity to the group's
        representative (1.0 for the representative). group_id null and no duplicates: in no
        group, or the version has no groups (GET /version: "groups" null)."""
        state = self.state
        self._first_id(state, product_id)  # 404 for an unknown product
        groups = state.groups or dedup.Groups({}, {})
        found = groups.duplicates(product_id)
        hits = [(int(ids[0]), score) for pid, score in found if len(ids := state.docs.ids_of(pid))]
        return {
            "product_id": product_id,
            "group_id": groups.group_of.get(product_id),
            "duplicates": _with_image_urls(query.results(state.docs, hits)),
            "index_version": state.name,
        }

    @app.get("/products/{product_id:path}/image")
    async def product_image(self, product_id: str, id: int | None = None) -> Response:
        self._ensure_following()
        state = self.state
        ids = state.docs.ids_of(product_id)
        if not len(ids) or (id is not None and id not in set(ids.tolist())):
            raise ApiError(404, "not_found", f"no image {id} for product {product_id!r}")
        uri = state.docs.rows([int(id if id is not None else ids[0])])[0]["image_uri"]
        try:
            data = await asyncio.to_thread(storage.read_bytes, uri, 64 << 20)
        except storage.StorageError as exc:
            raise ApiError(404, "not_found", f"image of {product_id!r} is unavailable") from exc
        media = images.media_type(data)
        if media is None:  # a docs row may name any file: only image bytes leave
            log.warning("product %r: %s is not an image; not served", product_id, uri)
            raise ApiError(404, "not_found", f"image of {product_id!r} is unavailable")
        headers = {"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=media, headers=headers)

    @app.put("/products/{product_id:path}")
    async def put_product(self, product_id: str, request: Request) -> dict:
        """Replace a product's photos and metadata (or add a new product): multipart with a file
        field `image` and an optional JSON field `metadata`. Answered once durable in the log."""
        self._admin(request)
        pid = _check_product_id(product_id)
        data, metadata = await httpapi.read_product_upload(request, self.settings.max_upload_bytes)
        state = self.state
        try:
            fields = live.check_metadata(metadata, state.docs.table)
        except ValueError as exc:
            raise ApiError(400, "bad_metadata", str(exc)) from exc
        vector, _ = await self._embed(state, data, Stages())
        uri = updates.image_uri(self.index_root, data, images.media_type(data))
        model = updates.model_key(state.version.manifest.model)
        try:
            if not await asyncio.to_thread(storage.exists, uri):
                await asyncio.to_thread(storage.write_bytes, uri, data)
        except storage.StorageError as exc:
            raise ApiError(503, "log_unavailable", f"cannot store the photo: {exc}") from exc
        update = updates.Update(updates.UPSERT, pid, uri, fields, vector[0], model, "api")
        return await self._commit(state, update)

    @app.delete("/products/{product_id:path}")
    async def delete_product(self, product_id: str, request: Request) -> dict:
        """Remove a product from search; 404 when it is unknown (or deleted already)."""
        self._admin(request)
        state = self.state
        self._first_id(state, product_id)
        return await self._commit(state, updates.Update(updates.DELETE, product_id, source="api"))

    async def _commit(self, state: _State, update: updates.Update) -> dict:
        self._ensure_following()
        try:
            done = await state.committer.submit(update)
        except (OSError, updates.LogError) as exc:
            log.warning("update of %r not written: %s", update.product_id, exc)
            raise ApiError(503, "log_unavailable", "the update log cannot be written") from exc
        asyncio.get_running_loop().create_task(state.follower.catch_up())  # read your writes
        return {"product_id": update.product_id, "seq": done.seq, "status": "accepted"}

    def _admin(self, request: Request) -> None:
        httpapi.require_key(
            request, self.api_key, self.settings.api_key_env, self.settings.admin_open
        )

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict:
        self._ensure_following()
        return {"status": "ready", "index_version": self.state.name}

    @app.get("/version")
    async def version(self) -> dict:
        self._ensure_following()
        m = self.state.version.manifest
        built = datetime.fromtimestamp(m.created_unix, UTC)
        return {
            "index_version": m.version,
            "model": m.model,
            "built": built.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "built_unix": m.created_unix,
            "code_version": self.code_version,
            "index_code_version": m.code_version,
            "count": m.count,
            "factory": m.factory,
            "search_params": m.search_params,
            "shards": len(m.shards),
            "recall": {k: v for k, v in m.recall.items() if k != "curve"},
            "groups": self.state.group_count,
            # what filter= accepts ({field: "string" | "number"}) and whether ?q= is served
            "filterable": self.state.filterable,
            "text": m.text["columns"] if m.text else None,
            "semantic_text": _tower_summary(m.text_tower) if self.state.tower else None,
            "updates": {
                "seq": self.state.seq,
                "through": updates.Position.of(m.updates_through).as_dict(),
                # applied on top of the version: what the next compaction folds in
                "since_version": self.state.seq - (m.updates_through or {}).get("seq", 0),
                "unsearchable": self.state.docs.overlay.unusable,
            },
        }

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.post("/admin/reload")
    async def reload(self, request: Request) -> dict:
        self._admin(request)
        async with self.reload_lock:
            previous = self.state.name
            try:
                target = versions.current(self.index_root)
                same = target is None or target == previous
                version = None if same else versions.open_version(self.index_root, target)
            except (ValueError, OSError, updates.LogError) as exc:  # corrupt: keep serving
                raise ApiError(409, "bad_version", f"cannot switch: {exc}") from exc
            if version is None:
                return await self._regroup()
            local = await self._local_for(version.manifest.model)
            # Warm every shard before switching, so no query waits on a load.
            await asyncio.gather(*(s.prepare.remote(target) for s in self.shards))
            self.state = await asyncio.to_thread(self._load, version, local)
            log.info("reloaded index %s -> %s", previous, target)
            return {
                "status": "reloaded",
                "index_version": target,
                "previous": previous,
                "groups": self.state.group_count,
            }

    async def _regroup(self) -> dict:
        """The live version again, with its near-duplicate groups read anew (the dedup job may
        have written them since it was loaded)."""
        state = self.state
        groups = await asyncio.to_thread(_load_groups, self.index_root, state.name)
        self.state = state.with_groups(groups)
        return {
            "status": "unchanged",
            "index_version": state.name,
            "groups": self.state.group_count,
        }

    async def _local_for(self, model: dict):
        """The embedder for a version's model: the live one when the model is the same; a new
        one when only the head changed (a re-index re-tunes it) and this replica embeds."""
        live = self.state.version.manifest.model
        if model == live:
            return self.state.local
        same_backbone = all(
            model.get(k) == live.get(k) for k in ("model_id", "weights", "preprocess")
        )
        if self.local_args is None or not same_backbone:
            raise ApiError(
                409, "incompatible_version", "the new version uses another model: redeploy"
            )
        try:
            return await asyncio.to_thread(BatchedEmbedder, model, **self.local_args)
        except (ValueError, OSError) as exc:
            raise ApiError(409, "incompatible_version", f"cannot load its model: {exc}") from exc

    def _first_id(self, state: _State, product_id: str) -> int:
        self._ensure_following()
        ids = state.docs.ids_of(product_id)
        if not len(ids):
            raise ApiError(404, "unknown_product", f"no product {product_id!r} in the index")
        return int(ids[0])

    def _shard_of(self, state: _State, gid: int) -> int:
        shards = state.version.manifest.shards
        found = live.shard_of(gid, len(shards), [rec.id_range for rec in shards])
        if found is None:
            raise ApiError(404, "unknown_product", f"id {gid} is in no shard")
        return found
