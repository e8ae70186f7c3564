"""Joining Ray, and what every task of ours needs to see the same storage as the driver."""

from __future__ import annotations

import os

from visual_search import storage

# Ray Serve's throughput-optimised data plane (Ray >= 2.55; the HAProxy binary comes with
# ray[serve]): HAProxy instead of the Python proxy in front of the ingress replicas, user code on
# each replica's main event loop, gRPC between deployments. Ray's processes read these when they
# start, so they belong in the environment of `ray start`, or of the process that starts a local
# Ray. bench/serve.py on 2 cores, concurrency 1: HTTP p50 42.7 -> 25.6 ms for the same app.
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def use_serve_env() -> dict:
    """Put SERVE_ENV into os.environ where a variable is not set (so `=0` opts out); call it
    before the process starts Ray. Returns the values in effect."""
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in SERVE_ENV}


def init() -> None:
    """Join RAY_ADDRESS (or the job's cluster under `ray job submit`), else start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def runtime_env() -> dict | None:
    """runtime_env for our tasks and actors: the driver's storage settings (never credentials)."""
    env = storage.storage_env()
    return {"env_vars": env} if env else None
