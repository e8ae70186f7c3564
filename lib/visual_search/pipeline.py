"""Reading and decoding catalog images: per image (read_image, decode_image) for the embedding
actors, and as a Ray Data stage of CPU tasks (decode_stage) where the actors run on GPUs."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from visual_search import background, devices, images, storage

DETAIL_MAX = 500
# Schema of the decode stage's output: pixels are null for rows that failed; decoded_at (Unix
# time) lets the driver tell the part of a run where both stages were busy (_Progress).
DECODED_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("pixels", pa.binary()),
        ("error", pa.string()),
        ("detail", pa.string()),
        ("decoded_at", pa.float64()),
    ]
)


def read_image(uri: str, limits: images.Limits) -> tuple[bytes | None, str | None, str | None]:
    """URI -> (file bytes, None, None) or (None, error code, detail); never raises."""
    try:
        return storage.read_bytes(uri, max_bytes=limits.max_bytes), None, None
    except storage.TooLarge as exc:
        return None, "too_large", str(exc)[:DETAIL_MAX]
    except Exception as exc:
        return None, "read_error", str(exc)[:DETAIL_MAX]


def decode_array(
    data: bytes, preprocess: images.Preprocess, limits: images.Limits
) -> tuple[np.ndarray | None, str | None, str | None]:
    """File bytes -> (uint8 (size, size, 3) pixels, None, None) or (None, error code, detail);
    never raises."""
    try:
        return images.load(data, preprocess, limits), None, None
    except images.ImageError as exc:
        return None, exc.code, exc.detail[:DETAIL_MAX]
    except Exception as exc:  # a decoder bug must cost one row, not the job
        return None, "decode_error", f"{type(exc).__name__}: {exc}"[:DETAIL_MAX]


def decode_image(
    data: bytes, preprocess: images.Preprocess, limits: images.Limits
) -> tuple[bytes | None, str | None, str | None]:
    """File bytes -> (uint8 pixel bytes, None, None) or (None, error code, detail); never raises."""
    pixels, error, detail = decode_array(data, preprocess, limits)
    return (None if pixels is None else pixels.tobytes()), error, detail


def read_and_decode(
    uri: str, preprocess: images.Preprocess, limits: images.Limits
) -> tuple[bytes | None, str | None, str | None]:
    """URI -> (uint8 pixel bytes, None, None) or (None, error code, detail); never raises."""
    data, error, detail = read_image(uri, limits)
    return (None, error, detail) if data is None else decode_image(data, preprocess, limits)


# Where decoding and the model share a machine's cores, the embed job's decoding threads run
# as SCHED_IDLE: the model's threads keep their cores (one preempted thread stalls every step
# of a batch) and decoding takes what the model leaves (bench/embed.py --large measures the
# job and how long the model waited for input).
_idle_priority = functools.partial(background.lower_priority, idle=True)


def decode_batch(
    batch: pa.Table,
    preprocess: images.Preprocess,
    limits: images.Limits,
    io_threads: int = 8,
    yield_cores: bool = False,
) -> pa.Table:
    """Ray Data UDF: (row, image_uri) -> (row, pixels | null, error, detail, decoded_at).

    Reads overlap in a small thread pool (object stores are latency bound); Pillow releases the
    GIL while decoding, so the threads also share the task's cores. `yield_cores`: the threads
    run at the lowest priority (the batch embed job; not the stream job, whose updates must not
    wait while a service on the same machine is busy).
    """
    uris = batch["image_uri"].to_pylist()
    threads = min(io_threads, max(1, len(uris)))
    init = _idle_priority if yield_cores else None
    with ThreadPoolExecutor(threads, initializer=init) as pool:
        results = list(pool.map(lambda u: read_and_decode(u, preprocess, limits), uris))
    pixels, errors, details = zip(*results, strict=True) if results else ((), (), ())
    return pa.table(
        [
            batch["row"],
            pa.array(pixels, pa.binary()),
            pa.array(errors, pa.string()),
            pa.array(details, pa.string()),
            pa.array([time.time()] * len(uris), pa.float64()),
        ],
        schema=DECODED_SCHEMA,
    )


def start_worker(threads: int | None) -> None:
    """Set up a process that embeds batches: torch threads, and freed tensors kept for reuse."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    devices.keep_freed_memory()


# Decoding tasks ask for less than 1 CPU: they run beside the GPU actors' feeding threads.
DECODE_CPUS = 0.5


def decode_stage(ds, decode: dict):
    """decode_batch over a dataset of (row, image_uri) blocks, in CPU tasks (`decode`:
    preprocess, limits, batch_size, yield_cores): embed_pool.blocks_of feeds its output to
    GPU actors."""
    from visual_search import cluster

    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "preprocess": decode["preprocess"],
            "limits": decode["limits"],
            "yield_cores": decode.get("yield_cores", False),
        },
        batch_size=decode["batch_size"],
        batch_format="pyarrow",
        num_cpus=DECODE_CPUS,
        runtime_env=cluster.runtime_env(),
    )
