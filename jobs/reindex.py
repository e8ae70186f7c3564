"""Full re-index: embed the catalog, build, verify and publish a new index version.

    python jobs/reindex.py --catalog URI --index-root URI [--work URI] [--shards N] [--model NAME]

This is the command platform engineers submit (`ray job submit ... -- python jobs/reindex.py`).
The embeddings go to --work (default: {index-root}/work/embed-<catalog fingerprint>-<model>),
so a rerun after a crash resumes the embedding where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the sibling jobs importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs import build_index, embed
from visual_search import catalog, embedders, embeddings, storage
from visual_search.manifest import IndexManifest


@dataclass(frozen=True)
class Config:
    embed: embed.Config
    build: build_index.Config


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
    manifest = build_index.run(cfg.build)
    print(
        f"[reindex] done in {time.time() - started:.1f}s: version {manifest.version}, "
        f"{manifest.count:,} vectors, {manifest.factory}, recall@10 "
        f"{manifest.recall['recall_at_10']}, {len(manifest.shards)} shard(s)",
        flush=True,
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = build_index.build_parser()
    p.description = __doc__
    p.add_argument("--catalog", required=True, help="catalog table or image folder/prefix URI")
    p.add_argument("--work", help="embeddings dataset URI (default: under --index-root)")
    p.add_argument("--model", default=embedders.DEFAULT_MODEL, choices=sorted(embedders.REGISTRY))
    p.add_argument("--weights", help="state dict URI (required for resnet50 and clip-vit-b-32)")
    p.add_argument("--preprocess", default="pad", choices=["pad", "crop"])
    p.add_argument("--head", help="projection head file URI (jobs/train_head.py output)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, help="embedding actors (default: GPUs, else 1)")
    for action in p._actions:
        if action.dest == "embeddings":
            action.required = False
            action.help = argparse.SUPPRESS
    args = p.parse_args(argv)
    try:
        if args.s3_endpoint:
            storage.configure(args.s3_endpoint)
        model = embedders.describe(args.model, args.weights, False, args.preprocess, args.head)
        work = args.work or default_work(args.index_root, args.catalog, model)
        cfg = Config(
            embed=embed.Config(
                catalog=args.catalog,
                out=work,
                model=args.model,
                weights=args.weights,
                preprocess=args.preprocess,
                head=args.head,
                batch_size=args.batch_size,
                concurrency=args.concurrency,
                gpus=args.gpus,
                s3_endpoint=args.s3_endpoint,
            ),
            build=build_index.config_from_args(args, embeddings_uri=work),
        )
        run(cfg)
    except (
        catalog.CatalogError,
        embed.JobError,
        build_index.BuildError,
        embeddings.DatasetError,
        storage.StorageError,
        ValueError,
    ) as exc:
        print(f"[reindex] error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
