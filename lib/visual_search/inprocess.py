"""The service's query path over one index version in this process (no Serve, no Ray): every
shard searched, widened until k distinct products, the docs joined. jobs/evaluate.py and the
benches measure through it, so what they measure is what POST /search and GET /similar answer.
"""

from __future__ import annotations

import asyncio

import numpy as np

from visual_search import query
from visual_search.versions import Version


class Searcher:
    def __init__(self, version: Version):
        m = version.manifest
        self.version, self.metric = version, m.metric
        self.shards = [query.ShardIndex(version, i) for i in range(len(m.shards))]
        self.docs = query.Docs.load(version)
        self._loop = asyncio.new_event_loop()

    def search(
        self, vector: np.ndarray, k: int, exclude: str | None = None, prefer: str | None = None
    ) -> list[dict]:
        """The k nearest products of vector (1, d) as result rows, best first; `exclude`: a
        product left out (GET /similar's own); `prefer`: a category whose products come first."""

        async def fan_out(width: int, flt):
            return [s.search(vector, width, flt) for s in self.shards]

        hits = self._loop.run_until_complete(
            query.preferring_search(fan_out, self.metric, self.docs, k, exclude, prefer)
        )
        return query.results(self.docs, hits)

    def close(self) -> None:
        self._loop.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
