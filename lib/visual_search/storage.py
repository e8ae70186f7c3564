"""URIs (local paths, file://, s3://) mapped onto pyarrow.fs; listing, reads and atomic writes.

S3-compatible servers are reached by setting an endpoint: ``configure(s3_endpoint=...)``, the
``VISUAL_SEARCH_S3_ENDPOINT`` environment variable, or the AWS standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``. Credentials come from the usual AWS chain (environment, profile, instance
role), never from this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ENDPOINT_ENV = "VISUAL_SEARCH_S3_ENDPOINT"
_ENDPOINT_ENVS = (ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(OSError):
    """An I/O failure, with the URI it concerns in the message."""


@dataclass(frozen=True)
class FileEntry:
    uri: str
    size: int


def configure(s3_endpoint: str | None) -> None:
    """Point s3:// URIs at an S3-compatible endpoint (process-wide; workers inherit the env)."""
    if s3_endpoint:
        os.environ[ENDPOINT_ENV] = s3_endpoint
    else:
        os.environ.pop(ENDPOINT_ENV, None)
    _s3.cache_clear()


def s3_endpoint() -> str | None:
    return next((os.environ[k] for k in _ENDPOINT_ENVS if os.environ.get(k)), None)


def storage_env() -> dict[str, str]:
    """Environment variables a Ray worker needs to see the same storage as this process."""
    keys = (*_ENDPOINT_ENVS, "AWS_REGION", "AWS_DEFAULT_REGION")
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {
        # AWS "standard" retry mode with its default of 3 attempts: transient errors are retried,
        # while a dead endpoint or refused credentials still fail within seconds.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        "connect_timeout": 10,
        "request_timeout": 60,
        # Small writes (CURRENT, manifests) become one PUT; only files over the part size go
        # through a multipart upload (which S3 also completes atomically).
        "allow_delayed_open": True,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["region"] = region or "us-east-1"
        # Most S3-compatible servers only understand path-style addressing.
        kwargs["force_virtual_addressing"] = False
    elif region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


_LOCAL = pafs.LocalFileSystem()


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI to (filesystem, path within it)."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: an s3 URI needs a bucket")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        try:
            return _s3(s3_endpoint(), region), path
        except Exception as exc:
            raise StorageError(f"{uri}: cannot reach S3 endpoint {s3_endpoint()!r}: {exc}") from exc
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return _LOCAL, os.path.abspath(os.path.expanduser(uri))


def normalize(uri: str) -> str:
    """Canonical spelling: absolute local path, or s3://bucket/key without a trailing slash."""
    _, path = resolve(uri)
    return f"s3://{path}" if is_s3(uri) else path


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def parent(uri: str) -> str:
    """The folder/prefix holding uri ("/" for a top-level local path, the bucket on S3)."""
    norm = normalize(uri)
    head, _, _ = norm.rpartition("/")
    if is_s3(norm):
        return head if head != "s3:/" else norm
    return head or "/"


def _wrap(uri: str, exc: Exception) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    return StorageError(f"{uri}: {type(exc).__name__}: {exc}".replace("\n", " "))


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except Exception as exc:
        raise _wrap(uri, exc) from exc


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[FileEntry]:
    """All files below a folder/prefix, recursively, sorted by URI; suffixes are lower-case."""
    fs, path = resolve(uri)
    base = normalize(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=False))
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such folder or prefix") from exc
    except Exception as exc:
        raise _wrap(uri, exc) from exc
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        if suffixes and not fi.base_name.lower().endswith(suffixes):
            continue
        rel = fi.path[len(path) :].lstrip("/")
        out.append(FileEntry(join(base, rel), fi.size))
    out.sort(key=lambda e: e.uri)
    return out


class TooLarge(StorageError):
    """The object is larger than the caller allowed."""


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """Whole object; raises TooLarge (without reading it all) past max_bytes."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            if max_bytes is None:
                return f.read()
            data = f.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: not found") from exc
    except Exception as exc:
        raise _wrap(uri, exc) from exc
    if len(data) > max_bytes:
        raise TooLarge(f"{uri}: larger than {max_bytes} bytes")
    return data


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str):
    return json.loads(read_text(uri))


def sha256_file(path: str) -> str:
    """The hex sha256 of a local file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old object or the whole new one, never a part.

    Locally: temp file in the same folder, fsync, rename. On S3: one PUT (or a multipart upload,
    which becomes visible only when completed).
    """
    fs, path = resolve(uri)
    try:
        if fs is _LOCAL:
            with staged_file(uri) as tmp, open(tmp, "wb") as f:
                f.write(data)
        else:
            _upload(path, io.BytesIO(data))
    except Exception as exc:
        raise _wrap(uri, exc) from exc


PART_BYTES = 8 << 20  # S3 parts are at least 5 MiB (the last one excepted)


def _upload(path: str, src) -> None:
    """Upload a binary stream to bucket/key: one PUT when it fits in a part, else a multipart
    upload that is completed only after its last part, and aborted on any error or interrupt.

    pyarrow's S3 output stream completes the upload when closed, even on an exception, which
    would publish a truncated object at the final key; hence boto3 here."""
    bucket, _, key = path.partition("/")
    client = _boto_s3()
    first = src.read(PART_BYTES)
    if len(first) < PART_BYTES:
        client.put_object(Bucket=bucket, Key=key, Body=first)
        return
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts, chunk = [], first
        while chunk:
            n = len(parts) + 1
            r = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=chunk
            )
            parts.append({"PartNumber": n, "ETag": r["ETag"]})
            chunk = src.read(PART_BYTES)
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        with contextlib.suppress(Exception):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        raise


@contextlib.contextmanager
def staged_file(uri: str):
    """Yield a local path to write a large file to; on success it becomes `uri` atomically.

    Locally the file is written next to its destination and renamed; on S3 it is uploaded in
    parts (the object appears only when the upload completes). On error nothing is published.
    """
    fs, path = resolve(uri)
    if fs is _LOCAL:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = os.path.join(tmpdir, os.path.basename(path))
        yield tmp
        try:
            with open(tmp, "rb") as src:
                _upload(path, src)
        except Exception as exc:
            raise _wrap(uri, exc) from exc


@functools.lru_cache(maxsize=4)
def _boto_client(endpoint: str | None, region: str | None):
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10)
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _boto_s3():
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return _boto_client(s3_endpoint(), region)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(uri: str, table: pa.Table) -> None:
    """Atomic Parquet write (buffered in memory; files here are partition-sized)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = resolve(uri)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except Exception as exc:
        raise _wrap(uri, exc) from exc


def _parquet_footer(uri: str) -> pq.FileMetaData:
    fs, path = resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata
    except Exception as exc:
        raise _wrap(uri, exc) from exc


def parquet_num_rows(uri: str) -> int:
    """Row count from the footer, without reading the data."""
    return _parquet_footer(uri).num_rows


def parquet_columns(uri: str) -> list[str]:
    """Column names from the footer, without reading the data."""
    return _parquet_footer(uri).schema.to_arrow_schema().names


def delete(uri: str, missing_ok: bool = True) -> None:
    fs, path = resolve(uri)
    try:
        fi = fs.get_file_info(path)
        if fi.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif fi.type == pafs.FileType.File:
            fs.delete_file(path)
        elif not missing_ok:
            raise StorageError(f"{uri}: not found")
    except FileNotFoundError as exc:
        if not missing_ok:  # else: another writer deleted it since get_file_info
            raise _wrap(uri, exc) from exc
    except Exception as exc:
        raise _wrap(uri, exc) from exc


def check_readable(uri: str) -> pafs.FileInfo:
    """Fail fast, naming the URI, when it is missing or the bucket/credentials refuse access."""
    fi = info(uri)
    if fi.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: not found")
    return fi


def check_writable(uri: str) -> None:
    """Prove that a folder/prefix accepts writes by writing and deleting a probe object."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    delete(probe)


CACHE_DIR = "visual_search-cache"


def _cache_path(uri: str, cache_dir: str | None) -> str:
    """Where copies of objects under `uri` live: the cache mirrors the bucket's key layout (one
    folder per endpoint), so a version's copies can be evicted as one folder."""
    _, path = resolve(uri)
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"{uri}: a key with empty, '.' or '..' parts cannot be cached")
    endpoint = hashlib.sha256(str(s3_endpoint()).encode()).hexdigest()[:12]
    base = cache_dir or os.path.join(tempfile.gettempdir(), CACHE_DIR)
    return os.path.join(base, endpoint, *parts)


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local file path holding the object (the path itself for local URIs)."""
    fs, path = resolve(uri)
    if fs is _LOCAL:
        if not os.path.isfile(path):
            raise StorageError(f"{uri}: not found")
        return path
    fi = check_readable(uri)
    folder, name = os.path.split(_cache_path(uri, cache_dir))
    # Named by size and mtime too: a changed object gets a fresh copy.
    stamp = hashlib.sha256(f"{fi.size}|{fi.mtime_ns}".encode()).hexdigest()[:16]
    dest = os.path.join(folder, f"{stamp}-{name}")
    if not os.path.exists(dest):
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        try:
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
            os.replace(tmp, dest)
        except Exception as exc:
            raise _wrap(uri, exc) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def evict_cache(prefix: str, keep: set[str], cache_dir: str | None = None) -> list[str]:
    """Delete the local copies of objects under the S3 `prefix` except those below the child
    URIs in `keep`; returns the children evicted. Copies in use stay readable (POSIX keeps an
    open or memory-mapped file until it is closed)."""
    if not is_s3(prefix):
        return []
    folder = _cache_path(prefix, cache_dir)
    if not os.path.isdir(folder):
        return []
    kept = {normalize(u) for u in keep}
    gone = []
    for name in sorted(os.listdir(folder)):
        child = join(normalize(prefix), name)
        if child not in kept and os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            gone.append(child)
    return gone
