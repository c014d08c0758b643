"""Tie a DHT process, and the p2pd daemon it runs, to the process that started it.

hivemind runs the DHT in a forked child that owns the p2pd daemon, which every stream of the peer goes
through. If the parent is killed with SIGKILL, nothing stops that child or its daemon: the daemon would keep
the peer's connections open, so clients would see a silent peer instead of a broken stream and wait for a
timeout. A watcher in the child notices the parent is gone within `poll_seconds` and SIGKILLs the daemon
(the kernel then resets every connection at once) and itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from functools import partial
from pathlib import Path

from hivemind.dht import DHT, DHTNode


async def _exit_when_orphaned(_dht: DHT, _node: DHTNode, parent_pid: int, poll_seconds: float) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(poll_seconds)
    for child in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    os._exit(0)


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


def exit_with_parent(dht: DHT, poll_seconds: float = 0.1) -> None:
    """Make `dht`'s process and its daemon exit as soon as the calling process dies."""
    dht.run_coroutine(
        partial(_exit_when_orphaned, parent_pid=os.getpid(), poll_seconds=poll_seconds), return_future=True
    )
