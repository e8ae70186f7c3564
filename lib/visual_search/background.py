"""Background work at low CPU priority, so that it never takes CPU from queries: a PUT's decode
and embedding in the ingress, and reading the update log in the searchers.

The threads raise their own nice value (on Linux a thread's, not the process's; the threads
they start, torch's OpenMP team included, inherit it), so on a busy node the kernel runs the
queries' threads first and the background work takes what is left. bench/updates.py measures
query latency during churn against idle with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

NICE = 10  # added to the process's: CFS gives a nice-10 thread ~1/10 of a nice-0 one's share
THREADS = 2


def lower_priority(nice: int = NICE, idle: bool = False) -> None:
    """Lower the calling thread's CPU priority: its nice value raised by `nice` (19 at most),
    or with `idle` SCHED_IDLE (it runs only on cores nothing else wants; nice 19 where that is
    refused). A no-op where the OS has no per-thread priority."""
    tid = threading.get_native_id()
    if idle:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError):
            nice = 19
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that refuses it
        log.debug("background threads keep their priority: %s", exc)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                THREADS, thread_name_prefix="background", initializer=lower_priority
            )
        return _pool


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a low-priority thread (asyncio.to_thread's counterpart)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args))
