"""The FastAPI ingress deployment (Contract 4); its back ends are in searchers.py and its HTTP
layer (errors, metrics, timing, uploads) in httpapi.py.

The ingress decodes uploads (CPU, off the event loop), embeds them in batches of concurrent
queries (itself on CPU, or through the QueryEmbedder deployment), fans out to one searcher
deployment per shard with asyncio.gather, merges with merge_topk and joins the docs. POST /search
then re-ranks its top products by geometric verification (verify.py) against their catalog
photos. Every query pins one index version end to end, so a reload never mixes two.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoint types at run time.
import asyncio
import contextlib
import hmac
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Query, Request, Response
from fastapi.responses import HTMLResponse
from ray import serve

from visual_search import embedders, httpapi, images, query, storage, verify, versions
from visual_search.httpapi import ApiError, Stages
from visual_search.manifest import code_version
from visual_search.searchers import BatchedEmbedder

log = logging.getLogger("visual_search.serving")
STATIC = Path(__file__).parent / "static"

# Local features of re-ranked catalog photos, per ingress replica (500 keypoints: about 130 kB).
FEATURE_CACHE_BYTES = 256 << 20

TopK = Annotated[int, Query(ge=1, le=100)]
Category = Annotated[str | None, Query(min_length=1, max_length=200)]


class _State:
    """What one query needs, swapped as a whole on reload."""

    def __init__(self, version: versions.Version, docs: query.Docs, local=None):
        self.version = version
        self.docs = docs
        self.name = version.manifest.version
        self.local = local  # the version's own model, when the ingress embeds (BatchedEmbedder)


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
        max_upload_bytes: int,
        max_inflight: int,
        api_key_env: str,
        local_embedder: dict | None = None,
        rerank: int = 10,
        admin_open: bool = False,
        upload_tiff: bool = False,
    ):
        """`embedder`: the QueryEmbedder handle, or None with `local_embedder` = the
        BatchedEmbedder arguments (weights, device, threads) to embed in this replica.
        `rerank`: how many top products of POST /search geometric verification re-ranks (0 off).
        /admin/* needs the key in $`api_key_env`; without one, they refuse unless `admin_open`."""
        if s3_endpoint:
            storage.configure(s3_endpoint)
        self.embedder, self.shards = embedder, shards
        self.index_root = index_root
        self.max_upload_bytes = max_upload_bytes
        self.max_inflight = max_inflight
        self.api_key = os.environ.get(api_key_env) or None
        self.api_key_env, self.admin_open = api_key_env, admin_open
        self.inflight = 0
        self.reload_lock = asyncio.Lock()
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
        formats = images.FORMATS if upload_tiff else images.UPLOAD_FORMATS
        self.limits = images.Limits(max_bytes=max_upload_bytes, formats=formats)
        self.rerank = rerank
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
        return _State(version, query.Docs.load(version), local)

    # --- helpers -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self):
        """Admission control: past max_inflight requests, answer 503 at once (JSON body)."""
        if self.inflight >= self.max_inflight:
            raise ApiError(503, "overloaded", "too many requests in flight; retry shortly")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

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

    async def _search(self, state: _State, vector, k, category, exclude=None, prefer=None):
        """Results filtered to `category`, or with `prefer`'s products first."""

        async def fan_out(width: int, preferred: str | None):
            filter_by = category or preferred
            calls = [s.search.remote(state.name, vector, width, filter_by) for s in self.shards]
            return await asyncio.gather(*calls)

        metric = state.version.manifest.metric
        hits = await query.preferring_search(fan_out, metric, state.docs, k, exclude, prefer)
        out = query.results(state.docs, hits)
        for row in out:
            row["image_url"] = f"/products/{row['product_id']}/image?id={row['id']}"
        return out

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
        self, response: Response, query_of, k: int, category: str | None, exclude=None
    ) -> dict:
        """Admit, pin the current version, get the query (vector, the photo's pixels or None,
        the category to prefer or None), search; for a photo, re-rank the top products and
        predict its category."""
        started, stage = time.perf_counter(), Stages()
        async with self._slot():
            state = self.state
            metric = state.version.manifest.metric
            vector, pixels, prefer = await query_of(state, stage)
            prefer = None if category else prefer  # a filter makes the preference moot
            # The bonus is added to a cosine: an "l2" version (distances) is not re-ranked.
            rerank = self.rerank if pixels is not None and metric == "ip" else 0
            with stage("search"):
                width = max(k, rerank)
                results = await self._search(state, vector, width, category, exclude, prefer)
            if rerank and results:
                with stage("rerank"):
                    results = await self._rerank(state, results, pixels, rerank)
            results = results[:k]
            took = (time.perf_counter() - started) * 1000
        response.headers["Server-Timing"] = stage.header() + f", total;dur={took:.2f}"
        answer = {
            "results": results,
            "index_version": state.name,
            "took_ms": round(took, 2),
            "partial": False,
        }
        if pixels is not None:
            answer["predicted_category"] = verify.predicted_category(results, metric=metric)
        else:
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
    ) -> dict:
        async def upload_query(state: _State, stage: Stages):
            with stage("read"):
                data = await httpapi.read_upload(request, self.max_upload_bytes)
            return *await self._embed(state, data, stage), None

        return await self._query(response, upload_query, k, category)

    @app.get("/products/{product_id:path}/similar")
    async def similar(
        self,
        product_id: str,
        response: Response,
        k: TopK = 10,
        category: Category = None,
        same_category: bool = True,
    ) -> dict:
        """Nearest products; by default those of the item's own category (when the catalog has
        categories) come first, then the nearest others."""

        async def stored_vector(state: _State, stage: Stages):
            gid = self._first_id(state, product_id)
            shard = self._shard_of(state, gid)
            with stage("vector"):
                vector = await self.shards[shard].reconstruct.remote(state.name, gid)
            own = state.docs.category_of(gid) if same_category else None
            return np.asarray(vector, np.float32)[None], None, own

        return await self._query(response, stored_vector, k, category, exclude=product_id)

    @app.get("/products/{product_id:path}/image")
    async def product_image(self, product_id: str, id: int | None = None) -> Response:
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

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> dict:
        return {"status": "ready", "index_version": self.state.name}

    @app.get("/version")
    async def version(self) -> dict:
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
        }

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.post("/admin/reload")
    async def reload(self, request: Request) -> dict:
        self._admit_admin(request)
        async with self.reload_lock:
            previous = self.state.name
            try:
                target = versions.current(self.index_root)
                if target is None or target == previous:
                    return {"status": "unchanged", "index_version": previous}
                version = versions.open_version(self.index_root, target)
            except (ValueError, OSError) as exc:  # a corrupt CURRENT or manifest: keep serving
                raise ApiError(409, "bad_version", f"cannot switch: {exc}") from exc
            local = await self._local_for(version.manifest.model)
            # Warm every shard before switching, so no query waits on a load.
            await asyncio.gather(*(s.prepare.remote(target) for s in self.shards))
            self.state = await asyncio.to_thread(self._load, version, local)
            log.info("reloaded index %s -> %s", previous, target)
            return {"status": "reloaded", "index_version": target, "previous": previous}

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

    def _admit_admin(self, request: Request) -> None:
        """Fail closed: 401 for a missing or wrong key, 403 when no key is configured."""
        if self.api_key is None:
            if self.admin_open:
                return
            raise ApiError(
                403,
                "admin_disabled",
                f"admin endpoints are off: set ${self.api_key_env} in the replicas' environment "
                "and send it as X-API-Key (or run with admin_open=true on a trusted network)",
            )
        given = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key")

    def _first_id(self, state: _State, product_id: str) -> int:
        ids = state.docs.ids_of(product_id)
        if not len(ids):
            raise ApiError(404, "unknown_product", f"no product {product_id!r} in the index")
        return int(ids[0])

    def _shard_of(self, state: _State, gid: int) -> int:
        for i, rec in enumerate(state.version.manifest.shards):
            lo, hi = rec.id_range
            if lo <= gid < hi:
                return i
        raise ApiError(404, "unknown_product", f"id {gid} is in no shard")
