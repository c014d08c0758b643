"""What the pipeline needs from routing, stated here so that routing depends on the pipeline and not back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hivemind.p2p import PeerID


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) computed by one peer, which decodes the wire codecs it advertises, in `dtype` with weights
    quantized as `quant` (spot checks compare peers that compute alike)."""

    peer_id: PeerID
    start: int
    end: int
    codecs: tuple[str, ...] = ("none",)
    dtype: str = "float32"
    quant: str = "none"

    def codec_for(self, preferred: str) -> str:
        """The codec for tensors to and from this peer: the caller's choice if the peer speaks it, else none."""
        return preferred if preferred in self.codecs else "none"


class Router(Protocol):
    def route(self, start: int, end: int, cache_tokens_needed: int = 0) -> list[Hop]:
        """The fastest consecutive hops covering blocks [start, end) for an inference session whose KV cache
        takes `cache_tokens_needed` tokens; raises NoRouteError when some block has no usable peer."""

    def wire(self, start: int, end: int) -> list[Hop]:
        """Consecutive hops covering blocks [start, end) for one forward/backward pass, load-balanced."""

    def ban(self, peer_id: PeerID, seconds: float | None = None) -> None:
        """Stop routing through a peer that failed (for a while that grows with repeated failures), or that is busy
        (for `seconds`, not counted as a failure)."""

    def is_usable(self, peer_id: PeerID) -> bool:
        """False once a peer is banned or announced it is leaving (DRAINING/OFFLINE)."""

    def covering(self, start: int, end: int) -> list[Hop]:
        """Every usable peer serving all of blocks [start, end), as a hop over exactly those blocks (spot checks)."""

    def distrust(self, peer_id: PeerID) -> None:
        """Never route through a peer caught returning wrong outputs again (for the client's lifetime)."""


class NoRouteError(RuntimeError):
    """Some blocks are served by no usable peer."""

    def __init__(self, model: str, missing_blocks: list[int], detail: str = ""):
        self.model = model
        self.missing_blocks = missing_blocks
        shown = ", ".join(map(str, missing_blocks[:16])) + (", ..." if len(missing_blocks) > 16 else "")
        super().__init__(
            f"no usable peer serves block(s) {shown} of model {model!r}" + (f": {detail}" if detail else "")
        )


class PeerError(RuntimeError):
    """A peer failed a request: an error reply, a broken stream or a timeout. `retry_after` is set when the peer
    only said it is busy: avoid it that long, but it did nothing wrong."""

    def __init__(self, peer_id: PeerID, message: str, retry_after: float | None = None):
        self.peer_id = peer_id
        self.retry_after = retry_after
        super().__init__(f"peer {peer_id}: {message}")
