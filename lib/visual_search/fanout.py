"""Calls to the shard deployments under a deadline: a shard that fails or is slow makes the answer
partial (Contract 4's `coverage`), never a 500."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("visual_search.fanout")


class Unavailable(RuntimeError):
    """No shard answered in time."""


class Coverage:
    """How many shards answered every fan-out of one request (the fewest of them), and the
    update log seq every part reflects (the smallest; `min_seq`: what the request asked for)."""

    def __init__(self, total: int, min_seq: int = 0):
        self.total = total
        self.answered = total
        self.min_seq = min_seq
        self.seq: int | None = None

    def saw(self, seq: int) -> None:
        self.seq = seq if self.seq is None else min(self.seq, seq)

    @property
    def partial(self) -> bool:
        return self.answered < self.total

    def as_dict(self) -> dict:
        return {"shards": self.answered, "of": self.total}


async def call(shard: Callable[[], Awaitable], timeout_s: float, retries: int = 1):
    """await shard() within timeout_s, retrying a failure (Serve routes the retry to another
    replica when the shard has one; a replica that died answers with an error at once)."""
    async with asyncio.timeout(timeout_s):
        for attempt in range(retries + 1):
            try:
                return await shard()
            except Exception:
                if attempt == retries:
                    raise


async def gather(shards: list[Callable[[], Awaitable]], timeout_s: float, coverage: Coverage):
    """The answers of the shards that answered within timeout_s (in shard order), recorded in
    coverage; Unavailable when none did."""
    parts = await asyncio.gather(*(call(s, timeout_s) for s in shards), return_exceptions=True)
    answers = []
    for i, part in enumerate(parts):
        if isinstance(part, BaseException):
            reason = "timed out" if isinstance(part, TimeoutError) else repr(part)
            log.warning("shard %d left out of the answer: %s", i, reason[:300])
        else:
            answers.append(part)
    coverage.answered = min(coverage.answered, len(answers))
    if not answers:
        raise Unavailable(f"none of the {len(shards)} shards answered within {timeout_s} s")
    return answers
