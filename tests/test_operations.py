"""The operational paths end to end: `ray job submit` to a real head node, Serve on it, S3.

One head node for the module (`ray start --head --block` in its own session, own --temp-dir and
ports, token auth on with a per-run token), and one moto S3 server on 127.0.0.1 started before it,
so the head and every worker inherit the fake credentials from their environment the way cluster
nodes get theirs (instance role); the S3 endpoint is not in the head's environment: the job gets it
from `--s3-endpoint`, the Serve replicas from the app's `s3_endpoint` argument.

Covered: the runbook's re-index submitted to the head, with local paths, and with catalog,
embeddings, index versions and CURRENT all on s3://; a failing job (exit status and log); the
library shipped with the job (py_modules) and a small working_dir upload; the new S3 index served
by `serve run` on the same head: /search, product images read through S3, path-escape attempts
refused, replicas on the shipped library; large index files uploaded to S3 in parts; a dead S3
endpoint failing the re-index in seconds.

Teardown kills exactly the processes of the head's session (never `ray stop`, which would stop
every Ray on the machine) and removes its temp dir, which holds its `ray_current_cluster`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
import requests
import yaml
from conftest import draw_product
from ports import free_port
from s3server import S3Server

from jobs import reindex
from visual_search import index, storage, versions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: its python, ray and serve
PY_MODULES = json.dumps({"py_modules": ["lib/visual_search"]})  # relative to REPO (the cwd)
N_PRODUCTS = 12
SIZE = (160, 120)
JOB_TIMEOUT = 300  # seconds for one `ray job submit` to finish
READY_TIMEOUT = 240  # seconds for the head or the Serve apps to come up
AGENT_TIMEOUT = 120  # seconds for the head's job agent to accept a first submission
# Where the S3 endpoint may hide in an environment: neither the head nor the CLIs have it.
ENDPOINT_ENVS = (storage.ENDPOINT_ENV, "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# Only the head has credentials (as a cloud node has its instance role), the operator's CLIs not.
CREDENTIAL_ENVS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{name}/stat").read_text()
                if os.getsid(int(name)) == sid and stat.rpartition(")")[2].split()[0] != "Z":
                    out.append(int(name))
    return out


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a CLI in its own session from the repo root; on timeout kill its whole group."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


class Head:
    """A Ray head node started with `ray start --head --block` in a session of its own."""

    def __init__(self):
        # Short path: Ray's Unix sockets live below it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="vs-ray-", dir="/tmp")
        self.dashboard_port = free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if k not in (*ENDPOINT_ENVS, "RAY_ADDRESS")}
        env.update(
            {
                # The job's `python` is whatever the head's PATH names first.
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token,  # this run's token, not ~/.ray/auth_token
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        self.env = env
        self.log_path = Path(self.temp_dir) / "head.log"
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        with open(self.log_path, "w") as log:
            # A new session: every process of this head (workers included) carries its id.
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.gcs_address: str | None = None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        address_file = Path(self.temp_dir) / "ray_current_cluster"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited:\n{self.log_path.read_text()[-4000:]}")
            if address_file.exists() and address_file.read_text().strip():
                with contextlib.suppress(requests.RequestException):
                    if self.api("/api/jobs/").status_code == 200:
                        self.gcs_address = address_file.read_text().strip()
                        return
            time.sleep(1)
        raise RuntimeError(f"head not ready in {READY_TIMEOUT}s:\n{self.log_path.read_text()}")

    def api(self, path: str, token: str | None = "", **kw) -> requests.Response:
        """GET on the dashboard's REST API, with this head's token unless told otherwise."""
        token = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.get(self.dashboard + path, headers=headers, timeout=30, **kw)

    def cli(self, *args: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
        """`ray ...` or `serve ...` as an operator would type it (token auth, venv first)."""
        drop = (*ENDPOINT_ENVS, *CREDENTIAL_ENVS, "RAY_ADDRESS")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update({k: self.env[k] for k in ("PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
        return _run([str(BIN / args[0]), *args[1:]], env, timeout)

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        # Right after start the dashboard may not have its job agent yet ("No available agent
        # to submit job, please try again later"): no job was created then, so try again.
        deadline = time.monotonic() + AGENT_TIMEOUT
        while True:
            r = self.cli(
                "ray", "job", "submit", "--address", self.dashboard,
                "--submission-id", submission_id,
                "--working-dir", ".", "--runtime-env-json", PY_MODULES,
                "--", *entrypoint,
            )  # fmt: skip
            if "No available agent" not in r.stdout or time.monotonic() > deadline:
                return r
            time.sleep(2)

    def job_logs(self, submission_id: str) -> str:
        r = self.cli("ray", "job", "logs", "--address", self.dashboard, submission_id, timeout=120)
        assert r.returncode == 0, r.stdout[-4000:]
        return r.stdout

    def runtime_resources(self, kind: str) -> list[Path]:
        """Unpacked runtime_env packages of a kind (working_dir_files, py_modules_files)."""
        root = Path(self.temp_dir) / "session_latest" / "runtime_resources" / kind
        return sorted(p for p in root.glob("_ray_pkg_*") if p.is_dir())

    def processes(self, pattern: str) -> list[int]:
        out = []
        for pid in _session_pids(self.proc.pid):
            with contextlib.suppress(OSError):
                if pattern in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    out.append(pid)
        return out

    def stop(self) -> None:
        """Kill every process of this head's session (SIGTERM would drain for 30 s first)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = _session_pids(self.proc.pid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=0.5)
            time.sleep(0.5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        # ray start wrote its address into --temp-dir; guard the default file all the same.
        default_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if self.gcs_address and default_file.read_text().strip() == self.gcs_address:
                default_file.unlink()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def head(s3):
    # After s3: the head inherits the fake credentials (and nothing else of the server).
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()
    assert not _session_pids(h.proc.pid), "processes of the head survived teardown"


class Catalog:
    """N_PRODUCTS generated photos and a catalog table, in a local folder and on S3."""

    def __init__(self, root: Path, s3: S3Server):
        self.files: dict[str, bytes] = {}  # product id -> image bytes
        rows = []
        (root / "images").mkdir()
        for i in range(N_PRODUCTS):
            pid = f"p{i:02d}"
            buf = io.BytesIO()
            draw_product(500 + i, SIZE).save(buf, format="PNG")
            self.files[pid] = buf.getvalue()
            (root / "images" / f"{pid}.png").write_bytes(buf.getvalue())
            storage.write_bytes(s3.uri("shop", "images", f"{pid}.png"), buf.getvalue())
            rows.append(
                {
                    "product_id": pid,
                    "image_uri": f"images/{pid}.png",
                    "title": f"Product {i}",
                    "category": "even" if i % 2 == 0 else "odd",
                }
            )
        self.local = str(root / "catalog.parquet")
        self.uri = s3.uri("shop", "catalog.parquet")
        for uri in (self.local, self.uri):
            storage.write_parquet(uri, pa.Table.from_pylist(rows))


@pytest.fixture(scope="module")
def shop(s3, tmp_path_factory):
    return Catalog(tmp_path_factory.mktemp("ops_catalog"), s3)


@pytest.fixture(scope="module")
def reindex_job(head, shop, s3):
    """The runbook's re-index, with catalog, embeddings, index versions and CURRENT on s3://."""
    submission = f"vs-reindex-{secrets.token_hex(4)}"
    r = head.submit(
        submission,
        "python", "jobs/reindex.py", "--catalog", shop.uri, "--index-root", s3.uri("index"),
        "--shards", "2", "--s3-endpoint", s3.endpoint,
    )  # fmt: skip
    return {"result": r, "id": submission, "index_root": s3.uri("index")}


def _apps(head: Head) -> dict:
    r = head.api("/api/serve/applications/")
    r.raise_for_status()
    return r.json().get("applications") or {}


@pytest.fixture(scope="module")
def service(head, reindex_job, s3, tmp_path_factory):
    """The new S3 index served from the head by `serve run --non-blocking` of a config file."""
    assert reindex_job["result"].returncode == 0, reindex_job["result"].stdout[-4000:]
    port = free_port()
    config = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "visual_search",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {
                    "index_root": reindex_job["index_root"],
                    "s3_endpoint": s3.endpoint,
                    "embedder_cpus": 0.5,
                    "shard_cpus": 0.1,
                    "ingress_cpus": 0.1,
                },
            }
        ],
    }
    config_path = tmp_path_factory.mktemp("ops_serve") / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    r = head.cli(
        "serve", "run", "--non-blocking", "--address", head.gcs_address,
        "--working-dir", ".", "--runtime-env-json", PY_MODULES, str(config_path),
        timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while (status := _apps(head).get("visual_search", {}).get("status")) != "RUNNING":
            assert status != "DEPLOY_FAILED", json.dumps(_apps(head), indent=1)[-6000:]
            assert time.monotonic() < deadline, f"Serve app not running: {status}"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        r = head.cli("serve", "shutdown", "--address", head.dashboard, "--yes", timeout=120)
        assert r.returncode == 0, r.stdout[-4000:]
        deadline = time.monotonic() + 60
        while _apps(head) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _apps(head), "Serve applications left after `serve shutdown`"


def _search(base: str, data: bytes, **params) -> dict:
    r = requests.post(
        f"{base}/search", files={"image": ("q.png", data)}, params=params, timeout=120
    )
    assert r.status_code == 200, (r.status_code, r.text[:1000])
    return r.json()


def _raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent byte for byte (no client-side normalisation of `..`)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------ S3, in process


def test_large_index_file_is_uploaded_to_s3_in_parts(s3):
    # 3,000 x 1,280 float32 = 14.6 MiB: past pyarrow's upload part size (10 MiB).
    vectors = np.random.default_rng(0).standard_normal((3000, 1280)).astype(np.float32)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    key = "big/versions/v1/shard-00000.faiss"
    digest, size = index.write_index(flat, s3.uri(key))

    meta = s3.client.head_object(Bucket=s3.bucket, Key=key)
    assert meta["ContentLength"] == size > 14 << 20
    # A multipart upload's ETag is "<md5 of the part md5s>-<number of parts>".
    parts = int(re.fullmatch(r'"[0-9a-f]{32}-(\d+)"', meta["ETag"]).group(1))
    assert parts >= 2, meta["ETag"]
    first = s3.client.head_object(Bucket=s3.bucket, Key=key, PartNumber=1)
    assert first["ContentLength"] < size
    # Every upload was completed (none left open), and the object is the file, intact.
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")
    # ... while a small file, like CURRENT, is one plain PUT.
    storage.write_text(s3.uri("big", "CURRENT"), "v1\n")
    small = s3.client.head_object(Bucket=s3.bucket, Key="big/CURRENT")
    assert re.fullmatch(r'"[0-9a-f]{32}"', small["ETag"]), small["ETag"]
    data = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(data).hexdigest() == digest
    back = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    _, ids = back.search(vectors[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_reindex_against_a_dead_s3_endpoint_fails_in_seconds(s3, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        catalog_uri = s3.uri("shop-nowhere", "catalog.parquet")
        started = time.monotonic()
        try:
            code = reindex.main(
                ["--catalog", catalog_uri, "--index-root", s3.uri("idx"), "--s3-endpoint", dead]
            )
        finally:
            storage.configure(s3.endpoint)
    assert code == 2
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert f"[reindex] error: {catalog_uri}" in err, err


# ---------------------------------------------------------------- ray job submit, a head


def test_head_requires_its_token(head):
    assert head.api("/api/jobs/", token=None).status_code == 401
    assert head.api("/api/jobs/", token="not-the-token").status_code in (401, 403)
    assert head.api("/api/jobs/").status_code == 200


def test_reindex_job_with_local_paths(head, shop, tmp_path):
    index_root = tmp_path / "index"
    r = head.submit(
        f"vs-reindex-local-{secrets.token_hex(4)}",
        "python", "jobs/reindex.py", "--catalog", shop.local, "--index-root", str(index_root),
        "--shards", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    assert re.search(r"^\[reindex\] done in .*, 2 shard\(s\)$", r.stdout, re.M), r.stdout[-4000:]
    current = (index_root / "CURRENT").read_text().strip()
    manifest = versions.open_version(str(index_root)).manifest
    assert manifest.version == current and manifest.count == N_PRODUCTS
    assert len(list((index_root / "versions" / current).glob("shard-*.faiss"))) == 2

    # The evaluation job runs the same way, on the version just published.
    out = tmp_path / "eval"
    r = head.submit(
        f"vs-evaluate-{secrets.token_hex(4)}",
        "python", "jobs/evaluate.py", "--index-root", str(index_root), "--leave-one-out",
        "--k", "1,5", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:]
    assert re.search(r"^\[evaluate\] category mAP@5 ", r.stdout, re.M), r.stdout[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == current and report["evaluated"] > 0
    assert (out / "summary.md").exists() and (out / "recall.png").exists()


def test_reindex_job_publishes_a_version_on_s3(head, reindex_job, s3):
    r = reindex_job["result"]
    assert r.returncode == 0, r.stdout[-4000:]
    summary = re.search(r"^\[reindex\] done in .*, 2 shard\(s\)$", r.stdout, re.M)
    assert summary, r.stdout[-4000:]
    assert summary.group(0) in head.job_logs(reindex_job["id"])

    keys = s3.keys(prefix="index/")
    current = storage.read_text(s3.uri("index", "CURRENT")).strip()
    assert f"version {current}, {N_PRODUCTS} vectors" in summary.group(0)
    version = f"index/versions/{current}/"
    assert {
        "index/CURRENT",
        f"{version}manifest.json",
        f"{version}shard-00000.faiss",
        f"{version}shard-00001.faiss",
        f"{version}docs/shard-00000.parquet",
        f"{version}docs/shard-00001.parquet",
    } <= set(keys), keys
    # The embeddings (the job's default --work, under the index root) went to S3 as well.
    work = [k for k in keys if k.startswith("index/work/") and k.endswith("/manifest.json")]
    assert len(work) == 1, keys
    assert f"{work[0].rpartition('/')[0]}/embeddings/part-00000.parquet" in keys
    assert not [k for k in keys if ".tmp" in k or "write-probe" in k], keys
    manifest = versions.open_version(reindex_job["index_root"]).manifest
    assert manifest.version == current
    assert sum(shard.count for shard in manifest.shards) == N_PRODUCTS


def test_job_ships_the_library_and_a_small_working_dir(head, reindex_job):
    assert reindex_job["result"].returncode == 0
    runtime_env = head.api(f"/api/jobs/{reindex_job['id']}").json()["runtime_env"]
    assert runtime_env["working_dir"].startswith("gcs://")
    assert [uri.startswith("gcs://") for uri in runtime_env["py_modules"]] == [True]
    assert "AWS_" not in json.dumps(runtime_env)  # credentials come from the node's env only
    for package in head.runtime_resources("py_modules_files"):
        assert [p.name for p in package.iterdir()] == ["visual_search"]
    # The working_dir upload is the source tree only: .gitignore and Ray's default excludes
    # keep .venv, .cache and .git out.
    packages = head.runtime_resources("working_dir_files")
    assert packages
    for package in packages:
        names = {p.name for p in package.iterdir()}
        assert {"jobs", "lib", "serve", "pyproject.toml"} <= names
        assert not names & {".venv", ".cache", ".git"}
        size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
        assert size < 5 << 20, size


def test_failing_job_exits_nonzero_with_the_error_in_its_log(head, tmp_path):
    missing = str(tmp_path / "no-such-catalog.parquet")
    submission = f"vs-reindex-fail-{secrets.token_hex(4)}"
    r = head.submit(
        submission,
        "python", "jobs/reindex.py", "--catalog", missing, "--index-root", str(tmp_path / "idx"),
    )  # fmt: skip
    assert r.returncode != 0, r.stdout[-4000:]
    logs = head.job_logs(submission)
    assert re.search(rf"^\[reindex\] error: {re.escape(missing)}.*not found", logs, re.M), logs
    assert "Traceback" not in logs
    assert not (tmp_path / "idx" / "CURRENT").exists()


# --------------------------------------------------------------------- Serve on the head


def test_search_and_images_from_the_new_s3_index(service, s3, shop):
    current = storage.read_text(s3.uri("index", "CURRENT")).strip()
    assert requests.get(f"{service}/readyz", timeout=30).json()["index_version"] == current
    body = _search(service, shop.files["p07"], k=5)
    assert body["index_version"] == current
    assert body["results"][0]["product_id"] == "p07", body
    assert body["results"][0]["image_uri"] == s3.uri("shop", "images", "p07.png")
    body = _search(service, shop.files["p04"], k=5, category="even")
    assert body["results"][0]["product_id"] == "p04", body
    assert {row["category"] for row in body["results"]} == {"even"}

    # The photo comes back through S3, byte for byte, by product id.
    r = requests.get(f"{service}/products/p07/image", timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "image/png"
    assert r.content == shop.files["p07"]

    # Paths are never taken from the request: anything but a catalog product id is a 404.
    for path in (
        "/products/..%2F..%2Fshop%2Fcatalog.parquet/image",
        "/products/../../shop/catalog.parquet/image",
        f"/products/s3:%2F%2F{s3.bucket}%2Fshop%2Fcatalog.parquet/image",
        "/products/%2Fetc%2Fpasswd/image",
    ):
        status, content = _raw_get(service, path)
        assert status == 404, (path, status, content[:200])
        assert not content.startswith(b"PAR1") and b"root:" not in content, path


def test_serve_replicas_run_the_shipped_library(service, head):
    replicas = head.processes("ServeReplica:")
    assert len(replicas) == 3, replicas  # the ingress (it embeds on CPU), 2 shard searchers
    for pid in replicas:
        environ = dict(
            line.split("=", 1)
            for line in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
            if "=" in line
        )
        # py_modules first on the path: the job's copy wins over the venv's editable install.
        assert "/runtime_resources/py_modules_files/" in environ["PYTHONPATH"].split(":")[0]
