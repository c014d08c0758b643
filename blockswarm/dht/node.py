"""Starting a DHT node for any role: bootstrap node, peer, client session or monitor.

Every node gets blockswarm's record validators, dies with the process that started it (`exit_with_parent`), and
runs in a process group of its own: a signal sent to the starting process's whole group (systemd's default stop,
`kill -- -PGID`, Ctrl-C in a terminal) reaches only that process, which then leaves the swarm cleanly (announcing
OFFLINE needs a working DHT) and stops the node itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from hivemind.dht import DHT

from .process import exit_with_parent
from .validation import make_validators


class NodeRole(StrEnum):
    BOOTSTRAP = "bootstrap"  # `run-dht`: listens, serves no blocks; may start a new swarm
    PEER = "peer"  # `run-server`: listens and serves blocks
    CLIENT = "client"  # a client session: reaches out only (client mode)
    MONITOR = "monitor"  # the health monitor: reaches out only (client mode)


LISTENING_ROLES = (NodeRole.BOOTSTRAP, NodeRole.PEER)


class SwarmJoinError(RuntimeError):
    """The node could not start or reach the swarm; the message says what to check."""


@dataclass(frozen=True)
class SwarmNode:
    """A running DHT node and the "[owner:...]" marker that the subkeys of its own records carry."""

    dht: DHT
    owner_marker: bytes

    def shutdown(self) -> None:
        self.dht.shutdown()


class _OwnProcessGroupDHT(DHT):
    """hivemind's DHT process (and the p2pd daemon it starts), moved out of the parent's process group."""

    def run(self) -> None:
        os.setpgid(0, 0)
        super().run()


def start_dht(
    role: NodeRole,
    initial_peers: Sequence[str],
    *,
    new_swarm: bool = False,
    host: str = "0.0.0.0",
    port: int = 0,
    announce_addrs: Sequence[str] = (),
    identity_path: str | None = None,
) -> SwarmNode:
    """Start a DHT node for `role` (in its own process) joined through `initial_peers`.

    Listening roles bind `host:port`; a bootstrap node or a peer with `new_swarm` may start without initial peers.
    Raises SwarmJoinError saying what to pass or check when the node has no initial peers where it needs them, or
    cannot start or join.
    """
    role = NodeRole(role)
    listening = role in LISTENING_ROLES
    if not initial_peers and not (listening and (new_swarm or role == NodeRole.BOOTSTRAP)):
        hint = ", or --new-swarm to start a new one" if role == NodeRole.PEER else ""
        raise SwarmJoinError(
            f"no initial peers: pass --initial-peers with the multiaddr of a peer or `blockswarm run-dht` node "
            f"of an existing swarm{hint}"
        )
    validators, owner_marker = make_validators()
    host_maddrs = [f"/ip4/{host}/tcp/{port}"]
    listening_options = dict(
        host_maddrs=host_maddrs, announce_maddrs=list(announce_addrs) or None, identity_path=identity_path
    )
    try:
        dht = _OwnProcessGroupDHT(
            initial_peers=list(initial_peers),
            start=True,
            client_mode=not listening,
            record_validators=validators,
            **(listening_options if listening else {}),
        )
    except Exception as e:
        where = f" while listening on {host_maddrs}" if listening else ""
        raise SwarmJoinError(
            f"could not join the swarm through {list(initial_peers) or 'no initial peers'}{where}: {e}. "
            "Check that the initial peers are running and reachable."
        ) from e
    exit_with_parent(dht)
    return SwarmNode(dht, owner_marker)
