"""The one place that looks at hardware: torch devices, Ray cluster GPUs, FAISS GPUs."""

from __future__ import annotations

import os

GPUS_HELP = (
    "GPUs to use (default: those the cluster has now). On an autoscaling cluster whose GPU "
    "workers scale from zero, give the number wanted: the requests make the autoscaler add them"
)


def torch_device(prefer: str | None = None):
    """`prefer` ("cpu", "cuda", "cuda:1") wins; else CUDA when present, else CPU."""
    import torch

    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cluster_gpus(requested: int | None = None) -> float:
    """GPUs a job should use: `requested` when given (on an autoscaling cluster whose GPU
    workers scale from zero, none exist until a task asks for one), else the GPUs the connected
    Ray cluster has now (0 when Ray is not initialised)."""
    import ray

    if requested is not None:
        return float(requested)
    if not ray.is_initialized():
        return 0.0
    return float(ray.cluster_resources().get("GPU", 0.0))


def cpu_count() -> int:
    """CPUs this process may use (cgroup/affinity aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


# glibc hands every freed block above its mmap threshold (at most 32 MiB, however it adapts)
# back to the kernel, and maps a fresh, zero-filled one for the next; and a thread other than
# the main one allocates from an arena of at most 64 MiB, so bigger blocks are always mapped.
# A CNN's batch activations (efficientnet_lite0, batch 32: up to 154 MB) were mapped,
# page-faulted and unmapped on every layer of every call, and the kernel spent as long as the
# model. One arena and freed blocks kept in the heap double the CPU forward pass (batch 32,
# 2 threads: 69 -> 143 images/s; bench/embed.py --model-sweep). Only for processes that do
# batch work: their heap no longer shrinks.
KEEP_FREED_BYTES = 1 << 30
# glibc's tunable: (mallopt option, value); the environment variable of the same setting.
_KEEP_FREED = {
    "MALLOC_ARENA_MAX": (-8, 1),
    "MALLOC_MMAP_THRESHOLD_": (-3, KEEP_FREED_BYTES),
    "MALLOC_TRIM_THRESHOLD_": (-1, KEEP_FREED_BYTES),
}
# The same for a process from its start (a Ray actor's runtime_env): a thread that allocated
# before mallopt keeps its own arena.
KEEP_FREED_ENV = {name: str(value) for name, (_, value) in _KEEP_FREED.items()}


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed large blocks instead of unmapping them, from one
    arena; False where the C library is not glibc (nothing changes there)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(option, value) for option, value in _KEEP_FREED.values()])
