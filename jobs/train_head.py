"""Train a projection head on stored backbone features (an embeddings dataset), with Ray Train.

    python jobs/train_head.py --embeddings URI --labels category --out URI [--dim 256]
        [--method metric|pca] [--kind mlp|linear] [--epochs 40] [--workers N] [--views URI]

`--method metric` (default) learns a head with a metric-learning loss on the labels: a cosine
softmax over one learned proxy per label with an additive margin (CosFace / normalised-softmax
family), plus a term that keeps the head's similarities between items close to the
backbone's, so that photos of one product stay closer than two products of one category.
It runs as a Ray Train `TorchTrainer` (CPU workers here, one GPU per worker when the cluster has
GPUs), reading the features through Ray Data, so it is cheap: no image is decoded again.
`--views URI` adds instance-level learning: the embeddings of re-photographed copies of the
training catalog (`jobs/make_queries.py --catalog TRAIN`, then `jobs/embed.py` on its
queries.parquet); each copy must find its own catalog photo among the batch's (InfoNCE), so the
head becomes invariant to crops, backgrounds and colour shifts while keeping products apart.
`--method pca` fits PCA-whitening on the features instead (no labels needed).

The output is a head file (`visual_search.heads`); embed or re-index with it:
    python jobs/reindex.py --catalog URI --index-root URI --head OUT
A held-out share of the labelled products (`--val-frac`) measures the head against the plain
backbone (nearest-neighbour label precision@10) before the file is written.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from jobs import cli
from visual_search import cluster, devices, embeddings, heads, storage


@dataclass(frozen=True)
class Config:
    embeddings: str
    out: str
    labels: str = "category"
    method: str = "metric"  # "metric" (Ray Train) or "pca"
    dim: int = 256
    kind: str = "mlp"  # measured on openclipart: mlp beats linear clearly (see README)
    hidden: int | None = 1024
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    margin: float = 0.1
    scale: float = 24.0
    views: str | None = None  # embeddings of re-photographed copies (see the module doc)
    instance_weight: float = 1.0  # weight of the copy -> catalog photo (InfoNCE) term
    temperature: float = 0.05
    preserve: float = 0.5  # weight of the term that keeps the backbone's neighbourhoods
    pca_shrinkage: float = 0.1
    val_frac: float = 0.1
    seed: int = 0
    workers: int | None = None  # default: one per GPU, else 1
    # Where Ray Train keeps its checkpoint: storage every node can reach (s3://...) on a
    # multi-node cluster; default a local temporary folder, enough on one node.
    train_storage: str | None = None
    s3_endpoint: str | None = None


class TrainError(ValueError):
    """The inputs cannot give a head (no labels, too few items, bad options)."""


def load_features(uri: str, labels: str):
    """(vectors, label codes, label names, product ids, backbone model) of every labelled row."""
    ds = embeddings.open_dataset(uri)
    table = ds.read_range(0, ds.count)
    if labels not in table.column_names:
        raise TrainError(f"{uri}: no column {labels!r}; columns: {', '.join(table.column_names)}")
    if "head" in ds.manifest.model:
        raise TrainError(f"{uri} was embedded with a head already; train on backbone features")
    names = table[labels].cast(pa.string()).to_pylist()
    keep = np.array([n is not None and n != "" for n in names])
    x = ds.vectors(table)[keep]
    classes, codes = np.unique(np.array([n for n in names if n]), return_inverse=True)
    if len(classes) < 2 or len(x) < 10:
        raise TrainError(f"{uri}: need >= 2 labels and >= 10 labelled rows, got {len(classes)}")
    pids = np.array(table["product_id"].to_pylist(), dtype=object)[keep]
    return x, codes.astype(np.int64), classes.tolist(), pids, ds.manifest.model


def load_views(uri: str, model: dict, pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(catalog row of each view, view vectors) for the views of the given products."""
    ds = embeddings.open_dataset(uri)
    if {k: ds.manifest.model.get(k) for k in ("model_id", "weights")} != {
        k: model.get(k) for k in ("model_id", "weights")
    } or "head" in ds.manifest.model:
        raise TrainError(f"{uri}: views were embedded with another model than the catalog")
    table = ds.read_range(0, ds.count, columns=["product_id", "embedding"])
    row_of = {pid: i for i, pid in reversed(list(enumerate(pids)))}
    rows = np.array([row_of.get(pid, -1) for pid in table["product_id"].to_pylist()])
    return rows[rows >= 0], ds.vectors(table)[rows >= 0]


def instance_recall_at_1(views, view_rows, gallery, gallery_pids) -> float:
    """Share of views whose nearest gallery row (cosine) is a photo of their own product."""
    top = np.argmax(views @ gallery.T, axis=1)
    return float(np.mean(gallery_pids[top] == gallery_pids[view_rows]))


def split(codes: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): a random `frac` of the rows of every label with >= 5 rows."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(codes):
        rows = np.flatnonzero(codes == c)
        if len(rows) >= 5:
            val.extend(rng.choice(rows, max(1, int(round(frac * len(rows)))), replace=False))
    val = np.sort(np.array(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(codes)), val), val


def label_precision_at_10(query: np.ndarray, qcodes, gallery: np.ndarray, gcodes) -> float:
    """Mean share of a query's 10 nearest gallery items (cosine) that carry its label."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    top = np.argsort(-(q @ g.T), axis=1)[:, :10]
    return float((gcodes[top] == qcodes[:, None]).mean())


def _batch_loss(model, batch: dict, config: dict, device) -> tuple:
    """(loss, rows) of one batch: proxy loss on the labels, the instance term between each
    re-photographed copy and its catalog photo, and the similarity-preserving term."""
    import torch
    from torch import nn

    x, xp = batch["x"].to(device).float(), batch["xp"].to(device).float()
    y, pid = batch["y"].to(device).long(), batch["pid"].to(device).long()
    pos = batch["pos"].to(device).bool()
    z_all, cos_all = model(torch.cat([x, xp]))  # one forward: DDP syncs once
    z, zp = z_all.chunk(2)
    y2 = torch.cat([y, y])
    margin = nn.functional.one_hot(y2, cos_all.shape[1]) * config["margin"]
    loss = nn.functional.cross_entropy(config["scale"] * (cos_all - margin), y2)
    if config["instance_weight"] and pos.sum() > 1:
        # Each copy must find its own catalog photo among the batch's photos.
        zs, zps, ps = z[pos], zp[pos], pid[pos]
        logits = zps @ zs.T / config["temperature"]
        same = (ps[:, None] == ps[None, :]) & ~torch.eye(len(ps), dtype=torch.bool,
                                                         device=device)  # fmt: skip
        logits = logits.masked_fill(same, float("-inf"))
        target = torch.arange(len(ps), device=device)
        loss = loss + config["instance_weight"] * nn.functional.cross_entropy(logits, target)
    if config["preserve"]:
        xn = nn.functional.normalize(x, dim=1)
        loss = loss + config["preserve"] * ((z @ z.T - xn @ xn.T) ** 2).mean()
    return loss, len(y)


def _train_loop(config: dict) -> None:
    """One Ray Train worker: DDP over the feature shard, proxies per label."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from visual_search import heads

    torch.manual_seed(config["seed"])
    head = heads.Head(config["kind"], config["in_dim"], config["dim"], config["hidden"])
    if config["init"] is not None:
        head.load_state_dict(config["init"])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head
            self.proxies = nn.Parameter(torch.randn(config["classes"], config["dim"]) * 0.1)

        def forward(self, x):  # through the DDP wrapper, so gradients are averaged
            z = nn.functional.normalize(self.head(x), dim=1)
            return z, z @ nn.functional.normalize(self.proxies, dim=1).T

    model = ray.train.torch.prepare_model(Model())
    inner = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config["epochs"])
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    for epoch in range(config["epochs"]):
        total, n = 0.0, 0
        batches = shard.iter_torch_batches(
            batch_size=config["batch_size"],
            local_shuffle_buffer_size=4 * config["batch_size"],
            local_shuffle_seed=config["seed"] * 1000 + epoch,  # repeatable reruns
        )
        for batch in batches:
            loss, rows = _batch_loss(model, batch, config, device)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss) * rows, n + rows
        sched.step()
        metrics = {"epoch": epoch + 1, "loss": total / max(n, 1)}
        last = epoch == config["epochs"] - 1
        if last and ray.train.get_context().get_world_rank() == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(inner.head.state_dict(), os.path.join(tmp, "head.pt"))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def training_rows(
    x: np.ndarray, codes: np.ndarray, rows: np.ndarray, views: tuple | None
) -> dict[str, np.ndarray]:
    """One row per training photo (its own positive) and one per (photo, re-photographed copy)."""
    pid = np.arange(len(x))  # catalog row = product key for the in-batch masking
    out = {"x": x[rows], "xp": x[rows], "y": codes[rows], "pid": pid[rows],
           "pos": np.zeros(len(rows), bool)}  # fmt: skip
    if views is not None:
        view_rows, view_x = views
        keep = np.isin(view_rows, rows)
        r = view_rows[keep]
        extra = {"x": x[r], "xp": view_x[keep], "y": codes[r], "pid": pid[r],
                 "pos": np.ones(len(r), bool)}  # fmt: skip
        out = {k: np.concatenate([out[k], extra[k]]) for k in out}
    return out


def _train_metric(cfg: Config, data: dict[str, np.ndarray], n_classes: int) -> heads.Head:
    import ray
    import ray.train
    import torch
    from ray.data.extensions import ArrowTensorArray
    from ray.train.torch import TorchTrainer

    cluster.init()
    gpus = devices.cluster_gpus()
    workers = cfg.workers or (max(1, int(gpus)) if gpus else 1)
    x = data["x"]
    # A PCA-whitening start: the metric loss then only has to bend an already good space.
    init = heads.pca_whitening(x, cfg.dim, cfg.pca_shrinkage) if cfg.kind == "linear" else None
    columns = {
        k: ArrowTensorArray.from_numpy(v.astype(np.float32)) if v.ndim == 2 else v
        for k, v in data.items()
    }
    dataset = ray.data.from_arrow(pa.table(columns))
    tmp = None if cfg.train_storage else tempfile.mkdtemp(prefix="train-head-")
    fs, storage_path = storage.resolve(cfg.train_storage) if cfg.train_storage else (None, tmp)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "in_dim": x.shape[1],
            "classes": n_classes,
            "init": None if init is None else init.state_dict(),
            **{k: v for k, v in asdict(cfg).items() if k not in ("embeddings", "out", "views")},
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(gpus)),
        run_config=ray.train.RunConfig(
            name=f"train-head-{int(time.time())}",
            storage_path=storage_path,
            storage_filesystem=fs,
            worker_runtime_env=cluster.runtime_env(),
        ),
        datasets={"train": dataset},
    )
    print(
        f"[train_head] Ray Train: {workers} worker(s) on {'GPU' if gpus else 'CPU'}, "
        f"{len(x):,} rows ({int(data['pos'].sum()):,} with a re-photographed copy), "
        f"{n_classes} labels, {cfg.epochs} epochs",
        flush=True,
    )
    try:
        result = trainer.fit()
        head = heads.Head(cfg.kind, x.shape[1], cfg.dim, cfg.hidden)
        with result.checkpoint.as_directory() as ckpt:
            head.load_state_dict(torch.load(os.path.join(ckpt, "head.pt"), weights_only=True))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"[train_head] final loss {result.metrics['loss']:.4f}", flush=True)
    return head.eval()


def _project(head: heads.Head, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        z = head(torch.from_numpy(x.astype(np.float32))).numpy()
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def run(cfg: Config) -> dict:
    """Train (or fit) the head, measure it on held-out rows, write the head file; the report."""
    started = time.time()
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    if cfg.method not in ("metric", "pca"):
        raise TrainError(f"unknown method {cfg.method!r} (metric or pca)")
    if cfg.views and cfg.method != "metric":
        raise TrainError("--views trains the metric head: it has no use with --method pca")
    x, codes, classes, pids, model = load_features(cfg.embeddings, cfg.labels)
    if not 0 < cfg.dim <= x.shape[1]:
        raise TrainError(f"--dim {cfg.dim} must be in [1, {x.shape[1]}]")
    train, val = split(codes, cfg.val_frac, cfg.seed) if cfg.val_frac else (np.arange(len(x)), [])
    print(
        f"[train_head] {cfg.embeddings}: {len(x):,} labelled vectors ({x.shape[1]}-d), "
        f"{len(classes)} {cfg.labels!r} labels; {len(train):,} train, {len(val):,} held out",
        flush=True,
    )
    views = load_views(cfg.views, model, pids) if cfg.views else None
    if cfg.method == "pca":
        head = heads.pca_whitening(x[train], cfg.dim, cfg.pca_shrinkage)
    else:
        head = _train_metric(cfg, training_rows(x, codes, train, views), len(classes))
    report = {"method": cfg.method, "kind": head.kind, "dim": cfg.dim, "labels": cfg.labels}
    if len(val):
        # Held-out items query the training items: how often their neighbours share the label.
        before = label_precision_at_10(x[val], codes[val], x[train], codes[train])
        z_val, z_train = _project(head, x[val]), _project(head, x[train])
        after = label_precision_at_10(z_val, codes[val], z_train, codes[train])
        report["val_precision_at_10"] = {"backbone": round(before, 4), "head": round(after, 4)}
        print(
            f"[train_head] held-out label precision@10: backbone {before:.4f} "
            f"({x.shape[1]}-d) -> head {after:.4f} ({cfg.dim}-d)",
            flush=True,
        )
    if len(val) and views is not None and np.isin(views[0], val).any():
        # Held-out copies look for their own photo among all catalog photos.
        held = np.isin(views[0], val)
        rows_v, vx = views[0][held], views[1][held]
        before = instance_recall_at_1(vx, rows_v, x, pids)
        after = instance_recall_at_1(_project(head, vx), rows_v, _project(head, x), pids)
        report["val_instance_recall_at_1"] = {"backbone": round(before, 4), "head": round(after, 4)}
        print(
            f"[train_head] held-out copies, recall@1 of their own product: backbone "
            f"{before:.4f} -> head {after:.4f}",
            flush=True,
        )
    report["seconds"] = round(time.time() - started, 1)
    info = {
        "embeddings": storage.normalize(cfg.embeddings),
        "backbone_model": model,
        "classes": len(classes),
        "rows": int(len(x)),
        "config": {k: v for k, v in asdict(cfg).items() if k != "s3_endpoint"},
        "report": report,
    }
    heads.save(head, cfg.out, backbone=model["model_id"], info=info)
    print(f"[train_head] wrote {cfg.out} in {report['seconds']}s", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--embeddings", required=True, help="embeddings dataset URI (backbone only)")
    p.add_argument("--out", required=True, help="head file URI to write")
    p.add_argument("--labels", default="category", help="label column (default: category)")
    p.add_argument("--method", default="metric", choices=["metric", "pca"])
    p.add_argument("--dim", type=int, default=256, help="output dimension")
    p.add_argument("--kind", default=Config.kind, choices=list(heads.KINDS))
    p.add_argument("--hidden", type=int, default=Config.hidden, help="hidden width (mlp)")
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--batch-size", type=int, default=Config.batch_size)
    p.add_argument("--lr", type=float, default=Config.lr)
    p.add_argument("--margin", type=float, default=Config.margin)
    p.add_argument("--scale", type=float, default=Config.scale)
    p.add_argument("--preserve", type=float, default=Config.preserve)
    p.add_argument("--views", help="embeddings of re-photographed copies of the catalog")
    p.add_argument("--instance-weight", type=float, default=Config.instance_weight)
    p.add_argument("--val-frac", type=float, default=Config.val_frac)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, help="Ray Train workers (default: GPUs, else 1)")
    p.add_argument("--train-storage", help="Ray Train checkpoint storage (s3:// on a cluster)")
    cli.add_s3_endpoint(p)
    args = p.parse_args(argv)
    return cli.exit_code("train_head", lambda: run(cli.config(Config, args)), (TrainError,))


if __name__ == "__main__":
    sys.exit(main())
