"""Catalogs of large product photos for bench/embed.py --large: products-dev photos upscaled to
1200x1600 (what a shop's photo studio uploads), saved as JPEG quality 90 or PNG.

    python bench/large_catalog.py --format jpeg --images 1000 --out .cache/large

The distinct photos are written once per format (`--distinct`, default 1,000); a bigger catalog
names them again through hard links, so a 10,000-image catalog costs the disk of 1,000 while
every row is its own file to read and decode.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import pyarrow as pa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from visual_search import storage  # noqa: E402

PRODUCTS = os.path.join(os.path.dirname(REPO), "shared", "data", "products-dev")
SIZE = (1200, 1600)
FORMATS = {"jpeg": ("jpg", {"quality": 90}), "png": ("png", {"compress_level": 6})}


def _sources(n: int) -> list[str]:
    with open(os.path.join(PRODUCTS, "catalog.csv"), newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["product_id"])
    if len(rows) < n:
        raise SystemExit(f"products-dev has {len(rows)} photos, fewer than {n}")
    step = len(rows) // n  # spread over the set: fashion and furniture photos alike
    return [os.path.join(PRODUCTS, r["image_uri"]) for r in rows[::step][:n]]


def _distinct(out: str, fmt: str, n: int) -> list[str]:
    """The n distinct 1200x1600 photos of one format (made once; kept in `out`)."""
    from PIL import Image

    ext, options = FORMATS[fmt]
    folder = os.path.join(out, f"{fmt}-distinct-{n}")  # file i is the i-th of n sources
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, src in enumerate(_sources(n)):
        path = os.path.join(folder, f"{i:05d}.{ext}")
        if not os.path.exists(path):
            with Image.open(src) as im:
                big = im.convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
            big.save(path + ".tmp", format=fmt.upper(), **options)
            os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def make(out: str, fmt: str, images: int, distinct: int = 1000) -> str:
    """Write a catalog of `images` rows of `fmt` photos; returns the catalog's path."""
    photos = _distinct(out, fmt, min(images, distinct))
    folder = os.path.join(out, f"{fmt}-{images}")
    os.makedirs(folder, exist_ok=True)
    uris = []
    for i in range(images):
        path = os.path.join(folder, f"{i:06d}{os.path.splitext(photos[0])[1]}")
        if not os.path.exists(path):
            os.link(photos[i % len(photos)], path)
        uris.append(path)
    uri = os.path.join(out, f"catalog-{fmt}-{images}.parquet")
    table = pa.table({"product_id": [f"p{i}" for i in range(images)], "image_uri": uris})
    storage.write_parquet(uri, table)
    return uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--format", choices=sorted(FORMATS), default="jpeg")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--distinct", type=int, default=1000)
    p.add_argument("--out", default=os.path.join(REPO, ".cache", "large"))
    args = p.parse_args(argv)
    print(make(args.out, args.format, args.images, args.distinct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
