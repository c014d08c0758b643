"""What a peer accepts from one client: sizes of requests and sessions, and how long it waits for them."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from blockswarm.wire.transport import busy_message

ACCEPTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RequestError(ValueError):
    """The request is invalid; its message is sent back to the caller verbatim."""


class CallerCounts:
    """How many of something (streams, requests) each caller holds and all callers together, under a per-caller and
    a total cap. `over_caller` and `over_total` say why a caller is turned away, from `{count}` and `{limit}`."""

    def __init__(self, per_caller: int, total: int, over_caller: str, over_total: str, retry_after: float) -> None:
        self.per_caller, self.cap, self.retry_after = per_caller, total, retry_after
        self.over_caller, self.over_total = over_caller, over_total
        self.total = 0
        self._per_caller: Counter = Counter()

    @contextlib.contextmanager
    def holding(self, remote: object) -> Iterator[None]:
        """Count one more for `remote` while the block runs; PeerBusy at once when that would pass a cap."""
        if self._per_caller[remote] >= self.per_caller:
            raise PeerBusy(
                self.over_caller.format(count=self._per_caller[remote], limit=self.per_caller), self.retry_after
            )
        if self.total >= self.cap:
            raise PeerBusy(self.over_total.format(count=self.total, limit=self.cap), self.retry_after)
        self._per_caller[remote] += 1
        self.total += 1
        try:
            yield
        finally:
            self.total -= 1
            self._per_caller[remote] -= 1
            if not self._per_caller[remote]:
                del self._per_caller[remote]


class PeerBusy(RequestError):
    """A limit of this peer is reached: the caller gets a busy reply at once and goes elsewhere for a while."""

    def __init__(self, reason: str, retry_after: float):
        super().__init__(busy_message(reason, retry_after))


@dataclass(frozen=True)
class ServingLimits:
    max_batch_tokens: int = 8192  # batch x sequence tokens in one forward/backward/inference step
    max_session_length: int = 8192
    # idle seconds before an inference session is closed and its cache freed: the most a session's next step
    # (all of its frame) may take to arrive
    session_timeout: float = 120.0
    # the most a client may take to start a request once its stream is open: a stream left silent is refused then
    # instead of holding a handler (a large first frame may then take up to step_timeout to arrive in full)
    first_message_timeout: float = 10.0
    # the most a client may take to send the whole first frame of a request: a forward/backward request or an
    # inference session's opening
    step_timeout: float = 300.0
    # how long a refused request's stream is read to its end (so that the refusal is not lost in a reset)
    drain_timeout: float = 10.0

    # bytes of the deep prompts and LoRA weights a client may send with one request or session opening, both as
    # sent and once decoded to float32 (checked from the tensors' headers before decoding); held until it ends
    max_adapter_bytes: int = 2**26
    # decoded adapter bytes of all running requests and open sessions together; over it, a busy reply
    max_adapter_bytes_total: int = 2**30
    # tensor bytes of the frames all requests receive or hold (as their headers announce them, before the rest is
    # read; a session holds its latest step); over it, a busy reply
    max_receiving_bytes: int = 2**32
    # requests waiting for compute or computing (the scheduler's one thread runs them): in all, and from one remote
    # peer; over either, a busy reply at once instead of a longer queue
    max_compute_queue: int = 64
    max_compute_queue_per_peer: int = 16
    # batch x sequence tokens of prefill a scheduler tick computes after its decode steps: a longer prompt goes on
    # in the next ticks, so decoding sessions wait at most about this much compute for their next token
    prefill_tokens_per_tick: int = 512
    # open request streams (inference sessions, forward and backward calls): from one remote peer, and in all
    max_streams_per_peer: int = 64
    max_streams: int = 1024
    busy_retry_after: float = 2.0  # seconds a busy reply asks the caller to stay away

    def max_request_bytes(self, hidden_size: int) -> int:
        """Tensor bytes one frame may carry: two activations of max_batch_tokens (float32), an adapter, slack."""
        return 2 * self.max_batch_tokens * hidden_size * 4 + self.max_adapter_bytes + 2**16

    def check_hidden(
        self, shape: Sequence[int], dtype: torch.dtype, hidden_size: int, expected_batch: int | None = None
    ) -> None:
        """Raise RequestError unless `shape` and `dtype` (read from a tensor's header, before decoding it) are
        those of hidden states [batch, seq_len, hidden_size] within the limits."""
        if len(shape) != 3 or shape[-1] != hidden_size:
            raise RequestError(f"hidden states must have shape [batch, seq_len, {hidden_size}], got {list(shape)}")
        if dtype not in ACCEPTED_DTYPES:
            raise RequestError(f"hidden states must be float32, float16 or bfloat16, got {dtype}")
        batch, seq_len, _ = shape
        if batch < 1 or seq_len < 1:
            raise RequestError(f"hidden states are empty: shape {list(shape)}")
        if expected_batch is not None and batch != expected_batch:
            raise RequestError(f"batch size {batch} != the session's batch size {expected_batch}")
        if batch * seq_len > self.max_batch_tokens:
            raise RequestError(
                f"{batch} x {seq_len} tokens exceed this peer's limit of {self.max_batch_tokens} per request"
            )

    def check_adapter_bytes(self, encoded: int, decoded: int) -> None:
        """Raise RequestError when an adapter's tensors, as sent (`encoded` bytes) or decoded to float32 (`decoded`
        bytes), are more than one request or session may bring."""
        for size, form in ((encoded, "as sent"), (decoded, "decoded to float32")):
            if size > self.max_adapter_bytes:
                raise RequestError(
                    f"adapter tensors take {size} bytes {form}, more than this peer's limit of "
                    f"{self.max_adapter_bytes} per request or session (max_adapter_bytes)"
                )
