"""Live catalog updates through the service (Contract 5), on one local Ray + Serve per module.

A 24-product catalog in 2 shards is served; PUT /products/{id} and DELETE /products/{id} write
to the update log, every shard and ingress replica follows it. Covered: auth and bad input
(4xx JSON, nothing written), seq +1 per accepted update and on every answer, read-your-writes
with min_seq, new products served by search, filters, /similar and /products/{id}/image,
replaced photos and deletes never answered again, /version's update counters, and a model-based
fault test: random upserts and deletes while a shard replica and then the ingress are killed
with SIGKILL; every acknowledged update holds afterwards (an oracle of acknowledged operations).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import draw_product, serve_ray
from PIL import Image
from ports import free_port

from jobs import build_index, compact, embed
from visual_search import updates, versions

API_KEY = "live-key"
KEY_ENV = "VISUAL_SEARCH_API_KEY"
N = 24
SHARDS = 2
SIZE = (128, 96)
TIMEOUT = 60
AUTH = {"X-API-Key": API_KEY}


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def photo(seed: int) -> bytes:
    return jpeg(draw_product(seed, SIZE))


class Live:
    def __init__(self, base: str, index_root: str):
        self.base, self.index_root = base, index_root
        self.http = requests.Session()

    def put(self, pid: str, data: bytes, metadata: dict | None = None, headers=AUTH):
        files = {"image": ("p.jpg", data, "image/jpeg")}
        form = {"metadata": json.dumps(metadata)} if metadata is not None else {}
        url = f"{self.base}/products/{pid}"
        return self.http.put(url, files=files, data=form, headers=headers, timeout=TIMEOUT)

    def delete(self, pid: str, headers=AUTH):
        return self.http.delete(f"{self.base}/products/{pid}", headers=headers, timeout=TIMEOUT)

    def search(self, data: bytes, **params):
        return self.http.post(
            f"{self.base}/search",
            data=data,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            timeout=TIMEOUT,
        )

    def get(self, path: str, **params):
        return self.http.get(self.base + path, params=params, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from ray import serve

    from serve.app import AppArgs, build_app

    root = tmp_path_factory.mktemp("live_catalog")
    rows = []
    for i in range(N):
        draw_product(i, SIZE).save(root / f"p{i:02d}.jpg", quality=95)
        category = "red" if i % 2 else "blue"
        rows.append({"product_id": f"p{i:02d}", "image_uri": f"p{i:02d}.jpg", "title": f"P {i}"})
        rows[-1].update({"category": category, "price": float(i)})
    pq.write_table(pa.Table.from_pylist(rows), root / "catalog.parquet")
    work = str(tmp_path_factory.mktemp("live_work") / "emb")
    index_root = str(tmp_path_factory.mktemp("live_index"))
    with serve_ray(KEY_ENV, API_KEY):
        embed.run(embed.Config(catalog=str(root / "catalog.parquet"), out=work, batch_size=16))
        cfg = build_index.Config(embeddings=work, index_root=index_root, shards=SHARDS)
        build_index.run(cfg)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 0.7 of the 2 logical CPUs in all: build tasks (1 CPU each) still fit, for compaction.
        cpus = {"shard_cpus": 0.1, "ingress_cpus": 0.1, "embedder_cpus": 0.4}
        args = AppArgs(index_root=index_root, rerank=0, **cpus)
        serve.run(build_app(args), name="vs", route_prefix="/")
        service = Live(f"http://127.0.0.1:{port}", index_root)
        yield service
        service.http.close()


def accepted(r: requests.Response, pid: str) -> int:
    assert r.status_code == 200, (r.status_code, r.text[:400])
    body = r.json()
    assert body["product_id"] == pid and body["status"] == "accepted"
    assert isinstance(body["seq"], int) and body["seq"] > 0
    return body["seq"]


def top(r: requests.Response) -> list[str]:
    assert r.status_code == 200, (r.status_code, r.text[:400])
    return [row["product_id"] for row in r.json()["results"]]


def error_code(r: requests.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:400])
    return r.json()["error"]["code"]


def segments(index_root: str) -> int:
    return updates.tail(index_root, updates.Position()).segment


# ------------------------------------------------------------------------------------ tests


def test_updates_need_the_key_and_good_input(live):
    before = segments(live.index_root)
    assert error_code(live.put("n1", photo(500), headers={}), 401) == "unauthorized"
    assert error_code(live.delete("p01", headers={"X-API-Key": "wrong"}), 401) == "unauthorized"
    assert error_code(live.put("n1", b"not an image"), 415) == "not_an_image"
    assert error_code(live.put("n1", photo(500), {"colour": "x"}), 400) == "bad_metadata"
    assert error_code(live.put("n1", photo(500), {"price": "cheap"}), 400) == "bad_metadata"
    r = live.http.put(f"{live.base}/products/n1", data=b"raw", headers=AUTH, timeout=TIMEOUT)
    assert error_code(r, 400) == "bad_request"
    assert error_code(live.delete("no-such-product"), 404) == "unknown_product"
    assert segments(live.index_root) == before  # nothing refused reached the log


def test_a_new_product_is_searchable_with_its_docs(live):
    data = photo(600)
    seq = accepted(live.put("new-1", data, {"title": "New one", "category": "green"}), "new-1")
    r = live.search(data, min_seq=seq, k=3)
    body = r.json()
    assert top(r)[0] == "new-1" and body["seq"] >= seq
    row = body["results"][0]
    assert row["title"] == "New one" and row["category"] == "green"
    assert live.get(row["image_url"]).content == data
    assert top(live.search(data, min_seq=seq, filter="category:green")) == ["new-1"]
    assert "new-1" not in top(live.search(data, min_seq=seq, filter="category:red"))
    similar = live.get("/products/new-1/similar", min_seq=seq, k=3)
    assert similar.status_code == 200 and "new-1" not in top(similar)


def test_seq_grows_by_one_and_every_answer_carries_it(live):
    a = accepted(live.put("seq-a", photo(700)), "seq-a")
    b = accepted(live.put("seq-b", photo(701)), "seq-b")
    c = accepted(live.delete("seq-a"), "seq-a")
    assert (b, c) == (a + 1, a + 2)
    assert live.search(photo(3), min_seq=c).json()["seq"] >= c
    assert live.get("/search", q="P", min_seq=c).json()["seq"] >= c
    version = live.get("/version").json()["updates"]
    assert version["seq"] >= c and version["since_version"] >= c


def test_a_replaced_photo_and_a_deleted_product_are_never_answered(live):
    old = photo(5)
    assert top(live.search(old, k=1)) == ["p05"]
    new = photo(900)
    seq = accepted(live.put("p05", new, {"title": "P 5, new photo"}), "p05")
    hits = live.search(old, min_seq=seq, k=N).json()["results"]
    assert all(row["product_id"] != "p05" or row["id"] >= updates.DELTA_BASE for row in hits)
    assert top(live.search(new, min_seq=seq, k=1)) == ["p05"]
    seq = accepted(live.delete("p07"), "p07")
    assert "p07" not in top(live.search(photo(7), min_seq=seq, k=N))
    assert "p07" not in top(live.get("/search", q="P 7", min_seq=seq, k=N))
    assert error_code(live.get("/products/p07/image"), 404) == "not_found"
    assert error_code(live.delete("p07"), 404) == "unknown_product"


def test_updates_are_searchable_without_min_seq_soon(live):
    data = photo(1234)
    accepted(live.put("fresh", data), "fresh")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and top(live.search(data, k=1)) != ["fresh"]:
        time.sleep(0.05)
    assert top(live.search(data, k=1)) == ["fresh"]


def test_stale_min_seq_is_503(live):
    ahead = live.get("/version").json()["updates"]["seq"] + 1000
    assert error_code(live.search(photo(1), min_seq=ahead), 503) == "stale"


def test_compaction_then_reload_keeps_every_update(live):
    data = photo(4242)
    accepted(live.put("folded", data, {"title": "Folded item"}), "folded")
    seq = accepted(live.delete("p09"), "p09")
    before = live.get("/version", min_seq=seq).json()
    assert compact.main(["--index-root", live.index_root]) == 0
    r = live.http.post(f"{live.base}/admin/reload", headers=AUTH, timeout=TIMEOUT)
    # The replica follows CURRENT by itself: it may have switched before the reload.
    assert r.status_code == 200 and r.json()["index_version"] == versions.current(live.index_root)
    after = live.get("/version").json()
    assert after["index_version"] != before["index_version"]
    assert after["updates"]["through"]["seq"] == seq == after["updates"]["seq"]
    assert after["updates"]["since_version"] == 0
    assert top(live.search(data, k=1)) == ["folded"]
    assert "p09" not in top(live.search(photo(9), k=N))
    assert top(live.get("/search", q="Folded", k=1)) == ["folded"]  # now in the text index too
    assert accepted(live.put("after-compaction", photo(4343)), "after-compaction") == seq + 1


# ----------------------------------------------------------------------------- faults


def _replica_pids(deployment: str) -> list[int]:
    """The process ids of a deployment's replicas (to kill them with a real signal)."""
    import ray

    names = ray.util.list_named_actors(all_namespaces=True)
    found = [a for a in names if f"#{deployment}#" in a["name"]]
    handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in found]
    return ray.get([h.__ray_call__.remote(lambda self: os.getpid()) for h in handles])


class Churn:
    """Random upserts and deletes from a thread, recording what was acknowledged. A request
    without a clear answer (connection lost, 5xx) may or may not have been applied: its product
    is uncertain until a later update of it is acknowledged."""

    def __init__(self, service: Live, seed: int):
        self.service, self.rng = service, random.Random(seed)
        self.acked: dict[str, tuple[int, int | None]] = {}  # pid -> (seq, photo seed or None)
        self.uncertain: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        for n in range(400):  # bounded
            if self.stop.is_set():
                break
            pid = f"c{self.rng.randrange(12)}"
            seed: int | None = 2000 + n
            try:
                if self.acked.get(pid, (0, None))[1] is not None and self.rng.random() < 0.3:
                    r, seed = self.service.delete(pid), None
                else:
                    r = self.service.put(pid, photo(seed))
            except requests.RequestException:
                self.uncertain.add(pid)
                continue
            if r.status_code == 200:
                self.acked[pid] = (r.json()["seq"], seed)
                self.uncertain.discard(pid)
            elif r.status_code >= 500:
                self.uncertain.add(pid)
            time.sleep(0.02)


def _wait_healthy(service: Live, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = service.search(photo(1), k=1)
            if r.status_code == 200 and not r.json()["partial"]:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("the service did not recover")


@pytest.mark.parametrize("victim", ["ShardSearcher-0", "Ingress"])
def test_kill_9_loses_no_acknowledged_update(live, victim):
    churn = Churn(live, seed=len(victim))
    churn.thread.start()
    deadline = time.monotonic() + 30
    while len(churn.acked) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(churn.acked) >= 4, "updates did not flow before the kill"
    pids = _replica_pids(victim)
    assert pids, f"no replica of {victim}"
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(3)  # updates keep flowing (or failing) while Serve restarts the replica
    churn.stop.set()
    churn.thread.join(timeout=120)
    _wait_healthy(live)
    last = max(seq for seq, _ in churn.acked.values())
    for pid, (seq, seed) in churn.acked.items():
        if pid in churn.uncertain:
            continue
        if seed is None:  # deleted: never answered again
            hits = top(live.search(photo(3), min_seq=last, k=N + 20))
            assert pid not in hits
            assert live.get(f"/products/{pid}/image").status_code == 404
        else:  # its last acknowledged photo finds it
            found = top(live.search(photo(seed), min_seq=last, k=1))
            assert found == [pid], (pid, seq, found)
    # The log has every acknowledged seq exactly once.
    seqs = [
        u.seq for _, batch in updates.follow(live.index_root, updates.Position()) for u in batch
    ]
    assert seqs == list(range(1, len(seqs) + 1))
    assert {seq for seq, _ in churn.acked.values()} <= set(seqs)
