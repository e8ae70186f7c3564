"""jobs/stream.py (Contract 5): a change feed of CSV files into the update log, exactly once.

The live version is built from a synthetic embeddings dataset whose manifest names the default
model (real weights), so the stream embeds real photos with it and the vectors can be checked
against the same embedder called directly. Covered: upserts, deletes, a corrupt image and
malformed rows in feed order with their error records; reruns and grown files writing nothing
twice; crashes at each step of a batch commit (in process); a real `python jobs/stream.py`
stopped with SIGTERM (exit 0) and one killed with SIGKILL, then restarted with --once, checked
against an oracle of the feed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import draw_product
from synthetic import clustered_vectors, write_embeddings_dataset

from jobs import build_index, stream
from visual_search import embedders, images, pipeline, updates
from visual_search import feed as feeds
from visual_search.manifest import EmbeddingsManifest
from visual_search.updates import Position

REPO = Path(__file__).resolve().parents[1]
HEADER = "op,product_id,image_uri,title,price\n"


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """(index root with one live version of the default model, that model's dict)."""
    model = embedders.describe(embedders.DEFAULT_MODEL)
    emb = tmp_path_factory.mktemp("emb")
    n = 20
    meta = {"title": [f"T{i}" for i in range(n)], "price": [float(i) for i in range(n)]}
    write_embeddings_dataset(emb, clustered_vectors(n, model["dim"]), metadata=meta)
    manifest = EmbeddingsManifest.read(str(emb))
    dataclasses.replace(manifest, model=model).write(str(emb))
    root = tmp_path_factory.mktemp("index")
    built = build_index.run(build_index.Config(str(emb), str(root), text=False))
    assert built.filterable["price"] == "number"
    return str(root), model


@pytest.fixture(scope="module")
def embedder(built):
    return embedders.from_model_dict(built[1])


@pytest.fixture
def root(built, tmp_path):
    """A fresh copy of the index root: every test has a log of its own."""
    dst = tmp_path / "index"
    shutil.copytree(built[0], dst)
    return str(dst)


@pytest.fixture
def feed(tmp_path):
    """A feed folder with photos a, b, e and a corrupt one under img/."""
    path = tmp_path / "feed"
    (path / "img").mkdir(parents=True)
    for i, name in enumerate("abe"):
        draw_product(i, (90, 70)).save(path / "img" / f"{name}.jpg", quality=95)
    (path / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return path


def land(feed: Path, name: str, text: str) -> None:
    """Land a feed file the way producers must: written elsewhere, then renamed."""
    tmp = feed / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, feed / name)


def log_of(root: str) -> list[updates.Update]:
    return [u for _, found in updates.follow(root, Position()) for u in found]


def errors_of(root: str) -> dict[tuple[str, int], dict]:
    out = {}
    for p in Path(root, "updates", "errors").rglob("*.json"):
        rec = json.loads(p.read_text())
        out[rec["file"], rec["row"]] = rec
    return out


def once(root: str, feed, **kw) -> dict:
    return stream.run(stream.Config(root, str(feed), once=True, progress_every_s=0, **kw))


def reference(embedder, path: Path) -> np.ndarray:
    return embedder.embed(images.load(path.read_bytes(), embedder.preprocess)[None])[0]


FIRST = HEADER + (
    "upsert,a,img/a.jpg,Alpha,9.5\n"
    "upsert,b,{feed}/img/b.jpg,,\n"  # absolute URI; empty cells: no title, no price
    "delete,p00003,,,\n"
    "upsert,c,img/bad.jpg,Broken,1\n"
    "upsert,d,img/a.jpg\n"  # too few fields
    "\n"  # a blank line: keeps its number, is no row
    "upsert,e,img/e.jpg,Echo,12\n"
    "bogus,f,img/a.jpg,x,1\n"  # unknown op
    "upsert,g,img/a.jpg,Gee,cheap\n"  # price is a number field of the version
)


def test_feed_lands_in_order_with_vectors_and_error_rows(root, feed, embedder, built, capsys):
    land(feed, "0001.csv", FIRST.format(feed=feed))
    counts = once(root, feed, batch_rows=3, round_batches=2)
    log = log_of(root)
    assert [u.source for u in log] == ["feed:0001.csv#1", "feed:0001.csv#2", "feed:0001.csv#3"] + [
        "feed:0001.csv#7"
    ]
    assert [(u.op, u.product_id) for u in log] == [
        ("upsert", "a"),
        ("upsert", "b"),
        ("delete", "p00003"),
        ("upsert", "e"),
    ]
    assert [u.seq for u in log] == [1, 2, 3, 4]
    a, b, d, e = log
    assert a.metadata == {"title": "Alpha", "price": 9.5} and b.metadata == {}
    assert a.image_uri == str(feed / "img" / "a.jpg") and b.image_uri == str(feed / "img" / "b.jpg")
    assert d.vector is None and d.image_uri is None
    key = updates.model_key(built[1])
    for u, name in ((a, "a"), (b, "b"), (e, "e")):
        assert u.model == key
        np.testing.assert_allclose(
            u.vector, reference(embedder, feed / "img" / f"{name}.jpg"), atol=1e-4
        )

    errors = errors_of(root)
    assert sorted(errors) == [("0001.csv", r) for r in (4, 5, 8, 9)]
    code = pipeline.read_and_decode(
        str(feed / "img" / "bad.jpg"), embedder.preprocess, images.Limits()
    )[1]
    assert errors["0001.csv", 4]["error"] == code and errors["0001.csv", 4]["product_id"] == "c"
    assert errors["0001.csv", 4]["image_uri"] == str(feed / "img" / "bad.jpg")
    assert {errors["0001.csv", r]["error"] for r in (5, 8)} == {"malformed_row"}
    assert errors["0001.csv", 9]["error"] == "bad_metadata"
    assert counts["rows"] == 8 and counts["written"] == 4 and counts["errors"] == 4
    assert "rows/s" in capsys.readouterr().out

    # A rerun writes nothing; a file that grew after it was read is not re-read, a new one is.
    assert once(root, feed)["rows"] == 0
    with open(feed / "0001.csv", "a") as f:
        f.write("delete,a,,,\n")
    land(feed, "0002.csv", HEADER + "delete,b,,,\nupsert,a2,img/a.jpg,Again,\n")
    assert once(root, feed)["rows"] == 2
    later = log_of(root)[4:]
    assert [(u.source, u.op, u.product_id) for u in later] == [
        ("feed:0002.csv#1", "delete", "b"),
        ("feed:0002.csv#2", "upsert", "a2"),
    ]
    np.testing.assert_allclose(later[1].vector, a.vector, atol=1e-6)
    assert "0001.csv changed after it was read" in capsys.readouterr().out
    assert once(root, feed)["rows"] == 0 and len(log_of(root)) == 6 and len(errors_of(root)) == 4


@pytest.mark.parametrize("crash", ["after_errors", "after_segment"])
def test_a_crash_inside_a_commit_writes_nothing_twice(root, feed, monkeypatch, crash):
    """Deletes and malformed rows only: no embedding, so each step of a commit is cheap."""
    rows = [f"delete,p{i:05d},,," if i % 3 else f"delete,p{i:05d}" for i in range(1, 10)]
    land(feed, "0001.csv", HEADER + "\n".join(rows) + "\n")
    target = (updates.Writer, "append") if crash == "after_errors" else (feeds.FeedState, "save")
    real, calls = getattr(*target), []

    def fails_second_time(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash")
        return real(self, *args)

    monkeypatch.setattr(*target, fails_second_time)
    with pytest.raises(RuntimeError, match="crash"):
        once(root, feed, batch_rows=4)
    monkeypatch.undo()
    once(root, feed, batch_rows=4)
    sources = [u.source for u in log_of(root)]
    assert sorted(sources) == sorted(f"feed:0001.csv#{i}" for i in range(1, 10) if i % 3)
    assert len(set(sources)) == len(sources)
    assert sorted(errors_of(root)) == [("0001.csv", 3), ("0001.csv", 6), ("0001.csv", 9)]


def many_files(feed: Path, n_files: int) -> dict[str, tuple[str, str]]:
    """n_files files of 4 rows (upserts and deletes); the oracle {source: (op, product_id)}."""
    oracle = {}
    for f in range(n_files):
        lines = []
        for r in range(1, 5):
            pid = f"n{f}-{r}"
            op = "delete" if r == 3 else "upsert"
            lines.append(f"{op},{pid},img/{'abe'[r % 3]}.jpg,t{f},{r}")
            oracle[f"feed:{f:04d}.csv#{r}"] = (op, pid)
        land(feed, f"{f:04d}.csv", HEADER + "\n".join(lines) + "\n")
    return oracle


def start(root: str, feed: Path, log: Path, *extra: str) -> subprocess.Popen:
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "jobs/stream.py", "--index-root", root, "--feed", str(feed), *extra]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_segments(root: str, n: int, proc: subprocess.Popen, log: Path, timeout=180) -> None:
    deadline = time.monotonic() + timeout
    while updates.tail(root, Position()).segment < n:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def check_oracle(root: str, oracle: dict) -> None:
    log = log_of(root)
    counts = collections.Counter(u.source for u in log)
    assert counts == collections.Counter(list(oracle)), "every feed row in the log exactly once"
    assert {u.source: (u.op, u.product_id) for u in log} == oracle
    assert all((u.vector is not None) == (u.op == "upsert") for u in log)


def test_sigterm_finishes_the_batch_and_exits_0(root, feed, tmp_path):
    oracle = many_files(feed, 3)
    log = tmp_path / "stream.log"
    proc = start(root, feed, log, "--batch-rows", "2", "--round-batches", "1", "--poll-s", "0.2")
    try:
        wait_for_segments(root, 1, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "[stream] lag" in log.read_text()
    assert 0 < len(log_of(root)) < len(oracle)
    assert stream.main(["--index-root", root, "--feed", str(feed), "--once"]) == 0
    check_oracle(root, oracle)


def test_kill_9_mid_way_then_once_writes_every_row_once(root, feed, tmp_path):
    oracle = many_files(feed, 4)
    log = tmp_path / "stream.log"
    proc = start(root, feed, log, "--batch-rows", "2", "--round-batches", "1", "--poll-s", "0.2")
    try:
        wait_for_segments(root, 2, proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(log_of(root)) < len(oracle), "killed mid-way"
    assert stream.main(["--index-root", root, "--feed", str(feed), "--once"]) == 0
    check_oracle(root, oracle)
    assert stream.main(["--index-root", root, "--feed", str(feed), "--once"]) == 0
    check_oracle(root, oracle)


@pytest.mark.parametrize(
    "rows, expected",
    [
        ({1, 2, 3, 7}, [[1, 3], [7, 7]]),
        (set(), []),
        ({5}, [[5, 5]]),
    ],
)
def test_checkpoint_ranges_round_trip(rows, expected):
    assert feeds._ranges(rows) == expected
    assert feeds._expand(expected) == rows


@pytest.mark.parametrize(
    "source, expected",
    [
        ("feed:a/b.csv#12", ("a/b.csv", 12)),
        ("feed:x#y.csv#3", ("x#y.csv", 3)),
        ("put", None),
        (None, None),
        ("feed:a.csv#", None),
    ],
)
def test_parse_source(source, expected):
    assert feeds.parse_source(source) == expected


HUGE_FIELD = b'"' + b"a" * 200_000 + b'"'


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"op,product_id\n", [(0, "bad_header")]),
        (b"op,product_id,image_uri,id\n", [(0, "bad_header")]),  # a reserved column
        (b"op,product_id,image_uri,t,t\n", [(0, "bad_header")]),
        (b"\xff\xfeop", [(0, "bad_file")]),
        (b"", [(0, "bad_header")]),
        (b"op,product_id,image_uri\n", []),
        (
            b"\xef\xbb\xbfop,product_id,image_uri\ndelete,x,\nupsert,y,\n",
            [(1, None), (2, "malformed_row")],
        ),
        (
            b"op,product_id,image_uri\ndelete,x,\ndelete,y," + HUGE_FIELD,
            [(1, None), (2, "malformed_row")],
        ),
    ],
)
def test_parse_file_turns_what_it_cannot_read_into_error_rows(data, expected):
    rows = feeds.parse_file("f.csv", "/feed/f.csv", data)
    assert [(r.row, r.error) for r in rows] == expected
