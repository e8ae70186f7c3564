"""Full re-index: embed the catalog, build, verify and publish a new index version.

    python jobs/reindex.py --catalog URI --index-root URI [--work URI] [--shards N] [--model NAME]
        [--head URI] [--no-tune] [--tune-method finetune|head] [--tune-labels COLUMN]
        [--eval-queries URI --min-recall R --max-drop D]

This is the command platform engineers submit (`ray job submit ... -- python jobs/reindex.py`).
The embeddings go to --work (default: {index-root}/work/embed-<catalog fingerprint>-<model>),
so a rerun after a crash resumes the embedding where it stopped.

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

from jobs import build_index, cli, embed, evaluate, tune
from visual_search import catalog, embedders, storage, versions
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


def default_work(index_root: str, catalog_uri: str, model: dict) -> str:
    """One embeddings dataset per catalog content and model (backbone, preprocessing, head)."""
    fingerprint = catalog.read_catalog(catalog_uri).fingerprint().split(":")[1][:16]
    name = f"embed-{fingerprint}-{model['model_id']}"
    if model["preprocess"]["mode"] != "pad":
        name += f"-{model['preprocess']['mode']}"
    if "head" in model:
        name += f"-head-{model['head']['sha256'].split(':')[1][:12]}"
    return storage.join(index_root, "work", name)


def run(cfg: Config) -> IndexManifest:
    started = time.time()
    embed.run(cfg.embed)
    build = cfg.build
    if cfg.tune:
        record = tune.run(cfg.tune)
        if record["kept"]:
            build = dataclasses.replace(build, embeddings=record["embeddings"])
    gate = cfg.gate and quality_gate(cfg.gate, cfg.build.index_root, cfg.embed.weights)
    manifest = build_index.run(build, gate=gate)
    print(
        f"[reindex] done in {time.time() - started:.1f}s: version {manifest.version}, "
        f"{manifest.count:,} vectors, {manifest.factory}, recall@10 "
        f"{manifest.recall['recall_at_10']}, {len(manifest.shards)} shard(s)",
        flush=True,
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
    p.add_argument("--tune-labels", default=tune.Config.labels, help="label column for tuning")
    p.add_argument("--tune-method", choices=sorted(tune.METHODS), default=tune.Config.method)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    if args.s3_endpoint:
        storage.configure(args.s3_endpoint)
    model = embedders.describe(args.model, args.weights, False, args.preprocess, args.head)
    work = args.work or default_work(args.index_root, args.catalog, model)
    return Config(
        embed=embed.config_from_args(args, out=work),
        build=build_index.config_from_args(args, embeddings_uri=work),
        gate=args.eval_queries
        and Gate(args.eval_queries, min_recall=args.min_recall, max_drop=args.max_drop),
        tune=None if args.no_tune or args.head else tune_config(args, work),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    errors = (embed.JobError, build_index.BuildError, tune.TuneError)
    return cli.exit_code("reindex", lambda: run(config_from_args(args)), errors)


if __name__ == "__main__":
    sys.exit(main())
