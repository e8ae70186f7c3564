"""The sample catalog for demos and benchmarks: Debian's openclipart-png (8,121 PNGs by category).

python -m visual_search.sample --cache .cache --out .cache/sample/catalog.parquet --limit 1000
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import pyarrow as pa

from visual_search import storage

PACKAGE = "openclipart-png"
PNG_ROOT = "usr/share/openclipart/png"


def fetch_openclipart(cache: str) -> str:
    """Download and unpack the Debian package once (no root needed); returns the PNG folder."""
    dest = os.path.join(os.path.abspath(cache), "openclipart")
    root = os.path.join(dest, "root", PNG_ROOT)
    if os.path.isdir(root) and os.path.exists(os.path.join(dest, ".complete")):
        return root
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        print(f"[sample] downloading {PACKAGE} (about 130 MB) into {dest}", flush=True)
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True)
        (deb,) = glob.glob(os.path.join(tmp, f"{PACKAGE}_*.deb"))
        unpacked = os.path.join(tmp, "root")
        subprocess.run(["dpkg-deb", "-x", deb, unpacked], check=True)
        if os.path.exists(os.path.join(dest, "root")):
            subprocess.run(["rm", "-rf", os.path.join(dest, "root")], check=True)
        os.replace(unpacked, os.path.join(dest, "root"))
    open(os.path.join(dest, ".complete"), "w").close()
    return root


def _title(stem: str) -> str:
    words = re.sub(r"[_\-]+", " ", os.path.basename(stem)).split()
    return " ".join(w for w in words if not w.isdigit()).strip().capitalize() or stem


def sample_table(folder: str, limit: int | None = None) -> pa.Table:
    """Catalog rows for the PNGs below folder; `limit` takes an even spread (every k-th file)."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.png"), recursive=True))
    if limit and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    rel = [os.path.relpath(f, folder)[: -len(".png")] for f in files]
    return pa.table(
        {
            "product_id": rel,
            "image_uri": [os.path.abspath(f) for f in files],
            "title": [_title(r) for r in rel],
            "category": [os.path.basename(os.path.dirname(r)) or None for r in rel],
        }
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", default=".cache", help="folder for the downloaded package")
    p.add_argument("--out", required=True, help="catalog table to write (.parquet)")
    p.add_argument("--limit", type=int, help="number of images (default: all 8,121)")
    args = p.parse_args(argv)
    table = sample_table(fetch_openclipart(args.cache), args.limit)
    storage.write_parquet(args.out, table)
    print(f"[sample] wrote {table.num_rows:,} catalog rows to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
