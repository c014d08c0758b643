"""Malformed requests get clear error replies, and the peer keeps serving correct ones."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto.p2pd_pb2 import RPCError

from blockswarm.compression.codecs import encode_tensor
from blockswarm.models import KVCache, load_blocks, load_config
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.cache import CachePool
from blockswarm.peer.handlers import RequestHandlers
from blockswarm.peer.limits import ServingLimits
from blockswarm.pipeline.hops import PeerError
from blockswarm.pipeline.streams import PeerStream, call
from blockswarm.wire.messages import (
    BACKWARD_RPC,
    FORWARD_RPC,
    INFERENCE_RPC,
    AdapterSpec,
    ChainRequest,
    InferenceStep,
    OpenSession,
    StepReply,
)
from blockswarm.wire.transport import REQUEST, Frame, encode

HIDDEN = 256  # tiny preset


@pytest.fixture(scope="module")
def client(swarm, tiny_model):
    from blockswarm.client import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, codec="none") as model:
        yield model.remote


@pytest.fixture(scope="module")
def first_peer(swarm) -> PeerID:
    peer = next(p for p in swarm.processes if p.span and p.span[0] == 0)
    return PeerID.from_base58(peer.peer_id)


def inference(client, peer_id, opening: OpenSession, steps: list[tuple[InferenceStep, bytes]]) -> list:
    """Open a session, send `steps`, return their outputs (raises PeerError on the first error reply)."""

    async def run():
        stream = await PeerStream.open(client.p2p, peer_id, INFERENCE_RPC, timeout=10)
        try:
            stream.send(opening, [])
            outputs = []
            for step, payload in steps:
                stream.send(step, [payload])
                outputs.append((await stream.receive(StepReply, timeout=10))[1][0])
            return outputs
        finally:
            await stream.close()

    return client.loop.run(run())


def forward(client, peer_id, request: ChainRequest, hidden: torch.Tensor) -> torch.Tensor:
    return client.loop.run(
        call(client.p2p, peer_id, FORWARD_RPC, request, [encode_tensor(hidden, "none")], timeout=10)
    )[0]


def opening(**overrides) -> OpenSession:
    return OpenSession(**{"session_id": "s1", "start": 0, "end": 3, "max_length": 16, **overrides})


def step_payload(shape=(1, 2, HIDDEN), dtype=torch.float32) -> bytes:
    return encode_tensor(torch.randn(shape).to(dtype))


BAD_INFERENCE = {
    "wrong hidden size": (
        opening(),
        [(InferenceStep(session_id="s1", position=0), step_payload((1, 2, 255)))],
        r"shape \[batch, seq_len, 256\]",
    ),
    "wrong dtype": (
        opening(),
        [(InferenceStep(session_id="s1", position=0), step_payload(dtype=torch.float64))],
        "float32, float16 or bfloat16",
    ),
    "wrong batch": (
        opening(),
        [(InferenceStep(session_id="s1", position=0), step_payload((2, 2, HIDDEN)))],
        "batch size 2",
    ),
    "oversize session": (opening(max_length=10**6), [], "exceeds this peer's limit"),
    "oversize step": (
        opening(max_length=4),
        [(InferenceStep(session_id="s1", position=0), step_payload((1, 5, HIDDEN)))],
        "exceeds the session's max_length",
    ),
    "unknown session": (
        opening(),
        [(InferenceStep(session_id="nope", position=0), step_payload())],
        "unknown session 'nope'",
    ),
    "position past the end": (
        opening(),
        [(InferenceStep(session_id="s1", position=3), step_payload())],
        "position 3 is out of range",
    ),
    "negative position": (
        opening(),
        [(InferenceStep(session_id="s1", position=-1), step_payload())],
        "position -1 is out of range",
    ),
    "blocks not served": (opening(end=7), [], r"blocks \[0, 7\) are not served here"),
    "truncated payload": (
        opening(),
        [(InferenceStep(session_id="s1", position=0), step_payload()[:-7])],
        "bytes were sent",
    ),
    "header claims more elements": (
        opening(),
        [
            (
                InferenceStep(session_id="s1", position=0),
                step_payload((1, 1, HIDDEN))[:5]
                + (1).to_bytes(4, "little")
                + (10).to_bytes(4, "little")
                + (HIDDEN).to_bytes(4, "little")
                + bytes(4 * HIDDEN),
            )
        ],
        "claims shape",
    ),
    "header claims a huge tensor": (  # refused from the header alone, before anything is decoded
        opening(),
        [
            (
                InferenceStep(session_id="s1", position=0),
                step_payload((1, 1, HIDDEN))[:5]
                + (1).to_bytes(4, "little")
                + (2**32 - 1).to_bytes(4, "little")
                + (HIDDEN).to_bytes(4, "little"),
            )
        ],
        r"1 x 4294967295 tokens exceed this peer's limit",
    ),
    "garbage payload": (opening(), [(InferenceStep(session_id="s1", position=0), b"\x00" * 40)], "bad magic"),
    "unsupported codec": (opening(codec="zip"), [], "unsupported codec 'zip'"),
}


@pytest.mark.parametrize("case", list(BAD_INFERENCE))
def test_bad_inference_request_gets_error_reply(client, first_peer, case):
    session, steps, message = BAD_INFERENCE[case]
    if not steps:  # errors found at open are reported on the first step
        steps = [(InferenceStep(session_id=session.session_id, position=0), step_payload())]
    with pytest.raises(PeerError, match=message):
        inference(client, first_peer, session, steps)


def test_bad_forward_requests_get_error_replies(client, first_peer):
    with pytest.raises(PeerError, match=r"not served here"):
        forward(client, first_peer, ChainRequest(start=2, end=5), torch.randn(1, 2, HIDDEN))
    with pytest.raises(PeerError, match="exceed this peer's limit"):
        forward(client, first_peer, ChainRequest(start=0, end=3), torch.randn(1, 9000, HIDDEN))
    with pytest.raises(PeerError, match="shape"):
        forward(client, first_peer, ChainRequest(start=0, end=3), torch.randn(2, HIDDEN))


def adapter_forward(client, peer_id, spec: AdapterSpec, adapter: list[torch.Tensor], train: bool = False):
    request = ChainRequest(start=0, end=3, adapter=spec, train=train)
    payloads = [encode_tensor(t, "none") for t in [torch.randn(1, 2, HIDDEN), *adapter]]
    rpc = BACKWARD_RPC if train else FORWARD_RPC
    if train:
        payloads.insert(1, encode_tensor(torch.randn(1, 2, HIDDEN), "none"))
    return client.loop.run(call(client.p2p, peer_id, rpc, request, payloads, timeout=10))


LORA = AdapterSpec(lora_rank=2, lora_targets=("q_proj",))
BAD_ADAPTERS = {
    "missing tensors": (
        LORA,
        [torch.zeros(2, HIDDEN)] * 5,
        r"expected 7 tensors \(1 of activations, 6 of the adapter\), got 6",
    ),
    "wrong LoRA shape": (LORA, [torch.zeros(2, HIDDEN), torch.zeros(HIDDEN, 3)] * 3, r"LoRA B of q_proj .* \[256, 2\]"),
    "unknown target": (  # a client cannot build this spec; built unchecked, it shows what a peer makes of it
        AdapterSpec.model_construct(lora_rank=2, lora_targets=("qkv",)),
        [torch.zeros(2, HIDDEN)] * 6,
        "unknown LoRA",
    ),
    "wrong prompt shape": (AdapterSpec(prompt_len=3), [torch.zeros(3, 1, 2, HIDDEN)], r"deep prompts must have shape"),
    "non-finite prompt": (AdapterSpec(prompt_len=2), [torch.full((3, 1, 2, HIDDEN), float("nan"))], "finite"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_gets_error_reply(client, first_peer, case):
    spec, tensors, message = BAD_ADAPTERS[case]
    with pytest.raises(PeerError, match=message):
        adapter_forward(client, first_peer, spec, tensors)


@pytest.mark.parametrize(
    ("codec", "form"), [("none", "as sent"), ("int8-blockwise", "decoded to float32")], ids=["sent", "decoded"]
)
def test_adapter_over_max_adapter_bytes_is_refused_before_decoding(tiny_model, codec, form):
    """The adapter allowance holds on its own, not only as part of the frame's: a valid adapter over it is refused,
    as sent or once decoded (an 8-bit payload decodes to four times its size), from its headers, before decoding."""
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    backend = BlockBackend(load_config(tiny_model), blocks, 0, torch.float32, torch.device("cpu"))
    limits = ServingLimits(max_adapter_bytes=2**16)
    prompts = torch.zeros(3, 1, 32, HIDDEN)  # 96 KiB in float32: over the adapter allowance, far within the frame's
    request = Frame(
        ChainRequest(start=0, end=3, adapter=AdapterSpec(prompt_len=32)),
        encode([torch.randn(1, 2, HIDDEN)]) + encode([prompts], codec),
    )
    assert request.nbytes() < limits.max_request_bytes(HIDDEN)
    size = request.nbytes(1) if codec == "none" else 4 * prompts.numel()
    assert (request.nbytes(1) < 2**16) == (codec != "none")

    async def forward_once() -> list:
        handlers = RequestHandlers("tiny", backend, CachePool(64, 3, backend.make_cache), limits, dict)

        async def requests():
            for message in request.messages():
                yield message

        replies = [reply async for reply in handlers.rpc_forward(requests(), context(CLIENT_A))]
        assert handlers.admission.adapter_bytes == 0 and handlers.admission.active_requests == 0
        return replies

    (reply,) = asyncio.run(forward_once())
    assert isinstance(reply, RPCError) and reply.message == (
        f"adapter tensors take {size} bytes {form}, more than this peer's limit of 65536 per request or session "
        "(max_adapter_bytes)"
    )


@pytest.mark.parametrize("rpc", ["rpc_forward", "rpc_backward", "rpc_inference"])
def test_a_silent_stream_is_refused_within_the_first_message_timeout(tiny_model, rpc):
    """A stream opened and left silent holds a handler only for first_message_timeout, not for step_timeout."""
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    backend = BlockBackend(load_config(tiny_model), blocks, 0, torch.float32, torch.device("cpu"))
    limits = ServingLimits(first_message_timeout=0.3, drain_timeout=0.3)

    async def silent():
        await asyncio.sleep(3600)
        yield None

    async def replies() -> list:
        handlers = RequestHandlers("tiny", backend, CachePool(64, 3, backend.make_cache), limits, dict)
        return [reply async for reply in getattr(handlers, rpc)(silent(), context(CLIENT_A))]

    began = time.monotonic()
    (reply,) = asyncio.run(asyncio.wait_for(replies(), 10))
    assert isinstance(reply, RPCError) and reply.message == "no request within 0.3 s of opening the stream"
    assert time.monotonic() - began < 5


CLIENT_A = PeerID.from_base58("QmbyV4BASLJCFiCfKz37eNwFX8y6hefQ7LGpzvEwJQzNft")
CLIENT_B = PeerID.from_base58("QmSXDk2v6kPu4BXW7UE6BsE4rB3k7Y1yJ11a9owiH52Ti4")


def context(remote: PeerID) -> P2PContext:
    """What hivemind hands a handler: the authenticated id of the caller."""
    return P2PContext(handle_name="test", local_id=CLIENT_B, remote_id=remote)


@pytest.mark.parametrize(
    ("limits", "reason", "another_caller_admitted"),
    [
        (ServingLimits(max_streams_per_peer=2), "2 streams from your peer id are open here, the limit is 2", True),
        (ServingLimits(max_streams=2), "this peer serves its limit of 2 streams", False),
    ],
    ids=["per peer", "in total"],
)
def test_streams_over_a_cap_get_a_busy_reply_at_once(tiny_model, limits, reason, another_caller_admitted):
    """Idle streams hold their slots; the next stream from the same caller over a cap is answered at once with a
    busy reply. Another caller is still admitted under the per-peer cap, and is not under the total one."""
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    backend = BlockBackend(load_config(tiny_model), blocks, 0, torch.float32, torch.device("cpu"))

    async def silent():
        await asyncio.sleep(3600)
        yield None

    async def run() -> tuple[RPCError, float, bool]:
        handlers = RequestHandlers("tiny", backend, CachePool(64, 3, backend.make_cache), limits, dict)
        holders = [asyncio.ensure_future(anext(handlers.rpc_inference(silent(), context(CLIENT_A)))) for _ in range(2)]
        await asyncio.sleep(0.2)  # both streams are open and waiting for their first message
        began = time.monotonic()
        reply = await anext(handlers.rpc_forward(silent(), context(CLIENT_A)))
        elapsed = time.monotonic() - began
        other = asyncio.ensure_future(anext(handlers.rpc_forward(silent(), context(CLIENT_B))))
        await asyncio.sleep(0.2)
        other_admitted = not other.done()  # admitted: waiting for its first message, not answered busy
        for task in (*holders, other):
            task.cancel()
        return reply, elapsed, other_admitted

    reply, elapsed, other_admitted = asyncio.run(run())
    assert isinstance(reply, RPCError) and reply.message == f"busy: {reason}; retry in 2 s"
    assert elapsed < 1.0
    assert other_admitted == another_caller_admitted


def test_training_request_to_frozen_peer_is_refused(client, first_peer):
    with pytest.raises(PeerError, match="frozen: only peers started with --train"):
        adapter_forward(client, first_peer, AdapterSpec(prompt_len=2), [torch.zeros(3, 1, 2, HIDDEN)], train=True)


def test_peer_serves_correctly_after_bad_requests(client, first_peer, tiny_model):
    for case in ("wrong hidden size", "unknown session", "truncated payload"):
        test_bad_inference_request_gets_error_reply(client, first_peer, case)
    test_bad_adapter_gets_error_reply(client, first_peer, "wrong LoRA shape")
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    hidden = torch.randn(1, 5, HIDDEN)
    expected = hidden
    with torch.no_grad():
        for block in blocks:
            expected = block(expected)
    assert torch.allclose(forward(client, first_peer, ChainRequest(start=0, end=3), hidden), expected, atol=1e-5)
    steps = [
        (InferenceStep(session_id="s1", position=0), encode_tensor(hidden[:, :3])),
        (InferenceStep(session_id="s1", position=3), encode_tensor(hidden[:, 3:])),
    ]
    first, second = inference(client, first_peer, opening(), steps)
    # the same two cached steps computed here: a 3+2-token split rounds differently from one 5-token pass
    # (by ~4e-5 on outputs of magnitude ~30 with this machine's BLAS), so compare like with like
    config = load_config(tiny_model)
    caches = [KVCache.allocate(config, 1, 16, torch.float32, torch.device("cpu")) for _ in blocks]
    expected_steps = []
    with torch.no_grad():
        for position, part in ((0, hidden[:, :3]), (3, hidden[:, 3:])):
            for block, cache in zip(blocks, caches):
                part = block(part, position=position, cache=cache)
            expected_steps.append(part)
    assert torch.allclose(torch.cat([first, second], dim=1), torch.cat(expected_steps, dim=1), atol=1e-5)


def test_a_session_that_does_not_fit_the_cache_now_gets_a_busy_reply_at_once(tiny_model):
    """A full cache answers a new session busy (the client goes elsewhere) instead of making it wait; a session
    that could never fit is refused outright."""
    blocks = load_blocks(tiny_model, 0, 3, progress=False)
    backend = BlockBackend(load_config(tiny_model), blocks, 0, torch.float32, torch.device("cpu"))

    async def opened(session: OpenSession):
        for message in Frame(session, []).messages(REQUEST):
            yield message
        await asyncio.sleep(3600)

    async def run() -> tuple[RPCError, float, RPCError]:
        handlers = RequestHandlers("tiny", backend, CachePool(16, 3, backend.make_cache), ServingLimits(), dict)
        holder = asyncio.ensure_future(anext(handlers.rpc_inference(opened(opening()), context(CLIENT_A))))
        await asyncio.sleep(0.2)  # the first session holds the whole cache
        assert handlers.cache.sessions == 1
        began = time.monotonic()
        busy = await anext(handlers.rpc_inference(opened(opening(session_id="s2")), context(CLIENT_B)))
        elapsed = time.monotonic() - began
        too_big = await anext(handlers.rpc_inference(opened(opening(max_length=17)), context(CLIENT_B)))
        holder.cancel()
        return busy, elapsed, too_big

    busy, elapsed, too_big = asyncio.run(run())
    assert busy.message == "busy: KV cache is full: 0 tokens left per block, the session needs 16; retry in 5 s"
    assert elapsed < 1.0
    assert too_big.message.startswith("a session of 1 x 17 tokens over 3 blocks needs 51 block-tokens of cache")
