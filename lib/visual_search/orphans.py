"""HAProxy processes that Ray Serve started and no Ray is left to stop.

Ray Serve's HAProxyManager actor starts `haproxy -db -f <dir>/<node id>/haproxy.cfg` as a plain
child, with no parent-death signal: when the actor and its raylet are SIGKILLed (a supervisor
killing the process group, `ray stop --force`, the OOM killer), haproxy lives on, holding the
HTTP port and its metrics and stats ports, and the next start cannot bind them.

python -m visual_search.orphans [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import select
import signal
import sys
from collections.abc import Iterator

log = logging.getLogger("visual_search.orphans")

# Ray's NodeID: 28 bytes, hex. Serve puts each node's HAProxy files in a folder of that name.
NODE_ID = re.compile(r"[0-9a-f]{56}")


def serve_haproxy_node(argv: list[str]) -> str | None:
    """The Ray node id in the command line of a haproxy that Ray Serve started, else None."""
    if not argv or os.path.basename(argv[0]) != "haproxy" or "-db" not in argv:
        return None
    try:
        config = argv[argv.index("-f") + 1]
    except (ValueError, IndexError):
        return None
    node = os.path.basename(os.path.dirname(config))
    return node if NODE_ID.fullmatch(node) else None


def raylet_node(argv: list[str]) -> str | None:
    """The node id of a raylet's command line, else None."""
    if not argv or os.path.basename(argv[0]) != "raylet":
        return None
    for arg in argv[1:]:
        if arg.startswith("--node_id="):
            return arg.removeprefix("--node_id=")
    return None


def _cmdline(pid: int) -> list[str]:
    """argv of a live process; [] for a zombie, a kernel thread or a process gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


def _processes() -> Iterator[tuple[int, int, list[str]]]:
    """(pid, uid, argv) of every process this user can see."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                uid = os.stat(f"/proc/{name}").st_uid
            except OSError:
                continue
            argv = _cmdline(int(name))
            if argv:
                yield int(name), uid, argv


def find_orphan_haproxy() -> dict[int, list[str]]:
    """{pid: argv} of this user's Ray Serve haproxy processes whose node's raylet is not running
    (any user's raylet counts). Linux only: {} without /proc."""
    if not os.path.isdir("/proc"):
        return {}
    uid = os.getuid()
    candidates = {
        pid: (node, argv)
        for pid, owner, argv in _processes()
        if owner == uid and (node := serve_haproxy_node(argv))
    }
    if not candidates:
        return {}
    # A second scan, begun after the first ended: a raylet alive when its haproxy was seen (it
    # starts before it) is in it unless it has died since. One scan could miss a raylet whose
    # pid it had passed before the raylet started.
    live = {node for _, _, argv in _processes() if (node := raylet_node(argv))}
    return {pid: argv for pid, (node, argv) in candidates.items() if node not in live}


def _kill(pid: int, argv: list[str], timeout_s: float) -> bool:
    """SIGTERM, then SIGKILL after timeout_s, the process `pid` if its argv is still `argv`.
    True once it has exited, False if it was gone (or the pid reused) before a signal."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        # The pidfd pins the process: checked now, the signals cannot reach a recycled pid.
        if _cmdline(pid) != argv:
            return False
        for sig in (signal.SIGTERM, signal.SIGKILL):
            signal.pidfd_send_signal(fd, sig)
            if select.select([fd], [], [], timeout_s)[0]:  # readable once it has exited
                return True
    finally:
        os.close(fd)
    raise RuntimeError(f"orphan haproxy pid {pid} did not exit {2 * timeout_s:.0f}s after SIGKILL")


def reap_orphan_haproxy(timeout_s: float = 5.0) -> list[int]:
    """Stop the orphans find_orphan_haproxy names (SIGTERM, SIGKILL after timeout_s); their
    pids, one warning logged per process. Call it before a local Ray starts Serve."""
    reaped = []
    for pid, argv in find_orphan_haproxy().items():
        if _kill(pid, argv, timeout_s):
            config = argv[argv.index("-f") + 1]
            log.warning(
                "stopped orphan haproxy pid %d (-f %s): no raylet of its Ray node runs, so "
                "nothing else would stop it or free the ports it listens on",
                pid,
                config,
            )
            reaped.append(pid)
    return reaped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list the orphans, stop none")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        for pid, cmd in find_orphan_haproxy().items():
            print(pid, " ".join(cmd))
        return 0
    pids = reap_orphan_haproxy()
    print(f"stopped {len(pids)} orphan haproxy process(es) {pids}" if pids else "no orphan haproxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
