"""Process checks shared by the launcher and harness tests: is a pid still running, are they all gone."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process. A zombie counts as gone: it runs nothing and only awaits reaping."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # PermissionError: a recycled pid owned by someone else
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    state = re.search(r"^State:\s*(\S)", status, flags=re.M)
    return not (state and state.group(1) in "ZX")


def assert_all_gone(pids: list[int], within_s: float = 5.0, what: str = "processes still running") -> None:
    """Every pid must be gone; allow a short poll because reparented processes are reaped asynchronously."""
    deadline = time.monotonic() + within_s
    alive = [p for p in pids if is_running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if is_running(p)]
    for p in alive:  # don't leak them into the rest of the session, then fail
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    assert not alive, f"{what}: {alive}"
