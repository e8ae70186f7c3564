"""Joining Ray, and what every task of ours needs to see the same storage as the driver."""

from __future__ import annotations

from visual_search import storage


def init() -> None:
    """Join RAY_ADDRESS (or the job's cluster under `ray job submit`), else start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def runtime_env() -> dict | None:
    """runtime_env for our tasks and actors: the driver's storage settings (never credentials)."""
    env = storage.storage_env()
    return {"env_vars": env} if env else None
