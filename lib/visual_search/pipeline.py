"""Ray Data stages of the embedding job: read + decode (CPU tasks) and embed (actor pool)."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import background, devices, images, schema, storage

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


def read_and_decode(
    uri: str, preprocess: images.Preprocess, limits: images.Limits
) -> tuple[bytes | None, str | None, str | None]:
    """URI -> (uint8 pixel bytes, None, None) or (None, error code, detail); never raises."""
    try:
        data = storage.read_bytes(uri, max_bytes=limits.max_bytes)
    except storage.TooLarge as exc:
        return None, "too_large", str(exc)[:DETAIL_MAX]
    except Exception as exc:
        return None, "read_error", str(exc)[:DETAIL_MAX]
    try:
        return images.load(data, preprocess, limits).tobytes(), None, None
    except images.ImageError as exc:
        return None, exc.code, exc.detail[:DETAIL_MAX]
    except Exception as exc:  # a decoder bug must cost one row, not the job
        return None, "decode_error", f"{type(exc).__name__}: {exc}"[:DETAIL_MAX]


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


class EmbedBatch:
    """Ray Data callable class: builds the model once per actor, embeds the decoded rows."""

    def __init__(
        self,
        model: str,
        weights: str | None,
        random_weights: bool,
        preprocess_mode: str,
        device: str | None,
        threads: int | None,
        head: str | None = None,
    ):
        from visual_search import embedders

        start_worker(threads)
        self.ready(
            embedders.create(
                model,
                weights=weights,
                device=device,
                random_weights=random_weights,
                preprocess_mode=preprocess_mode,
                head=head,
            )
        )

    def ready(self, embedder) -> None:
        """Take the built model; from now on, time between calls is input wait."""
        self.embedder, self.idle_since = embedder, time.monotonic()

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.monotonic()
        ok = pc.is_valid(batch["pixels"]).to_numpy(zero_copy_only=False)
        size = self.embedder.preprocess.size
        good = batch["pixels"].filter(pa.array(ok)).to_pylist()
        pixels = np.frombuffer(bytearray().join(good), np.uint8).reshape(-1, size, size, 3)
        vectors = np.zeros((len(ok), self.embedder.dim), np.float32)
        vectors[ok] = self.embedder.embed(pixels)
        column = schema.embedding_array(vectors)
        column = pa.FixedSizeListArray.from_arrays(
            column.values, self.embedder.dim, mask=pa.array(~ok)
        )
        return pa.table(
            {
                "row": batch["row"],
                "embedding": column,
                "error": batch["error"],
                "detail": batch["detail"],
                "decoded_at": batch["decoded_at"],
                **self._timing_columns(start, batch.num_rows),
            }
        )

    def _timing_columns(self, start: float, rows: int) -> dict[str, pa.Array]:
        """This call's model seconds and the seconds the actor waited for it, spread over its
        rows, so that sums over any set of rows add up (the driver sums them all)."""
        now = time.monotonic()
        waited, self.idle_since = start - self.idle_since, now
        n = max(rows, 1)
        return {
            "embed_s": pa.array([(now - start) / n] * rows, pa.float64()),
            "waited_s": pa.array([waited / n] * rows, pa.float64()),
        }


# Decoding tasks ask for less than 1 CPU, unlike the embedding actors: equal remote args would
# let Ray Data fuse decoding into the actors, and the (GPU) actors would then decode serially.
DECODE_CPUS = 0.5


def decode_and_embed(ds, decode: dict, embed: dict, gpus: float, concurrency: int):
    """Ray Data stages over a dataset of (row, image_uri) blocks: decode_batch in CPU tasks
    (`decode`: preprocess, limits, batch_size, yield_cores), then an embedding actor pool
    (`embed`: cls, args, batch_size), a GPU per actor when `gpus`; the actors keep freed
    tensors (devices.KEEP_FREED_ENV)."""
    import ray

    from visual_search import cluster

    env = cluster.runtime_env()
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={
            "preprocess": decode["preprocess"],
            "limits": decode["limits"],
            "yield_cores": decode.get("yield_cores", False),
        },
        batch_size=decode["batch_size"],
        batch_format="pyarrow",
        num_cpus=DECODE_CPUS,
        runtime_env=env,
    )
    env_vars = {**(env or {}).get("env_vars", {}), **devices.KEEP_FREED_ENV}
    return ds.map_batches(
        embed["cls"],
        fn_constructor_args=embed["args"],
        batch_size=embed["batch_size"],
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        runtime_env={**(env or {}), "env_vars": env_vars},
    )
