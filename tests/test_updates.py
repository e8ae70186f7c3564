"""The update log (Contract 5): sequence numbers without gaps or repeats across racing writers,
on local storage and on S3 (moto), and the log's effect on a version (Overlay)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from visual_search import conditional, storage, updates
from visual_search.updates import DELETE, UPSERT, Overlay, Position, Update, Writer

DIM = 4


@pytest.fixture
def root(any_root):
    return any_root


def upsert(pid: str, x: float = 1.0, model: str = "m") -> Update:
    v = np.full(DIM, x, np.float32)
    return Update(UPSERT, pid, f"/img/{pid}.jpg", {"title": pid}, v / np.linalg.norm(v), model)


def test_create_exclusive_has_one_winner(root):
    uri = storage.join(root, "x.bin")
    assert conditional.create_exclusive(uri, b"first")
    assert not conditional.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_racing_writers_share_one_gapless_sequence(root):
    writers = [Writer(root, Position(), DIM) for _ in range(3)]
    acked: list[Update] = []

    def write(w: Writer, j: int) -> None:
        for i in range(8):
            acked.extend(w.append([upsert(f"w{j}-{i}"), upsert(f"w{j}-{i}b")]))

    threads = [threading.Thread(target=write, args=(w, j)) for j, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(u.seq for u in acked) == list(range(1, 49))
    read = [u for _, found in updates.follow(root, Position()) for u in found]
    assert [u.seq for u in read] == list(range(1, 49))
    assert {(u.seq, u.product_id) for u in read} == {(u.seq, u.product_id) for u in acked}
    assert updates.tail(root, Position()) == Position(48, 24)
    # A reader that starts mid-log sees only what follows.
    assert [u.seq for _, f in updates.follow(root, Position(10, 5)) for u in f][:2] == [11, 12]


def test_segments_keep_vectors_metadata_and_deletes(tmp_path):
    root = str(tmp_path)
    w = Writer(root, Position(), DIM)
    a = w.append([upsert("a", 2.0), Update(DELETE, "b", source="feed:f.csv#3")])
    assert [u.seq for u in a] == [1, 2]
    (pos, found), *_ = list(updates.follow(root, Position()))
    assert pos == Position(2, 1)
    assert found[0].metadata == {"title": "a"} and found[0].image_uri == "/img/a.jpg"
    np.testing.assert_allclose(found[0].vector, np.full(DIM, 0.5), rtol=1e-6)
    assert found[1].vector is None and found[1].source == "feed:f.csv#3"


def test_a_broken_chain_is_an_error(tmp_path):
    root = str(tmp_path)
    Writer(root, Position(), DIM).append([upsert("a")])
    storage.write_bytes(updates.segment_uri(root, 2), b"not parquet")
    with pytest.raises(updates.LogError, match="not an update segment"):
        list(updates.follow(root, Position()))


def test_overlay_tombstones_and_new_docs(tmp_path):
    root = str(tmp_path)
    base = {"old": np.array([3, 4]), "kept": np.array([5])}
    added: list[int] = []
    overlay = Overlay(
        lambda p: base.get(p, np.zeros(0, np.int64)), Position(), "m", lambda u: added.append(u.seq)
    )
    w = Writer(root, Position(), DIM)
    w.append([upsert("old")])  # an upsert replaces the version's photos of "old"
    w.append([upsert("new"), upsert("new", 3.0)])  # a second upsert replaces the first
    w.append([Update(DELETE, "kept"), upsert("other", model="another model")])
    assert overlay.catch_up(root) == 5
    assert overlay.seq == 5 and added == [1, 2, 3]
    assert overlay.dead == {3, 4, 5, updates.DELTA_BASE + 2}
    assert overlay.ids_of("old").tolist() == [updates.DELTA_BASE + 1]
    assert overlay.ids_of("new").tolist() == [updates.DELTA_BASE + 3]
    assert overlay.ids_of("kept").tolist() == [] and overlay.ids_of("untouched") is None
    assert overlay.rows[updates.DELTA_BASE + 3]["title"] == "new"
    assert overlay.unusable == 1  # "other": its vector came from another model
    assert overlay.catch_up(root) == 0  # idempotent: nothing new


def test_retired_segments_are_never_written_again(root):
    w = Writer(root, Position(), DIM)
    for i in range(4):
        w.append([upsert(f"r{i}")])
    assert updates.retire(root, Position(2, 2)) == 2
    assert updates.read_segment(root, 1) is None and updates.read_segment(root, 3) is not None
    assert updates.floor(root) == Position(2, 2)
    # A writer that knows nothing starts above the floor: seq 5 follows 4, not a new seq 1.
    (late,) = Writer(root, Position(), DIM).append([upsert("late")])
    assert late.seq == 5
    assert updates.snapshot(root, Position()) == Position(5, 5)
    with pytest.raises(updates.LogError, match="retired"):
        updates.check_reachable(root, Position(1, 1))
    assert updates.check_reachable(root, Position(2, 2)) == Position(2, 2)
    assert updates.retire(root, Position(2, 2)) == 0  # already done
