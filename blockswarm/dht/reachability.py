"""Can others dial this node directly, or must it be reached through a circuit relay?

A node cannot tell by itself whether a NAT or firewall drops inbound connections, so it asks the swarm. Every
listening node (bootstrap nodes and peers) serves `DIAL_BACK_RPC`: given a peer id and its addresses, it dials them
from its own libp2p host and answers whether the connection came up. The node being checked starts two temporary
libp2p daemons, each with a fresh identity and relays off: a *target* that listens where the node will listen and
never dials out, and an *asker* that sends the request to the initial peers. The target has no connection that a
dial could reuse and no relay address, so a helper reaches it only by a new direct connection, as a client would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from enum import StrEnum

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto.dht_pb2 import PingResponse
from hivemind.proto.p2pd_pb2 import PeerInfo
from hivemind.utils.multiaddr import Multiaddr

logger = logging.getLogger(__name__)

DIAL_BACK_RPC = "blockswarm.dial_back"
DIAL_TIMEOUT = 5.0  # seconds a helper tries to connect; a NAT drops the handshake, so failure is a timeout
ASK_TIMEOUT = DIAL_TIMEOUT + 5.0  # seconds the checked node waits for each helper's answer
MAX_HELPERS = 5  # initial peers asked at once
MAX_ADDRS = 16  # addresses a helper dials for one request
MAX_CONCURRENT_DIALS = 4  # per helper: dial-backs are cheap, but anyone can ask for them
RELAY_WAIT = 30.0  # seconds a relayed node waits for its first relay slot before going online without one


class RelayMode(StrEnum):
    """`--relay`: decide by asking the swarm (auto), or force it."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


async def serve_dial_back(p2p: P2P) -> None:
    """Register `DIAL_BACK_RPC` on this node, so that nodes joining through it can learn if they are reachable."""
    dials = asyncio.Semaphore(MAX_CONCURRENT_DIALS)

    async def dial_back(request: PeerInfo, context: P2PContext) -> PingResponse:
        try:
            peer_id = PeerID(request.id)
            addrs = [Multiaddr(raw) for raw in request.addrs[:MAX_ADDRS]]
        except Exception:  # garbled id or address: nothing to dial
            return PingResponse(available=False)
        # as libp2p's AutoNAT does, dial only at the IP the asker came from: nobody can make this node connect (scan,
        # flood) elsewhere
        observed = {
            _host(addr) for peer in await p2p.list_peers() if peer.peer_id == context.remote_id for addr in peer.addrs
        }
        addrs = [addr for addr in addrs if _host(addr) in observed - {None}]
        if peer_id == context.remote_id or not addrs:
            return PingResponse(available=False)  # the asker itself (a dial would reuse its connection), or no address
        async with dials:
            try:
                # hivemind's P2P has no public call that dials given addresses; its daemon client has one
                await asyncio.wait_for(p2p._client.connect(peer_id, addrs), DIAL_TIMEOUT)
            except Exception:  # timeout, refused, wrong identity at that address: not directly reachable
                return PingResponse(available=False)
        return PingResponse(available=True)

    await p2p.add_protobuf_handler(DIAL_BACK_RPC, dial_back, PeerInfo)


async def check_direct_reachability(
    initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = ()
) -> bool | None:
    """True when most helpers that answered could dial this host directly, False when most could not, None when
    no helper answered (no initial peers, or none runs a version that serves the check)."""
    helpers = list(dict.fromkeys(_peer_id(maddr) for maddr in initial_peers))[:MAX_HELPERS]
    if not helpers:
        return None
    target = await P2P.create(
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) or None,
        use_relay=False,
        auto_nat=False,
        nat_port_map=False,
        dht_mode="client",
    )
    try:
        asker = await P2P.create(initial_peers=list(initial_peers), no_listen=True, use_relay=False, dht_mode="client")
        try:
            suffix = Multiaddr(f"/p2p/{target.peer_id}")
            addrs = [maddr.decapsulate(suffix) for maddr in await target.get_visible_maddrs()]
            request = PeerInfo(id=target.peer_id.to_bytes(), addrs=[addr.to_bytes() for addr in addrs])
            answers = await asyncio.gather(*(_ask(asker, helper, request) for helper in helpers))
        finally:
            await asker.shutdown()
    finally:
        await target.shutdown()
    answered = [answer for answer in answers if answer is not None]
    if not answered:
        return None
    return 2 * sum(answered) >= len(answered)


async def _ask(asker: P2P, helper: PeerID, request: PeerInfo) -> bool | None:
    try:
        reply = await asyncio.wait_for(
            asker.call_protobuf_handler(helper, DIAL_BACK_RPC, request, PingResponse), ASK_TIMEOUT
        )
    except Exception as e:  # unreachable helper, or one of a version without the check
        logger.debug("reachability: no answer from %s: %s", helper, e)
        return None
    return reply.available


def _host(maddr: Multiaddr) -> str | None:
    return next((maddr[protocol] for protocol in ("ip4", "ip6") if protocol in maddr), None)


def _peer_id(maddr: str) -> PeerID:
    return PeerID.from_base58(Multiaddr(maddr)["p2p"])


def choose_relay(
    mode: RelayMode, initial_peers: Sequence[str], host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = ()
) -> bool:
    """Whether a listening node should be reached through relays; with `auto`, asks the swarm, and logs why."""
    mode = RelayMode(mode)
    if mode != RelayMode.AUTO:
        logger.warning("reachability: not checked (--relay %s)", mode.value)
        return mode == RelayMode.ALWAYS
    if not initial_peers:
        logger.info("reachability: not checked (no initial peers to ask): assuming others can dial this node")
        return False
    began = time.monotonic()
    try:
        reachable = asyncio.run(check_direct_reachability(initial_peers, host_maddrs, announce_maddrs))
    except Exception as e:  # a temporary daemon did not start: the real node will say why, if it fails too
        logger.warning("reachability: could not check (%s); assuming others can dial this node directly", e)
        return False
    if reachable is None:
        logger.warning("reachability: no initial peer answered the check; assuming others can dial this node directly")
        return False
    if reachable:
        logger.info("reachability: others can dial this node directly (checked in %.1f s)", time.monotonic() - began)
        return False
    logger.warning(
        "reachability: others cannot dial this node directly (NAT or firewall): serving through circuit relays of "
        "the initial peers; forward a port and pass --announce-addr, or --relay never, to serve directly"
    )
    return True


async def wait_for_relayed_addrs(p2p: P2P, timeout: float = RELAY_WAIT) -> bool:
    """Wait until this node has a relay slot (a /p2p-circuit address to announce); False, logged, after `timeout`:
    until then, nobody can reach this node."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if any("p2p-circuit" in maddr for maddr in await visible_maddrs(p2p)):
            return True
        if asyncio.get_running_loop().time() >= deadline:
            logger.warning("no relay slot after %.0f s: nobody can reach this node until it has one", timeout)
            return False
        await asyncio.sleep(0.5)


async def visible_maddrs(p2p: P2P) -> list[str]:
    """This node's addresses as others should dial them; none for a relayed node that has no relay slot yet."""
    try:
        return [str(maddr) for maddr in await p2p.get_visible_maddrs(latest=True)]
    except ValueError:  # hivemind raises rather than return no address
        return []
