"""Hang detection: a peer whose step is overdue is asked for `info`; a slow but live peer answers and is waited for,
a hung one is given up on in about a second, not after the whole step timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2P

from blockswarm.client.event_loop import BackgroundLoop
from blockswarm.models import load_blocks, load_config
from blockswarm.peer.backend import BlockBackend, DecodeStep
from blockswarm.peer.cache import CachePool
from blockswarm.peer.handlers import RequestHandlers
from blockswarm.peer.limits import ServingLimits
from blockswarm.pipeline.hops import Hop, PeerError
from blockswarm.pipeline.inference import InferenceSession
from blockswarm.pipeline.liveness import SUSPECT_FLOOR_S, Liveness
from blockswarm.wire.messages import INFO_RPC
from blockswarm.wire.transport import REQUEST

SLOW_STEP_S = 2.5


def status() -> dict:
    """The `info` fields the server adds to the handlers' own."""
    return {"state": "online", "version": "test", "dtype": "float32", "quant": "none", "codecs": ["none"]}


class SlowBackend(BlockBackend):
    """Computes correctly, taking `delay` seconds longer per tick once it is set: a peer slowed down by others."""

    delay = 0.0

    def inference_steps(self, steps: list[DecodeStep]) -> list[torch.Tensor]:
        time.sleep(self.delay)
        return super().inference_steps(steps)


class OnePeerRouter:
    """Routes every span to the one peer; records bans."""

    def __init__(self, hop: Hop):
        self.hop = hop
        self.banned: list = []

    def route(self, start: int, end: int, cache_tokens_needed: int = 0) -> list[Hop]:
        return [self.hop]

    def ban(self, peer_id, seconds=None) -> None:
        self.banned.append(peer_id)

    def is_usable(self, peer_id) -> bool:
        return True


@pytest.fixture
def live_peer(tiny_model):
    """An in-process peer serving blocks 0:3 of the tiny model, a client connected to it, and the loop they run on."""
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    backend = SlowBackend(load_config(tiny_model), blocks, 0, torch.float32, torch.device("cpu"))
    loop = BackgroundLoop()

    async def serve() -> tuple[RequestHandlers, P2P]:  # on the loop: the handlers keep loop-bound state
        handlers = RequestHandlers("tiny", backend, CachePool(64, 3, backend.make_cache), ServingLimits(), status)
        server = await P2P.create()
        await handlers.register(server)
        return handlers, server

    handlers, server = loop.run(serve())
    client = loop.run(P2P.create(initial_peers=loop.run(server.get_visible_maddrs())))
    yield loop, server, client, handlers, blocks
    handlers.scheduler.stop()
    for p2p in (client, server):
        loop.run(p2p.shutdown())
    loop.stop()


def test_a_slow_live_peer_is_waited_for_and_its_output_used(live_peer):
    loop, server, client, handlers, blocks = live_peer
    router = OnePeerRouter(Hop(server.peer_id, 0, 3))
    session = InferenceSession(client, router, num_blocks=3, max_length=8, step_timeout=30.0)
    prompt, token = torch.randn(1, 4, 256), torch.randn(1, 1, 256)

    async def run() -> tuple[torch.Tensor, float, int]:
        await session.open()
        for _ in range(3):  # a few quick steps: the span learns how long its steps take
            await session.step(prompt if session.position == 0 else token)
        handlers.backend.delay = SLOW_STEP_S
        began = time.monotonic()
        output = await session.step(token)
        elapsed = time.monotonic() - began
        probes = session.spans[0].liveness.probes
        await session.close()
        return output, elapsed, probes

    output, elapsed, probes = loop.run(run())
    hidden = torch.cat([prompt, token, token, token], dim=1)
    with torch.no_grad():
        for block in blocks:
            hidden = block(hidden)
    assert (output - hidden[:, -1:]).abs().max() <= 1e-4
    assert elapsed >= SLOW_STEP_S and router.banned == []
    assert probes >= 2  # asked more than once while waiting: each answer let the wait go on


def test_a_peer_that_does_not_answer_is_given_up_in_about_a_second(live_peer):
    """The step never comes and `info` goes unanswered (the peer's process stopped): PeerError well before any step
    timeout; a step that does come back in time is not probed at all."""
    loop, server, client, handlers, _ = live_peer
    liveness = Liveness(client, server.peer_id)

    async def never_answer(request, context):
        await asyncio.sleep(3600)

    async def run() -> tuple[float, str]:
        assert await liveness.wait(asyncio.sleep(SUSPECT_FLOOR_S / 2, result="quick"), decode=True) == "quick"
        assert liveness.probes == 0
        await server.remove_protobuf_handler(INFO_RPC)
        await server.add_protobuf_handler(INFO_RPC, never_answer, REQUEST)
        began = time.monotonic()
        with pytest.raises(PeerError) as error:
            await liveness.wait(asyncio.sleep(3600), decode=True)
        return time.monotonic() - began, str(error.value)

    elapsed, message = loop.run(run())
    assert elapsed < 3.0, elapsed
    assert "no answer to `info`" in message
