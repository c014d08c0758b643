"""Hypothesis strategies for tests/test_fuzz.py: what a fuzz case sends, from valid frames down to raw bytes."""

from __future__ import annotations

import struct

import msgpack
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hypothesis import strategies as st

from blockswarm.compression.codecs import CODECS, WIRE_DTYPES, encode_tensor
from blockswarm.models.adapters import LORA_TARGETS
from blockswarm.wire.transport import REQUEST

HIDDEN = 256  # tiny preset
SPAN = (0, 3)


def framed(data: bytes, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    """A protobuf message's bytes as hivemind frames them on a stream."""
    return marker + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


def raw_messages(header: object, blob: bytes, chunk: int) -> list[runtime_pb2.ExpertRequest]:
    """A frame's protobuf messages with any header (valid or not) and its tensor bytes cut into `chunk`s."""
    chunks = [blob[i : i + chunk] for i in range(0, len(blob), chunk)] or [b""]
    first = REQUEST(metadata=msgpack.packb(header), tensors=[runtime_pb2.Tensor(buffer=chunks[0])])
    return [first] + [REQUEST(tensors=[runtime_pb2.Tensor(buffer=c)]) for c in chunks[1:]]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
codec_names = st.sampled_from([*CODECS, *CODECS, *CODECS, "zip", ""])


rarely = st.sampled_from([False] * 4 + [True])  # (hypothesis favours the simplest value: integers(0, 9) is 0 often)


def mostly(valid: object, *invalid: object) -> st.SearchStrategy:
    """`valid` four times in five, else one of `invalid`."""
    return st.sampled_from([valid] * 4 * len(invalid) + list(invalid))


positions = mostly(0, -1, 1, 3, 2**63 - 1, -(2**63))


@st.composite
def adapter_specs(draw) -> dict | None:
    if not draw(rarely):
        return None
    targets = draw(st.lists(st.sampled_from([*LORA_TARGETS, "qkv"]), max_size=3))
    return {
        "prompt_len": draw(st.integers(-1, 4)),
        "lora_rank": draw(st.integers(-1, 3)),
        "lora_alpha": draw(st.floats(-2, 2)),
        "lora_targets": targets,
    }


@st.composite
def mutated_meta(draw, valid: dict) -> object:
    """`valid` metadata, or that with fields replaced by random values, dropped, or added; or anything at all."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["fields"] * 3 + ["anything"]))
    if kind == "anything":
        return draw(json_values)
    meta = dict(valid)
    if kind == "fields":
        for key in draw(st.lists(st.sampled_from([*valid, "extra"]), max_size=3)):
            if draw(st.booleans()):
                meta.pop(key, None)
            else:
                meta[key] = draw(json_values)
    return meta


@st.composite
def tensor_payloads(draw, hidden_like: bool) -> bytes:
    """An encoded tensor (hidden states [b, s, 256] when `hidden_like`, any small shape otherwise), often broken."""
    if hidden_like and not draw(rarely):
        shape = (draw(mostly(1, 0, 2)), draw(mostly(2, 0, 1, 3)), HIDDEN)
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    dtype = draw(mostly(torch.float32, *WIRE_DTYPES.values()))
    codec = draw(st.sampled_from([c for c, spec in CODECS.items() if spec.accepts(dtype)]))
    payload = encode_tensor(torch.randn(shape).to(dtype), codec)
    mutation = draw(st.sampled_from(["none"] * 8 + ["truncate", "extend", "flip", "claim", "codec", "random"]))
    if mutation == "truncate":
        payload = payload[: draw(st.integers(0, max(len(payload) - 1, 0)))]
    elif mutation == "extend":
        payload += draw(st.binary(min_size=1, max_size=64))
    elif mutation == "flip":
        index = draw(st.integers(0, len(payload) - 1))
        payload = payload[:index] + bytes([payload[index] ^ draw(st.integers(1, 255))]) + payload[index + 1 :]
    elif mutation == "claim":  # the header claims a shape its bytes do not carry
        dims = draw(st.lists(st.sampled_from([0, 1, 2, HIDDEN, 2**16, 2**31, 2**32 - 1]), min_size=1, max_size=4))
        payload = (
            payload[:4] + bytes([len(dims)]) + struct.pack(f"<{len(dims)}I", *dims) + payload[5 + 4 * len(shape) :]
        )
    elif mutation == "codec":
        payload = payload[:2] + bytes([draw(st.integers(0, 255)), draw(st.integers(0, 255))]) + payload[4:]
    elif mutation == "random":
        payload = draw(st.binary(max_size=300))
    return payload


@st.composite
def frame_bytes(draw, valid_meta: dict, payloads: list[bytes]) -> bytes:
    """One frame on the wire: metadata mutated, payload sizes possibly lying, a message possibly garbled (its
    length prefix stays true, so the stream stays readable)."""
    meta = draw(mutated_meta(valid_meta))
    sizes = [len(p) for p in payloads]
    if draw(rarely):
        sizes = draw(st.lists(st.integers(-5, 2**40), max_size=4))
    header = draw(json_values) if draw(rarely) else {"sizes": sizes, "meta": meta}
    chunk = draw(st.sampled_from([2**21, 7, 1000]))
    messages = [m.SerializeToString() for m in raw_messages(header, b"".join(payloads), chunk)]
    if draw(rarely):  # a garbage protobuf
        index = draw(st.integers(0, len(messages) - 1))
        data = messages[index]
        cut = draw(st.integers(0, len(data)))
        messages[index] = data[:cut] + draw(st.binary(max_size=8)) + data[cut + draw(st.integers(0, 4)) :]
    return b"".join(framed(m) for m in messages)


def chain_meta(draw, train: bool = False) -> tuple[dict, list[bytes]]:
    spec = draw(adapter_specs())
    meta = {"start": draw(mostly(0, 1, 2, 3, -1)), "end": draw(mostly(3, 1, 2, 4, 2**40))}
    meta |= {"codec": draw(codec_names), "adapter": spec}
    if train:
        meta |= {"train": draw(st.booleans()), "train_proof": draw(st.text(max_size=8))}
    adapter = draw(st.lists(tensor_payloads(hidden_like=False), max_size=4)) if spec else []
    return meta, adapter


@st.composite
def forward_cases(draw) -> bytes:
    meta, adapter = chain_meta(draw)
    hidden = draw(st.lists(tensor_payloads(hidden_like=True), min_size=0, max_size=2))
    return draw(frame_bytes(meta, hidden + adapter))


@st.composite
def backward_cases(draw) -> bytes:
    meta, adapter = chain_meta(draw, train=True)
    activations = draw(st.lists(tensor_payloads(hidden_like=True), min_size=1, max_size=3))
    return draw(frame_bytes(meta, activations + adapter))


@st.composite
def inference_cases(draw) -> bytes:
    spec = draw(adapter_specs())
    opening = {
        "session_id": draw(mostly("s", "", "x" * 65)),
        "start": draw(mostly(0, 1, 3, -1)),
        "end": draw(mostly(3, 2, 9)),
        "max_length": draw(mostly(8, 1, 0, 10**6)),
        "batch_size": draw(mostly(1, 2, 0, -1, 2**40)),
        "codec": draw(codec_names),
        "adapter": spec,
    }
    adapter = draw(st.lists(tensor_payloads(hidden_like=False), max_size=3)) if spec else []
    data = draw(frame_bytes(opening, adapter))
    for _ in range(draw(st.integers(0, 3))):
        step = {"session_id": draw(mostly("s", "other")), "position": draw(positions)}
        data += draw(frame_bytes(step, [draw(tensor_payloads(hidden_like=True))]))
    return data


# streams readable message by message, of random protobuf bytes
garbage_messages = st.lists(st.binary(max_size=200), min_size=1, max_size=3).map(lambda ms: b"".join(map(framed, ms)))
# streams that are not: random bytes, unknown markers, message lengths promising more than comes
unreadable = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda marker, length, body: marker + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body,
        st.sampled_from([P2P.MESSAGE_MARKER, P2P.ERROR_MARKER, b"\x07"]),
        st.integers(0, 2**40),
        st.binary(max_size=100),
    ),
)
