"""Start the app on an index, answer one sample query on the console, then keep serving.

python -m serve.demo --index-root DIR [--query IMAGE] [--port 8000] [--once]
"""

import argparse
import io
import os
import secrets
import sys
import time

import requests
from ray import serve

from serve.app import AppArgs, build_app
from visual_search import cluster, orphans, storage, versions

KEY_ENV = "VISUAL_SEARCH_API_KEY"


def live_update(url: str, key: str, data: bytes) -> None:
    """Add a product through PUT /products/{id}, find it with min_seq, then delete it."""
    from PIL import Image

    mirrored = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(
        mirrored, "JPEG"
    )
    headers = {"X-API-Key": key}
    files = {"image": ("new.jpg", mirrored.getvalue(), "image/jpeg")}
    started = time.monotonic()
    put = requests.put(f"{url}/products/demo-new", files=files, headers=headers, timeout=60)
    put.raise_for_status()
    seq = put.json()["seq"]
    found = requests.post(
        f"{url}/search?k=1&min_seq={seq}", data=mirrored.getvalue(), timeout=60
    ).json()
    took = (time.monotonic() - started) * 1000
    top = found["results"][0]["product_id"] if found["results"] else None
    print(f"[demo] live update: PUT /products/demo-new -> seq {seq}; searched with", flush=True)
    print(f"[demo]   min_seq={seq}: top result {top!r} ({took:.0f} ms from upload to answer)")
    requests.delete(f"{url}/products/demo-new", headers=headers, timeout=60).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--index-root", required=True)
    p.add_argument("--query", help="image URI to search with (default: a catalog photo)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--once", action="store_true", help="stop after the sample query")
    args = p.parse_args(argv)

    import ray

    cluster.use_serve_env(drain_s=1)  # one machine: no load balancer to deregister from
    # Admin writes need a key: one made for this demo unless one is set (replicas inherit it).
    os.environ.setdefault(KEY_ENV, secrets.token_urlsafe(24))
    orphans.reap_orphan_haproxy()  # a hard-killed demo's haproxy would keep --port
    ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    root = storage.normalize(args.index_root)
    serve.run(build_app(AppArgs(index_root=root)), name="visual_search", route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    query = args.query or versions.open_version(root).read_docs(0)["image_uri"][0].as_py()
    data = storage.read_bytes(query)
    answer = requests.post(f"{url}/search?k=5", data=data, timeout=60).json()
    print(f"[demo] sample query {query} -> index {answer['index_version']}:", flush=True)
    for i, r in enumerate(answer["results"], 1):
        title = r.get("title") or ""
        print(f"[demo]   {i}. {r['product_id']:<50} {title[:30]:<30} {r['score']:.3f}")
    print(f"[demo] took {answer['took_ms']} ms. Open {url}/ to search by photo.", flush=True)
    live_update(url, os.environ[KEY_ENV], data)
    if args.once:
        serve.shutdown()
        return 0
    print("[demo] serving; press Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
