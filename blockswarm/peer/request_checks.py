"""Checks of what a request asks for (span, codec) and reading its tensors, each checked from its header first."""

from __future__ import annotations

import torch

from blockswarm.compression.codecs import CODECS
from blockswarm.peer.adapters import ReceivedAdapter, receive_adapter
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.limits import RequestError, ServingLimits
from blockswarm.wire.messages import ChainRequest, OpenSession
from blockswarm.wire.payload_headers import payload_headers
from blockswarm.wire.transport import Frame


def check_span(backend: BlockBackend, start: int, end: int) -> None:
    if not backend.start <= start < end <= backend.end:
        raise RequestError(
            f"blocks [{start}, {end}) are not served here: this peer serves [{backend.start}, {backend.end})"
        )


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise RequestError(f"unsupported codec {codec!r}; this peer supports {sorted(CODECS)}")


def check_session(backend: BlockBackend, limits: ServingLimits, session: OpenSession) -> None:
    """What an OpenSession asks for: blocks served here, a known codec, a batch and a length within limits."""
    check_span(backend, session.start, session.end)
    check_codec(session.codec)
    if session.batch_size < 1 or session.max_length < 1:
        raise RequestError("batch_size and max_length must be positive")
    if session.max_length > limits.max_session_length:
        raise RequestError(f"max_length {session.max_length} exceeds this peer's limit of {limits.max_session_length}")
    if (session.push_to is None) != (session.push_session is None):
        raise RequestError("push_to and push_session go together: the next span's peer and its session id")


def decode_hidden(
    frame: Frame,
    backend: BlockBackend,
    limits: ServingLimits,
    begin: int = 0,
    end: int | None = None,
    expected_batch: int | None = None,
) -> torch.Tensor:
    """The one tensor of hidden states among the frame's payloads [begin, end), its shape checked before decoding."""
    if len(frame.payloads[begin:end]) != 1:
        raise RequestError(f"expected exactly one tensor of hidden states, got {len(frame.payloads[begin:end])}")
    (header,) = payload_headers(frame, begin, end)
    limits.check_hidden(header.shape, header.dtype, backend.config.hidden_size, expected_batch)
    (hidden,) = frame.tensors(begin, end)
    return hidden


def receive_request_adapter(
    frame: Frame[OpenSession | ChainRequest],
    begin: int,
    backend: BlockBackend,
    batch_size: int,
    requires_grad: bool = False,
) -> ReceivedAdapter | None:
    """The adapter of the request's blocks in its payloads from `begin` on (sized by the handler's room check)."""
    request = frame.meta
    if request.adapter is None:
        return None
    num_blocks = request.end - request.start
    tensors = frame.tensors(begin)
    return receive_adapter(
        request.adapter, tensors, backend.config, num_blocks, batch_size, backend.device, requires_grad
    )
