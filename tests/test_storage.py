"""visual_search.storage against a local folder and a real S3 protocol server (moto on 127.0.0.1).

The tests taking the ``base`` fixture run once per backend; the rest are local- or S3-only.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from visual_search import storage
from visual_search.storage import FileEntry, StorageError, TooLarge

# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["local", "s3"])
def root(request, tmp_path_factory):
    """The module's base URI on each backend: a temp folder, or s3://bucket/prefix-<uuid>."""
    if request.param == "local":
        yield str(tmp_path_factory.mktemp("storage"))
    else:
        server = request.getfixturevalue("s3")
        yield server.uri(f"prefix-{uuid.uuid4().hex}")


@pytest.fixture
def base(root):
    """A fresh, empty folder/prefix below ``root`` for one test."""
    return storage.join(root, uuid.uuid4().hex[:12])


@pytest.fixture
def s3_base(s3):
    return s3.uri(f"prefix-{uuid.uuid4().hex}")


def _table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array(range(100), pa.int64()),
            "name": pa.array([f"item-{i}" for i in range(100)]),
            "vec": pa.array([[float(i), float(-i)] for i in range(100)], pa.list_(pa.float32())),
        }
    )


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------ both backends


def test_bytes_roundtrip(base):
    uri = storage.join(base, "a", "b.bin")
    data = bytes(range(256)) * 1000
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.read_bytes(uri, max_bytes=len(data)) == data


def test_empty_object_roundtrip(base):
    uri = storage.join(base, "empty")
    storage.write_bytes(uri, b"")
    assert storage.read_bytes(uri) == b""
    assert storage.read_bytes(uri, max_bytes=0) == b""
    assert storage.list_files(base) == [FileEntry(uri, 0)]


def test_overwrite_replaces_content(base):
    uri = storage.join(base, "f.txt")
    storage.write_text(uri, "a much longer first version")
    storage.write_text(uri, "second")
    assert storage.read_text(uri) == "second"
    assert [e.size for e in storage.list_files(base)] == [6]


def test_read_bytes_max_bytes(base):
    uri = storage.join(base, "big.bin")
    storage.write_bytes(uri, b"x" * 1001)
    with pytest.raises(TooLarge) as exc:
        storage.read_bytes(uri, max_bytes=1000)
    assert isinstance(exc.value, StorageError)
    assert uri in str(exc.value)
    assert storage.read_bytes(uri, max_bytes=1001) == b"x" * 1001


def test_read_missing_names_uri(base):
    uri = storage.join(base, "nope", "missing.bin")
    for read in (
        storage.read_bytes,
        storage.read_text,
        storage.read_json,
        storage.read_parquet,
        storage.parquet_num_rows,
        storage.check_readable,
    ):
        with pytest.raises(StorageError) as exc:
            read(uri)
        assert uri in str(exc.value), read.__name__


def test_list_files(base):
    names = ["b.jpg", "a.JPG", "sub/c.png", "sub/deeper/d.Jpeg", "sub/e.txt", "Z.jpg"]
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(base, name), b"x" * (i + 1))
    sizes = {storage.join(base, name): i + 1 for i, name in enumerate(names)}

    entries = storage.list_files(base)
    assert [e.uri for e in entries] == sorted(sizes)
    assert all(e.size == sizes[e.uri] for e in entries)
    if storage.is_s3(base):
        assert all(e.uri.startswith(base + "/") for e in entries)

    images = storage.list_files(base, suffixes=(".jpg", ".jpeg", ".png"))
    assert [e.uri for e in images] == sorted(u for u in sizes if not u.endswith(".txt"))
    assert [e.uri for e in storage.list_files(base, suffixes=(".txt",))] == [
        storage.join(base, "sub/e.txt")
    ]

    # A trailing slash and a subfolder both work; the URIs keep the caller's base.
    assert storage.list_files(base + "/") == entries
    assert [e.uri for e in storage.list_files(storage.join(base, "sub"))] == [
        storage.join(base, "sub/c.png"),
        storage.join(base, "sub/deeper/d.Jpeg"),
        storage.join(base, "sub/e.txt"),
    ]


def test_list_files_missing_folder(base):
    uri = storage.join(base, "no-such-folder")
    with pytest.raises(StorageError) as exc:
        storage.list_files(uri)
    assert uri in str(exc.value)


def test_exists_and_is_dir(base):
    file_uri = storage.join(base, "dir", "f.txt")
    storage.write_text(file_uri, "hi")
    assert storage.exists(file_uri) and not storage.is_dir(file_uri)
    dir_uri = storage.join(base, "dir")
    assert storage.exists(dir_uri) and storage.is_dir(dir_uri)
    missing = storage.join(base, "missing")
    assert not storage.exists(missing) and not storage.is_dir(missing)
    assert storage.check_readable(file_uri).size == 2
    assert storage.check_readable(dir_uri).type == pafs.FileType.Directory


def test_json_roundtrip(base):
    uri = storage.join(base, "meta.json")
    obj = {"z": [1, 2.5, None], "a": {"nested": "ünïcode"}, "n": 3}
    storage.write_json(uri, obj)
    assert storage.read_json(uri) == obj
    text = storage.read_text(uri)
    assert text.endswith("\n") and text.index('"a"') < text.index('"z"')
    assert json.loads(storage.read_bytes(uri)) == obj


def test_parquet_roundtrip(base):
    uri = storage.join(base, "part-0000.parquet")
    table = _table()
    storage.write_parquet(uri, table)
    assert storage.read_parquet(uri).equals(table)
    assert storage.read_parquet(uri, columns=["name"]).equals(table.select(["name"]))
    assert storage.parquet_num_rows(uri) == 100


def test_parquet_corrupt(base):
    uri = storage.join(base, "bad.parquet")
    storage.write_bytes(uri, b"this is not parquet")
    for read in (storage.read_parquet, storage.parquet_num_rows):
        with pytest.raises(StorageError) as exc:
            read(uri)
        assert uri in str(exc.value)


def test_delete(base):
    a = storage.join(base, "a.txt")
    sub = storage.join(base, "sub")
    storage.write_text(a, "a")
    storage.write_text(storage.join(sub, "b.txt"), "b")
    storage.write_text(storage.join(sub, "deep", "c.txt"), "c")

    storage.delete(a)
    assert not storage.exists(a)
    storage.delete(sub)  # a folder/prefix goes with everything below it
    assert not storage.exists(sub)
    assert not storage.exists(storage.join(sub, "deep", "c.txt"))

    storage.delete(a)  # missing_ok by default
    with pytest.raises(StorageError) as exc:
        storage.delete(a, missing_ok=False)
    assert a in str(exc.value)


def test_check_writable(base):
    storage.check_writable(base)  # on a folder/prefix that does not exist yet
    storage.write_text(storage.join(base, "keep.txt"), "k")
    storage.check_writable(base)
    assert [e.uri for e in storage.list_files(base)] == [storage.join(base, "keep.txt")]


def test_check_readable_missing(base):
    uri = storage.join(base, "missing.bin")
    with pytest.raises(StorageError, match="not found") as exc:
        storage.check_readable(uri)
    assert uri in str(exc.value)


def test_local_copy(base, tmp_path, monkeypatch):
    uri = storage.join(base, "blob.bin")
    data = os.urandom(3000)
    storage.write_bytes(uri, data)
    cache = tmp_path / "cache"
    path = storage.local_copy(uri, cache_dir=str(cache))
    with open(path, "rb") as f:
        assert f.read() == data
    assert storage.local_copy(uri, cache_dir=str(cache)) == path
    if storage.is_s3(base):
        assert path.startswith(str(cache) + os.sep)
        assert not [n for _, _, names in os.walk(cache) for n in names if ".tmp-" in n]
        # Without cache_dir it lands under the temp folder.
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        default = storage.local_copy(uri)
        assert default.startswith(str(tmp_path / "tmp" / "visual_search-cache"))
        with open(default, "rb") as f:
            assert f.read() == data
    else:
        assert path == uri  # local objects are not copied

    missing = storage.join(base, "missing.bin")
    with pytest.raises(StorageError) as exc:
        storage.local_copy(missing, cache_dir=str(cache))
    assert missing in str(exc.value)


def test_join_normalize_parent(base):
    assert storage.join(base, "a", "/b/", "c.txt") == f"{base}/a/b/c.txt"
    assert storage.join(base + "/", "x") == f"{base}/x"
    assert storage.normalize(base + "/") == base
    assert storage.normalize(storage.join(base, "a") + "/") == f"{base}/a"
    assert storage.parent(storage.join(base, "a", "b.txt")) == f"{base}/a"
    assert storage.parent(storage.join(base, "a") + "/") == base
    assert storage.is_s3(base) == base.startswith("s3://")


# ------------------------------------------------------------------------------ local-only


def test_local_file_uris(tmp_path):
    folder = tmp_path / "data"
    uri = f"file://{folder}/x/y.txt"
    storage.write_text(uri, "via file://")
    assert (folder / "x" / "y.txt").read_text() == "via file://"
    assert storage.read_text(str(folder / "x" / "y.txt")) == "via file://"
    assert storage.read_text(uri) == "via file://"
    assert storage.exists(f"file://{folder}/x") and storage.is_dir(f"file://{folder}/x")
    assert storage.normalize(uri) == str(folder / "x" / "y.txt")
    # Listing a file:// folder gives canonical (plain path) URIs.
    assert storage.list_files(f"file://{folder}") == [FileEntry(str(folder / "x" / "y.txt"), 11)]


def test_local_relative_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_text("rel/a.txt", "r")
    assert (tmp_path / "rel" / "a.txt").read_text() == "r"
    assert storage.normalize("rel/a.txt") == str(tmp_path / "rel" / "a.txt")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.normalize("~/rel/a.txt") == str(tmp_path / "rel" / "a.txt")
    assert storage.read_text("~/rel/a.txt") == "r"


def test_local_atomic_write_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "out" / "f.bin")
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second, longer")
    storage.write_json(str(tmp_path / "out" / "m.json"), {"a": 1})
    storage.write_parquet(str(tmp_path / "out" / "t.parquet"), _table())
    assert sorted(os.listdir(tmp_path / "out")) == ["f.bin", "m.json", "t.parquet"]
    assert (tmp_path / "out" / "f.bin").read_bytes() == b"second, longer"


def test_local_failed_write_cleans_up(tmp_path):
    target = tmp_path / "target"
    target.mkdir()  # os.replace onto a non-empty folder fails after the temp file is written
    (target / "child").write_text("c")
    with pytest.raises(StorageError) as exc:
        storage.write_bytes(str(target), b"data")
    assert str(target) in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == ["target"]
    assert sorted(os.listdir(target)) == ["child"]


def test_local_write_under_a_file_fails(tmp_path):
    (tmp_path / "file").write_text("x")
    uri = str(tmp_path / "file" / "sub")
    with pytest.raises(StorageError) as exc:
        storage.write_bytes(storage.join(uri, "a.bin"), b"x")
    assert uri in str(exc.value)
    with pytest.raises(StorageError) as exc:
        storage.check_writable(uri)
    assert uri in str(exc.value)


def test_local_copy_rejects_folder(tmp_path):
    with pytest.raises(StorageError):
        storage.local_copy(str(tmp_path))


@pytest.mark.parametrize("uri", ["gs://bucket/key", "http://example.com/x", "S3://b/k"])
def test_unsupported_scheme(uri):
    for call in (storage.resolve, storage.read_bytes, storage.exists, storage.list_files):
        with pytest.raises(StorageError, match="unsupported URI scheme") as exc:
            call(uri)
        assert uri in str(exc.value)
    with pytest.raises(StorageError):
        storage.write_bytes(uri, b"x")


def test_parent_of_top_level_local_path():
    assert storage.parent("/a") == "/"


# ------------------------------------------------------------------------------ endpoints


def test_endpoint_precedence(monkeypatch):
    for key in storage._ENDPOINT_ENVS:
        monkeypatch.delenv(key, raising=False)
    assert storage.s3_endpoint() is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert storage.s3_endpoint() == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3specific:2")
    assert storage.s3_endpoint() == "http://s3specific:2"
    monkeypatch.setenv(storage.ENDPOINT_ENV, "http://ours:3")
    assert storage.s3_endpoint() == "http://ours:3"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = storage.storage_env()
    assert env[storage.ENDPOINT_ENV] == "http://ours:3"
    assert env["AWS_ENDPOINT_URL"] == "http://generic:1"
    assert env["AWS_REGION"] == "eu-west-1"
    assert "AWS_SECRET_ACCESS_KEY" not in env


def test_configure_sets_and_clears_env(monkeypatch):
    monkeypatch.delenv(storage.ENDPOINT_ENV, raising=False)
    try:
        storage.configure(s3_endpoint="http://127.0.0.1:9")
        assert os.environ[storage.ENDPOINT_ENV] == "http://127.0.0.1:9"
        storage.configure(None)
        assert storage.ENDPOINT_ENV not in os.environ
    finally:
        storage.configure(None)


# --------------------------------------------------------------------------------- S3-only


def test_s3_objects_are_real(s3, s3_base):
    """What pyarrow writes, boto3 reads, and the other way round."""
    key_prefix = s3_base[len(f"s3://{s3.bucket}/") :]
    storage.write_bytes(storage.join(s3_base, "dir", "a.bin"), b"from pyarrow")
    storage.write_parquet(storage.join(s3_base, "t.parquet"), _table())
    expected = [f"{key_prefix}/dir/a.bin", f"{key_prefix}/t.parquet"]
    assert s3.keys(prefix=key_prefix + "/") == expected
    body = s3.client.get_object(Bucket=s3.bucket, Key=f"{key_prefix}/dir/a.bin")["Body"].read()
    assert body == b"from pyarrow"

    s3.client.put_object(Bucket=s3.bucket, Key=f"{key_prefix}/dir/b.txt", Body=b"from boto3")
    assert storage.read_bytes(storage.join(s3_base, "dir", "b.txt")) == b"from boto3"
    assert storage.list_files(storage.join(s3_base, "dir")) == [
        FileEntry(storage.join(s3_base, "dir", "a.bin"), 12),
        FileEntry(storage.join(s3_base, "dir", "b.txt"), 10),
    ]


def test_s3_check_writable_leaves_no_probe(s3, s3_base):
    storage.check_writable(s3_base)
    prefix = s3_base[len(f"s3://{s3.bucket}/") :]
    assert not [k for k in s3.keys(prefix=prefix) if "write-probe" in k]


def test_s3_list_bucket_root(s3):
    bucket = s3.new_bucket()
    storage.write_bytes(f"s3://{bucket}/x/1.jpg", b"1")
    storage.write_bytes(f"s3://{bucket}/2.jpg", b"22")
    expected = [FileEntry(f"s3://{bucket}/2.jpg", 2), FileEntry(f"s3://{bucket}/x/1.jpg", 1)]
    assert storage.list_files(f"s3://{bucket}") == expected
    assert storage.list_files(f"s3://{bucket}/") == expected
    assert storage.is_dir(f"s3://{bucket}")


def test_s3_missing_bucket(s3):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    for uri in (f"s3://{bucket}", f"s3://{bucket}/some/key.bin"):
        with pytest.raises(StorageError) as exc:
            storage.check_readable(uri)
        assert uri in str(exc.value)
    uri = f"s3://{bucket}/prefix"
    for call in (storage.list_files, storage.check_writable, storage.read_bytes):
        with pytest.raises(StorageError) as exc:
            call(uri)
        assert uri in str(exc.value), call.__name__


def test_s3_uri_needs_bucket(s3):
    for uri in ("s3://", "s3:///"):
        with pytest.raises(StorageError, match="needs a bucket"):
            storage.resolve(uri)


def test_s3_normalize_and_parent(s3):
    assert storage.normalize("s3://b/k/") == "s3://b/k"
    assert storage.normalize("s3://b/") == "s3://b"
    assert storage.parent("s3://b/k") == "s3://b"
    assert storage.parent("s3://b") == "s3://b"


def test_s3_local_copy_is_atomic_and_cached(s3, s3_base, tmp_path):
    uri = storage.join(s3_base, "sub", "obj.bin")
    storage.write_bytes(uri, b"v1")
    cache = str(tmp_path)
    path = storage.local_copy(uri, cache_dir=cache)
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]
    assert storage.local_copy(uri, cache_dir=cache) == path  # cached, not fetched again
    time.sleep(1.1)  # a new mtime for the overwrite
    storage.write_bytes(uri, b"version 2")
    fresh = storage.local_copy(uri, cache_dir=cache)
    assert fresh != path
    with open(fresh, "rb") as f:
        assert f.read() == b"version 2"
    storage.delete(uri)
    with pytest.raises(StorageError, match="not found"):
        storage.local_copy(uri, cache_dir=cache)


def test_s3_local_copy_distinct_keys_do_not_collide(s3, s3_base, tmp_path):
    one, two = storage.join(s3_base, "a", "b"), storage.join(s3_base, "a__b")
    storage.write_bytes(one, b"one")
    storage.write_bytes(two, b"two")
    with open(storage.local_copy(one, cache_dir=str(tmp_path)), "rb") as f:
        assert f.read() == b"one"
    with open(storage.local_copy(two, cache_dir=str(tmp_path)), "rb") as f:
        assert f.read() == b"two"


def test_s3_dead_endpoint_fails_naming_uri(s3):
    uri = s3.uri("some", "key.bin")
    storage.configure(s3_endpoint=f"http://127.0.0.1:{_closed_port()}")
    try:
        for call in (storage.check_readable, storage.read_bytes, storage.list_files):
            start = time.monotonic()
            with pytest.raises(StorageError) as exc:
                call(uri)
            assert time.monotonic() - start < 10
            assert uri in str(exc.value)
        with pytest.raises(StorageError) as exc:
            storage.write_bytes(uri, b"x")
        assert uri in str(exc.value)
    finally:
        storage.configure(s3_endpoint=s3.endpoint)
    assert not storage.exists(uri)  # back on the moto server


def test_s3_endpoint_without_scheme(s3):
    uri = s3.uri("key.bin")
    storage.configure(s3_endpoint=f"localhost:{_closed_port()}")
    try:
        with pytest.raises(StorageError) as exc:
            storage.check_readable(uri)
        assert uri in str(exc.value)
    finally:
        storage.configure(s3_endpoint=s3.endpoint)
