"""Re-index: embed the catalog, build, verify and publish a new index version.

    python jobs/reindex.py --catalog URI --index-root URI [--work URI] [--shards N] [--model NAME]
        [--head URI] [--full] [--no-tune] [--tune-method finetune|head] [--tune-labels COLUMN]
        [--eval-queries URI --min-recall R --max-drop D]

This is the command platform engineers submit (`ray job submit ... -- python jobs/reindex.py`).
The embeddings go to --work (default: {index-root}/work/embed-<catalog content>-<model>), so
a rerun after a crash resumes the embedding where it stopped.

Incremental by default: when a live version of the same base model exists and its embeddings
carry content keys (lib/visual_search/increments.py: image URI + size + mtime), only new or
changed rows are embedded, with the live version's model as it is (tuned weights included; the
tuning stage is skipped), the other rows' vectors are copied from the live embeddings into a
complete dataset in catalog order (the same one a full run makes), and the live version's
template is filled again while the build's recall target holds (else a new one is trained).
--full (or no fitting live version; the job prints why) embeds every row, tunes and trains.
Either way the version records the update log's tail at the start (`updates_through`), so the
service applies the updates acknowledged after the catalog snapshot.

Tuning (jobs/tune.py): by default the model is tuned to the catalog when it has enough images
(500): the backbone's last stage is fine-tuned on synthetic re-photographs of 60% of the products
(no labels needed), measured against the untuned model on held-out products, and kept only when
it is better there; the index is then built from the tuned vectors and the service loads the
tuned weights named in the manifest (`model.weights_uri`). The tuning record (what was trained,
on what, how long, both measurements) is the manifest's `model.tuning`. `--tune-method head`
trains the older label projection next to the backbone's vector instead (`--tune-labels`).
--no-tune (or --head) builds from the backbone's vectors as before.

Quality gate: with --eval-queries, the new version is evaluated (jobs/evaluate.py) after it is
built and verified and before CURRENT moves; CURRENT stays on the live version (exit 2) when
recall@10 is below --min-recall or more than --max-drop below the live version's on the same
queries. The report stays in {index-root}/evaluations/{version}/ either way; a refused version
is withdrawn (its folder removed), so it never counts as complete nor toward --keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs import build_index, cli, embed, evaluate, tune
from visual_search import embedders, embeddings, increments, index, partitions, storage, versions
from visual_search.manifest import IndexManifest


@dataclass(frozen=True)
class Gate:
    queries: str  # queries table (jobs/make_queries.py output, or labelled photos)
    min_recall: float = 0.0  # refuse below this recall@k
    max_drop: float = 0.02  # refuse when more than this below the live version
    k: int = 10


@dataclass(frozen=True)
class Config:
    embed: embed.Config
    build: build_index.Config
    gate: Gate | None = None
    tune: tune.Config | None = None  # None: build from the backbone's vectors
    full: bool = False  # embed every row, tune and train a template even when a live version fits
    work: str | None = None  # --work as given (None: the incremental dataset goes under work/)
    snapshot: increments.Snapshot | None = None  # the catalog and its content keys (None: read)


def say(msg: str) -> None:
    print(f"[reindex] {msg}", flush=True)


def gate_recall(report: dict, k: int) -> tuple[str, float]:
    """(level, recall@k) the gate judges: instance level when the queries name products."""
    for level in ("instance", "category"):
        if report.get(level):
            return level, float(report[level][f"recall@{k}"])
    raise build_index.GateError("the gate's queries have neither product_id nor category")


def quality_gate(gate: Gate, index_root: str, weights: str | None = None):
    """A build_index gate: evaluate the new version, and the live one on the same queries."""

    def evaluate_version(version: str, out: str | None) -> dict:
        cfg = evaluate.Config(
            index_root=index_root,
            queries=gate.queries,
            version=version,
            ks=tuple(sorted({1, 5, gate.k})),
            out=out,
            weights=weights,
        )
        return evaluate.run(cfg)

    def check(manifest: IndexManifest) -> None:
        # Outside the version: its folder is immutable once its manifest is written.
        out = storage.join(index_root, "evaluations", manifest.version)
        level, recall = gate_recall(evaluate_version(manifest.version, out), gate.k)
        live = versions.current(index_root)
        live_recall = gate_recall(evaluate_version(live, None), gate.k)[1] if live else None
        reasons = []
        if recall < gate.min_recall:
            reasons.append(f"{level} recall@{gate.k} {recall:.4f} < --min-recall {gate.min_recall}")
        if live_recall is not None and recall < live_recall - gate.max_drop:
            reasons.append(
                f"{level} recall@{gate.k} {recall:.4f} is more than {gate.max_drop} below the "
                f"live version {live}'s {live_recall:.4f}"
            )
        decision = {
            "version": manifest.version,
            "live": live,
            "level": level,
            f"recall_at_{gate.k}": recall,
            f"live_recall_at_{gate.k}": live_recall,
            "gate": {"queries": gate.queries, "min_recall": gate.min_recall,
                     "max_drop": gate.max_drop},
            "passed": not reasons,
            "reasons": reasons,
        }  # fmt: skip
        storage.write_json(storage.join(out, "gate.json"), decision)
        if reasons:
            raise build_index.GateError(
                f"quality gate refused {manifest.version}: {'; '.join(reasons)}. CURRENT stays "
                f"on {live}; report in {out}"
            )
        print(
            f"[reindex] quality gate passed: {level} recall@{gate.k} {recall:.4f} "
            f"(live {live_recall if live_recall is None else round(live_recall, 4)}, "
            f"min {gate.min_recall}, max drop {gate.max_drop})",
            flush=True,
        )

    return check


def default_work(index_root: str, fingerprint: str, model: dict) -> str:
    """One embeddings dataset per catalog content (rows, metadata, image content keys) and model
    (backbone, weights, preprocessing, head), so a resumed run never mixes in stale vectors."""
    name = f"embed-{fingerprint.split(':')[1][:16]}-{model['model_id']}"
    if model["preprocess"]["mode"] != "pad":
        name += f"-{model['preprocess']['mode']}"
    if "head" in model:
        name += f"-head-{model['head']['sha256'].split(':')[1][:12]}"
    if "weights_uri" in model:  # tuned weights (jobs/tune.py)
        name += f"-tuned-{model['weights'].split(':')[-1][:12]}"
    return storage.join(index_root, "work", name)


@dataclass(frozen=True)
class Previous:
    """The live version and its embeddings dataset, whose keyed rows an incremental run reuses."""

    version: versions.Version
    dataset: embeddings.Dataset
    keys: pa.Table  # increments.read_keys


def _base(model: dict) -> dict:
    """What a model was made from: tuning's weights and head left out (they came from a re-index,
    not from the flags), so a tuned live version matches the flags that made it."""
    head = model.get("head")
    return {
        "model_id": model["model_id"],
        "preprocess": model["preprocess"]["mode"],
        "weights": None if "weights_uri" in model else model["weights"],
        "head": None if head is None or "tuning" in head else head["sha256"],
    }


def model_mismatch(live: dict, requested: dict) -> str | None:
    """Why vectors of the live model cannot stand for the requested one (None: they can)."""
    have, want = _base(live), _base(requested)
    if have["weights"] is None:  # tuned: its base weights are not recorded
        want["weights"] = None
    changed = [k for k in want if have[k] != want[k]]
    return (
        f"the live model differs from the requested one in {', '.join(changed)}"
        if changed
        else None
    )


def previous(cfg: Config, index_root: str) -> tuple[Previous | None, str]:
    """(what an incremental run reuses, or None for a full run; why)."""
    if cfg.full:
        return None, "--full"
    live_id = versions.current(index_root)
    if live_id is None:
        return None, "no live version yet"
    live = versions.open_version(index_root, live_id)
    e = cfg.embed
    requested = embedders.describe(e.model, e.weights, e.random_weights, e.preprocess, e.head)
    mismatch = model_mismatch(live.manifest.model, requested)
    if mismatch:
        return None, mismatch
    uri = live.manifest.embeddings["uri"]
    try:
        dataset = embeddings.open_dataset(uri)
    except (embeddings.DatasetError, storage.StorageError) as exc:
        return None, f"the live version's embeddings are unreadable ({exc})"
    if dataset.manifest.model != live.manifest.model:
        return None, f"the embeddings {uri} are not of the live version's model"
    if cfg.work and storage.normalize(cfg.work) == dataset.uri:
        return None, "--work names the live version's own embeddings"
    keys = increments.read_keys(dataset)
    if keys is None:
        return None, f"the embeddings {uri} have no content keys (made before incremental runs)"
    return Previous(live, dataset, keys), f"live version {live_id} has the same base model"


def _full(cfg: Config, snap: increments.Snapshot, build: build_index.Config):
    """Embed every row (a rerun resumes), tune, key the dataset the build uses."""
    embed.run(cfg.embed)
    if cfg.tune:
        record = tune.run(cfg.tune)
        if record["kept"]:
            build = dataclasses.replace(build, embeddings=record["embeddings"])
    increments.write_keys(embeddings.open_dataset(build.embeddings), snap)
    return build


def _embed_rows(cfg: Config, snap: increments.Snapshot, rows: np.ndarray, model: dict, out: str):
    """Embed catalog `rows` with the live `model` into `out`: (dataset or None, errors table with
    catalog `row`, `error`, `detail`)."""
    table = snap.catalog.table
    subset = f"{out.rstrip('/')}.parquet"
    storage.write_parquet(subset, table.select(increments.PAIR).take(pa.array(rows)))
    head = model.get("head")
    manifest = embed.run(
        dataclasses.replace(
            cfg.embed,
            catalog=subset,
            out=out,
            model=model["model_id"],
            weights=model.get("weights_uri") or cfg.embed.weights,
            preprocess=model["preprocess"]["mode"],
            head=head and head["uri"],
            overwrite=True,
        )
    )
    if manifest.model["weights"] != model["weights"] or manifest.model.get("head") != head:
        raise embed.JobError(f"{out}: the live version's model could not be rebuilt for the rows")
    errors = pa.concat_tables(
        storage.read_parquet(storage.join(out, r.path)) for r in manifest.errors
    )
    errors = errors.append_column("row", pa.array(increments.catalog_rows(errors, table)))
    if not manifest.counts["embedded"]:
        return None, errors
    return embeddings.open_dataset(out), errors


def _incremental(cfg: Config, snap: increments.Snapshot, prev: Previous, build):
    """Reuse the vectors of unchanged rows, embed the rest with the live model, and reuse the
    live template while it fits; the tuning stage is skipped (the live model is kept as is)."""
    old = increments.match(snap, prev.keys)
    rows = np.flatnonzero(old < 0)
    say(
        f"{len(rows):,} of {snap.catalog.num_rows:,} rows new or changed, "
        f"{snap.catalog.num_rows - len(rows):,} reused from {prev.dataset.uri}"
    )
    out = cfg.work or default_work(build.index_root, snap.fingerprint, prev.version.manifest.model)
    if storage.normalize(out) == prev.dataset.uri:  # the same content made the live dataset
        dataset = prev.dataset if not len(rows) else _assemble(cfg, snap, prev, old, f"{out}-next")
    else:
        dataset = _assemble(cfg, snap, prev, old, out)
    build = dataclasses.replace(build, embeddings=dataset.uri)
    return reuse_template(build, prev.version.manifest, prev.version.root, dataset)


def _assemble(cfg: Config, snap: increments.Snapshot, prev: Previous, old: np.ndarray, out: str):
    """The complete dataset at `out`: rows with an `old` id copied from the live dataset, the
    others embedded with the live model."""
    model = prev.version.manifest.model
    rows = np.flatnonzero(old < 0)
    sources = [(prev.dataset, old)]
    errors = pa.table({"row": pa.array([], pa.int64()), "error": [], "detail": []})
    if len(rows):
        delta, errors = _embed_rows(cfg, snap, rows, model, f"{out.rstrip('/')}-delta")
        if delta is not None:
            new = np.full(snap.catalog.num_rows, -1, np.int64)
            pairs = delta.read_range(0, delta.count, columns=increments.PAIR)
            new[increments.catalog_rows(pairs, snap.catalog.table)] = np.arange(delta.count)
            sources.append((delta, new))
    counts = {"reused": int((old >= 0).sum()), "embedded_this_run": len(rows)}
    partitions.assemble(out, snap.catalog, model, sources, errors, cfg.embed.partition_size, counts)
    dataset = embeddings.open_dataset(out)
    increments.write_keys(dataset, snap)
    return dataset


def reuse_template(
    build: build_index.Config, live: IndexManifest, root: str, ds: embeddings.Dataset
) -> build_index.Config:
    """The build filling the live version's template, when it has one fit for these vectors."""
    wanted = build.factory
    if wanted == "auto":
        wanted = index.choose_factory(ds.count, ds.dim, build.memory_budget)
    if live.template is None:
        why = "the live version stored no template"
    elif (wanted, build.metric) != (live.factory, live.metric):
        why = (
            f"{ds.count:,} {build.metric} vectors call for {wanted}, the live one is {live.factory}"
        )
    else:
        say(f"reusing the live version's template ({live.factory})")
        return dataclasses.replace(
            build, template=storage.join(root, live.template["file"]), factory=live.factory
        )
    say(f"training a new template: {why}")
    return build


def build_with_fallback(build: build_index.Config, factory: str, gate) -> IndexManifest:
    """Build; when a reused template fails (its recall misses the target as the catalog drifts
    away from what it was trained on), train a new one."""
    if not build.template:
        return build_index.run(build, gate=gate)
    try:
        return build_index.run(build, gate=gate)
    except build_index.RecallError as exc:
        say(f"the reused template failed ({exc}); retraining the template")
    return build_index.run(dataclasses.replace(build, template=None, factory=factory), gate=gate)


def run(cfg: Config) -> IndexManifest:
    started = time.time()
    snap = cfg.snapshot or increments.snapshot(cfg.embed.catalog)
    index_root = cfg.build.index_root
    build = dataclasses.replace(cfg.build, updates_through=build_index.log_snapshot(index_root))
    prev, why = previous(cfg, index_root)
    say(f"{'incremental' if prev else 'full'} re-index: {why}")
    build = _incremental(cfg, snap, prev, build) if prev else _full(cfg, snap, build)
    gate = cfg.gate and quality_gate(cfg.gate, index_root, cfg.embed.weights)
    manifest = build_with_fallback(build, cfg.build.factory, gate)
    say(
        f"done in {time.time() - started:.1f}s: version {manifest.version}, "
        f"{manifest.count:,} vectors, {manifest.factory}, recall@10 "
        f"{manifest.recall['recall_at_10']}, {len(manifest.shards)} shard(s)"
    )
    return manifest


def tune_config(args: argparse.Namespace, work: str) -> tune.Config:
    return tune.Config(
        embeddings=work,
        index_root=args.index_root,
        out=f"{work.rstrip('/')}-tuned",
        labels=args.tune_labels,
        method=args.tune_method,
        weights=args.weights,
        s3_endpoint=args.s3_endpoint,
    )


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    embed.add_model_arguments(p)
    build_index.add_build_arguments(p)
    p.add_argument("--work", help="embeddings dataset URI (default: under --index-root)")
    p.add_argument("--eval-queries", help="queries table: evaluate before publishing (the gate)")
    p.add_argument("--min-recall", type=float, default=0.0, help="gate: lowest recall@10")
    p.add_argument("--max-drop", type=float, default=Gate.max_drop, help="gate: largest drop")
    p.add_argument("--no-tune", action="store_true", help="build from the backbone's vectors")
    p.add_argument("--full", action="store_true", help="re-embed every row, tune, train anew")
    p.add_argument("--tune-labels", default=tune.Config.labels, help="label column for tuning")
    p.add_argument("--tune-method", choices=sorted(tune.METHODS), default=tune.Config.method)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    if args.s3_endpoint:
        storage.configure(args.s3_endpoint)
    model = embedders.describe(args.model, args.weights, False, args.preprocess, args.head)
    snap = increments.snapshot(args.catalog)
    work = args.work or default_work(args.index_root, snap.fingerprint, model)
    return Config(
        embed=embed.config_from_args(args, out=work),
        build=build_index.config_from_args(args, embeddings_uri=work),
        gate=args.eval_queries
        and Gate(args.eval_queries, min_recall=args.min_recall, max_drop=args.max_drop),
        tune=None if args.no_tune or args.head else tune_config(args, work),
        full=args.full,
        work=args.work,
        snapshot=snap,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = (embed.JobError, build_index.BuildError, tune.TuneError)
    return cli.exit_code("reindex", lambda: run(config_from_args(args)), errors)


if __name__ == "__main__":
    sys.exit(main())
