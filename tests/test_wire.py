"""Tensor payloads and message framing: round trips, limits, and clear errors for broken input."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from blockswarm.compression.codecs import WireFormatError, decode_tensor, encode_tensor
from blockswarm.wire.messages import ChainRequest, StepReply
from blockswarm.wire.trainer_auth import is_valid_train_proof, train_proof
from blockswarm.wire.transport import (
    CHUNK_BYTES,
    MAX_RETRY_AFTER,
    REPLY,
    Frame,
    FramingError,
    PeerBusyError,
    RemoteError,
    UndecodableTensor,
    WireError,
    busy_message,
    encode,
    read_frame,
    read_meta,
    remote_error,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 256), (2, 3, 5), (0, 4), (1,), ()])
def test_lossless_round_trip(dtype, shape):
    tensor = torch.randn(shape).to(dtype)
    decoded = decode_tensor(encode_tensor(tensor))
    assert decoded.dtype == dtype and decoded.shape == tensor.shape
    assert torch.equal(decoded, tensor)


@pytest.mark.parametrize("codec, wire_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_codecs_keep_dtype_and_round_like_a_cast(codec, wire_dtype):
    tensor = torch.randn(3, 7, 11)
    decoded = decode_tensor(encode_tensor(tensor, codec))
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, tensor.to(wire_dtype).float())
    assert len(encode_tensor(tensor, codec)) < len(encode_tensor(tensor))


def test_nan_and_inf_survive_lossless_codec():
    tensor = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    assert torch.equal(decode_tensor(encode_tensor(tensor)).isnan(), tensor.isnan())


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:3], "shorter than its header"),
        (lambda b: b"XX" + b[2:], "bad magic"),
        (lambda b: b[:2] + bytes([99]) + b[3:], "unknown codec id 99"),
        (lambda b: b[:3] + bytes([77]) + b[4:], "unknown dtype id 77"),
        (lambda b: b[:4] + bytes([40]) + b[5:], "claims 40 dims"),
        (lambda b: b[:-1], "bytes were sent"),
        (lambda b: b + b"\x00", "bytes were sent"),
    ],
)
def test_broken_payloads_are_rejected(mutate, message):
    with pytest.raises(WireFormatError, match=message):
        decode_tensor(mutate(encode_tensor(torch.randn(2, 3))))


def test_unknown_codec_and_dtype_are_refused_when_encoding():
    with pytest.raises(ValueError, match="unknown codec"):
        encode_tensor(torch.randn(2), "gzip")
    with pytest.raises(ValueError, match="cannot send a tensor of dtype"):
        encode_tensor(torch.zeros(2, dtype=torch.bool))


async def _as_stream(messages):
    for message in messages:
        yield message


def test_large_frames_are_chunked_and_reassembled():
    big = torch.randn(3 * CHUNK_BYTES // 4 + 5)
    payloads = [encode_tensor(big), encode_tensor(torch.randn(4))]
    messages = list(Frame(ChainRequest(start=1, end=3), payloads).messages())
    assert len(messages) == 4 and all(m.ByteSize() <= CHUNK_BYTES + 1024 for m in messages)
    frame = asyncio.run(read_frame(_as_stream(messages), ChainRequest, max_bytes=2**30))
    meta, received = frame.meta, frame.payloads
    assert meta == ChainRequest(start=1, end=3)
    assert torch.equal(decode_tensor(received[0]), big)


def test_frames_over_the_limit_or_short_are_rejected():
    messages = list(Frame(ChainRequest(start=0, end=1), [encode_tensor(torch.randn(1000))]).messages())
    with pytest.raises(FramingError, match="limit is 100"):
        asyncio.run(read_frame(_as_stream(messages), ChainRequest, max_bytes=100))
    big = list(Frame(None, [encode_tensor(torch.randn(CHUNK_BYTES))]).messages())
    with pytest.raises(FramingError, match="stream ended after"):
        asyncio.run(read_frame(_as_stream(big[:1]), None, max_bytes=2**30))
    bad_meta = runtime_pb2.ExpertRequest(metadata=b"\xc1not msgpack")
    with pytest.raises(FramingError, match="malformed message metadata"):
        asyncio.run(read_frame(_as_stream([bad_meta]), ChainRequest, max_bytes=2**30))


def test_frames_decode_each_tensor_with_its_codec_and_fail_as_wire_errors():
    tensors = [torch.randn(2, 3), torch.randn(4)]
    frame = Frame(StepReply(position=5), encode(tensors[:1], "fp16") + encode(tensors[1:]))
    received = asyncio.run(read_frame(_as_stream(frame.messages(REPLY)), StepReply, max_bytes=2**20))
    assert received.meta == StepReply(position=5) and received.nbytes() == frame.nbytes()
    first, second = received.tensors()
    assert torch.equal(first, tensors[0].half().float()) and torch.equal(second, tensors[1])
    with pytest.raises(UndecodableTensor, match="bytes were sent") as error:
        Frame(None, [frame.payloads[0][:-1]]).tensors()
    assert isinstance(error.value, WireError)
    (unary,) = Frame(StepReply(position=1), []).messages(REPLY)
    assert read_meta(unary, StepReply) == StepReply(position=1)
    with pytest.raises(FramingError, match="limit is 0"):
        read_meta(next(frame.messages(REPLY)), StepReply)


TRAIN_PEERS = (
    "QmbyV4BASLJCFiCfKz37eNwFX8y6hefQ7LGpzvEwJQzNft",
    "QmSXDk2v6kPu4BXW7UE6BsE4rB3k7Y1yJ11a9owiH52Ti4",
    "QmRU8AbmfH5aRkC5LebWmsbZGFGuqf332kUJKWgB3LJHeD",
)


def test_a_train_proof_binds_the_key_the_server_and_the_trainer():
    server, trainer, other = (PeerID.from_base58(p) for p in TRAIN_PEERS)
    proof = train_proof("run key", server, trainer)
    assert is_valid_train_proof("run key", server, trainer, proof)
    assert not is_valid_train_proof("other key", server, trainer, proof)
    assert not is_valid_train_proof("run key", other, trainer, proof)  # a receiving peer cannot replay it elsewhere
    assert not is_valid_train_proof("run key", server, other, proof)  # nor can anyone who saw it on the way
    assert not is_valid_train_proof("run key", server, None, proof)
    assert not is_valid_train_proof(None, server, trainer, proof)
    assert not is_valid_train_proof("run key", server, trainer, "")


def test_a_busy_reply_is_told_apart_from_other_errors():
    busy = remote_error(busy_message("64 streams from your peer id are open here, the limit is 64", 2.0))
    assert isinstance(busy, PeerBusyError) and busy.retry_after == 2.0
    assert busy.reason == "64 streams from your peer id are open here, the limit is 64"
    assert remote_error(busy_message("full", 10**6)).retry_after == MAX_RETRY_AFTER  # a peer cannot banish itself
    other = remote_error("blocks [0, 9) are not served here")
    assert type(other) is RemoteError and str(other) == "blocks [0, 9) are not served here"
