"""An in-process S3 server (moto) on 127.0.0.1 for tests, wired into ``visual_search.storage``.

Usage::

    from s3server import S3Server

    with S3Server() as s3:
        storage.write_bytes(f"s3://{s3.bucket}/key", b"data")
        s3.client.get_object(Bucket=s3.bucket, Key="key")

While it runs, the process has fake AWS credentials in its environment and ``storage`` points
s3:// URIs at the server; on exit the environment and the storage endpoint are put back as they
were. Everything stays on the loopback interface.
"""

from __future__ import annotations

import logging
import os
import uuid

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from visual_search import storage

REGION = "us-east-1"

# Fake credentials, and nothing that could send requests anywhere but the local server.
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
_UNSET = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class S3Server:
    """moto's S3 on 127.0.0.1:<free port>, with one bucket (``bucket``) made at start.

    Attributes once started: ``endpoint`` ("http://127.0.0.1:PORT"), ``port``, ``bucket`` and
    ``client`` (a boto3 S3 client for the server, to check what pyarrow wrote independently).
    """

    def __init__(self, bucket: str | None = None):
        self._first_bucket = bucket
        self._server: ThreadedMotoServer | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_endpoint: str | None = None
        self._saved_log_level: int | None = None
        self._buckets: list[str] = []
        self.port: int | None = None
        self.endpoint: str | None = None
        self.bucket: str | None = None
        self.client = None

    def start(self) -> S3Server:
        if self._server is not None:
            raise RuntimeError("S3Server already started")
        for key in (*_ENV, *_UNSET):
            self._saved_env[key] = os.environ.get(key)
        os.environ.update(_ENV)
        for key in _UNSET:
            os.environ.pop(key, None)
        self._saved_endpoint = os.environ.get(storage.ENDPOINT_ENV)
        # One line per request from werkzeug would drown any test output; keep warnings.
        log = logging.getLogger("werkzeug")
        self._saved_log_level = log.level
        log.setLevel(logging.WARNING)
        try:
            # Port 0: the OS picks a free port, read back once the socket is bound (no race).
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            host, self.port = self._server.get_host_and_port()
            self.endpoint = f"http://{host}:{self.port}"
            storage.configure(s3_endpoint=self.endpoint)
            self.client = boto3.client(
                "s3",
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id=_ENV["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=_ENV["AWS_SECRET_ACCESS_KEY"],
                config=Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=30),
            )
            self.bucket = self.new_bucket(self._first_bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def new_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name unless given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        self._buckets.append(name)
        return name

    def keys(self, bucket: str | None = None, prefix: str = "") -> list[str]:
        """All object keys under a prefix, as boto3 (not pyarrow) sees them."""
        paginator = self.client.get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=bucket or self.bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(out)

    def uri(self, *parts: str, bucket: str | None = None) -> str:
        return storage.join(f"s3://{bucket or self.bucket}", *parts)

    def _drop_buckets(self) -> None:
        # moto keeps its state process-wide; remove what this server made (best effort).
        for name in self._buckets:
            try:
                for key in self.keys(name):
                    self.client.delete_object(Bucket=name, Key=key)
                self.client.delete_bucket(Bucket=name)
            except Exception:
                pass
        self._buckets.clear()

    def stop(self) -> None:
        if self.client is not None:
            self._drop_buckets()
            self.client.close()
            self.client = None
        if self._server is not None:
            if self.port is not None:
                self._server.stop()
            self._server = None
        storage.configure(self._saved_endpoint)
        if self._saved_log_level is not None:
            logging.getLogger("werkzeug").setLevel(self._saved_log_level)
            self._saved_log_level = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
