"""The FastAPI ingress deployment (Contract 4): its endpoints. Its query path is in
ingress_query.py, what a query pins in ingress_state.py, its back ends in searchers.py and its
HTTP layer (errors, metrics, timing, uploads) in httpapi.py.

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
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from ray import serve

from visual_search import (
    dedup,
    fanout,
    filters,
    fulltext,
    httpapi,
    images,
    ingress_state,
    live,
    query,
    storage,
    texttower,
    updates,
)
from visual_search.httpapi import ApiError, Stages
from visual_search.ingress_query import QueryPath
from visual_search.ingress_state import Narrowing, Settings, State, fused, fusion_width

__all__ = ["Ingress", "Settings"]

log = logging.getLogger("visual_search.serving")
STATIC = Path(__file__).parent / "static"

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


def narrowing(
    k: TopK = 10,
    category: Category = None,
    filter_text: FilterText = None,
    collapse: Collapse = False,
    min_seq: MinSeq = 0,
) -> Narrowing:
    return Narrowing(k, category, filter_text, collapse, min_seq)


Narrowed = Annotated[Narrowing, Depends(narrowing)]

app = httpapi.make_app("visual_search")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Ingress(QueryPath):
    @app.post("/search")
    async def search(
        self, request: Request, response: Response, p: Narrowed, q: HybridText = None
    ) -> dict:
        """Products like the photo; with `q`, hybrid: the photo's ranking, the words' rankings
        and the photo's ranking among the products whose text matches the words ("words"),
        fused by weighted reciprocal rank, the words ranking weighted to come first; each
        result says its `ranks`."""
        stage = Stages()
        data = await self._upload(request, stage)
        photo = {}

        async def upload_query(state: State, stage: Stages):
            vector, decoded = await self._embed(state, data, stage)
            photo["vector"] = vector
            return vector, decoded, None

        wide = p if q is None else dataclasses.replace(p, k=fusion_width(p.k))
        answer = await self._query(response, stage, upload_query, wide)
        if q is None:
            return answer
        state = self.state
        queries = {"text": self._text_query(q)}
        if state.semantic("hybrid"):
            queries["semantic"] = self._semantic_query(q, photo["vector"])

        async def photo_query(state: State, stage: Stages):
            return photo["vector"], None, None  # not re-ranked: the words decide, not the item

        matching, *found = await asyncio.gather(
            self._query(response, Stages(), photo_query, p, words=q),
            *(self._query(response, Stages(), f, wide) for f in queries.values()),
        )
        names = ("image", *queries)
        weights = {n: 1.0 for n in names} | (state.weights("hybrid") or {})
        weights["words"] = query.words_weight(weights, names, p.k)
        return fused([answer, *found, matching], (*names, "words"), p.k, weights)

    @app.get("/search")
    async def text_search(
        self,
        response: Response,
        q: Annotated[str, Query(min_length=1, max_length=fulltext.MAX_QUERY_CHARS)],
        p: Narrowed,
    ) -> dict:
        """Products whose title and text metadata match q (BM25), best first; with the version's
        text tower, BM25 fused with the words' vector search (`ranks` per ranking)."""
        state = self.state
        if not state.semantic("text"):
            return await self._query(response, Stages(), self._text_query(q), p)
        wide = dataclasses.replace(p, k=fusion_width(p.k))
        queries = (self._text_query(q), self._semantic_query(q))
        found = await asyncio.gather(*(self._query(response, Stages(), f, wide) for f in queries))
        return fused(found, ("text", "semantic"), p.k, state.weights("text"))

    @staticmethod
    def _semantic_query(q: str, photo: np.ndarray | None = None):
        """The words' vector from the version's text tower (moved from the photo's, with one)."""

        async def semantic_query(state: State, stage: Stages):
            if state.tower is None:  # a reload to a version without one, mid-query
                raise ApiError(409, "no_text_tower", f"version {state.name} has no text tower")
            with stage("encode_text"):
                words = await asyncio.to_thread(state.tower.encode, [q])
            vector = words if photo is None else texttower.compose(photo, words)
            return vector, None, None

        return semantic_query

    @staticmethod
    def _text_query(q: str):
        async def text_query(state: State, stage: Stages):
            if not state.version.manifest.text:
                raise ApiError(409, "no_text_index", f"version {state.name} has no text index")
            return q, None, None

        return text_query

    @app.get("/products/{product_id:path}/similar")
    async def similar(
        self, product_id: str, response: Response, p: Narrowed, same_category: bool = True
    ) -> dict:
        """Nearest products; by default those of the item's own category (when the catalog has
        categories) come first, then the nearest others."""

        async def stored_vector(state: State, stage: Stages):
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

        return await self._query(response, Stages(), stored_vector, p, exclude=product_id)

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
            "duplicates": ingress_state.with_image_urls(query.results(state.docs, hits)),
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
        pid = ingress_state.check_product_id(product_id)
        data, metadata = await httpapi.read_product_upload(request, self.settings.max_upload_bytes)
        state = self.state
        try:
            fields = live.check_metadata(metadata, state.docs.table)
        except ValueError as exc:
            raise ApiError(400, "bad_metadata", str(exc)) from exc
        vector, _ = await self._embed(state, data, Stages(), low=True)
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
        return {**ingress_state.describe(self.state, self.code_version), "replica": self.replica}

    @app.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.post("/admin/reload")
    async def reload(self, request: Request) -> dict:
        self._admin(request)
        return await self.switch_to_current()
