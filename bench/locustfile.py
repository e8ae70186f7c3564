"""The locust side of bench/load.py: users that upload catalog photos to POST /search.

Run by bench/load.py in its own process (locust's gevent patches sockets and threads, which
Ray's driver must not see), configured by environment variables:
- LOAD_PLAN: JSON list of stages {"seconds", "users", "rate"}: `users` users for `seconds`,
  each sending `rate` requests per second as a Poisson process while answers keep up (0:
  closed loop, the next request as soon as the last is answered). The run stops after the
  last stage (locust's LoadTestShape).
- LOAD_PHOTOS: a file of photo paths, one per line, sent in turn (JPEG or PNG).
- LOAD_OUT: where the samples go at the end, as JSON: [[t_start_s, latency_ms, status], ...]
  with t_start_s from the start of the run and status the HTTP code, "<code>-not-json" for an
  error answer that is not JSON, or the client error's name (timeouts included); a JSON
  429/503 adds a fourth field, its error code ("overloaded", "stale", ...).
- LOAD_TIMEOUT: per-request timeout in seconds (default 30).
"""

from __future__ import annotations

import itertools
import json
import mimetypes
import os
import random
import time

from locust import FastHttpUser, LoadTestShape, events, task

PLAN = json.loads(os.environ.get("LOAD_PLAN", "[]"))
TIMEOUT = float(os.environ.get("LOAD_TIMEOUT", "30"))
START = time.monotonic()
SAMPLES: list[list] = []


def _photos() -> list[tuple[bytes, str]]:
    path = os.environ.get("LOAD_PHOTOS")
    if not path:
        return []
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    out = []
    for name in names:
        with open(name, "rb") as img:
            out.append((img.read(), mimetypes.guess_type(name)[0] or "image/jpeg"))
    return out


PHOTOS = _photos()
NEXT_PHOTO = itertools.count()


def stage_at(elapsed: float) -> dict | None:
    """The plan's stage running `elapsed` seconds after the start (None: past the end)."""
    end = 0.0
    for stage in PLAN:
        end += stage["seconds"]
        if elapsed < end:
            return stage
    return None


def classify(code: int, content_type: str | None, error: Exception | None) -> str:
    if error is not None and not code:
        return type(error).__name__
    if code != 200 and "json" not in (content_type or ""):
        return f"{code}-not-json"
    return str(code)


def error_code(body: bytes | None) -> str | None:
    """The "error.code" of a JSON error answer (Contract 4), else None."""
    try:
        return json.loads(body or b"")["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class Shopper(FastHttpUser):
    network_timeout = TIMEOUT
    connection_timeout = TIMEOUT

    def wait_time(self) -> float:
        """Paced users send as a Poisson process of their stage's rate (exponential gaps from
        one send to the next, the first at a random offset): users paced at a constant gap
        stay in step and arrive as one burst per gap, which admission control halves."""
        stage = stage_at(time.monotonic() - START)
        rate = stage["rate"] if stage else 0
        if not rate:
            return 0.0
        last = getattr(self, "_last_start", None)
        if last is None:
            return random.uniform(0, 1.0 / rate)
        return max(0.0, random.expovariate(rate) - (time.monotonic() - last))

    @task
    def search(self) -> None:
        data, ctype = PHOTOS[next(NEXT_PHOTO) % len(PHOTOS)]
        self._last_start = t0 = time.monotonic()
        with self.client.post(
            "/search?k=10", data=data, headers={"Content-Type": ctype}, catch_response=True
        ) as resp:
            code = resp.status_code or 0
            ctype = (resp.headers or {}).get("Content-Type")
            status = classify(code, ctype, getattr(resp, "error", None))
            # 429/503 are the service's admission control answering as it should.
            if code in (200, 429, 503) and not status.endswith("not-json"):
                resp.success()
            why = error_code(resp.content) if status in ("429", "503") else None
        row = [round(t0 - START, 3), round((time.monotonic() - t0) * 1000, 1), status]
        SAMPLES.append(row + [why] if why else row)


class Plan(LoadTestShape):
    def tick(self):
        stage = stage_at(time.monotonic() - START)
        if stage is None:
            return None
        users = int(stage["users"])
        return users, max(users, 1)  # every stage's users start within a second


@events.test_start.add_listener
def _restart_clock(**_kwargs) -> None:
    global START
    START = time.monotonic()


@events.quitting.add_listener
def _write(**_kwargs) -> None:
    out = os.environ.get("LOAD_OUT")
    if out:
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(SAMPLES, f)
        os.replace(tmp, out)
