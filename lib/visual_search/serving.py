"""Ray Serve deployments (Contract 4): FastAPI ingress, batching query embedder, shard searchers.

The ingress decodes uploads (CPU, off the event loop), embeds them in batches of concurrent
queries (itself on CPU, or through the QueryEmbedder deployment), fans out to one searcher
deployment per shard with asyncio.gather, merges with merge_topk and joins the docs. POST /search
then re-ranks its top products by geometric verification (verify.py) against their catalog
photos. Every query pins one index version end to end, so a reload never mixes two.
"""

# No `from __future__ import annotations`: FastAPI must see the endpoint types at run time.
import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import time
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from visual_search import embedders, images, query, storage, verify, versions
from visual_search.manifest import code_version

log = logging.getLogger("visual_search.serving")
STATIC = Path(__file__).parent / "static"
IMAGE_STATUS = {
    "too_large": 413,
    "not_an_image": 415,
    "unsupported": 415,
    "too_small": 422,
    "truncated": 422,
    "decode_error": 422,
}


# Local features of re-ranked catalog photos, per ingress replica (500 keypoints: about 130 kB).
FEATURE_CACHE_BYTES = 256 << 20

TopK = Annotated[int, Query(ge=1, le=100)]
Category = Annotated[str | None, Query(min_length=1, max_length=200)]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class ShardSearcher:
    """One shard; keeps the two most recent versions it was asked for, loading them lazily."""

    def __init__(self, index_root: str, shard: int, s3_endpoint: str | None, mmap: bool):
        if s3_endpoint:
            storage.configure(s3_endpoint)
        self.index_root, self.shard, self.mmap = index_root, shard, mmap
        self.loaded: OrderedDict[str, query.ShardIndex] = OrderedDict()
        self.lock = asyncio.Lock()
        # Load and verify CURRENT's shard before the replica counts as started, so the first
        # query does not pay for it. Another version loads on demand.
        current = versions.open_version(index_root)
        self.loaded[current.manifest.version] = query.ShardIndex(current, shard, mmap)

    async def _get(self, version: str) -> query.ShardIndex:
        if version in self.loaded:
            return self.loaded[version]
        async with self.lock:
            if version not in self.loaded:
                v = versions.open_version(self.index_root, version)
                self.loaded[version] = await asyncio.to_thread(
                    query.ShardIndex, v, self.shard, self.mmap
                )
                while len(self.loaded) > 2:
                    self.loaded.popitem(last=False)
        return self.loaded[version]

    async def prepare(self, version: str) -> int:
        return (await self._get(version)).index.ntotal

    async def search(self, version: str, vectors: np.ndarray, k: int, category: str | None):
        shard = await self._get(version)
        return await asyncio.to_thread(shard.search, vectors, k, category)

    async def reconstruct(self, version: str, gid: int) -> np.ndarray:
        shard = await self._get(version)
        return await asyncio.to_thread(shard.reconstruct, gid)


class BatchedEmbedder:
    """The index's own model; batches concurrent queries into one forward pass. Runs as the
    QueryEmbedder deployment, or inside the ingress (AppArgs.embed_in_ingress)."""

    def __init__(self, model: dict, weights: str | None, device: str | None, threads: int):
        import torch

        # 0 keeps Ray's choice (torch threads = the replica's CPU request). More threads cut a
        # lone query's latency on a big node, but on a small one they fight the other replicas.
        if threads:
            torch.set_num_threads(threads)
        self.embedder = embedders.from_model_dict(model, weights, device)
        size = self.embedder.preprocess.size  # one pass at start: the first query is not slower
        self.embedder.embed(np.full((1, size, size, 3), 255, np.uint8))

    # No wait for stragglers: queries that arrive during a forward pass form the next batch, so
    # a lone query never waits and a busy replica still batches.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def embed(self, pixels: list[np.ndarray]) -> list[np.ndarray]:
        # The forward pass runs on the event loop's thread, blocking it: bench/embed_threads.py
        # (a Ray actor on 2 cores, one query) measured 12.7 ms there against 17.7 ms through
        # asyncio.to_thread with 1 torch thread, and 7.8 against 15.1 ms with 2. The CPU is busy
        # with the batch either way; other requests resume when it is done.
        return list(self.embedder.embed(np.stack(pixels)))


@serve.deployment(ray_actor_options={"num_cpus": 1})
class QueryEmbedder(BatchedEmbedder):
    """A deployment of its own: GPU embedders scale apart from the HTTP tier."""


class _Stages:
    """Per-request stage durations, sent as a W3C Server-Timing header (browser devtools and
    bench/serve.py read it)."""

    def __init__(self):
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.2f}" for name, ms in self.ms.items())


class _State:
    """What one query needs, swapped as a whole on reload."""

    def __init__(self, version: versions.Version, docs: query.Docs, local=None):
        self.version = version
        self.docs = docs
        self.name = version.manifest.version
        self.local = local  # the version's own model, when the ingress embeds (BatchedEmbedder)


app = FastAPI(title="visual_search", docs_url="/docs")


@functools.cache
def _metrics() -> tuple[Counter, Histogram, Counter]:
    """Built on first use, inside the replica, so Serve adds its deployment/replica tags."""
    return (
        Counter(
            "visual_search_requests",
            "HTTP requests answered by the ingress",
            tag_keys=("route", "method", "status"),
        ),
        Histogram(
            "visual_search_request_latency_ms",
            "time in the ingress replica per request, until the last byte is sent (ms)",
            boundaries=[5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000],
            tag_keys=("route",),
        ),
        Counter(
            "visual_search_errors",
            "error answers by their JSON error code",
            tag_keys=("route", "status", "code"),
        ),
    )


class _Observe:
    """ASGI wrapper that counts and times every request, and reads the code of error answers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, body = time.perf_counter(), 500, bytearray()

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and len(body) < 4096:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            # The route template, never the raw path: one series per endpoint, not per product.
            route = getattr(scope.get("route"), "path", "unmatched")
            requests, latency, errors = _metrics()
            tags = {"route": route, "status": str(status)}
            requests.inc(tags={**tags, "method": scope["method"]})
            latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})
            if status >= 400:
                try:
                    code = json.loads(bytes(body))["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "internal_error" if status >= 500 else f"http_{status}"
                errors.inc(tags={**tags, "code": str(code)})


app.add_middleware(_Observe)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return error_response(400, "bad_request", "; ".join(parts))


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

    async def _read_upload(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_upload_bytes + 65536:
            raise ApiError(413, "too_large", f"upload over {self.max_upload_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_upload_bytes + 65536:
                raise ApiError(413, "too_large", f"upload over {self.max_upload_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            request._body = body  # let starlette parse the multipart body we already read
            try:
                form = await request.form()
            except Exception as exc:
                raise ApiError(400, "bad_request", f"malformed multipart body: {exc}") from exc
            field = form.get("image")
            if field is None or isinstance(field, str):
                raise ApiError(400, "bad_request", "multipart body needs a file field 'image'")
            body = await field.read()
        if not body:
            raise ApiError(400, "bad_request", "empty body: send an image")
        if len(body) > self.max_upload_bytes:
            raise ApiError(413, "too_large", f"image over {self.max_upload_bytes} bytes")
        return body

    async def _embed(
        self, state: _State, data: bytes, stage: _Stages
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query vector (1, d), the preprocessed pixels it was embedded from)."""
        with stage("decode"):
            try:
                pixels = await asyncio.to_thread(images.load, data, self.preprocess, self.limits)
            except images.ImageError as exc:
                raise ApiError(IMAGE_STATUS.get(exc.code, 422), exc.code, exc.detail) from exc
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
        started, stage = time.perf_counter(), _Stages()
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
        async def upload_query(state: _State, stage: _Stages):
            with stage("read"):
                data = await self._read_upload(request)
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

        async def stored_vector(state: _State, stage: _Stages):
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
