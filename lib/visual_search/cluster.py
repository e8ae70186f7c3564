"""Joining Ray, and what every task of ours needs to see the same storage as the driver."""

from __future__ import annotations

import os

from visual_search import storage

# Ray Serve's throughput-optimised data plane (Ray >= 2.55; the HAProxy binary comes with
# ray[serve]): HAProxy instead of the Python proxy in front of the ingress replicas, user code on
# each replica's main event loop, gRPC between deployments. Ray's processes read these when they
# start, so they belong in the environment of `ray start`, or of the process that starts a local
# Ray. bench/serve.py on 2 cores, concurrency 1: HTTP p50 32.9 -> 25.9 ms for the same app.
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def use_serve_env(drain_s: float | None = None) -> dict:
    """Put SERVE_ENV into os.environ where a variable is not set (so `=0` opts out); call it
    before the process starts Ray. `drain_s`: how long a stopping ingress replica keeps taking
    requests (Ray's default, 30 s, lets load balancers deregister it; one machine has none).
    Returns the values in effect."""
    defaults = dict(SERVE_ENV)
    if drain_s is not None:
        defaults[DRAIN_ENV] = str(drain_s)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in defaults}


def init() -> None:
    """Join RAY_ADDRESS (or the job's cluster under `ray job submit`), else start a local Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def runtime_env() -> dict | None:
    """runtime_env for our tasks and actors: the driver's storage settings (never credentials)."""
    env = storage.storage_env()
    return {"env_vars": env} if env else None
