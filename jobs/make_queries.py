"""Make an instance-level query set from a catalog by re-photographing its photos synthetically.

    python jobs/make_queries.py --catalog URI --out URI [--per-product 1] [--limit N] [--seed 0]
        [--profile query|shopper|train] [--threads 8] [--s3-endpoint URL]

For each sampled product (--limit: how many products, seeded; default all), --per-product
queries, each from one of its photos (seeded pick), transformed as a shopper's photo of it
would differ from the catalog shot: random crop keeping 75-95% of each side, rotation up to
±15° (corners filled as background), background change (the near-white background connected to
the border, where transparent sources end up too, replaced by a random colour, gradient or
noise), brightness / contrast / saturation / white-balance shifts, JPEG recompression at quality
50-90. `--profile shopper` is a second, independent distribution: crop keeping 70-90% of each
side, rotation up to ±10°, the background kept, the same colour shifts, JPEG quality 40.
`--profile train` (the tuning stage's training views) spans both and more: crop keeping 65-95%,
±15°, the background replaced in half of the photos and kept in the other half, JPEG 30-90.
Every query has its own generator seeded from (--seed, query number), so the output is
byte-identical for a seed whatever the thread timing.

Output: {out}/images/q-NNNNNN.jpg (NNNNNN = query number) and {out}/queries.parquet, written
last: image_uri (relative to --out), product_id, category (when the catalog has it), source_uri,
augment (the query's parameters as JSON). Sources that cannot be read or decoded are skipped
and counted.
"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageEnhance, ImageFilter

from jobs import cli
from visual_search import catalog, images, storage

# Sources are shrunk to this longest side first: queries are embedded at 224 px anyway.
MAX_SIDE = 512
MIN_SIDE = 32
# A pixel whose every channel is at least this counts as (near-)white background.
WHITE = 235
# Background connectivity is traced on a grid of at most this many cells per side.
GRID = 64
BACKGROUNDS = ("solid", "gradient", "noise")
# A re-photographed product is mostly in frame: each side keeps 75-95% of the catalog shot.
CROP = (0.75, 0.95)
MAX_ROTATE = 15.0


class QueryGenError(ValueError):
    """No query set can be made from this input."""


# name -> (crop share range, largest rotation, share of queries whose background is replaced,
# JPEG quality range [lo, hi)). "train" (the tuning stage's views) covers both of the others and
# more: tighter crops, harder compression, and half of the backgrounds kept, as a shopper's
# photo of a studio shot keeps its (colour-shifted) backdrop.
PROFILES = {
    "query": (CROP, MAX_ROTATE, 1.0, (50, 91)),
    "shopper": ((0.7, 0.9), 10.0, 0.0, (40, 41)),
    "train": ((0.65, 0.95), MAX_ROTATE, 0.5, (30, 91)),
}


@dataclass(frozen=True)
class Config:
    catalog: str
    out: str
    per_product: int = 1
    limit: int | None = None  # products sampled (seeded); None: all
    seed: int = 0
    threads: int = 8
    s3_endpoint: str | None = None
    profile: str = "query"  # see PROFILES


def _say(msg: str) -> None:
    print(f"[make_queries] {msg}", flush=True)


def image_name(j: int) -> str:
    return f"images/q-{j:06d}.jpg"


def draw_params(rng: np.random.Generator, profile: str = "query") -> dict:
    """One query's augmentation parameters (rounded as recorded, and applied as recorded)."""
    crop, max_rotate, replace_share, jpeg = PROFILES[profile]

    def u(lo: float, hi: float, digits: int = 4) -> float:
        return round(float(rng.uniform(lo, hi)), digits)

    w, h = u(crop[0], crop[1]), u(crop[0], crop[1])
    left, top = u(0, 1 - w), u(0, 1 - h)
    colours = rng.integers(0, 256, (2, 3)).tolist()
    rotate = u(-max_rotate, max_rotate, 2)  # drawn in this order: seeds keep their queries
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    params = {
        "crop": [left, top, round(left + w, 4), round(top + h, 4)],
        "rotate_deg": rotate,
        "background": {
            "kind": kind if replace_share >= 1 else "kept",
            "colours": colours,
            "angle_deg": u(0, 360, 1),
            "seed": int(rng.integers(2**31)),
        },
        "brightness": u(0.7, 1.3),
        "contrast": u(0.7, 1.3),
        "saturation": u(0.7, 1.3),
        "channel_gain": [u(0.9, 1.1) for _ in range(3)],
        "jpeg_quality": int(rng.integers(*jpeg)),
    }
    # Drawn last, and only for a mixed profile: the other profiles' seeds keep their queries.
    if 0 < replace_share < 1 and rng.uniform() < replace_share:
        params["background"]["kind"] = kind
    return params


def background_mask(img: Image.Image) -> np.ndarray:
    """float32 (h, w) in [0, 1]: the near-white region connected to the image border (soft edge).

    Connectivity is traced on a coarse grid (cheap at any size), grown by one cell so the
    product's edge is reached, then intersected with the near-white pixels themselves.
    """
    white = np.asarray(img).min(axis=2) >= WHITE
    h, w = white.shape
    scale = GRID / max(w, h)
    gw, gh = max(1, round(w * scale)), max(1, round(h * scale))
    coarse = Image.fromarray(white.astype(np.uint8) * 255).resize((gw, gh), Image.Resampling.BOX)
    cells = np.asarray(coarse) >= 128
    reached = np.zeros_like(cells)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reached[edge] = cells[edge]
    while True:
        grown = _dilate(reached) & cells
        if np.array_equal(grown, reached):
            break
        reached = grown
    region = Image.fromarray(_dilate(reached).astype(np.uint8) * 255)
    region = np.asarray(region.resize((w, h), Image.Resampling.NEAREST)) > 0
    mask = Image.fromarray((white & region).astype(np.uint8) * 255)
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(1)), np.float32) / 255.0


def _dilate(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out[1:] |= a[:-1]
    out[:-1] |= a[1:]
    out[:, 1:] |= a[:, :-1]
    out[:, :-1] |= a[:, 1:]
    return out


def make_background(size: tuple[int, int], spec: dict) -> np.ndarray:
    """float32 (h, w, 3): a solid colour, a linear gradient, or smooth colour noise."""
    w, h = size
    c0, c1 = (np.asarray(c, np.float32) for c in spec["colours"])
    if spec["kind"] == "solid":
        return np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
    if spec["kind"] == "gradient":
        theta = np.deg2rad(spec["angle_deg"])
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        t = x * np.cos(theta) + y * np.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return c0 + (c1 - c0) * t[..., None]
    rng = np.random.default_rng(spec["seed"])
    blobs = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    smooth = np.asarray(blobs.resize((w, h), Image.Resampling.BICUBIC), np.float32)
    return np.clip(smooth + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.float32)


def augment(img: Image.Image, p: dict) -> tuple[Image.Image, dict]:
    """RGB source -> (synthetic query photo, facts measured on the way: sizes, background share)."""
    source_size = list(img.size)
    if max(img.size) > MAX_SIDE:
        s = MAX_SIDE / max(img.size)
        size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    w, h = img.size
    left, top, right, bottom = p["crop"]
    box = (round(left * w), round(top * h), max(round(right * w), 1), max(round(bottom * h), 1))
    img = img.crop(box)
    if min(img.size) < MIN_SIDE:  # tiny sources: keep the query decodable (min_side 16)
        s = MIN_SIDE / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
    img = img.rotate(
        p["rotate_deg"], Image.Resampling.BICUBIC, expand=True, fillcolor=(255, 255, 255)
    )
    mask = background_mask(img)[..., None]
    if p["background"]["kind"] != "kept":
        pixels = np.asarray(img, np.float32)
        pixels = pixels * (1 - mask) + make_background(img.size, p["background"]) * mask
        img = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    img = ImageEnhance.Brightness(img).enhance(p["brightness"])
    img = ImageEnhance.Contrast(img).enhance(p["contrast"])
    img = ImageEnhance.Color(img).enhance(p["saturation"])
    gain = np.asarray(p["channel_gain"], np.float32)
    pixels = np.clip(np.round(np.asarray(img, np.float32) * gain), 0, 255).astype(np.uint8)
    facts = {
        "source_size": source_size,
        "size": list(img.size),
        "background_fraction": round(float(mask.mean()), 4),
    }
    return Image.fromarray(pixels), facts


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _plan(cfg: Config, table: pa.Table) -> list[dict]:
    """The queries to make, in query-number order: source row and parameters of each."""
    pids = table["product_id"].to_pylist()
    photos: dict[str, list[int]] = {}
    for row, pid in enumerate(pids):
        photos.setdefault(pid, []).append(row)
    products = list(photos)
    if cfg.limit is not None and cfg.limit < len(products):
        chosen = np.random.default_rng(cfg.seed).choice(len(products), cfg.limit, replace=False)
        products = [products[i] for i in sorted(chosen.tolist())]
    plan = []
    for pid in products:
        for _ in range(cfg.per_product):
            j = len(plan)
            rng = np.random.default_rng([cfg.seed, j])
            rows = photos[pid]
            plan.append(
                {
                    "j": j,
                    "row": rows[int(rng.integers(len(rows)))],
                    "params": draw_params(rng, cfg.profile),
                }
            )
    return plan


def _make_one(cfg: Config, source_uri: str, task: dict) -> tuple[dict | None, str | None]:
    """(augment record, None) once the query image is written, or (None, error code)."""
    limits = images.Limits()
    try:
        img = images.decode(storage.read_bytes(source_uri, limits.max_bytes), limits)
    except storage.TooLarge:
        return None, "too_large"
    except storage.StorageError:
        return None, "read_error"
    except images.ImageError as exc:
        return None, exc.code
    out, facts = augment(img, task["params"])
    storage.write_bytes(
        storage.join(cfg.out, image_name(task["j"])),
        encode_jpeg(out, task["params"]["jpeg_quality"]),
    )
    return {**task["params"], **facts}, None


def run(cfg: Config) -> dict:
    """Write the query set; returns its table URI and counts (queries, products, skipped)."""
    if cfg.s3_endpoint:
        storage.configure(cfg.s3_endpoint)
    if cfg.per_product < 1:
        raise QueryGenError(f"--per-product must be >= 1, got {cfg.per_product}")
    if cfg.profile not in PROFILES:
        raise QueryGenError(f"unknown --profile {cfg.profile!r}; known: {', '.join(PROFILES)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise QueryGenError(f"--limit must be >= 1, got {cfg.limit}")
    table = catalog.read_catalog(cfg.catalog).table
    storage.check_writable(cfg.out)
    plan = _plan(cfg, table)
    uris = table["image_uri"].to_pylist()
    with ThreadPoolExecutor(max_workers=max(1, cfg.threads)) as pool:
        done = list(pool.map(lambda t: _make_one(cfg, uris[t["row"]], t), plan))
    skipped = Counter(err for _, err in done if err is not None)
    kept = [(t, rec) for t, (rec, _) in zip(plan, done, strict=True) if rec is not None]
    if not kept:
        raise QueryGenError(f"{cfg.catalog}: no source photo could be used {dict(skipped)}")
    rows = pa.array([t["row"] for t, _ in kept], pa.int64())
    src = table.take(rows)
    cols = {
        "image_uri": pa.array([image_name(t["j"]) for t, _ in kept], pa.string()),
        "product_id": src["product_id"],
    }
    if "category" in src.column_names:
        cols["category"] = src["category"].cast(pa.string())
    cols["source_uri"] = src["image_uri"]
    cols["augment"] = pa.array([json.dumps(rec, sort_keys=True) for _, rec in kept], pa.string())
    uri = storage.join(cfg.out, "queries.parquet")
    storage.write_parquet(uri, pa.table(cols))
    products = len(set(src["product_id"].to_pylist()))
    summary = {
        "table": uri,
        "queries": len(kept),
        "products": products,
        "skipped": sum(skipped.values()),
        "skipped_by_code": dict(sorted(skipped.items())),
    }
    skipped_text = f"{summary['skipped']} source(s) skipped {summary['skipped_by_code']}"
    _say(f"done: {len(kept)} queries of {products} products, {skipped_text} -> {uri}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--catalog", required=True, help="catalog table or image folder/prefix URI")
    p.add_argument("--out", required=True, help="output folder URI (images/, queries.parquet)")
    p.add_argument("--per-product", type=int, default=Config.per_product)
    p.add_argument("--limit", type=int, help="products sampled (default: all)")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--profile", default=Config.profile, choices=sorted(PROFILES))
    cli.add_s3_endpoint(p)
    args = p.parse_args(argv)
    return cli.exit_code("make_queries", lambda: run(cli.config(Config, args)), (QueryGenError,))


if __name__ == "__main__":
    sys.exit(main())
