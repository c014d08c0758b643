"""A peer leaves cleanly however the stop signal arrives: to its process alone or to its whole process group
(systemd's default stop, `kill -- -PGID`, Ctrl-C in a terminal). It exits promptly, announces OFFLINE, and leaves
no DHT process or p2pd daemon behind."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import pytest
from hivemind.p2p import PeerID

from blockswarm.dht import NodeRole, ServerState, get_block_servers, start_dht
from blockswarm.local_swarm import LocalSwarm

GRACE_PERIOD = 2.0
EXIT_TIMEOUT = 30.0  # generous: announcing DRAINING and OFFLINE plus the grace period take a few seconds


@pytest.fixture(scope="module")
def bootstrap(tiny_model, tmp_path_factory):
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("leaving")) as swarm:
        swarm.start_bootstrap()
        node = start_dht(NodeRole.CLIENT, swarm.initial_peers)
        yield swarm, node
        node.shutdown()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the peer's DHT process, its p2pd daemon, ...)."""
    found, queue = [], [pid]
    while queue:
        for task in Path(f"/proc/{queue.pop()}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in (task / "children").read_text().split()]
                found.extend(children)
                queue.extend(children)
    return found


def is_running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_peer_leaves_cleanly_on_a_stop_signal(bootstrap, sig, to_group):
    stop_and_check(*bootstrap, sig, to_group)


def test_training_peer_leaves_cleanly_when_its_group_is_stopped(bootstrap, tmp_path):
    """The group signal also kills a training peer's averager processes; the peer still exits and saves its span."""
    stop_and_check(*bootstrap, signal.SIGTERM, True, "--train", "--train-key", "k", "--checkpoint-dir", str(tmp_path))
    assert list(tmp_path.glob("blocks_0-8.step*.safetensors"))


def stop_and_check(swarm: LocalSwarm, node, sig: int, to_group: bool, *peer_args: str) -> None:
    """Start a peer, send it `sig`, and check that it leaves cleanly."""
    peer = swarm.start_peer("--blocks", "0:8", "--grace-period", str(GRACE_PERIOD), "--update-period", "60", *peer_args)
    peer_id = PeerID.from_base58(peer.peer_id)
    model = _model_name(peer.log())
    helpers = descendants(peer.popen.pid)
    assert helpers, "the peer should run its DHT in a child process"
    assert get_block_servers(node.dht, model, 0, 1, latest=True)[0][peer_id].state == ServerState.ONLINE

    began = time.monotonic()
    (peer.signal_group if to_group else peer.signal)(sig)
    try:
        code = peer.popen.wait(EXIT_TIMEOUT)
    except Exception:
        pytest.fail(f"the peer did not exit within {EXIT_TIMEOUT} s of {sig.name}:\n{peer.log()[-3000:]}")
    assert code == 0, peer.log()[-3000:]
    assert time.monotonic() - began < EXIT_TIMEOUT
    assert "announced OFFLINE" in peer.log()
    deadline = time.monotonic() + 10
    while any(is_running(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in helpers if is_running(pid)], "the peer's DHT process or p2pd outlived it"
    records = get_block_servers(node.dht, model, 0, 8, latest=True)
    assert all(block[peer_id].state == ServerState.OFFLINE for block in records)


def _model_name(log: str) -> str:
    return log.split("blockswarm peer ready: model=")[1].split()[0]
