"""Tune the model to the catalog: the stage `jobs/reindex.py` runs between embed and build.

    python jobs/tune.py --embeddings URI --index-root URI --out URI [--method finetune|head]
        [--labels category] [--eval-products 600] [--views 2] [--view-profile train]
        [--finetune-epochs 5]
        [--from-block 5] [--epochs 15] [--seed 0]

1. Products are split by a seeded hash of their id: 60% train, 20% validation, 20% test.
2. --method finetune (the default; no labels needed): the backbone's last two stages (from
   block --from-block; see finetune.Settings for the measurement that chose it) are trained on
   --views synthetic re-photographs (jobs/make_queries.py's augmentations, --view-profile; the
   held-out queries use its "query" profile) of every train photo
   with a contrastive loss (lib/visual_search/finetune.py; the GPU when there is one). Held-out
   re-photographs of up to --eval-products products per split are searched among the whole
   catalog after each epoch; the epoch with the best validation instance recall@1 is kept
   (epoch 0 is the untuned model). Kept, the backbone's weights go to
   {index-root}/models/backbone-<sha256>.pt, named by the manifest's model.weights_uri, and
   the catalog's vectors are recomputed from the stored feature maps (no image decoded again).
   --method head: a metric-learning projection on the labels (one proxy per label, additive
   margin; Ray Train) beside the backbone's vector (a "concat" head, cosine = (1 - mix) *
   backbone + mix * projection), trained on frozen vectors, `mix` chosen on validation,
   refitted on every product when kept, written to {index-root}/models/head-<sha256>.pt.
3. The tuned model is compared with the untuned one on the test products (instance
   recall@1/@10 of the held-out queries, category precision@10 of /similar when there are
   labels) and kept only when it is better and loses no instance recall (tuning.decide).
   The record (method, split, what was trained, times, both measurements) goes into the
   tuned embeddings' manifest and from there into the index version's.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from jobs import cli, embed, make_queries, train_head
from visual_search import embedders, embeddings, finetune, heads, images, storage, tuning


@dataclass(frozen=True)
class Config:
    embeddings: str  # backbone vectors (the embed job's output)
    index_root: str  # the head file goes to {index_root}/models/
    out: str  # the tuned embeddings dataset
    work: str | None = None  # held-out queries and their vectors (default: {out}-work)
    labels: str = "category"
    seed: int = 0
    eval_products: int = 600  # products per split with a re-photographed query
    mixes: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
    dim: int = 256
    hidden: int = 1024
    epochs: int = 15  # more overfits the proxies on small catalogs and costs time
    margin: float = 0.2
    min_images: int = 500
    min_per_label: int = 5
    # recall@1 on 600 queries has a standard error of about 0.015; both models answer the same
    # queries, so their difference is less noisy than that.
    max_instance_drop: float = 0.01
    refit: bool = True  # refit the kept model on every product (mix fixed)
    write_rejected: bool = False  # benchmarks: write the head and vectors even when not kept
    weights: str | None = None
    s3_endpoint: str | None = None
    method: str = "finetune"  # see METHODS
    views: int = 2  # finetune: synthetic re-photographs per train photo
    view_profile: str = "train"  # finetune: make_queries profile of those views
    finetune_epochs: int = 5
    from_block: int = finetune.Settings.at
    # Feature maps are held in memory: 44 KB each at block 5, about 2.3 per catalog image.
    max_finetune_images: int = 50_000


METHODS = {
    "finetune": "the backbone's last blocks fine-tuned on synthetic re-photographs (InfoNCE)",
    "head": "proxy softmax + margin, concat head",
}


class TuneError(ValueError):
    """The tuning stage cannot run on these inputs."""


def _say(msg: str) -> None:
    print(f"[tune] {msg}", flush=True)


def _load(ds: embeddings.Dataset, labels: str):
    table = ds.read_range(0, ds.count)
    x = tuning.unit(ds.vectors(table))
    pids = np.asarray(table["product_id"].to_pylist(), dtype=object).astype(str)
    cats = None
    if labels in table.column_names:
        values = table[labels].to_pylist()
        cats = np.asarray(["" if v is None else str(v) for v in values])
    return table, x, pids, cats


def _queries(cfg: Config, table: pa.Table, pids, splits: np.ndarray, model: dict, work: str):
    """(vectors, product ids, split names) of re-photographed held-out queries."""
    rng = np.random.default_rng(cfg.seed)
    chosen = np.concatenate(
        [rng.permutation(np.unique(pids[splits == s]))[: cfg.eval_products] for s in tuning.SPLITS]
    )
    rows = np.flatnonzero(np.isin(pids, chosen))
    sources = table.select(["product_id", "image_uri"]).take(pa.array(rows))
    storage.write_parquet(storage.join(work, "sources.parquet"), sources)
    made = make_queries.run(
        make_queries.Config(
            storage.join(work, "sources.parquet"), storage.join(work, "queries"), seed=cfg.seed
        )
    )
    out = storage.join(work, "query-vectors")
    embed.run(
        embed.Config(
            catalog=made["table"],
            out=out,
            model=model["model_id"],
            weights=cfg.weights,
            preprocess=model["preprocess"]["mode"],
            overwrite=True,
        )
    )
    ds = embeddings.open_dataset(out)
    qt = ds.read_range(0, ds.count)
    qpids = np.asarray(qt["product_id"].to_pylist(), dtype=object).astype(str)
    split_of = dict(zip(pids, splits, strict=True))
    return ds.vectors(qt), qpids, np.asarray([split_of[p] for p in qpids])


def _train(cfg: Config, x: np.ndarray, codes: np.ndarray, rows: np.ndarray, n: int):
    """An MLP projection trained on the given rows' labels (train_head's Ray Train loop)."""
    th = train_head.Config(
        embeddings=cfg.embeddings,
        out="",
        labels=cfg.labels,
        dim=cfg.dim,
        kind="mlp",
        hidden=cfg.hidden,
        epochs=cfg.epochs,
        margin=cfg.margin,
        instance_weight=0.0,
        preserve=0.0,  # the backbone half of the concat head keeps the neighbourhoods
        val_frac=0.0,
        seed=cfg.seed,
    )
    return train_head._train_metric(th, train_head.training_rows(x, codes, rows, None), n)


def _concat_head(proj_head: heads.Head, in_dim: int, mix: float) -> heads.Head:
    head = heads.Head("concat", in_dim, in_dim + proj_head.out_dim, proj_head.hidden)
    head.proj.load_state_dict(proj_head.proj.state_dict())
    head.mix.fill_(mix)
    return head.eval()


def _evaluate(cfg, x, pids, cats, proj, queries, splits):
    """Untuned and tuned measurements per split, with the mix chosen on validation."""
    qx, qpids, qsplits = queries
    qproj, xproj = train_head._project(proj, qx), train_head._project(proj, x)

    def at(mix: float | None, split: str) -> dict:
        g = x if mix is None else tuning.concat(x, xproj, mix)
        q = qx if mix is None else tuning.concat(qx, qproj, mix)
        sel, rows = qsplits == split, np.flatnonzero(splits == split)
        return tuning.measure(g, pids, cats, q[sel], qpids[sel], rows)

    by_mix = {mix: at(mix, "val") for mix in cfg.mixes}
    mix = tuning.choose_mix(at(None, "val"), by_mix, cfg.max_instance_drop)
    return {
        "mix": mix,
        "val_by_mix": {str(m): v for m, v in by_mix.items()},
        "untuned": {s: at(None, s) for s in tuning.SPLITS},
        "tuned": {s: at(mix, s) for s in tuning.SPLITS},
    }


def _skip_reason(cfg: Config, model: dict, n: int, cats) -> str | None:
    if cfg.method == "head":
        return tuning.skip_reason(n, cats, cfg.min_images, cfg.min_per_label)
    if model["model_id"] not in finetune.FINETUNABLE:
        return f"fine-tuning supports {', '.join(finetune.FINETUNABLE)}, not {model['model_id']}"
    if n < cfg.min_images:
        return f"{n} images < {cfg.min_images} (too few to learn from and measure)"
    if n > cfg.max_finetune_images:
        return f"{n:,} images > {cfg.max_finetune_images:,} (feature maps are held in memory)"
    return None


def run(cfg: Config) -> dict:
    """Tune; returns the record (kept or not, why, measurements) and, when kept, the tuned
    embeddings dataset URI under "embeddings"."""
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    if cfg.method not in METHODS:
        raise TuneError(f"unknown --method {cfg.method!r}; known: {', '.join(METHODS)}")
    if cfg.view_profile not in make_queries.PROFILES:
        known = ", ".join(make_queries.PROFILES)
        raise TuneError(f"unknown --view-profile {cfg.view_profile!r}; known: {known}")
    ds = embeddings.open_dataset(cfg.embeddings)
    model = ds.manifest.model
    if "head" in model:
        raise TuneError(f"{cfg.embeddings} was embedded with a head already: tune the backbone's")
    table, x, pids, cats = _load(ds, cfg.labels)
    reason = _skip_reason(cfg, model, len(x), cats)
    if reason:
        _say(f"skipped: {reason}; the untuned model is used")
        return {"kept": False, "skipped": reason, "method": cfg.method}
    splits = tuning.split_products(pids, seed=cfg.seed)
    labels = "no labels" if cats is None else f"{len(set(cats))} {cfg.labels!r} labels"
    _say(
        f"{len(x):,} images, {len(set(pids)):,} products, {labels}; {cfg.method}: "
        + ", ".join(f"{s} {int((splits == s).sum()):,}" for s in tuning.SPLITS)
    )
    base = {
        "method": cfg.method,
        "labels": cfg.labels if cats is not None else None,
        "classes": 0 if cats is None else len(set(cats)),
        "images": int(len(x)),
        "products": {s: int(len(set(pids[splits == s]))) for s in tuning.SPLITS},
        "split": {"method": "sha256(seed:product_id)", "seed": cfg.seed, "shares": [0.6, 0.2, 0.2]},
    }  # fmt: skip
    if cfg.method == "finetune":
        return _finetune(cfg, ds, (table, pids, cats, splits), base, started)
    return _head(cfg, ds, (table, x, pids, cats, splits), base, started)


def _decided(cfg: Config, report: dict, base: dict, train_s: float) -> dict:
    kept, why = tuning.decide(
        report["untuned"]["test"], report["tuned"]["test"], cfg.max_instance_drop
    )
    for level in ("untuned", "tuned"):
        _say(f"{level} on test products: {report[level]['test']}; train: {report[level]['train']}")
    _say(f"{'kept' if kept else 'not kept'}: {why}")
    return {"kept": kept, "decision": why, **base, "train_s": round(train_s, 1), **report}


def _head(cfg: Config, ds, data, base: dict, started: float) -> dict:
    """The concat head: a label projection trained on frozen vectors, next to the backbone's."""
    table, x, pids, cats, splits = data
    model = ds.manifest.model
    names, codes = np.unique(cats, return_inverse=True)
    work = cfg.work or f"{cfg.out.rstrip('/')}-work"
    queries = _queries(cfg, table, pids, splits, model, work)
    t_train = time.time()
    proj = _train(cfg, x, codes, np.flatnonzero(splits == "train"), len(names))
    report = _evaluate(cfg, x, pids, cats, proj, queries, splits)
    record = _decided(cfg, report, base, time.time() - t_train)
    record["queries"] = int(len(queries[0]))
    record["trained"] = {"method": METHODS["head"], "epochs": cfg.epochs, "dim": cfg.dim,
                         "hidden": cfg.hidden, "margin": cfg.margin}  # fmt: skip
    if not record["kept"] and not cfg.write_rejected:
        record["seconds"] = round(time.time() - started, 1)
        return record
    if cfg.refit and record["kept"]:
        t_refit = time.time()
        proj = _train(cfg, x, codes, np.arange(len(x)), len(names))
        record["refit_s"] = round(time.time() - t_refit, 1)
    record["seconds"] = round(time.time() - started, 1)
    head = _concat_head(proj, x.shape[1], report["mix"])
    blob = heads.to_bytes(head, model["model_id"], info={"tuning": record})
    uri = storage.join(cfg.index_root, "models", f"head-{hashlib.sha256(blob).hexdigest()[:16]}.pt")
    storage.write_bytes(uri, blob)
    tuned = embedders.describe(
        model["model_id"], cfg.weights, False, model["preprocess"]["mode"], head=uri
    )
    embeddings.project(ds, cfg.out, lambda v: train_head._project(head, v), tuned)
    _say(f"head {uri}; tuned vectors ({tuned['dim']}-d) -> {cfg.out} in {record['seconds']}s")
    return {**record, "head": uri, "embeddings": cfg.out}


def _photo(data: bytes, params: dict | None, pre: images.Preprocess) -> np.ndarray:
    """A catalog photo as the embed job sees it, or a synthetic re-photograph of it."""
    if params is not None:
        img, _ = make_queries.augment(images.decode(data), params)
        data = make_queries.encode_jpeg(img, params["jpeg_quality"])
    return images.load(data, pre)


def _held_out(cfg: Config, pids: np.ndarray, splits: np.ndarray) -> dict[str, np.ndarray]:
    """Per split, one catalog row of each of up to eval_products products (seeded pick)."""
    rng, out = np.random.default_rng(cfg.seed), {}
    for s in tuning.SPLITS:
        rows = rng.permutation(np.flatnonzero(splits == s))
        _, first = np.unique(pids[rows], return_index=True)
        out[s] = np.sort(rng.permutation(rows[first])[: cfg.eval_products])
    return out


def _finetune(cfg: Config, ds, data, base: dict, started: float) -> dict:
    """The backbone's last stage trained on re-photographs of the train products (finetune.py);
    the epoch is chosen on validation queries, the decision made on test queries."""
    table, pids, cats, splits = data
    model = ds.manifest.model
    settings = finetune.Settings(at=cfg.from_block, epochs=cfg.finetune_epochs, seed=cfg.seed)
    mode = model["preprocess"]["mode"]
    emb = embedders.create(model["model_id"], cfg.weights, preprocess_mode=mode, for_training=True)
    tail, pre = finetune.Tail(emb, settings.at), emb.preprocess
    sources = [storage.read_bytes(u) for u in table["image_uri"].to_pylist()]
    rng = np.random.default_rng(cfg.seed)
    view_rows = np.repeat(np.flatnonzero(splits == "train"), cfg.views)
    queries = _held_out(cfg, pids, splits)

    def maps(rows: np.ndarray, profile: str | None) -> object:
        params = [profile and make_queries.draw_params(rng, profile) for _ in rows]
        return tail.trunk_maps(lambda j: _photo(sources[rows[j]], params[j], pre), len(rows), _say)

    catalog_maps = maps(np.arange(len(sources)), None)
    query_maps = {s: maps(rows, "query") for s, rows in queries.items()}
    view_maps = maps(view_rows, cfg.view_profile)

    def measure(split: str, catalog_vectors: np.ndarray | None = None) -> dict:
        g = tail.vectors(catalog_maps) if catalog_vectors is None else catalog_vectors
        q = tail.vectors(query_maps[split])
        rows = np.flatnonzero(splits == split)
        return tuning.measure(g, pids, cats, q, pids[queries[split]], rows)

    untuned = {s: measure(s) for s in tuning.SPLITS}
    t_train = time.time()
    history = finetune.train(
        tail, view_maps, view_rows, catalog_maps,
        lambda _: measure("val")["instance_r1"], settings, _say,
    )  # fmt: skip
    train_s = time.time() - t_train
    vectors = tail.vectors(catalog_maps)
    report = {"untuned": untuned, "tuned": {s: measure(s, vectors) for s in tuning.SPLITS},
              "history": history}  # fmt: skip
    record = _decided(cfg, report, base, train_s)
    record["queries"] = int(sum(len(r) for r in queries.values()))
    record["trained"] = {"method": METHODS["finetune"], "from_block": settings.at,
                         "views": int(len(view_rows)), "view_profile": cfg.view_profile,
                         "epochs": settings.epochs,
                         "lr": settings.lr, "temperature": settings.temperature,
                         "keep": settings.keep, "device": str(tail.device)}  # fmt: skip
    record["seconds"] = round(time.time() - started, 1)
    if not record["kept"] and not cfg.write_rejected:
        return record
    blob = tail.weights_bytes()
    name = f"backbone-{hashlib.sha256(blob).hexdigest()[:16]}.pt"
    uri = storage.join(cfg.index_root, "models", name)
    storage.write_bytes(uri, blob)
    tuned = embedders.describe(model["model_id"], uri, False, mode)
    tuned.update(weights_uri=uri, tuning=record)
    embeddings.replace_vectors(ds, cfg.out, vectors, tuned)
    _say(f"weights {uri}; tuned vectors -> {cfg.out} in {record['seconds']}s")
    return {**record, "weights": uri, "embeddings": cfg.out}


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--embeddings", required=True, help="backbone embeddings dataset URI")
    cli.add_index_root(p, "the head goes to {index-root}/models/")
    p.add_argument("--out", required=True, help="tuned embeddings dataset URI")
    p.add_argument("--work", help="held-out queries and vectors (default: {out}-work)")
    p.add_argument("--labels", default=Config.labels, help="label column")
    p.add_argument("--eval-products", type=int, default=Config.eval_products)
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--method", choices=sorted(METHODS), default=Config.method)
    p.add_argument("--views", type=int, default=Config.views, help="finetune: views per photo")
    p.add_argument(
        "--view-profile",
        default=Config.view_profile,
        choices=sorted(make_queries.PROFILES),
        help="finetune: the views' profile",
    )
    p.add_argument("--finetune-epochs", type=int, default=Config.finetune_epochs)
    p.add_argument("--from-block", type=int, default=Config.from_block,
                   help="finetune: first trained block of the backbone (1-6)")  # fmt: skip
    cli.add_s3_endpoint(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return cli.exit_code("tune", lambda: run(cli.config(Config, args)), (TuneError,))


if __name__ == "__main__":
    sys.exit(main())
