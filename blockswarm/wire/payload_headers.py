"""What an encoded tensor claims to be (dtype and shape), read from its header alone: a receiver checks how large
a tensor will be once decoded before it decodes any (a small int8 payload can claim a large float32 tensor)."""

from __future__ import annotations

from blockswarm.compression.codecs import TensorHeader, WireFormatError, read_header
from blockswarm.wire.transport import Frame, UndecodableTensor


def read_payload_header(payload: bytes) -> TensorHeader:
    """The header of one payload; UndecodableTensor when it is not even readable."""
    try:
        return read_header(payload)
    except WireFormatError as e:
        raise UndecodableTensor(str(e)) from e


def payload_headers(frame: Frame, begin: int = 0, end: int | None = None) -> list[TensorHeader]:
    """The headers of the frame's payloads [begin, end)."""
    return [read_payload_header(payload) for payload in frame.payloads[begin:end]]
