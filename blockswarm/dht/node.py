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
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey

from .identity import Identity, forget, load_identity, new_identity
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


def _listening_identity(identity_path: str | None) -> tuple[Identity, bool]:
    """The identity a listening node runs under, and whether it is new (so nobody else can be using it)."""
    if identity_path is None:
        return new_identity(), True
    if not os.path.exists(identity_path):
        P2P.generate_identity(identity_path)  # as hivemind would, but before the start: records are signed with it
        return load_identity(identity_path), True
    return load_identity(identity_path), False


@dataclass(frozen=True)
class SwarmNode:
    """A running DHT node, the key its records are signed with, and the "[owner:...]" marker they carry.

    Other hivemind components that sign DHT records on this node (a progress tracker) must be given
    `signing_key`: the node signs only records carrying its own marker, and refuses to take a second key.
    """

    dht: DHT
    signing_key: RSAPrivateKey
    owner_marker: bytes

    def shutdown(self) -> None:
        self.dht.shutdown()


class _OwnProcessGroupDHT(DHT):
    """hivemind's DHT process (and the p2pd daemon it starts), moved out of the parent's process group.

    `static_relays`: reserve relay slots only at the trusted relays, at once. With p2pd's default, discovering relays
    through its DHT too, a NATed peer of a three-node swarm had reserved no slot after 40 s (libp2p waits for more
    candidates); hivemind's `P2P.create` has no parameter for p2pd's `-relayDiscovery`, so it is added to the
    daemon's arguments here, in the DHT's own process.
    """

    static_relays = False

    def run(self) -> None:
        os.setpgid(0, 0)
        if self.static_relays:
            make_args = P2P._make_process_args
            P2P._make_process_args = staticmethod(lambda *args, **kwargs: make_args(*args, **kwargs, relayDiscovery=0))
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
    relay: bool = False,
) -> SwarmNode:
    """Start a DHT node for `role` (in its own process) joined through `initial_peers`.

    Listening roles bind `host:port`; a bootstrap node or a peer with `new_swarm` may start without initial peers.
    They run under the identity in `identity_path` (made there when missing; a fresh temporary one without a path)
    and sign their records with its key, so that their records prove their peer id (see identity.py).
    With `relay` (a listening node others cannot dial, see reachability.py), the node reserves slots at the initial
    peers' circuit relays and announces only its relayed addresses, through which others reach it.
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
    host_maddrs = [f"/ip4/{host}/tcp/{port}"]
    try:
        identity, fresh_identity = _listening_identity(identity_path) if listening else (None, False)
    except Exception as e:  # unreadable file, not a libp2p private key, not RSA: whatever the parsers raise
        raise SwarmJoinError(f"cannot use the identity file {identity_path}: {e}") from e
    signing_key = identity.key if identity else RSAPrivateKey.process_wide()
    validators, owner_marker = make_validators(signing_key)
    listening_options = dict(
        host_maddrs=host_maddrs,
        announce_maddrs=list(announce_addrs) or None,
        identity_path=identity.path if identity else None,
        check_if_identity_free=not fresh_identity,
    )
    if relay:
        # forced private: p2pd would otherwise wait for its own AutoNAT verdict before using the relays
        listening_options.update(use_auto_relay=True, force_reachability="private", trusted_relays=list(initial_peers))
    try:
        dht = _OwnProcessGroupDHT(
            initial_peers=list(initial_peers),
            start=False,
            client_mode=not listening,
            record_validators=validators,
            **(listening_options if listening else {}),
        )
        dht.static_relays = relay
        dht.run_in_background(await_ready=True)
    except Exception as e:
        where = f" while listening on {host_maddrs}" if listening else ""
        raise SwarmJoinError(
            f"could not join the swarm through {list(initial_peers) or 'no initial peers'}{where}: {e}. "
            "Check that the initial peers are running and reachable."
        ) from e
    finally:
        if identity is not None and identity_path is None:
            forget(identity)  # p2pd has read it (or failed); the key lives on in the validators
    exit_with_parent(dht)
    return SwarmNode(dht, signing_key, owner_marker)
