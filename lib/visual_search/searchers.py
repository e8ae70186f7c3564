"""The ingress's back ends (Ray Serve deployments): one searcher per shard, and the batching query
embedder (a deployment of its own, or a plain object inside the ingress)."""

import asyncio
from collections import OrderedDict

import numpy as np
from ray import serve

from visual_search import embedders, live, storage, versions


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class ShardSearcher:
    """One shard; keeps the two most recent versions it was asked for, loading them lazily,
    each kept up to date with the update log (live.LiveShard)."""

    def __init__(self, index_root: str, shard: int, s3_endpoint: str | None, mmap: bool):
        if s3_endpoint:
            storage.configure(s3_endpoint)
        self.index_root, self.shard, self.mmap = index_root, shard, mmap
        self.loaded: OrderedDict[str, live.LiveShard] = OrderedDict()
        self.lock = asyncio.Lock()
        self.following: asyncio.Task | None = None
        # Load and verify CURRENT's shard before the replica counts as started, so the first
        # query does not pay for it. Another version loads on demand.
        current = versions.open_version(index_root)
        self.loaded[current.manifest.version] = self._open(current)

    def _open(self, version: versions.Version) -> live.LiveShard:
        shard = live.LiveShard(version, self.shard, self.index_root, self.mmap)
        shard.overlay.catch_up(self.index_root)  # not yet shared: no lock needed
        return shard

    async def _get(self, version: str, min_seq: int = 0) -> live.LiveShard:
        if self.following is None or self.following.done():
            targets = lambda: [s.follower for s in self.loaded.values()]  # noqa: E731
            self.following = asyncio.get_running_loop().create_task(live.follow_forever(targets))
        if version not in self.loaded:
            async with self.lock:
                if version not in self.loaded:
                    v = versions.open_version(self.index_root, version)
                    self.loaded[version] = await asyncio.to_thread(self._open, v)
                    while len(self.loaded) > 2:
                        self.loaded.popitem(last=False)
        shard = self.loaded[version]
        if min_seq > shard.overlay.seq:
            await shard.follower.wait_for(min_seq)  # the answer's seq says whether it did
        return shard

    async def prepare(self, version: str) -> int:
        return (await self._get(version)).base.index.ntotal

    async def search(self, version: str, vectors: np.ndarray, k: int, flt=None, min_seq: int = 0):
        """(scores, ids, seq) of the k nearest (a filters.Filter, or None for all items), and
        the update log seq the answer reflects (waiting a little for min_seq)."""
        shard = await self._get(version, min_seq)
        return await asyncio.to_thread(shard.search, vectors, k, flt)

    async def text_search(self, version: str, text: str, k: int, flt=None, min_seq: int = 0):
        """(scores, ids, seq) (1, k) of the k best BM25 matches of text."""
        shard = await self._get(version, min_seq)
        return await asyncio.to_thread(shard.text_search, text, k, flt)

    async def reconstruct(self, version: str, gid: int) -> np.ndarray:
        shard = await self._get(version)
        return await asyncio.to_thread(shard.reconstruct, gid)

    async def seq(self, version: str) -> int:
        return (await self._get(version)).overlay.seq


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
