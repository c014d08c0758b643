"""Random and mutated frames at every RPC of a live peer: each gets an error reply or a closed stream within
seconds, the peer never dies, never fails inside a handler, and computes correctly afterwards.

Cases are built with the wire module's own encoder, then broken at every level: the typed metadata (random values,
missing and extra fields), the msgpack header (random objects, lying payload sizes), the tensor payloads (wrong
codecs and dtypes, truncated, extended, headers claiming more elements than they carry, random bytes), the
protobuf messages (flipped and cut bytes), and the stream itself (random bytes, lying message lengths).
Hypothesis runs derandomized and without a database, so every run tries the same cases.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import msgpack
import pytest
import torch
from fuzz_cases import (
    HIDDEN,
    SPAN,
    backward_cases,
    forward_cases,
    framed,
    garbage_messages,
    inference_cases,
    unreadable,
)
from hivemind.p2p import P2P, PeerID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockswarm.client.event_loop import BackgroundLoop
from blockswarm.compression.codecs import WIRE_DTYPES, encode_tensor
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models import KVCache, load_blocks, load_config
from blockswarm.wire.messages import (
    BACKWARD_RPC,
    FORWARD_RPC,
    INFERENCE_RPC,
    INFO_RPC,
    ChainRequest,
    InferenceStep,
    OpenSession,
    StepReply,
)
from blockswarm.wire.payload_headers import read_payload_header
from blockswarm.wire.transport import REPLY, REQUEST, Frame, WireStream, encode

CASE_TIMEOUT = 10.0  # seconds one case may take, from opening its stream to the peer's last word
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
END_OF_STREAM = P2P.ERROR_MARKER + (0).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)  # an empty RPCError


@dataclass
class FuzzPeer:
    loop: BackgroundLoop
    p2p: P2P
    peer_id: PeerID
    process: object
    outcomes: Counter


@pytest.fixture(scope="module")
def peer(tiny_model, tmp_path_factory):
    """One peer of its own (blocks 0:3) and a bare libp2p client connected to it."""
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("fuzz")) as swarm:
        swarm.start_bootstrap()
        process = swarm.start_peer("--blocks", f"{SPAN[0]}:{SPAN[1]}")
        loop = BackgroundLoop()
        p2p = loop.run(P2P.create(initial_peers=process.maddrs))
        try:
            yield FuzzPeer(loop, p2p, PeerID.from_base58(process.peer_id), process, Counter())
        finally:
            loop.run(p2p.shutdown())
            loop.stop()


# ---- sending a case and judging the peer's answer


async def exchange(p2p: P2P, peer_id: PeerID, rpc: str, data: bytes, timeout: float) -> str:
    """Send `data` and an end of stream on a fresh stream, read until the peer closes it: 'replied', 'error: ...',
    'closed', or 'silent' when it said nothing for `timeout` seconds."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, rpc)
    try:
        writer.write(data + END_OF_STREAM)
        await writer.drain()
        outcome = "closed"
        while True:
            try:
                reply, error = await asyncio.wait_for(P2P.receive_protobuf(REPLY, reader), timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                return outcome
            except TimeoutError:
                return "silent"
            if error is not None:
                return f"error: {error.message}"
            outcome = "replied"
    finally:
        writer.close()  # also what ends a stream the peer still reads: it sees the stream close


def run_case(peer: FuzzPeer, rpc: str, data: bytes, readable: bool = True) -> None:
    """A readable stream must get an answer (a reply, an error reply with a message, or a closed stream) within
    CASE_TIMEOUT; an unreadable one is abandoned after a moment of silence (the peer may wait for bytes that never
    come: it notices the close)."""
    outcome = peer.loop.run(exchange(peer.p2p, peer.peer_id, rpc, data, CASE_TIMEOUT if readable else 0.3))
    assert outcome != "silent" or not readable, f"{rpc}: no answer within {CASE_TIMEOUT} s to {data[:300]!r}"
    assert outcome != "error: ", f"{rpc}: an error reply without a message for {data[:300]!r}"
    assert "Traceback" not in outcome
    peer.outcomes[rpc, outcome[:70]] += 1


@settings(FUZZ, max_examples=700)
@given(data=forward_cases())
def test_fuzz_forward(peer, data):
    run_case(peer, FORWARD_RPC, data)


@settings(FUZZ, max_examples=500)
@given(data=backward_cases())
def test_fuzz_backward(peer, data):
    run_case(peer, BACKWARD_RPC, data)


@settings(FUZZ, max_examples=700)
@given(data=inference_cases())
def test_fuzz_inference(peer, data):
    run_case(peer, INFERENCE_RPC, data)


STREAM_RPCS = [FORWARD_RPC, BACKWARD_RPC, INFERENCE_RPC]


@settings(FUZZ, max_examples=200)
@given(rpc=st.sampled_from(STREAM_RPCS), data=garbage_messages)
def test_fuzz_garbage_protobufs(peer, rpc, data):
    run_case(peer, rpc, data)


@settings(FUZZ, max_examples=40)
@given(rpc=st.sampled_from(STREAM_RPCS), data=unreadable)
def test_fuzz_unreadable_streams(peer, rpc, data):
    run_case(peer, rpc, data, readable=False)


@settings(FUZZ, max_examples=100)
@given(data=st.binary(max_size=300))
def test_fuzz_info(peer, data):
    """`info` is a unary call: hivemind hands the peer whatever bytes arrive as its request (which it ignores)."""
    call = peer.p2p._client.call_unary_handler(peer.peer_id, INFO_RPC, data)
    try:
        reply = peer.loop.run(asyncio.wait_for(call, CASE_TIMEOUT))
        outcome = f"replied {len(reply)} bytes" if reply else "empty reply"
    except TimeoutError:
        pytest.fail(f"info: no answer within {CASE_TIMEOUT} s to {data!r}")
    except Exception as e:  # an error answer is fine, as long as one comes in time
        outcome = f"error: {e}"
    assert outcome not in ("error: ", "empty reply")
    peer.outcomes[INFO_RPC, outcome[:50]] += 1


def header_only(header: object) -> bytes:
    return framed(REQUEST(metadata=msgpack.packb(header)).SerializeToString())


# what the fuzzer found answered by a dropped stream or an unclear error, now answered clearly
FOUND = {
    "garbled protobuf": (framed(b"\xff\xff\xff"), "error: garbled protobuf message: Error parsing message"),
    "unknown marker": (b"\x07" + bytes(8), "error: not a message: unknown marker byte b'\\x07'"),
    "message over the cap": (framed(b"")[:1] + (2**40).to_bytes(8, "big"), "error: a message of 1099511627776 bytes"),
    "header not a map": (header_only([1, 2]), "error: malformed message metadata: expected a map with 'sizes'"),
    "sizes not a list": (header_only({"sizes": 3}), "error: malformed message metadata: expected a map with 'sizes'"),
    "sizes not integers": (header_only({"sizes": ["a"]}), "error: malformed message metadata: 'sizes' must hold"),
    "negative size": (
        header_only({"sizes": [-4, 8], "meta": {"start": 0, "end": 3}}),
        "error: malformed message metadata: negative payload size",
    ),
    "no meta": (header_only({"sizes": []}), "error: malformed message metadata: no 'meta' (ChainRequest expected)"),
    "meta not a map": (header_only({"sizes": [], "meta": 7}), "error: malformed message metadata: meta: Input should"),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_what_the_fuzzer_found_gets_a_clear_error(peer, case):
    data, expected = FOUND[case]
    outcome = peer.loop.run(exchange(peer.p2p, peer.peer_id, FORWARD_RPC, data, CASE_TIMEOUT))
    assert outcome.startswith(expected), outcome


@settings(FUZZ, max_examples=200)
@given(shape=st.lists(st.integers(0, 6), max_size=5), dtype=st.sampled_from(list(WIRE_DTYPES.values())))
def test_payload_headers_read_what_the_encoder_wrote(shape, dtype):
    """The header reader that sizes tensors before decoding agrees with the codecs' own layout."""
    tensor = torch.zeros(shape).to(dtype)
    header = read_payload_header(encode_tensor(tensor, "none"))
    assert (header.dtype, header.shape, header.numel) == (dtype, tuple(shape), tensor.numel())


def test_the_peer_survived_and_computes_correctly(peer, tiny_model):
    """Runs after the fuzzing: the peer process is alive, no handler failed unexpectedly, and a forward pass and
    an inference session get exactly what the blocks compute here."""
    for (rpc, outcome), count in sorted(peer.outcomes.items()):
        print(f"{count:5d} {rpc} {outcome}")
    if not peer.outcomes:
        pytest.skip("checks the peer after the fuzz tests of this module: run them together")
    assert sum(peer.outcomes.values()) >= 2000
    assert peer.process.popen.poll() is None, peer.process.log()[-3000:]
    log = peer.process.log()
    assert "stream handler" not in log and "Handler failed" not in log, log[-5000:]  # no handler failed unexpectedly
    blocks = load_blocks(tiny_model, *SPAN, progress=False)
    config = load_config(tiny_model)
    hidden = torch.randn(1, 5, HIDDEN)
    expected, expected_step = hidden, hidden
    caches = [KVCache.allocate(config, 1, 8, torch.float32, torch.device("cpu")) for _ in blocks]
    with torch.no_grad():
        for block, cache in zip(blocks, caches):
            expected = block(expected)
            expected_step = block(expected_step, position=0, cache=cache)

    async def requests() -> tuple[Frame, Frame]:
        forward = await WireStream.open(peer.p2p, peer.peer_id, FORWARD_RPC, timeout=10)
        session = await WireStream.open(peer.p2p, peer.peer_id, INFERENCE_RPC, timeout=10)
        try:
            forward.send(Frame(ChainRequest(start=SPAN[0], end=SPAN[1]), encode([hidden])))
            session.send(Frame(OpenSession(session_id="s", start=SPAN[0], end=SPAN[1], max_length=8), []))
            session.send(Frame(InferenceStep(session_id="s", position=0), encode([hidden])))
            return await forward.receive(None, 2**30, timeout=30), await session.receive(StepReply, 2**30, timeout=30)
        finally:
            await forward.close()
            await session.close()

    forward_reply, step_reply = peer.loop.run(requests())
    assert torch.allclose(forward_reply.tensors()[0], expected, atol=1e-5)
    assert step_reply.meta.position == 0 and torch.allclose(step_reply.tensors()[0], expected_step, atol=1e-5)
