"""Conditional writes, for the objects that racing writers share (CURRENT, the update log's
segments): create-if-absent and compare-and-swap, locally and on S3."""

from __future__ import annotations

import fcntl
import os
import uuid

from visual_search import storage


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write `data` to `uri` only if nothing is there yet, atomically; False when it exists.

    Two writers racing for one name: exactly one wins. Locally: a fsynced temp file hard-linked
    to the name (link fails on an existing name); on S3: a PUT with If-None-Match: * (412 when
    the key exists), through boto3, since pyarrow's S3 has no conditional write.
    """
    fs, path = storage.resolve(uri)
    if fs is storage._LOCAL:
        folder = os.path.dirname(path)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise storage._wrap(uri, exc) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    bucket, _, key = path.partition("/")
    try:
        storage._boto_s3().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except Exception as exc:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):  # 409: a concurrent conditional PUT of the same key
            return False
        raise storage._wrap(uri, exc) from exc


def _local_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def swap(uri: str, expected: bytes | None, data: bytes) -> bool:
    """Compare-and-swap: replace the object with `data` only while it still holds `expected`
    (None: while it does not exist); False when another writer changed it first.

    On S3: a PUT with If-Match on the ETag read (If-None-Match: * for None). Locally: the check
    and the atomic rename happen under an exclusive lock on a sibling lock file."""
    fs, path = storage.resolve(uri)
    if fs is storage._LOCAL:
        lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(lock, "a+b") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                if _local_bytes(path) != expected:
                    return False
                storage.write_bytes(uri, data)
                return True
        except OSError as exc:
            raise storage._wrap(uri, exc) from exc
    if expected is None:
        return create_exclusive(uri, data)
    bucket, _, key = path.partition("/")
    client = storage._boto_s3()
    try:
        obj = client.get_object(Bucket=bucket, Key=key)
        if obj["Body"].read() != expected:
            return False
        client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=obj["ETag"])
        return True
    except Exception as exc:
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (404, 409, 412):  # gone, or changed since it was read
            return False
        raise storage._wrap(uri, exc) from exc
