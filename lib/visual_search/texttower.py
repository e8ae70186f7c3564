"""Semantic text search: a small text encoder trained into the version's own image space.

LiT-style (Zhai et al. 2022): the image side is frozen (the catalog's own vectors), and a text
tower (word + character-trigram hash buckets -> EmbeddingBag -> MLP -> the image dimension,
L2-normalised) learns, by symmetric InfoNCE on (a row's text, that row's vector), to land text
next to the photos it describes. A word learned from some products then finds others that look
alike even when their titles lack it. No download: it trains on the catalog in the build.

The build step also tunes the weights of the weighted reciprocal-rank fusion (query.fuse) on
held-out rows, titles as queries, and records both in the manifest (`text_tower`).

A catalog embedded by clip-vit-b-32 whose weights the build is given uses CLIP's own text
tower instead (ClipTower): the same held-out measure and fusion tuning, no training.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import unicodedata
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from visual_search import devices, fulltext, storage, tuning
from visual_search.manifest import check_relative

FILE = "texttower.pt"
FORMAT = 1
MIN_ROWS = 200  # fewer (text, photo) pairs than this teach the tower nothing reliable
MAX_ROWS = 200_000  # rows sampled for training, held-out checks and fusion tuning
MAX_QUERIES = 500  # held-out title queries
DEPTH = 40  # ranks each ranking contributes when fusion weights are tuned
HELD_OUT = 0.1  # share of products held out of training
TEXT_GRID = ((1.0, 0.0), (1.0, 0.25), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.0, 1.0))
HYBRID_GRID = tuple(
    (i, s, t) for i in (0.5, 1.0, 2.0) for s in (0.0, 0.5, 1.0, 2.0) for t in (0.0, 0.5, 1.0)
)
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Settings:
    buckets: int = 1 << 15
    width: int = 128
    hidden: int = 512
    epochs: int = 30
    batch: int = 256
    lr: float = 3e-3
    temperature: float = 0.05
    seed: int = 0
    device: str | None = None  # None: CUDA when torch sees one (devices.torch_device)


def features(text: str, buckets: int) -> list[int]:
    """Hash buckets (1..buckets-1; 0 = no text) of the stemmed words and of the character
    trigrams of each lower-cased word (so "tshirt" and "t-shirts" share most)."""
    grams = set()
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
        padded = f"<{word}>"
        grams.update(padded[i : i + 3] for i in range(len(padded) - 2))
    keys = [f"w:{w}" for w in set(fulltext.tokenize(text))] + [f"g:{g}" for g in grams]
    return sorted({1 + zlib.crc32(k.encode()) % (buckets - 1) for k in keys}) or [0]


def _net(dim: int, s: Settings):
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(s.buckets, s.width, mode="mean")
            self.mlp = nn.Sequential(
                nn.LayerNorm(s.width),
                nn.Linear(s.width, s.hidden),
                nn.GELU(),
                nn.Linear(s.hidden, dim),
            )

        def forward(self, flat, offsets):
            return nn.functional.normalize(self.mlp(self.bag(flat, offsets)), dim=-1)

    return Net()


def _bags(texts: list[str], buckets: int, device):
    import torch

    feats = [features(t, buckets) for t in texts]
    lengths = np.fromiter((len(f) for f in feats), np.int64, len(feats))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.fromiter((b for f in feats for b in f), np.int64, int(lengths.sum()))
    return torch.from_numpy(flat).to(device), torch.from_numpy(offsets).to(device)


class Tower:
    """A trained text tower: encode(texts) -> float32 (n, dim), L2-normalised."""

    kind = "lit"

    def __init__(self, net, dim: int, settings: Settings, device=None):
        self.net, self.dim, self.settings = net.eval(), dim, settings
        self.device = device or devices.torch_device(settings.device)
        self.net.to(self.device)

    def encode(self, texts: list[str], batch: int = 4096) -> np.ndarray:
        import torch

        out = [np.zeros((0, self.dim), np.float32)]
        with torch.no_grad():
            for lo in range(0, len(texts), batch):
                flat, offsets = _bags(texts[lo : lo + batch], self.settings.buckets, self.device)
                out.append(self.net(flat, offsets).float().cpu().numpy())
        return np.concatenate(out)

    def to_bytes(self) -> bytes:
        import torch

        # float16 halves the file (the hash table is most of it); search ranks do not move.
        state = {k: v.half().cpu() for k, v in self.net.state_dict().items()}
        buf = io.BytesIO()
        meta = {"format": FORMAT, "dim": self.dim, "settings": asdict(self.settings)}
        torch.save({"meta": meta, "state": state}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, device: str | None = None) -> Tower:
        import torch

        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        meta = saved["meta"]
        if meta.get("format") != FORMAT:
            raise ValueError(f"text tower format {meta.get('format')}, expected {FORMAT}")
        settings = Settings(**{**meta["settings"], "device": device})
        net = _net(meta["dim"], settings)
        net.load_state_dict({k: v.float() for k, v in saved["state"].items()})
        return cls(net, meta["dim"], settings)


class ClipTower:
    """CLIP's own text tower, for a catalog embedded by clip-vit-b-32 with its weights: texts
    land in the space its image tower made the vectors in. Nothing is trained; the weights file
    is named by the manifest (`weights_uri`), not copied into the version."""

    kind = "clip"
    model_id = "clip-vit-b-32"

    def __init__(self, weights: str, device: str | None = None, weights_id: str | None = None):
        """`weights_id`: the file's, when the caller has hashed it already."""
        import open_clip

        from visual_search import embedders

        self.uri = storage.normalize(weights)
        self.weights_id = weights_id or _clip_weights_id(weights)
        self.device = devices.torch_device(device)
        model = embedders.clip_model(weights)
        model.visual = None  # the image side lives in the embedder
        self.model, self.dim = model.to(self.device), int(model.text_projection.shape[1])
        self.tokenize = open_clip.get_tokenizer(embedders.CLIP_ARCH)

    def encode(self, texts: list[str], batch: int = 256) -> np.ndarray:
        import torch

        out = [np.zeros((0, self.dim), np.float32)]
        with torch.no_grad():
            for lo in range(0, len(texts), batch):
                tokens = self.tokenize(texts[lo : lo + batch]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out)

    @classmethod
    def for_model(cls, model: dict, weights: str | None) -> ClipTower | None:
        """CLIP's text tower for the embeddings' `model` entry: None unless it is clip-vit-b-32
        (without a projection head) and its weights are named by the entry (tuned) or given;
        they must be the ones the vectors were made with."""
        weights = model.get("weights_uri") or weights
        if model.get("model_id") != cls.model_id or model.get("head") or not weights:
            return None
        got = _clip_weights_id(weights)  # checked before the model is built
        if got != model.get("weights"):
            raise ValueError(
                f"CLIP weights {got} differ from the catalog vectors' "
                f"{model.get('weights')}: its text would not land next to their photos"
            )
        return cls(weights, weights_id=got)


def _clip_weights_id(weights: str) -> str:
    from visual_search import embedders

    return embedders.weights_id(ClipTower.model_id, weights)


def train(texts: list[str], vectors: np.ndarray, settings: Settings = Settings()) -> Tower:
    """A tower trained on (texts[i], vectors[i]) pairs, float32 (n, d) vectors frozen."""
    import torch

    if len(texts) != len(vectors) or len(texts) < 2:
        raise ValueError(f"text tower: {len(texts)} texts for {len(vectors)} vectors")
    device = devices.torch_device(settings.device)
    torch.manual_seed(settings.seed)
    targets = torch.from_numpy(tuning.unit(vectors)).to(device)
    feats = [features(t, settings.buckets) for t in texts]
    net = _net(targets.shape[1], settings).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps = settings.epochs * -(-len(texts) // settings.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, settings.lr, total_steps=steps)
    rng = np.random.default_rng(settings.seed)
    net.train()
    for _ in range(settings.epochs):
        for rows in np.array_split(rng.permutation(len(texts)), steps // settings.epochs):
            flat, offsets = _bag_rows(feats, rows, device)
            logits = net(flat, offsets) @ targets[rows].T / settings.temperature
            labels = torch.arange(len(rows), device=device)
            ce = torch.nn.functional.cross_entropy
            loss = (ce(logits, labels) + ce(logits.T, labels)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return Tower(net, targets.shape[1], settings, device)


def _bag_rows(feats: list[list[int]], rows: np.ndarray, device):
    import torch

    chosen = [feats[r] for r in rows]
    lengths = [len(f) for f in chosen]
    offsets = torch.tensor([0, *np.cumsum(lengths)[:-1].tolist()], device=device)
    flat = torch.tensor([b for f in chosen for b in f], device=device)
    return flat, offsets


def compose(photo: np.ndarray, words: np.ndarray) -> np.ndarray:
    """The photo's vector moved toward the words' (both (1, d), unit): what POST /search?q=
    searches for the semantic ranking, items that look like the photo and match the words."""
    return tuning.unit(tuning.unit(photo) + tuning.unit(words))


# --- the build step ------------------------------------------------------------------------


def _ranking(scores: np.ndarray, pids: np.ndarray, depth: int) -> list[dict]:
    """The best `depth` products of one score row (one per product, best row first)."""
    out, seen = [], set()
    for j in np.argsort(-scores, kind="stable"):
        if scores[j] == -np.inf:
            break
        if pids[j] not in seen:
            seen.add(pids[j])
            out.append({"product_id": pids[j]})
            if len(out) == depth:
                break
    return out


def _bm25_rankings(docs: pa.Table, columns: list[str], queries: list[str], pids, depth: int):
    if "id" in docs.column_names:
        docs = docs.drop_columns(["id"])
    rows = docs.append_column("id", pa.array(np.arange(docs.num_rows), pa.int64()))
    text = fulltext.TextIndex.build(rows, columns)
    out = []
    for q in queries:
        scores, ids = text.search(q, depth * 4)
        row = np.full(docs.num_rows, -np.inf, np.float32)
        row[ids[ids >= 0]] = scores[ids >= 0]
        out.append(_ranking(row, pids, depth))
    return out


def _recall(fused: list[list[dict]], targets, k: int = 10) -> tuple[float, float]:
    """(R@k, MRR) of target products in fused rankings."""
    hits, rr = [], []
    for ranking, want in zip(fused, targets, strict=True):
        ranks = [i for i, row in enumerate(ranking, 1) if row["product_id"] == want]
        hits.append(bool(ranks) and ranks[0] <= k)
        rr.append(1.0 / ranks[0] if ranks else 0.0)
    return float(np.mean(hits)), float(np.mean(rr))


def tune_fusion(rankings: dict[str, list[list[dict]]], targets, grid, names) -> dict:
    """The grid's weights (for `names`) whose weighted RRF best finds `targets` (R@10, then
    MRR; the first of equals wins), with the figures of every point."""
    from visual_search import query

    points = []
    for weights in grid:
        w = dict(zip(names, weights, strict=True))
        fused = [
            query.fuse([rankings[n][i] for n in names], 10, names, w) for i in range(len(targets))
        ]
        r10, mrr = _recall(fused, targets)
        points.append({"weights": w, "r10": round(r10, 4), "mrr": round(mrr, 4)})
    best = max(points, key=lambda p: (p["r10"], p["mrr"]))  # max keeps the first of equals
    return {**best, "grid": points}


def train_and_tune(
    docs: pa.Table,
    vectors: np.ndarray,
    settings: Settings = Settings(),
    seed: int = 0,
    pretrained: ClipTower | None = None,
) -> tuple[Tower | ClipTower, dict]:
    """Train on the rows of (1 - HELD_OUT) of the products, measure the held-out titles'
    R@10 (the own product among all rows, by the tower's vectors), tune the fusion weights on
    them, then train the kept tower on every row. Returns (tower, the manifest's record).
    A `pretrained` tower is measured and tuned for the same way, and trained on nothing."""
    started = time.time()
    columns = fulltext.text_columns(docs)
    texts = fulltext.doc_texts(docs, columns)
    title_col = "title" if "title" in columns else columns[0]
    titles = fulltext.doc_texts(docs, [title_col])
    pids = np.asarray(docs["product_id"].to_pylist()).astype(str)
    fit, held = _held_out(pids, titles, seed)
    probe = pretrained or train([texts[i] for i in fit], vectors[fit], settings)
    gallery = tuning.unit(vectors)
    queries = [titles[i] for i in held]
    words = probe.encode(queries)
    semantic = [_ranking(gallery @ w, pids, DEPTH) for w in words]
    bm25 = _bm25_rankings(docs, columns, queries, pids, DEPTH)
    targets = pids[held]
    text_fusion = tune_fusion({"text": bm25, "semantic": semantic}, targets, TEXT_GRID,
                              ("text", "semantic"))  # fmt: skip
    hybrid = _hybrid_fusion(gallery, pids, held, words, bm25)
    heldout_r10 = _recall(semantic, targets)[0]
    tower = pretrained or train(texts, vectors, settings)
    record = {
        "kind": tower.kind,
        "columns": columns,
        "rows": len(texts),
        "device": str(tower.device),
        "heldout": {
            "rows": len(held),
            "title_r10": round(heldout_r10, 4),
            "method": f"titles of {HELD_OUT:.0%} of the products, held out of training, among "
            "all rows by the tower's vectors",
        },  # fmt: skip
        "fusion": {
            "method": "weighted rrf",
            "depth": DEPTH,
            "text": _brief(text_fusion),
            "hybrid": _brief(hybrid),
            "hybrid_method": "photo of the nearest other product + the held-out row's title",
        },
        "seconds": round(time.time() - started, 2),
    }
    if pretrained is None:
        record["epochs"] = settings.epochs
        record["settings"] = {k: v for k, v in asdict(settings).items() if k != "device"}
    return tower, record


def _held_out(pids: np.ndarray, titles: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows with a title, at most MAX_QUERIES), split by product."""
    # Not the seed of the tuning stage's split: within one of its splits every share would
    # fall on one side of 0.9.
    split = tuning.split_products(pids, (1 - HELD_OUT, 0.0, HELD_OUT), seed + 1)
    fit, held = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    held = held[[bool(titles[i].strip()) for i in held]]
    held = np.random.default_rng(seed).permutation(held)[:MAX_QUERIES]
    if len(fit) < 2 or not len(held):
        raise ValueError(f"text tower: {len(fit)} training rows, {len(held)} held-out titles")
    return fit, held


def _hybrid_fusion(gallery, pids, held, words, bm25) -> dict:
    """Hybrid weights tuned without labels: the photo of the held-out row's nearest other
    product (a look-alike) with the row's title; its own product is the one to find."""
    targets = pids[held]
    sims = gallery[held] @ gallery.T
    sims[pids[None, :] == targets[:, None]] = -np.inf
    photos = gallery[np.argmax(sims, axis=1)]
    image = [_ranking(gallery @ p, pids, DEPTH) for p in photos]
    composed = [_ranking(gallery @ compose(p[None], w[None])[0], pids, DEPTH)
                for p, w in zip(photos, words, strict=True)]  # fmt: skip
    return tune_fusion({"image": image, "semantic": composed, "text": bm25}, targets,
                       HYBRID_GRID, ("image", "semantic", "text"))  # fmt: skip


def _brief(tuned: dict) -> dict:
    return {"weights": tuned["weights"], "r10": tuned["r10"], "mrr": tuned["mrr"]}


def build(
    docs: pa.Table,
    vectors: np.ndarray,
    root: str,
    settings: Settings = Settings(),
    pretrained: ClipTower | None = None,
) -> dict:
    """The build step: the manifest's `text_tower` record, {"skipped": why} when the docs
    have no text or too few rows; else the tower trained and written under the version root
    (atomically, its sha256 recorded), or with `pretrained` (CLIP's own) its weights named."""
    columns = fulltext.text_columns(docs)
    if not columns:
        return {"skipped": "the docs have no text columns"}
    if docs.num_rows < MIN_ROWS:
        return {"skipped": f"{docs.num_rows} rows, fewer than {MIN_ROWS}"}
    if docs.num_rows > MAX_ROWS:
        keep = np.sort(np.random.default_rng(0).permutation(docs.num_rows)[:MAX_ROWS])
        docs, vectors = docs.take(pa.array(keep)), vectors[keep]
    tower, record = train_and_tune(docs, vectors, settings, pretrained=pretrained)
    if pretrained is not None:
        return {"weights_uri": pretrained.uri, "weights": pretrained.weights_id, **record}
    data = tower.to_bytes()
    storage.write_bytes(storage.join(root, FILE), data)
    return {"file": FILE, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **record}


def _has_tower(record: dict | None) -> bool:
    return bool(record) and ("file" in record or record.get("kind") == ClipTower.kind)


def load(
    version_root: str, record: dict | None, device: str | None = None
) -> Tower | ClipTower | None:
    """The version's tower (its file's or CLIP weights' hash checked against the manifest),
    None when it has none."""
    if not _has_tower(record):
        return None
    if record["kind"] == ClipTower.kind:
        got = _clip_weights_id(record["weights_uri"])
        if got != record["weights"]:
            raise ValueError(f"{record['weights_uri']}: weights {got} changed "
                             f"since the build ({record['weights']})")  # fmt: skip
        return ClipTower(record["weights_uri"], device, got)
    check_relative(record["file"], "text tower file")
    data = storage.read_bytes(storage.join(version_root, record["file"]))
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ValueError(f"{record['file']}: sha256 mismatch")
    return Tower.from_bytes(data, device)


def weights(record: dict | None, kind: str) -> dict[str, float] | None:
    """The tuned fusion weights of `kind` ("text": GET, "hybrid": POST), None without them."""
    if not _has_tower(record):
        return None
    return record["fusion"][kind]["weights"]
