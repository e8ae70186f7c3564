"""Publish safety with real processes: racing publishers move CURRENT only forward and only onto
complete versions, prune spares recent and in-flight versions, a killed publisher leaves CURRENT
usable, and an interrupted S3 upload leaves nothing at its final key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from visual_search import conditional, storage, updates, versions

# A publisher as a build does it: a new version's files, manifest last, CURRENT, prune.
PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from visual_search import storage, updates, versions
    root, rounds, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    versions.RECENT_S = 1.0
    for _ in range(rounds):
        v = versions.new_version_id()
        vroot = versions.version_root(root, v)
        storage.write_bytes(storage.join(vroot, "shard-00000.faiss"), b"x")
        time.sleep(slow)  # a slow build: others publish and prune meanwhile
        if not storage.exists(storage.join(vroot, "shard-00000.faiss")):
            sys.exit(f"in-flight version {v} was pruned")
        storage.write_bytes(storage.join(vroot, "manifest.json"), b"{}")
        try:
            versions.set_current(root, v)
        except versions.Superseded:
            versions.withdraw(root, v)
        versions.prune(root, 1, v)
    """
)


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    return env


def _start(tmp_path, root: str, rounds: int, slow: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER)
    return subprocess.Popen(
        [sys.executable, str(script), root, str(rounds), str(slow)],
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def root(any_root):
    return any_root


def test_racing_publishers_move_current_forward_onto_complete_versions(root, tmp_path):
    # Paced rounds (0.2 s each), so the 50 ms poll below sees CURRENT move even when the
    # three publishers start at once on a loaded machine.
    procs = [_start(tmp_path, root, 4, slow=0.2) for _ in range(3)]
    procs.append(_start(tmp_path, root, 1, slow=4.0))  # older id, in flight the whole time
    seen: list[str] = []
    killed = False
    while any(p.poll() is None for p in procs[:3]) or procs[3].poll() is None:
        live = versions.current(root)
        if live is not None:
            # Read as CURRENT: complete, and not pruned right after (RECENT_S in the publishers).
            assert versions.is_complete(root, live), live
            if seen and live != seen[-1]:
                assert live > seen[-1], f"CURRENT went back from {seen[-1]} to {live}"
            if not seen or live != seen[-1]:
                seen.append(live)
        if not killed and len(seen) >= 2:
            procs[0].kill()  # a publisher killed mid-loop holds no lock and breaks nothing
            killed = True
        time.sleep(0.05)
    for p in procs[1:]:
        assert p.wait() == 0, p.stderr.read()
    assert len(seen) >= 2
    final = versions.current(root)
    assert versions.is_complete(root, final)
    # Prune kept CURRENT, and at most the killed publisher's version if it got its manifest
    # (newer than CURRENT and younger than GRACE_S: it could still be about to publish).
    time.sleep(1.1)
    versions.RECENT_S, saved = 1.0, versions.RECENT_S
    try:
        versions.prune(root, 1, final)
    finally:
        versions.RECENT_S = saved
    left = versions.list_versions(root)
    others = {v: ok for v, ok in left.items() if v != final}
    assert left[final] and len(others) <= 1, left
    assert all(v > final or not ok for v, ok in others.items()), left
    entries = storage.list_files(storage.join(root, versions.HISTORY))
    history = [  # a publisher killed mid-write may leave its temp file (.tmp-...)
        json.loads(storage.read_bytes(e.uri))
        for e in entries
        if not e.uri.rsplit("/", 1)[1].startswith(".tmp-")
    ]
    assert final in {h["to"] for h in history}


def test_current_never_moves_backwards_nor_onto_an_incomplete_version(root):
    old, new = "20260101T000000.000000Z-aaaaaa", "20260102T000000.000000Z-bbbbbb"
    for v in (old, new):
        storage.write_bytes(storage.join(versions.version_root(root, v), "manifest.json"), b"{}")
    assert versions.set_current(root, new) is None
    with pytest.raises(versions.Superseded):
        versions.set_current(root, old)
    half = "20260103T000000.000000Z-cccccc"
    storage.write_bytes(storage.join(versions.version_root(root, half), "shard-00000.faiss"), b"")
    with pytest.raises(ValueError, match="not complete"):
        versions.set_current(root, half)
    assert versions.current(root) == new


def _publish(root: str, version: str, through: dict | None = None) -> None:
    manifest = json.dumps({"updates_through": through} if through else {}).encode()
    storage.write_bytes(
        storage.join(versions.version_root(root, version), "manifest.json"), manifest
    )


def test_rollback_moves_current_back_and_records_it(root, capsys):
    from jobs import rollback

    old, bad = "20260101T000000.000000Z-aaaaaa", "20260102T000000.000000Z-bbbbbb"
    _publish(root, old, {"seq": 4, "segment": 2})
    _publish(root, bad)
    versions.set_current(root, old)
    versions.set_current(root, bad)
    assert rollback.main(["--index-root", root, "--to", old]) == 0
    assert f"CURRENT {bad} -> {old}" in capsys.readouterr().out
    assert versions.current(root) == old
    last = storage.list_files(storage.join(root, versions.HISTORY))[-1]  # names sort by time
    assert storage.read_json(last.uri) | {"unix": 0} == {
        "from": bad,
        "to": old,
        "rollback": True,
        "unix": 0,
    }
    # Not newer than CURRENT, missing, or not a version id: refused, CURRENT unchanged.
    for target in (old, bad, "20251231T000000.000000Z-cccccc", "../x"):
        assert rollback.main(["--index-root", root, "--to", target]) == 2
    assert versions.current(root) == old
    newer = versions.new_version_id()
    _publish(root, newer)
    versions.set_current(root, newer)  # the next build publishes forward as usual
    assert versions.current(root) == newer


def test_rollback_refuses_a_version_whose_updates_are_retired(root, capsys):
    from jobs import rollback

    old, new = "20260101T000000.000000Z-aaaaaa", "20260102T000000.000000Z-bbbbbb"
    _publish(root, old, {"seq": 4, "segment": 2})
    _publish(root, new, {"seq": 9, "segment": 5})
    versions.set_current(root, old)
    versions.set_current(root, new)
    updates.retire(root, updates.Position(9, 5))  # compaction folded segments 3-5 into `new`
    assert rollback.main(["--index-root", root, "--to", old]) == 2
    assert "retired" in capsys.readouterr().err
    assert versions.current(root) == new


def test_swap_is_compare_and_swap(root):
    uri = storage.join(root, "CAS")
    assert conditional.swap(uri, None, b"a")
    assert not conditional.swap(uri, None, b"b")  # exists already
    assert not conditional.swap(uri, b"stale", b"b")
    assert conditional.swap(uri, b"a", b"b")
    assert storage.read_bytes(uri) == b"b"


def test_prune_spares_recent_current_and_young_in_flight_versions(tmp_path, monkeypatch):
    root = str(tmp_path)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    old = "20200101T000000.000000Z-"
    names = [f"{old}{i}aaaaa" for i in range(3)]
    for v in names:
        storage.write_bytes(storage.join(versions.version_root(root, v), "manifest.json"), b"{}")
    for v in names:
        versions.set_current(root, v)
    dead = f"{old}0dead0"  # an incomplete folder older than the grace period: a failed build
    young = f"{stamp}.000000Z-young0"  # incomplete and young: a build in flight
    for v in (dead, young):
        storage.write_bytes(storage.join(versions.version_root(root, v), "shard.faiss"), b"")
    # All three were CURRENT within RECENT_S: none is pruned; the failed build is.
    assert versions.prune(root, 1, names[-1]) == [dead]
    monkeypatch.setattr(versions, "RECENT_S", 0.0)
    assert versions.prune(root, 1, names[-1]) == names[:2]
    assert versions.list_versions(root) == {names[-1]: True, young: False}


UPLOADER = textwrap.dedent(
    """
    import os, sys, time
    from visual_search import storage
    client = storage._boto_s3()
    real = client.upload_part
    def slow_part(**kw):
        out = real(**kw)
        print("part", kw["PartNumber"], flush=True)
        time.sleep(30)  # the parent interrupts us here
        return out
    client.upload_part = slow_part
    with storage.staged_file(sys.argv[1]) as tmp:
        with open(tmp, "wb") as f:
            f.write(os.urandom(3 * storage.PART_BYTES))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_s3_upload_leaves_no_object_at_its_key(s3, tmp_path, sig):
    script = tmp_path / "upload.py"
    script.write_text(UPLOADER)
    key = f"up-{sig.name}/shard-00000.faiss"
    env = _env({storage.ENDPOINT_ENV: s3.endpoint})
    proc = subprocess.Popen(
        [sys.executable, str(script), s3.uri(key)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "part 1"  # one part is up, the upload is open
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert s3.keys(prefix=key) == []
    uploads = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=key).get("Uploads", [])
    if sig == signal.SIGINT:  # an exception: aborted; a kill leaves it to the bucket's lifecycle
        assert uploads == []


def test_s3_cache_keeps_only_the_versions_in_use(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default cache folder
    root = s3.uri(f"cached-{tmp_path.name}")
    names = [f"2026010{i}T000000.000000Z-aaaaaa" for i in range(1, 5)]
    copies = {}
    for v in names:
        vroot = versions.version_root(root, v)
        storage.write_bytes(storage.join(vroot, "manifest.json"), b"{}")
        storage.write_bytes(storage.join(vroot, "shard-00000.faiss"), v.encode())
        copies[v] = storage.local_copy(storage.join(vroot, "shard-00000.faiss"))
    for v in names[:3]:
        versions.set_current(root, v)
    # In use: the one loaded (names[3]), CURRENT (names[2]) and those CURRENT named recently.
    assert versions.evict_unused(root, names[3]) == []
    monkeypatch.setattr(versions, "RECENT_S", 0.0)
    evicted = versions.evict_unused(root, names[3])
    assert evicted == [versions.version_root(root, v) for v in names[:2]]
    assert [os.path.exists(copies[v]) for v in names] == [False, False, True, True]
    with open(copies[names[2]], "rb") as f:
        assert f.read() == names[2].encode()


def test_a_version_awaiting_its_gate_is_not_complete(tmp_path):
    """What a build killed while its gate runs leaves: manifest and PENDING. It is not
    complete, cannot become CURRENT, does not count toward keep, and goes after GRACE_S."""
    root = str(tmp_path)
    live, gated = "20260101T000000.000000Z-aaaaaa", "20260102T000000.000000Z-bbbbbb"
    for v in (live, gated):
        storage.write_bytes(storage.join(versions.version_root(root, v), "manifest.json"), b"{}")
    storage.write_bytes(storage.join(versions.version_root(root, gated), versions.PENDING), b"")
    versions.set_current(root, live)
    assert versions.list_versions(root) == {live: True, gated: False}
    with pytest.raises(ValueError, match="not complete"):
        versions.set_current(root, gated)
    assert versions.prune(root, 1, live) == [gated]  # made in 2026-01: past GRACE_S
    assert versions.current(root) == live
