"""Build, verify and publish a sharded FAISS index version from an embeddings dataset.

    python jobs/build_index.py --embeddings URI --index-root URI [--shards N]
        [--factory auto|STRING] [--memory-budget BYTES] [--target-recall R] [--keep N]

Steps: validate the dataset -> train one template on a sample (GPU when FAISS sees one) ->
fill N shards in parallel Ray tasks with global dense int64 ids -> tune nprobe/efSearch on
held-out queries against exact search -> read every shard back (sha256, counts) and re-check
recall on the files as written -> manifest.json -> move CURRENT -> prune old versions.
A failure before CURRENT moves leaves the previous version live.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from jobs import cli
from visual_search import (
    cluster,
    devices,
    embed_pool,
    embeddings,
    filters,
    fulltext,
    index,
    storage,
    texttower,
    updates,
    versions,
)
from visual_search.manifest import IndexManifest
from visual_search.search import merge_topk
from visual_search.shards import fill_shard, train_template, verify_shard

log = logging.getLogger("visual_search.build_index")
K = 10
GIB = 1 << 30


class BuildError(RuntimeError):
    """The build cannot produce a version that meets its contract; nothing was published."""


class RecallError(BuildError):
    """The index misses the recall target (a reused template that no longer fits, or a factory
    too coarse for these vectors)."""


class GateError(BuildError):
    """The version is complete and verified but a quality gate refused it: CURRENT stays put."""


@dataclass(frozen=True)
class Config:
    embeddings: str
    index_root: str
    shards: int = 1
    factory: str = "auto"
    memory_budget: int = 8 * GIB
    target_recall: float = 0.95
    metric: str = "ip"
    queries: int = 1000
    max_train: int = 200_000
    keep: int = 3
    seed: int = 0
    text: bool = True  # BM25 text indexes of the docs (GET /search?q=)
    text_tower: bool = True  # with text: the semantic text tower (texttower.py) and its fusion
    # clip-vit-b-32's weights (as embedded): its own text tower instead of training one
    weights: str | None = None
    gpus: int | None = None  # >0: train the template on a GPU (default: if the cluster has one)
    s3_endpoint: str | None = None
    # A trained template (a version's template.faiss) to fill instead of training one
    template: str | None = None
    # The update log position the catalog snapshot reflects (updates.Position.as_dict())
    updates_through: dict | None = None


def _say(msg: str) -> None:
    print(f"[build_index] {msg}", flush=True)


def _sample(n: int, cfg: Config, factory: str) -> tuple[np.ndarray, np.ndarray]:
    """Held-out query ids and training ids (disjoint while the dataset allows)."""
    rng = np.random.default_rng(cfg.seed)
    perm = rng.permutation(n)
    nq = min(cfg.queries, max(1, n // 10))
    queries, rest = np.sort(perm[:nq]), perm[nq:]
    if factory == "Flat":
        return queries, np.zeros(0, np.int64)
    train = rest[: cfg.max_train] if len(rest) >= 1000 else perm[: cfg.max_train]
    return queries, np.sort(train)


def _tune(cfg: Config, grid: list[dict], filled: list[dict], query_ids: np.ndarray):
    truth = merge_topk([f["exact"] for f in filled], K + 1, cfg.metric)[1]
    curve = []
    for j, params in enumerate(grid):
        found = merge_topk([f["candidates"][j] for f in filled], K + 1, cfg.metric)[1]
        recall = index.recall_at_k(found, truth, K, exclude=query_ids)
        curve.append((params, recall))
        if recall >= cfg.target_recall:
            return params, recall, truth, curve
    best = max(curve, key=lambda c: c[1])
    raise RecallError(
        f"recall@{K} {best[1]:.3f} at best ({best[0]}) is below the target {cfg.target_recall}; "
        "choose a richer --factory or a larger --memory-budget"
    )


def _check(cfg: Config, n: int) -> None:
    if cfg.shards < 1:
        raise ValueError("--shards must be >= 1")
    if cfg.keep < 1:
        raise ValueError("--keep must be >= 1")
    if n < cfg.shards:
        raise BuildError(f"{n} vectors cannot fill {cfg.shards} shards")
    if cfg.template and cfg.factory == "auto":
        raise BuildError("a reused --template needs the factory it was made with (--factory)")


def _train(cfg: Config, dataset, factory: str, train_ids: np.ndarray, root: str, env: dict):
    """The trained template: reused (--template) or trained on a Ray task (a GPU when there
    is one); (its object ref, its search-parameter grid, its manifest record)."""
    import ray

    d = dataset.dim
    if cfg.template:
        trained = storage.read_bytes(cfg.template)
        grid = index.param_grid(_checked_template(trained, d, cfg.metric, cfg.template))
        _say(f"reusing the trained template {cfg.template} ({factory})")
    else:
        gpus = 1 if devices.cluster_gpus(cfg.gpus) > 0 else 0
        if gpus:  # idle warm embedding actors hold GPUs (embed_pool.py)
            embed_pool.release_idle()
        train = ray.remote(train_template).options(num_gpus=gpus, runtime_env=env)
        trained = ray.get(train.remote(dataset, factory, cfg.metric, train_ids, None))
        grid = index.param_grid(index.make_template(factory, d, cfg.metric))
    return ray.put(trained), grid, _write_template(root, trained)


def _fill(cfg: Config, dataset, template, root: str, queries, grid, env: dict) -> list[dict]:
    """Every shard filled from its contiguous id range, written, and searched for `queries`
    at every point of `grid` (Ray tasks, one per shard)."""
    import ray

    bounds = np.linspace(0, dataset.count, cfg.shards + 1).astype(np.int64)
    fill = ray.remote(fill_shard).options(runtime_env=env)
    args = (root, queries, K + 1, grid, cfg.metric)
    ranges = [(int(bounds[i]), int(bounds[i + 1])) for i in range(cfg.shards)]
    return ray.get([fill.remote(dataset, template, i, r, *args) for i, r in enumerate(ranges)])


def _verify(cfg: Config, root: str, records, queries, params, truth, query_ids, env) -> float:
    """Recall@K of the shard files as written (read back, checksums and counts checked)."""
    import ray

    verify = ray.remote(verify_shard).options(runtime_env=env)
    answers = ray.get([verify.remote(root, r, queries, K + 1, params) for r in records])
    found = merge_topk(answers, K + 1, cfg.metric)[1]
    recall = index.recall_at_k(found, truth, K, exclude=query_ids)
    if recall < cfg.target_recall:
        raise RecallError(
            f"recall@{K} of the files as written is {recall:.4f} < {cfg.target_recall}"
        )
    _say(f"verified {cfg.shards} shard file(s): checksums, counts, recall@{K} {recall:.4f}")
    return recall


def _build_shards(cfg: Config, dataset, factory: str, root: str, env: dict) -> dict:
    """Train (or reuse) the template, fill and write the shards, tune the search parameters on
    held-out queries and verify the files as written: the manifest's index fields."""
    query_ids, train_ids = _sample(dataset.count, cfg, factory)
    _, queries = dataset.read_ids(query_ids)
    t0 = time.monotonic()
    template, grid, template_record = _train(cfg, dataset, factory, train_ids, root, env)
    t_train = time.monotonic() - t0
    if not cfg.template:
        _say(f"template trained on {len(train_ids):,} vectors in {t_train:.1f}s")
    filled = _fill(cfg, dataset, template, root, queries, grid, env)
    t_fill = time.monotonic() - t0 - t_train
    records = [f["record"] for f in filled]
    _say(f"{cfg.shards} shard(s) filled and written in {t_fill:.1f}s")

    params, recall, truth, curve = _tune(cfg, grid, filled, query_ids)
    _say(f"search params {params}: recall@{K} {recall:.4f} (target {cfg.target_recall})")
    recall = _verify(cfg, root, records, queries, params, truth, query_ids, env)
    timings = {"train_s": round(t_train, 2), "fill_s": round(t_fill, 2)}
    return {
        "search_params": params,
        "shards": records,
        "recall": _recall_record(cfg, recall, len(query_ids), curve),
        "template": template_record,
        "timings": {**timings, "train_vectors": len(train_ids)},
    }


def run(cfg: Config, gate: Callable[[IndexManifest], None] | None = None) -> IndexManifest:
    """Build and publish one version; returns its manifest.

    `gate`, when given, sees the complete, verified version before CURRENT moves and raises
    GateError to refuse it (the version folder stays for inspection, CURRENT does not move).
    """
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    dataset = embeddings.open_dataset(cfg.embeddings)
    through = cfg.updates_through or log_snapshot(cfg.index_root)
    n, d = dataset.count, dataset.dim
    _check(cfg, n)
    auto = cfg.factory == "auto"
    factory = index.choose_factory(n, d, cfg.memory_budget) if auto else cfg.factory
    version = versions.new_version_id()
    root = versions.version_root(cfg.index_root, version)
    _say(f"{n:,} vectors of dimension {d} -> {factory} in {cfg.shards} shard(s), version {version}")

    cluster.init()
    env = cluster.runtime_env()
    built = _build_shards(cfg, dataset, factory, root, env)
    records = built["shards"]
    filterable, text, t_text = _docs_indexes(cfg, root, records, env)
    tower = _text_tower(cfg, root, dataset, text)
    manifest = IndexManifest(
        version=version,
        created_unix=time.time(),
        model=dataset.manifest.model,
        dim=d,
        metric=cfg.metric,
        factory=factory,
        count=n,
        embeddings={
            "uri": dataset.uri,
            "catalog_fingerprint": dataset.manifest.catalog.get("fingerprint"),
            "counts": dataset.manifest.counts,
        },
        filterable=filterable,
        text=text,
        text_tower=tower,
        updates_through=through,
        **built,
    )
    manifest.timings.update(text_s=round(t_text, 2), total_s=round(time.time() - started, 2))
    manifest.timings["bytes"] = sum(r.bytes for r in records)
    _complete(cfg, root, manifest, gate)
    return manifest


def _recall_record(cfg: Config, recall: float, queries: int, curve: list) -> dict:
    return {
        f"recall_at_{K}": round(recall, 4),
        "target": cfg.target_recall,
        "queries": queries,
        "method": "held-out dataset vectors, own id excluded, vs exact search",
        "curve": [{"params": p, "recall": round(r, 4)} for p, r in curve],
    }


def _complete(cfg: Config, root: str, manifest: IndexManifest, gate) -> None:
    """Write the manifest (the version is complete), pass the gate, move CURRENT."""
    pending = storage.join(root, versions.PENDING)
    if gate is not None:  # a crash while the gate runs must not leave a complete version
        storage.write_bytes(pending, b"")
    manifest.write(root)  # last in the version folder: the version is complete
    if gate is not None:
        try:
            gate(manifest)
        except GateError:
            versions.withdraw(cfg.index_root, manifest.version)  # not complete, nor kept
            raise
        storage.delete(pending)
    publish(cfg, root, manifest)


TEMPLATE_FILE = "template.faiss"


def log_snapshot(index_root: str) -> dict:
    """The update log position this build's catalog is taken to reflect: its tail at the start
    (later updates are applied on top of the new version by the service)."""
    live = versions.current(index_root)
    after = updates.Position()
    if live is not None:
        after = updates.Position.of(
            versions.open_version(index_root, live).manifest.updates_through
        )
    return updates.snapshot(index_root, after).as_dict()


def _write_template(root: str, trained: bytes) -> dict:
    """The trained, empty template in the version (the service fills live updates into copies
    of it; compaction and incremental re-indexes reuse it)."""
    uri = storage.join(root, TEMPLATE_FILE)
    storage.write_bytes(uri, trained)
    return {"file": TEMPLATE_FILE, "sha256": hashlib.sha256(trained).hexdigest()}


def _checked_template(trained: bytes, d: int, metric: str, uri: str) -> faiss.Index:
    """A reused template, once checked trained, empty, and of these vectors' dimension and
    metric."""
    template = index.from_bytes(trained)
    want = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if template.d != d or template.metric_type != want or not template.is_trained:
        raise BuildError(f"template {uri}: not a trained {metric} index of dimension {d}")
    if template.ntotal:
        raise BuildError(f"template {uri}: holds {template.ntotal} vectors, expected none")
    return template


def _docs_indexes(cfg: Config, root: str, records, env) -> tuple[dict, dict | None, float]:
    """(filterable columns, the BM25 text indexes' record or None, seconds): one text index per
    shard over the docs' title and string metadata, written before the manifest."""
    import ray

    started = time.time()
    docs = pa.concat_tables(storage.read_parquet(storage.join(root, r.docs)) for r in records)
    filterable = filters.filterable_columns(docs)
    columns = fulltext.text_columns(docs)
    if not cfg.text or not columns:
        return filterable, None, 0.0
    build = ray.remote(fulltext.build_shard_from_docs).options(runtime_env=env)
    shards = ray.get([build.remote(root, i, r.docs, columns) for i, r in enumerate(records)])
    took = time.time() - started
    _say(f"text indexes (BM25 over {', '.join(columns)}) for {len(shards)} shard(s) in {took:.1f}s")
    return filterable, {"columns": columns, "shards": shards}, took


def _clip_tower(cfg: Config, model: dict):
    """CLIP's own text tower when the vectors are clip-vit-b-32's and its weights are known."""
    clip = texttower.ClipTower.for_model(model, cfg.weights)
    if clip is None and model.get("model_id") == texttower.ClipTower.model_id:
        why = "a projection head on them" if model.get("head") else "no --weights"
        _say(f"clip-vit-b-32 vectors, {why}: a text tower is trained instead of CLIP's own")
    return clip


def _text_tower(cfg: Config, root: str, dataset, text: dict | None) -> dict | None:
    """The semantic text tower trained on the docs' (text, vector) pairs, or why not."""
    if text is None or not cfg.text_tower:
        return None
    # At most MAX_ROWS sampled rows are read: a catalog's whole embeddings need not fit here.
    n, cap = dataset.count, texttower.MAX_ROWS
    ids = np.arange(n) if n <= cap else np.random.default_rng(cfg.seed).choice(n, cap, False)
    ids, vectors = dataset.read_ids(ids)  # sorted
    names = storage.parquet_columns(dataset.parts[0].uri)
    docs = dataset.read_range(0, n, [c for c in names if c != "embedding"])
    clip = _clip_tower(cfg, dataset.manifest.model)
    if clip is None and len(ids) >= texttower.MIN_ROWS:
        # Two trainings (held-out check, then all rows): minutes on CPU at 100k rows.
        _say(f"text tower: training on {len(ids):,} rows twice (--no-text-tower skips it)")
    record = texttower.build(docs.take(pa.array(ids)), vectors, root, pretrained=clip)
    if "skipped" in record:
        _say(f"text tower skipped: {record['skipped']}")
    else:
        fusion = record["fusion"]
        _say(
            f"text tower ({record['kind']}) on {record['rows']:,} rows in {record['seconds']:.1f}s "
            f"({record['device']}): held-out title R@10 {record['heldout']['title_r10']:.3f}; "
            f"fusion weights {fusion['text']['weights']} / {fusion['hybrid']['weights']}"
        )
    return record


def publish(cfg: Config, root: str, manifest: IndexManifest) -> None:
    """Move CURRENT forward to a complete version (its manifest written), then prune (best
    effort). A newer build that published first wins: this one is withdrawn (GateError)."""
    try:
        previous = versions.set_current(cfg.index_root, manifest.version)
    except versions.Superseded as exc:
        versions.withdraw(cfg.index_root, manifest.version)
        raise GateError(
            f"{exc}: a newer build published first; {manifest.version} withdrawn"
        ) from None
    _say(f"published {manifest.version} (was {previous}); CURRENT -> {root}")
    try:
        pruned = versions.prune(cfg.index_root, cfg.keep, manifest.version, (previous,))
        if pruned:
            _say(f"pruned old versions: {', '.join(pruned)}")
    except Exception as exc:  # the new version is live; a failed cleanup must not undo that
        log.warning("pruning old versions failed (the new version is live): %s", exc)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the build itself (jobs/reindex.py shares them; it makes the embeddings)."""
    cli.add_index_root(p)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--factory", default="auto", help="FAISS factory string, or auto")
    p.add_argument("--memory-budget", type=int, default=Config.memory_budget, help="bytes")
    p.add_argument("--target-recall", type=float, default=Config.target_recall)
    p.add_argument("--metric", default="ip", choices=sorted(index.METRIC_TYPES))
    p.add_argument("--queries", type=int, default=Config.queries, help="held-out queries")
    p.add_argument("--keep", type=int, default=Config.keep, help="complete versions kept")
    p.add_argument("--gpus", type=int, help=devices.GPUS_HELP)
    p.add_argument("--no-text", dest="text", action="store_false", help="no BM25 text indexes")
    p.add_argument(
        "--no-text-tower",
        dest="text_tower",
        action="store_false",
        help="no semantic text tower",
    )
    cli.add_s3_endpoint(p)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--embeddings", required=True, help="embeddings dataset URI (Contract 2)")
    p.add_argument(
        "--weights",
        help="clip-vit-b-32 state dict the vectors were made with: CLIP's own text tower "
        "serves text queries (else one is trained on the catalog)",
    )
    add_build_arguments(p)
    return p


def config_from_args(args: argparse.Namespace, embeddings_uri: str | None = None) -> Config:
    """Config from the build flags; embeddings_uri stands in for --embeddings (reindex)."""
    embeddings = embeddings_uri or args.embeddings
    return cli.config(Config, args, embeddings=embeddings)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    return cli.exit_code("build_index", lambda: run(cfg), (BuildError,), log=True)


if __name__ == "__main__":
    sys.exit(main())
