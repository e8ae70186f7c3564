"""The ingress's query path, under its endpoints (serving.py): admission control, the bounded
upload read, decode and embed, the fan-out to the shard searchers, geometric re-ranking, the
answer of one ranking, and the update log commit. Every query pins one State (ingress_state.py)
end to end, so a reload never mixes two versions."""

# No `from __future__ import annotations`: Ray Serve builds the deployment from this class.
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os

import numpy as np
from fastapi import Request, Response
from ray import serve

from visual_search import (
    background,
    embedders,
    fanout,
    filters,
    httpapi,
    images,
    ingress_state,
    live,
    query,
    storage,
    updates,
    verify,
    versions,
)
from visual_search.httpapi import ApiError, Stages
from visual_search.ingress_state import (
    Narrowing,
    Settings,
    State,
    load_state,
    parse_filter,
    stale,
    with_image_urls,
)
from visual_search.manifest import code_version
from visual_search.searchers import BatchedEmbedder

log = logging.getLogger("visual_search.serving")

# How often each ingress replica reads CURRENT (follow_current): replicas switch within about it.
CURRENT_POLL_S = 1.0
# Local features of re-ranked catalog photos, per ingress replica (500 keypoints: about 130 kB).
FEATURE_CACHE_BYTES = 256 << 20


@dataclasses.dataclass
class Photo:
    """A decoded query photo: its pixels, and the future of its local features when the query
    is re-ranked (started as soon as it is decoded, so that SIFT runs while the model embeds)."""

    pixels: np.ndarray
    features: asyncio.Future | None = None

    def drop(self) -> None:
        """Cancel the features if still running, else retrieve their error: none is left
        unawaited."""
        f = self.features
        if f is not None and not f.cancel() and not f.cancelled():
            f.exception()


def replica_name() -> str:
    """This Serve replica's id (in GET /version and the logs); the process outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not running in a replica
        return f"pid-{os.getpid()}"


class QueryPath:
    """The Ingress deployment's state and query path; the Ingress adds the endpoints."""

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
        self.watching: asyncio.Task | None = None
        self.replica = replica_name()
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

    def _load(self, version: versions.Version, local=None) -> State:
        return load_state(self.index_root, version, len(self.shards), local)

    def _ensure_following(self) -> None:
        """The replica's log follower (a task of the serving event loop, started by the first
        request since the constructor has no loop of its own to start it on)."""
        loop = asyncio.get_running_loop()
        if self.following is None or self.following.done():
            self.following = loop.create_task(live.follow_forever(lambda: [self.state.follower]))
        if self.settings.follow_current and (self.watching is None or self.watching.done()):
            self.watching = loop.create_task(self._watch_current())

    async def switch_to_current(self) -> dict:
        """POST /admin/reload: the version CURRENT names, every shard warmed before the switch
        so that no query waits on a load; the live version's groups read anew when CURRENT has
        not moved. ApiError 409 (still serving the old one) when it cannot be used."""
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
            await asyncio.gather(*(s.prepare.remote(target) for s in self.shards))
            self.state = await asyncio.to_thread(self._load, version, local)
            log.info("replica %s reloaded index %s -> %s", self.replica, previous, target)
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
        groups = await asyncio.to_thread(ingress_state.load_groups, self.index_root, state.name)
        self.state = state = state.with_groups(groups)
        return {"status": "unchanged", "index_version": state.name, "groups": state.group_count}

    async def _watch_current(self) -> None:
        """follow_current: switch when CURRENT names another version (a re-index published it,
        or a rollback), so that every ingress replica moves within about CURRENT_POLL_S of the
        others. A version that cannot be used is retried on each poll and logged once."""
        logged = None
        while True:
            await asyncio.sleep(CURRENT_POLL_S)
            try:
                target = await asyncio.to_thread(versions.current, self.index_root)
                if target is not None and target != self.state.name:
                    await self.switch_to_current()
                logged = None
            except Exception as exc:  # keep serving the live version, and keep watching
                message = exc.message if isinstance(exc, ApiError) else repr(exc)
                if message != logged:
                    log.warning("replica %s not following CURRENT: %s", self.replica, message)
                logged = message

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

    def _reranks(self, state: State) -> int:
        """How many of a photo query's top results are re-ranked. The bonus is added to a
        cosine: an "l2" version (distances) is not re-ranked."""
        return self.settings.rerank if state.version.manifest.metric == "ip" else 0

    async def _embed(
        self, state: State, data: bytes, stage: Stages, low: bool = False
    ) -> tuple[np.ndarray, Photo]:
        """(query vector (1, d), the Photo it was embedded from, with its features started when
        the query is re-ranked). `low`: decode and embed (when the ingress embeds) at low CPU
        priority, as a PUT's photo is, so that writes never slow the queries (background.py),
        and no features."""
        run = background.run if low else asyncio.to_thread
        with stage("decode"):
            try:
                pixels = await run(
                    images.load,
                    data,
                    self.preprocess,
                    self.limits,
                    self.settings.backdrop_balance,
                )
            except images.ImageError as exc:
                raise ApiError(
                    httpapi.IMAGE_STATUS.get(exc.code, 422), exc.code, exc.detail
                ) from exc
        photo = Photo(pixels)
        if not low and self._reranks(state):
            # The features do not depend on the results: found on another core while the model
            # embeds on this one (bench/serve.py, 100k vectors, concurrency 1: search stage 13.9
            # -> 10.8 ms, since SIFT no longer shares the cores with the shards).
            photo.features = asyncio.ensure_future(asyncio.to_thread(verify.local_features, pixels))
        try:
            with stage("embed"):
                if state.local is None:
                    vector = await self.embedder.embed.remote(pixels)
                elif low:  # alone, not in a batch of queries
                    vector = (await background.run(state.local.embedder.embed, pixels[None]))[0]
                else:
                    vector = await state.local.embed(pixels)
        except BaseException:
            photo.drop()
            raise
        return np.asarray(vector, np.float32)[None], photo

    async def _search(self, state: State, coverage, probe, k, flt, exclude, prefer, group_of):
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
        return with_image_urls(query.results(state.docs, hits))

    async def _rerank(self, state: State, results: list[dict], query_features, n: int):
        """The top n results re-ranked by inliers between the query (`query_features`: the
        future of its verify.local_features) and each catalog photo. Cached features are
        taken on the event loop; only the photos to read go to threads."""
        top = results[:n]
        by_id = {row["id"]: self.features.get((state.name, row["id"])) for row in top}
        missing = [row for row in top if by_id[row["id"]] is None]
        query_features, *read = await asyncio.gather(
            query_features,
            # The catalog's own limits, not the upload limit: the embed job read it with these.
            *(
                asyncio.to_thread(
                    self.features.get_or_read,
                    (state.name, row["id"]),
                    row["image_uri"],
                    self.preprocess,
                )
                for row in missing
            ),
        )
        by_id.update((row["id"], f) for row, f in zip(missing, read, strict=True))
        return await asyncio.to_thread(
            verify.rerank, results, query_features, lambda row: by_id.get(row["id"]), n
        )

    async def _query(
        self,
        response: Response,
        stage: Stages,
        query_of,
        p: Narrowing,
        exclude=None,
        words=None,
    ) -> dict:
        """Admit, pin the current version, get the query (vector or text, the Photo or None,
        the category to prefer or None), search the p.k best among the items p's category
        and filter let through (with p.collapse, one per near-duplicate group when the version
        has groups); for a photo, re-rank the top products and predict its category. The
        answer's seq is the update log seq it reflects; with p.min_seq, at least that one or
        503 stale. With `words`, only the items whose text matches them."""
        self._ensure_following()
        coverage = fanout.Coverage(len(self.shards), p.min_seq)
        async with self._admit("searching", self.settings.max_inflight):
            state = self.state
            if p.min_seq > state.seq and not await state.follower.wait_for(p.min_seq):
                raise stale(p.min_seq, state.seq)
            metric = state.version.manifest.metric
            flt = parse_filter(state, p.category, p.filter_text)
            if words:
                flt = (flt or filters.Filter()).and_(filters.Filter(words=words))
            group_of = state.groups.group_of if p.collapse and state.groups else None
            probe, photo, prefer = await query_of(state, stage)
            prefer = None if flt else prefer  # a filter makes the preference moot
            features = None if photo is None else photo.features
            rerank = self._reranks(state) if features is not None else 0
            try:
                with stage("search"):
                    args = (probe, max(p.k, rerank), flt, exclude, prefer, group_of)
                    results = await self._search(state, coverage, *args)
                if rerank and results:
                    with stage("rerank"):
                        results = await self._rerank(state, results, features, rerank)
            finally:
                if photo is not None:
                    photo.drop()
            seq = min(state.seq, state.seq if coverage.seq is None else coverage.seq)
            if seq < p.min_seq:
                raise stale(p.min_seq, seq)
        took = stage.total_ms()
        response.headers["Server-Timing"] = stage.header() + f", total;dur={took:.2f}"
        answer = {
            "results": results[: p.k],
            "index_version": state.name,
            "took_ms": round(took, 2),
            "partial": coverage.partial,
            "coverage": coverage.as_dict(),
            "collapsed": group_of is not None,
            "seq": seq,
        }
        if photo is not None:
            answer["predicted_category"] = verify.predicted_category(
                answer["results"], metric=metric
            )
        elif not isinstance(probe, str):
            answer["preferred_category"] = prefer
        return answer

    async def _commit(self, state: State, update: updates.Update) -> dict:
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

    async def _local_for(self, model: dict):
        """The embedder for a version's model: the live one when the model is the same; a new
        one when only the head changed (a re-index re-tunes it) and this replica embeds."""
        current = self.state.version.manifest.model
        if model == current:
            return self.state.local
        same_backbone = all(
            model.get(k) == current.get(k) for k in ("model_id", "weights", "preprocess")
        )
        if self.local_args is None or not same_backbone:
            raise ApiError(
                409, "incompatible_version", "the new version uses another model: redeploy"
            )
        try:
            return await asyncio.to_thread(BatchedEmbedder, model, **self.local_args)
        except (ValueError, OSError) as exc:
            raise ApiError(409, "incompatible_version", f"cannot load its model: {exc}") from exc

    def _first_id(self, state: State, product_id: str) -> int:
        self._ensure_following()
        ids = state.docs.ids_of(product_id)
        if not len(ids):
            raise ApiError(404, "unknown_product", f"no product {product_id!r} in the index")
        return int(ids[0])

    def _shard_of(self, state: State, gid: int) -> int:
        shards = state.version.manifest.shards
        found = live.shard_of(gid, len(shards), [rec.id_range for rec in shards])
        if found is None:
            raise ApiError(404, "unknown_product", f"id {gid} is in no shard")
        return found
