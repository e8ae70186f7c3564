"""Fold the update log (Contract 5) into a new index version.

    python jobs/compact.py --index-root URI [--keep N] [--s3-endpoint URL]

Reads the log after the live version's `updates_through` up to its tail, and writes a new
embeddings dataset under {index_root}/compactions/: the live version's rows minus every row of
a product the log touched, plus one row per product whose last update is an upsert (kept rows
first, in their order; new rows in seq order). Nothing unchanged is re-embedded; an upsert's
vector is reused when the live model made it, else its photo is embedded again with that model.
jobs/build_index.py then fills the live version's template (same factory, metric and shard
count) and publishes, unless CURRENT moved meanwhile (a re-index won; nothing is published).

After CURRENT moves, the log segments the previous compaction folded in (those up to the
`updates_through` of the version live until now) are retired with updates.retire, so a service
still on that version can catch up; newer segments are never touched. Compaction datasets no
remaining version uses are deleted too.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import build_index, cli
from visual_search import (
    cluster,
    devices,
    embed_pool,
    embeddings,
    schema,
    storage,
    updates,
    versions,
)
from visual_search.manifest import IndexManifest
from visual_search.updates import UPSERT, Position, Update

log = logging.getLogger("visual_search.compact")
# Dataset columns the log's metadata may not set (the rest are the catalog's metadata columns).
OWN_COLUMNS = ("product_id", "image_uri", "embedding")


@dataclass(frozen=True)
class Config:
    index_root: str
    keep: int = build_index.Config.keep
    min_updates: int = 1  # fewer pending updates: nothing to do yet (for a frequent schedule)
    s3_endpoint: str | None = None


class CompactError(RuntimeError):
    """Compaction cannot produce a faithful version; nothing was published."""


def _say(msg: str) -> None:
    print(f"[compact] {msg}", flush=True)


def read_log(index_root: str, after: Position) -> tuple[Position, list[Update]]:
    """(the tail, every update after `after` up to it), as the log stands now."""
    tail, found = after, []
    for pos, segment in updates.follow(index_root, after):
        tail = pos
        found.extend(segment)
    return tail, found


def last_upserts(found: list[Update]) -> tuple[set[str], list[Update]]:
    """(every product the updates touch, the upserts that are their product's last update, in
    seq order): an upsert replaces all of a product's photos, a delete removes them."""
    last = {u.product_id: u for u in sorted(found, key=lambda u: u.seq)}
    survivors = sorted((u for u in last.values() if u.op == UPSERT), key=lambda u: u.seq)
    return set(last), survivors


def _kept(dataset: embeddings.Dataset, touched: set[str]):
    """The dataset's parts, in order, without the rows of touched products (one part at a time,
    so memory holds one partition)."""
    gone = pa.array(sorted(touched), pa.string())
    for part in dataset.parts:
        table = storage.read_parquet(part.uri)
        yield table.filter(pc.invert(pc.is_in(table["product_id"], value_set=gone)))


def _vectors(ups: list[Update], model: dict, dim: int) -> np.ndarray:
    """float32 (len(ups), dim): each upsert's own vector when the live model made it, else its
    photo embedded again with that model (in a Ray task, on a GPU when the cluster has one)."""
    import ray

    key = updates.model_key(model)
    out = np.zeros((len(ups), dim), np.float32)
    stale = [i for i, u in enumerate(ups) if u.vector is None or u.model != key]
    for i, u in enumerate(ups):
        if u.vector is not None and u.model == key:
            out[i] = u.vector
    if not stale:
        return out
    _say(f"{len(stale):,} upsert(s) carry no vector of the live model: re-embedding their photos")
    cluster.init()
    gpus = 1 if devices.cluster_gpus() > 0 else 0
    if gpus:  # idle warm embedding actors hold GPUs (embed_pool.py)
        embed_pool.release_idle()
    task = ray.remote(embeddings.embed_photos).options(
        num_gpus=gpus, runtime_env=cluster.runtime_env()
    )
    try:
        out[stale] = ray.get(task.remote(model, [ups[i].image_uri for i in stale]))
    except Exception as exc:  # any cause: the message must say how many rows are at stake
        raise CompactError(
            f"{len(stale)} upsert(s) need re-embedding with {model.get('model_id')!r}, "
            f"which failed: {exc}"
        ) from exc
    return out


def new_rows(ups: list[Update], like: pa.Schema, vectors: np.ndarray) -> pa.Table:
    """The surviving upserts as dataset rows of schema `like`: metadata fills the catalog's
    metadata columns (missing -> null); keys the catalog lacks are dropped (and said so)."""
    keys = {k for u in ups for k in u.metadata}
    dropped = sorted(keys - (set(like.names) - set(OWN_COLUMNS)))
    if dropped:
        _say(f"metadata keys the catalog does not have were dropped: {', '.join(dropped)}")
    own = {"product_id": [u.product_id for u in ups], "image_uri": [u.image_uri for u in ups]}
    arrays = []
    for f in like:
        if f.name == "embedding":
            arrays.append(schema.embedding_array(vectors).cast(f.type))
            continue
        column = own[f.name] if f.name in own else [u.metadata.get(f.name) for u in ups]
        try:
            arrays.append(pa.array(column, f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise CompactError(
                f"metadata {f.name!r} does not fit the catalog's {f.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(arrays, schema=like)


def write_compacted(
    index_root: str, live: versions.Version, tail: Position, found: list[Update]
) -> embeddings.Dataset:
    """The live version's dataset with the log folded in, under {index_root}/compactions/ (a
    deterministic name: a rerun after a crash rewrites the same folder)."""
    dataset = embeddings.open_dataset(live.manifest.embeddings["uri"])
    touched, ups = last_upserts(found)
    like = storage.read_parquet(dataset.parts[0].uri).schema
    rows = new_rows(ups, like, _vectors(ups, live.manifest.model, dataset.dim))
    step = max(1, dataset.manifest.partition_size)
    added = [rows.slice(lo, step) for lo in range(0, rows.num_rows, step)]
    out = storage.join(index_root, "compactions", f"{live.manifest.version}.{tail.seq}")
    catalog = {
        **dataset.manifest.catalog,
        "fingerprint": f"{dataset.manifest.catalog.get('fingerprint')}+log:{tail.seq}",
        "compacted_from": dataset.uri,
        "updates_through": tail.as_dict(),
    }
    result = embeddings.write_dataset(
        out, itertools.chain(_kept(dataset, touched), added), dataset.manifest, catalog=catalog
    )
    _say(
        f"dataset {out}: {dataset.count:,} rows - those of {len(touched):,} touched product(s) "
        f"+ {len(ups):,} new = {result.count:,}"
    )
    return result


def _build_config(cfg: Config, live: versions.Version, dataset, tail: Position):
    """The live version's build settings, filling its template rather than training anew."""
    m = live.manifest
    template = storage.join(live.root, m.template["file"]) if m.template else None
    if template is None:
        _say(f"version {m.version} kept no template: training a new {m.factory} one")
    return build_index.Config(
        embeddings=dataset.uri,
        index_root=cfg.index_root,
        shards=len(m.shards),
        factory=m.factory,
        metric=m.metric,
        target_recall=m.recall.get("target", build_index.Config.target_recall),
        keep=cfg.keep,
        text=m.text is not None,
        template=template,
        updates_through=tail.as_dict(),
    )


def _unmoved(index_root: str, live: str):
    """A build gate: refuse to publish when CURRENT no longer names the version compacted."""

    def gate(manifest: IndexManifest) -> None:
        now = versions.current(index_root)
        if now != live:
            raise build_index.GateError(f"CURRENT moved from {live} to {now}; not publishing")

    return gate


def prune_datasets(index_root: str) -> list[str]:
    """Delete compaction datasets that no complete version was built from and whose base
    version is gone too (a compaction in flight starts from a version that still exists)."""
    base = storage.join(index_root, "compactions")
    if not storage.is_dir(base):
        return []
    have = versions.list_versions(index_root)
    used = {
        IndexManifest.read(versions.version_root(index_root, v)).embeddings["uri"]
        for v, complete in have.items()
        if complete
    }
    prefix = len(storage.normalize(base)) + 1
    names = sorted({e.uri[prefix:].split("/")[0] for e in storage.list_files(base)})
    doomed = [
        n
        for n in names
        if storage.normalize(storage.join(base, n)) not in used and n.rsplit(".", 1)[0] not in have
    ]
    for n in doomed:
        storage.delete(storage.join(base, n))
    return doomed


def _clean_up(index_root: str, folded: Position) -> None:
    """Retire what the previous compaction folded in (`folded`: the log position of the version
    live until now), then unused datasets; best effort: the new version is live already."""
    try:
        retired = updates.retire(index_root, folded)
        if retired:
            _say(f"retired {retired} log segment(s) through {folded.segment} (seq {folded.seq})")
        pruned = prune_datasets(index_root)
        if pruned:
            _say(f"deleted compaction datasets no version uses: {', '.join(pruned)}")
    except Exception as exc:  # a failed cleanup must not turn a published version into an error
        log.warning("cleaning up after compaction failed (the new version is live): %s", exc)


def run(cfg: Config) -> IndexManifest | None:
    """Publish the live version + the log after it; None when the log holds nothing new."""
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    try:
        live = versions.open_version(cfg.index_root)
    except FileNotFoundError as exc:
        raise CompactError(str(exc)) from exc
    start = updates.check_reachable(cfg.index_root, Position.of(live.manifest.updates_through))
    tail, found = read_log(cfg.index_root, start)
    if len(found) < max(cfg.min_updates, 1):
        _say(
            f"nothing to compact: version {live.manifest.version} is through seq {start.seq}, "
            f"{len(found)} update(s) after it (--min-updates {cfg.min_updates})"
        )
        return None
    _say(f"version {live.manifest.version}: folding in seqs {start.seq + 1}..{tail.seq}")
    dataset = write_compacted(cfg.index_root, live, tail, found)
    build = _build_config(cfg, live, dataset, tail)
    manifest = build_index.run(build, gate=_unmoved(cfg.index_root, live.manifest.version))
    _clean_up(cfg.index_root, start)
    return manifest


MIN_UPDATES_HELP = "compact only once the log holds this many updates after the live version"


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_index_root(p)
    p.add_argument("--keep", type=int, default=Config.keep, help="complete versions kept")
    p.add_argument("--min-updates", type=int, default=Config.min_updates, help=MIN_UPDATES_HELP)
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = (CompactError, build_index.BuildError, updates.LogError)
    return cli.exit_code("compact", lambda: run(cli.config(Config, args)), errors, log=True)


if __name__ == "__main__":
    sys.exit(main())
