"""The peer's scheduler: decode steps before prefills before forward/backward, long prefills in chunks, no job
starves, a full queue answers busy at once; and a saturated live peer still answers `info` promptly."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time

import pytest
import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto.p2pd_pb2 import RPCError

from blockswarm.client.event_loop import BackgroundLoop
from blockswarm.compression.codecs import encode_tensor
from blockswarm.models import load_blocks, load_config
from blockswarm.peer.backend import BlockBackend, DecodeStep
from blockswarm.peer.cache import CachePool
from blockswarm.peer.handlers import RequestHandlers
from blockswarm.peer.limits import PeerBusy, ServingLimits
from blockswarm.peer.scheduler import MAX_JOB_WAIT_TICKS, Scheduler
from blockswarm.pipeline.hops import PeerError
from blockswarm.pipeline.streams import PeerStream, call
from blockswarm.wire.messages import FORWARD_RPC, INFERENCE_RPC, ChainRequest, InferenceStep, OpenSession, StepReply
from blockswarm.wire.ping import measure_rtt
from blockswarm.wire.transport import Frame, encode

HIDDEN = 256  # tiny preset
CLIENT_A = PeerID.from_base58("QmbyV4BASLJCFiCfKz37eNwFX8y6hefQ7LGpzvEwJQzNft")
CLIENT_B = PeerID.from_base58("QmSXDk2v6kPu4BXW7UE6BsE4rB3k7Y1yJ11a9owiH52Ti4")


class RecordingBackend:
    """Records what the compute thread runs, in order; every output is its input plus one."""

    def __init__(self):
        self.log: list[tuple] = []

    def inference_steps(self, steps: list[DecodeStep]) -> list[torch.Tensor]:
        """A tick: (position, length) of each step, a decode step's length being 1."""
        self.log.append(("tick", sorted((step.position, step.hidden.shape[1]) for step in steps)))
        return [step.hidden + 1 for step in steps]

    def job(self, name: str) -> str:
        self.log.append(("job", name))
        return name


def step(position: int, length: int = 1) -> DecodeStep:
    return DecodeStep(0, [], torch.full((1, length, 4), float(position)), position)


async def held(scheduler: Scheduler) -> threading.Event:
    """Keep the compute thread busy until the returned event is set, so that work piles up in the queue."""
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    asyncio.ensure_future(scheduler.submit_job(block))
    await asyncio.to_thread(started.wait, 10)
    return release


def test_decode_steps_and_prefills_share_a_tick_before_jobs():
    backend = RecordingBackend()

    async def run():
        scheduler = Scheduler(ServingLimits())
        release = await held(scheduler)
        queued = [
            asyncio.ensure_future(scheduler.submit_job(backend.job, "forward")),
            asyncio.ensure_future(scheduler.submit_step(backend, step(0, 3))),
            asyncio.ensure_future(scheduler.submit_step(backend, step(5))),
            asyncio.ensure_future(scheduler.submit_step(backend, step(7))),
        ]
        await asyncio.sleep(0.05)
        release.set()
        outputs = await asyncio.gather(*queued)
        scheduler.stop()
        return outputs

    forward, prefill, *decodes = asyncio.run(run())
    assert backend.log == [("tick", [(0, 3), (5, 1), (7, 1)]), ("job", "forward")]
    assert forward == "forward" and torch.equal(prefill, torch.full((1, 3, 4), 1.0))
    assert [d[0, 0, 0].item() for d in decodes] == [6.0, 8.0]


def test_a_long_prefill_goes_in_chunks_of_the_tick_budget_between_decode_steps():
    backend = RecordingBackend()

    async def run():
        scheduler = Scheduler(ServingLimits(prefill_tokens_per_tick=4))
        release = await held(scheduler)
        prompt = DecodeStep(0, [], torch.arange(10.0).reshape(1, 10, 1), position=2)
        prefill = asyncio.ensure_future(scheduler.submit_step(backend, prompt))

        async def decoding(position: int) -> None:  # a session that sends its next step as soon as it has a reply
            while not prefill.done():
                position = int((await scheduler.submit_step(backend, step(position)))[0, 0, 0].item())

        session = asyncio.ensure_future(decoding(100))
        await asyncio.sleep(0.05)
        release.set()
        output = await prefill
        await session
        scheduler.stop()
        return output

    output = asyncio.run(run())
    assert torch.equal(output, torch.arange(10.0).reshape(1, 10, 1) + 1)
    chunks = [piece for _, pieces in backend.log for piece in pieces if piece[1] > 1]
    assert chunks == [(2, 4), (6, 4), (10, 2)]
    chunk_ticks = [pieces for _, pieces in backend.log if any(piece in chunks for piece in pieces)]
    assert len(chunk_ticks) == 3  # one chunk a tick
    assert len(chunk_ticks[0]) == 2  # with the decode step that was waiting too


def test_a_job_runs_within_a_bounded_number_of_ticks_while_decode_steps_keep_arriving():
    backend = RecordingBackend()

    async def run():
        scheduler = Scheduler(ServingLimits())
        release = await held(scheduler)
        job = asyncio.ensure_future(scheduler.submit_job(backend.job, "forward"))

        async def decoding(position: int) -> None:
            while not job.done():
                position = int((await scheduler.submit_step(backend, step(position)))[0, 0, 0].item())

        sessions = [asyncio.ensure_future(decoding(1000 * i)) for i in range(1, 4)]
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(job, 10)
        await asyncio.gather(*sessions)
        scheduler.stop()

    asyncio.run(run())
    ticks_before_job = backend.log.index(("job", "forward"))
    assert 1 <= ticks_before_job <= MAX_JOB_WAIT_TICKS + 1, backend.log


class SlowBackend(RecordingBackend):
    """A decode tick takes TICK_S whatever its batch, as a memory-bound one roughly does."""

    def inference_steps(self, steps: list[DecodeStep]) -> list[torch.Tensor]:
        time.sleep(TICK_S)
        return super().inference_steps(steps)


TICK_S = 0.1


def test_ticks_wait_for_sessions_due_within_a_tick_and_a_lone_session_never_waits():
    """Two sessions in a steady rhythm, one of which spends 30 ms between a reply and its next step (its client's
    own work): ticks wait for it and compute both together, where starting a tick at each arrival would alternate
    ticks of one and two. Once the other session closes, the remaining one is not kept waiting."""
    backend = SlowBackend()

    async def decoding(scheduler: Scheduler, position: int, steps: int, think_s: float) -> list[float]:
        seconds = []
        with scheduler.session() as rhythm:
            for _ in range(steps):
                began = time.monotonic()
                position = int((await scheduler.submit_step(backend, step(position), rhythm))[0, 0, 0].item())
                seconds.append(time.monotonic() - began)
                await asyncio.sleep(think_s)
        return seconds

    async def run() -> tuple[list[tuple], list[float]]:
        scheduler = Scheduler(ServingLimits())
        await asyncio.gather(decoding(scheduler, 0, 20, 0.0), decoding(scheduler, 1000, 20, 0.03))
        paired_ticks = backend.log[:]
        alone = await decoding(scheduler, 2000, 5, 0.0)
        scheduler.stop()
        return paired_ticks, alone

    paired_ticks, alone = asyncio.run(run())
    batched = "".join(str(len(pieces)) for _, pieces in paired_ticks)
    assert "2" * 10 in batched, paired_ticks  # once the rhythm is learnt (a few steps), every tick has both
    assert statistics.median(alone) < 1.7 * TICK_S, alone  # waiting for the closed session would take 2 ticks


def test_the_queue_is_bounded_per_caller_and_in_total():
    scheduler = Scheduler(ServingLimits(max_compute_queue_per_peer=2, max_compute_queue=3))
    with contextlib.ExitStack() as admitted:
        admitted.enter_context(scheduler.admit(CLIENT_A))
        admitted.enter_context(scheduler.admit(CLIENT_A))
        with pytest.raises(
            PeerBusy, match=r"^busy: 2 requests from your peer id wait for compute here, the limit is 2"
        ):
            admitted.enter_context(scheduler.admit(CLIENT_A))
        admitted.enter_context(scheduler.admit(CLIENT_B))
        with pytest.raises(PeerBusy, match=r"^busy: 3 requests wait for compute here, the limit is 3; retry in 2 s$"):
            admitted.enter_context(scheduler.admit(PeerID(b"\x00" * 34)))
        assert scheduler.active_requests == 3
    assert scheduler.active_requests == 0


def test_forward_requests_over_the_queue_get_a_busy_reply_at_once(tiny_model):
    """Through the handlers: while the compute thread is held, queued forwards fill the queue; the next one is
    answered busy at once; released, the queued ones are computed correctly and nothing stays counted."""
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    backend = BlockBackend(load_config(tiny_model), blocks, 0, torch.float32, torch.device("cpu"))
    limits = ServingLimits(max_compute_queue_per_peer=2, max_compute_queue=3)
    hidden = torch.randn(1, 2, HIDDEN)
    request = Frame(ChainRequest(start=0, end=3), encode([hidden]))

    async def forward(handlers: RequestHandlers, remote: PeerID):
        async def messages():
            for message in request.messages():
                yield message

        context = P2PContext(handle_name="test", local_id=CLIENT_B, remote_id=remote)
        async with contextlib.aclosing(handlers.rpc_forward(messages(), context)) as replies:
            return await anext(replies)

    async def run():
        handlers = RequestHandlers("tiny", backend, CachePool(64, 3, backend.make_cache), limits, dict)
        release = await held(handlers.scheduler)
        queued = [asyncio.ensure_future(forward(handlers, remote)) for remote in (CLIENT_A, CLIENT_A, CLIENT_B)]
        await asyncio.sleep(0.2)
        began = time.monotonic()
        busy = await forward(handlers, PeerID(b"\x00" * 34))
        elapsed = time.monotonic() - began
        release.set()
        outputs = await asyncio.gather(*queued)
        handlers.scheduler.stop()
        return busy, elapsed, outputs, handlers.admission.active_requests

    busy, elapsed, outputs, active = asyncio.run(run())
    assert isinstance(busy, RPCError) and busy.message == (
        "busy: 3 requests wait for compute here, the limit is 3; retry in 2 s"
    )
    assert elapsed < 1.0 and active == 0
    expected = hidden
    with torch.no_grad():
        for block in blocks:
            expected = block(expected)
    for reply in outputs:
        (output,) = Frame(None, [reply.tensors[0].buffer]).tensors()
        assert torch.allclose(output, expected, atol=1e-5)


SESSION_LENGTH = 256


def test_a_saturated_peer_answers_info_promptly(swarm):
    """Callers keep the first peer's compute queue full of long forward passes (more than its per-caller cap: some
    are answered busy) while sessions decode; `info` round trips stay short: the event loop only moves bytes."""
    process = next(p for p in swarm.processes if p.span and p.span[0] == 0)
    peer_id = PeerID.from_base58(process.peer_id)
    loop = BackgroundLoop()
    callers = [loop.run(P2P.create(initial_peers=process.maddrs)) for _ in range(3)]
    decoder = loop.run(P2P.create(initial_peers=process.maddrs))
    payload = [encode_tensor(torch.randn(1, 2048, HIDDEN), "none")]

    async def saturate_and_measure() -> tuple[list[float], list[float], dict]:
        idle = [await measure_rtt(callers[0], peer_id) for _ in range(5)]
        counts = {"computed": 0, "busy": 0}
        stop = asyncio.Event()

        async def flood(p2p: P2P) -> None:
            while not stop.is_set():
                try:
                    await call(p2p, peer_id, FORWARD_RPC, ChainRequest(start=0, end=3), payload, timeout=60)
                    counts["computed"] += 1
                except PeerError as e:
                    assert "busy" in str(e), e
                    counts["busy"] += 1
                    await asyncio.sleep(0.05)

        async def decode(p2p: P2P, session_id: str) -> None:
            stream = await PeerStream.open(p2p, peer_id, INFERENCE_RPC, timeout=10)
            # a short session: the shared swarm's other clients may hold much of this peer's cache
            stream.send(OpenSession(session_id=session_id, start=0, end=3, max_length=SESSION_LENGTH), [])
            position = 0
            while not stop.is_set() and position < SESSION_LENGTH:
                stream.send(InferenceStep(session_id=session_id, position=position), [encode_tensor(token)])
                await stream.receive(StepReply, timeout=60)
                counts["decoded"] += 1
                position += 1
            await stream.close()

        counts["decoded"] = 0
        token = torch.randn(1, 1, HIDDEN)
        flooders = [asyncio.ensure_future(flood(p2p)) for p2p in callers for _ in range(20)]
        flooders += [asyncio.ensure_future(decode(decoder, f"s{i}")) for i in range(3)]  # under the caller cap
        await asyncio.sleep(1.0)  # the queue fills
        loaded = []
        for _ in range(20):
            loaded.append(await measure_rtt(callers[0], peer_id, timeout=10))
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*flooders)
        return idle, loaded, counts

    try:
        idle, loaded, counts = loop.run(saturate_and_measure())
    finally:
        for p2p in (*callers, decoder):
            loop.run(p2p.shutdown())
        loop.stop()
    assert None not in loaded
    print(
        f"info round trip: idle median {statistics.median(idle) * 1e3:.1f} ms; saturated median "
        f"{statistics.median(loaded) * 1e3:.1f} ms, max {max(loaded) * 1e3:.1f} ms; {counts}"
    )
    assert counts["computed"] >= 5 and counts["busy"] >= 1 and counts["decoded"] >= 10
    assert statistics.median(loaded) < 0.5
