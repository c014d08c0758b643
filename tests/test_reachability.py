"""The reachability check on loopback: a bootstrap node dials the asking node back; without helpers, no verdict.
The NATed case (no helper can dial in) runs on the emulated WAN: tests/test_wan.py."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto.dht_pb2 import PingResponse
from hivemind.proto.p2pd_pb2 import PeerInfo

from blockswarm.dht import NodeRole, start_dht
from blockswarm.dht.reachability import DIAL_BACK_RPC, check_direct_reachability, serve_dial_back

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@pytest.fixture
def bootstrap():
    """A bootstrap node of its own per test: dial-back handlers registered by one test's event loop die with it."""
    node = start_dht(NodeRole.BOOTSTRAP, [], host="127.0.0.1")
    try:
        yield node.dht, [str(maddr) for maddr in node.dht.get_visible_maddrs()]
    finally:
        node.shutdown()


def test_a_node_others_can_dial_is_told_so(bootstrap):
    dht, maddrs = bootstrap

    async def check() -> bool | None:
        await serve_dial_back(await dht.replicate_p2p())
        return await check_direct_reachability(maddrs, LOOPBACK)

    assert asyncio.run(check()) is True


def test_without_an_answer_there_is_no_verdict(bootstrap):
    _, maddrs = bootstrap  # it does not serve the check: a swarm of an older version
    assert asyncio.run(check_direct_reachability(maddrs, LOOPBACK)) is None
    assert asyncio.run(check_direct_reachability([], LOOPBACK)) is None


def test_a_helper_dials_only_at_the_ip_the_asker_came_from(bootstrap):
    dht, maddrs = bootstrap

    async def ask_to_dial(target_ip: str) -> bool:
        await serve_dial_back(await dht.replicate_p2p())
        target = await P2P.create(host_maddrs=[f"/ip4/{target_ip}/tcp/0"], use_relay=False)
        asker = await P2P.create(initial_peers=maddrs, no_listen=True, use_relay=False)  # comes from 127.0.0.1
        try:
            addrs = [addr.to_bytes() for addr in target._visible_maddrs]
            helper = (await asker.list_peers())[0].peer_id
            request = PeerInfo(id=target.peer_id.to_bytes(), addrs=addrs)
            return (await asker.call_protobuf_handler(helper, DIAL_BACK_RPC, request, PingResponse)).available
        finally:
            await asker.shutdown()
            await target.shutdown()

    assert asyncio.run(ask_to_dial("127.0.0.2")) is False  # listening and dialable, but not where the asker is
