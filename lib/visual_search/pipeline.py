"""Ray Data stages of the embedding job: read + decode (CPU tasks) and embed (actor pool)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visual_search import images, schema, storage

DETAIL_MAX = 500
# Schema of the decode stage's output: pixels are null for rows that failed.
DECODED_SCHEMA = pa.schema(
    [("row", pa.int64()), ("pixels", pa.binary()), ("error", pa.string()), ("detail", pa.string())]
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


def decode_batch(
    batch: pa.Table, preprocess: images.Preprocess, limits: images.Limits, io_threads: int = 8
) -> pa.Table:
    """Ray Data UDF: (row, image_uri) -> (row, pixels | null, error, detail).

    Reads overlap in a small thread pool (object stores are latency bound); Pillow releases the
    GIL while decoding, so the threads also share the task's cores.
    """
    uris = batch["image_uri"].to_pylist()
    with ThreadPoolExecutor(min(io_threads, max(1, len(uris)))) as pool:
        results = list(pool.map(lambda u: read_and_decode(u, preprocess, limits), uris))
    pixels, errors, details = zip(*results, strict=True) if results else ((), (), ())
    return pa.table(
        [
            batch["row"],
            pa.array(pixels, pa.binary()),
            pa.array(errors, pa.string()),
            pa.array(details, pa.string()),
        ],
        schema=DECODED_SCHEMA,
    )


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
        import torch

        from visual_search import embedders

        if threads:
            torch.set_num_threads(threads)
        self.embedder = embedders.create(
            model,
            weights=weights,
            device=device,
            random_weights=random_weights,
            preprocess_mode=preprocess_mode,
            head=head,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
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
            }
        )


# Decoding tasks ask for less than 1 CPU, unlike the embedding actors: equal remote args would
# let Ray Data fuse decoding into the actors, and the (GPU) actors would then decode serially.
DECODE_CPUS = 0.5


def decode_and_embed(ds, decode: dict, embed: dict, gpus: float, concurrency: int):
    """Ray Data stages over a dataset of (row, image_uri) blocks: decode_batch in CPU tasks
    (`decode`: preprocess, limits, batch_size), then an embedding actor pool (`embed`: cls,
    args, batch_size), a GPU per actor when `gpus`."""
    import ray

    from visual_search import cluster

    env = cluster.runtime_env()
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"preprocess": decode["preprocess"], "limits": decode["limits"]},
        batch_size=decode["batch_size"],
        batch_format="pyarrow",
        num_cpus=DECODE_CPUS,
        runtime_env=env,
    )
    return ds.map_batches(
        embed["cls"],
        fn_constructor_args=embed["args"],
        batch_size=embed["batch_size"],
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        runtime_env=env,
    )
