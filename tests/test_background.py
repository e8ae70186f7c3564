"""background.py: work run there gets a lower CPU priority than the caller's thread, and the
threads it starts (torch's intra-op team) inherit it."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from visual_search import background


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _team_nices() -> set[int]:
    """Nice values of the threads torch's intra-op pool uses for a call from this thread."""
    import torch

    before = set(os.listdir("/proc/self/task"))
    x = torch.randn(600, 600)
    for _ in range(3):
        (x @ x).sum()
    new = set(os.listdir("/proc/self/task")) - before
    return {os.getpriority(os.PRIO_PROCESS, int(t)) for t in new}


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_work_runs_at_lower_priority_and_returns_its_result():
    mine = _nice()
    nice, tid = asyncio.run(background.run(lambda: (_nice(), threading.get_native_id())))
    assert nice == min(19, mine + background.NICE)
    assert tid != threading.get_native_id() and _nice() == mine  # the caller keeps its own
    assert asyncio.run(background.run(divmod, 7, 2)) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(background.run(divmod, 1, 0))


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")
def test_torch_threads_started_from_a_lowered_thread_inherit_its_priority():
    import torch

    if torch.get_num_threads() < 2:
        pytest.skip("torch runs single-threaded here")
    seen = {}

    def work():  # a fresh thread, as each of background's is: its torch team starts here
        background.lower_priority()
        seen["own"], seen["team"] = _nice(), _team_nices()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["own"] == min(19, _nice() + background.NICE)
    assert seen["team"] == {seen["own"]}


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux's")
def test_idle_priority_is_sched_idle():
    seen = {}

    def work():
        background.lower_priority(idle=True)
        seen["policy"] = os.sched_getscheduler(threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["policy"] == os.SCHED_IDLE
    assert os.sched_getscheduler(threading.get_native_id()) != os.SCHED_IDLE
