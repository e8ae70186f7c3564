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
