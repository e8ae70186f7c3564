"""Measure the retrieval quality of one index version, through the service's own query path.

    python jobs/evaluate.py --index-root URI (--queries URI | --leave-one-out) [--version V]
        [--k 1,5,10,50] [--limit N] [--seed S] [--rerank N] [--no-backdrop-balance]
        [--any-category] [--out URI]
        [--weights URI] [--s3-endpoint URL]

Queries are either a table (Contract 1 style: `image_uri` plus `product_id` for instance-level
and/or `category` for category-level ground truth; e.g. the output of jobs/make_queries.py),
embedded in process with the index's own model (after POST /search's backdrop white balance,
images.balance_backdrop; --no-backdrop-balance: as decoded), or (--leave-one-out) catalog
photos of the index itself, whose stored vectors are the queries and whose own product is
excluded from the results.
Each query runs the Serve app's path in process (query.ShardIndex per shard +
query.preferring_search + query.results): one result per product, as POST /search answers. Table
queries then get POST /search's geometric re-rank of their top --rerank products (verify.py,
against the catalog photos the docs name; 0: off; "ip" versions only); leave-one-out queries,
like GET /products/{id}/similar, are not re-ranked and list the products of the query's own
category first (--any-category: nearest first, as ?same_category=false).

Metrics (definitions in lib/visual_search/metrics.py) at each k: recall@k, precision@k, mAP@k,
overall and per query category; the index's raw top-10 against exact search on the same queries
(index_recall_at_10); per-query latency. With --out: report.json, summary.md, recall.png.

The report (what run() returns and report.json holds):
- version, index_root, model, metric, factory, search_params, shards, count, mode ("table" or
  "leave-one-out"), ks;
- queries (rows tried), evaluated, errors (rows whose image could not be read or decoded; never
  fatal), errors_by_code, error_examples (up to 10);
- instance, category: {"queries", "no_relevant", "recall@K", "precision@K", "map@K"} or None
  (instance: the table has product ids that are in the index; category: it has a category
  column and the docs have one; leave-one-out is category level only);
- per_category: {category: {"queries", "instance", "category"}} by query category (instance-only
  tables: the category of the query's product in the docs); worst_categories: {"level", "by",
  "rows": [{"category", "queries", "map@10"}]}, the 10 lowest first;
- index_recall_at_10 (None, with index_recall_note, when the embeddings dataset the manifest names
  is gone or does not match the version);
- predicted_category_accuracy: the share of the queries with a category whose
  verify.predicted_category (of the final results, as POST /search answers it) is that category;
  None without category ground truth;
- latency_ms: {"decode", "embed", "search", "rerank"}: {"p50", "p99", "mean"} or None. embed is
  each query's share of its batch of 32; search is widening_search + docs join, one query at a
  time; rerank is the query's features + its candidates' (cached across queries) + matching.
- rerank: how many top products were re-ranked (0: off, leave-one-out, or an "l2" version);
- config, code_version, created_unix, took_s.
"""

from __future__ import annotations

import argparse
import sys

from jobs import cli
from visual_search.evaluation import Config, EvalError, run

__all__ = ["Config", "EvalError", "build_parser", "main", "run"]


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers: {text!r}") from exc
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k takes positive integers: {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_index_root(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--queries", help="queries table URI (image_uri, product_id and/or category)")
    src.add_argument(
        "--leave-one-out", action="store_true", help="catalog photos as queries, own product out"
    )
    p.add_argument("--version", help="version id (default: the one CURRENT names)")
    p.add_argument("--k", type=_ks, default=Config.ks, help="cut-offs, e.g. 1,5,10,50")
    p.add_argument(
        "--limit", type=int, help="sampled queries (default: 1000 leave-one-out, all rows; 0: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rerank",
        type=int,
        default=Config.rerank,
        help="top products re-ranked by geometric verification, as POST /search (0: off)",
    )
    p.add_argument(
        "--no-backdrop-balance",
        action="store_true",
        help="table queries as decoded, without POST /search's backdrop white balance",
    )
    p.add_argument(
        "--any-category",
        action="store_true",
        help="leave-one-out: nearest products first, not the own category's (?same_category=false)",
    )
    p.add_argument("--out", help="folder URI for report.json, summary.md, recall.png")
    p.add_argument("--weights", help="model weights URI (models that need them)")
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = cli.config(
        Config,
        args,
        ks=args.k,
        same_category=not args.any_category,
        backdrop_balance=not args.no_backdrop_balance,
    )
    return cli.exit_code("evaluate", lambda: run(cfg), (EvalError,))


if __name__ == "__main__":
    sys.exit(main())
