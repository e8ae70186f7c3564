"""Upload decode memory: peak RSS of images.load on large uploads, each in a fresh process.

    python bench/decode.py [--json bench/results/decode.json]

Makes a 40 Mpx (8000x5000) RGBA PNG, 16-bit grayscale PNG and JPEG, and a 16 Mpx RGBA WebP
(the WebP limit), then decodes each with the ingress's upload limits and the default
preprocessing in a new interpreter, and prints the peak RSS over the RSS just before the
decode (Linux: VmHWM, reset through /proc/self/clear_refs). The goal is <= 300 MB for each.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

GOAL_MB = 300
CASES = {  # name -> (mode, size, format)
    "png_rgba_40mpx": ("RGBA", (8000, 5000), "PNG"),
    "png_16bit_40mpx": ("I;16", (8000, 5000), "PNG"),
    "jpeg_rgb_40mpx": ("RGB", (8000, 5000), "JPEG"),
    "webp_rgba_16mpx": ("RGBA", (5000, 3200), "WEBP"),
}


def gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    """A smooth image in `mode` (RGB, RGBA, LA, I;16, I), every band (alpha too) varying
    across it: large in pixels, small as a file (uploads stay under the byte limit)."""
    w, h = size
    x = np.broadcast_to(np.linspace(0, 1, w, dtype=np.float32), (h, w))
    y = np.broadcast_to(np.linspace(0, 1, h, dtype=np.float32)[:, None], (h, w))
    if mode == "I;16":
        return Image.fromarray((x * y * 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((x * 3000 + y * 900).astype(np.int32), "I")
    bands = [x * 255, y * 255, (1 - x) * 255, (x + y) * 127][: len(mode)]
    return Image.fromarray(np.stack(bands, -1).astype(np.uint8), mode)


def save(img: Image.Image, fmt: str, path: pathlib.Path) -> None:
    options = {"PNG": {"compress_level": 1}, "WEBP": {"quality": 30, "method": 0}}
    img.save(path, format=fmt, **options.get(fmt, {"quality": 80}))


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def measure_one(path: str) -> dict:
    """Peak RSS of one upload decode over the RSS before it (Linux: the peak is reset first),
    and its outcome: "ok" or the ImageError code."""
    from visual_search import images

    data = pathlib.Path(path).read_bytes()
    limits = images.Limits(formats=images.UPLOAD_FORMATS)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    try:
        images.load(data, images.Preprocess(), limits)
        code = "ok"
    except images.ImageError as exc:
        code = exc.code
    peak = _status_kb("VmHWM")
    return {"bytes": len(data), "code": code, "peak_mb": round((peak - base) / 1024)}


def measure(path: pathlib.Path) -> dict:
    """measure_one in a fresh interpreter, so that nothing decoded before counts."""
    child = [sys.executable, __file__, "--one", str(path)]
    out = subprocess.run(child, capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"{path.name}: {out.stderr[-1000:]}")
    return json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench/results/decode.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure this file
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (mode, size, fmt) in CASES.items():
            path = pathlib.Path(tmp) / f"{name}.{fmt.lower()}"
            save(gradient(mode, size), fmt, path)
            results[name] = r = measure(path)
            print(
                f"{name}: {r['bytes'] / 1e6:.1f} MB file, {r['code']}, "
                f"peak {r['peak_mb']} MB over base (goal <= {GOAL_MB})"
            )
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps({"goal_mb": GOAL_MB, "cases": results}, indent=2))


if __name__ == "__main__":
    main()
