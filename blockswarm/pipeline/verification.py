"""Spot-checking peers: a random share of the spans a client runs is also computed by another peer, and compared.

With probability `fraction`, the inputs a hop's peer P got (for an inference step: the span's whole input
history, since the checker has no KV cache of the session) also go, as a stateless forward and at the same time
as P's request, to a peer Q that serves all of P's blocks with the same dtype and weight quantization. When the
outputs differ by more than `tolerance`, a third such peer R settles it: whoever disagrees with the other two is
the liar, reported (`LieReport`, a warning in the log) and distrusted by the router for the client's lifetime.
When P lies, `settle` raises `LieDetected`, a PeerError, so the caller's failover path replaces P as it would a
dead peer and computes the step again on an honest route. With nobody to settle a dispute, both P and Q are
distrusted and reported as unconfirmed. Two liars returning the same wrong numbers are not caught: see README.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from hivemind.p2p import P2P

from blockswarm.compression.codecs import encode_tensor
from blockswarm.pipeline.hops import Hop, PeerError, Router
from blockswarm.pipeline.streams import call
from blockswarm.wire.adapters import AdapterTensors, adapter_payloads
from blockswarm.wire.messages import FORWARD_RPC, AdapterSpec, ChainRequest

logger = logging.getLogger(__name__)

# Relative L2 error per row (one token's hidden state) that a wire codec may add to an honest peer's output.
# int8-blockwise: a value x between codes q and q+1 (|x| >= q*q*s) is off by at most (q + 1/2) * s, so a block b of
# n = 256 values is off by at most s * sum|x| + s**1.5 * sum|x|**0.5 + n * s*s / 4 squared, where sum|x| <= 16 ||b||,
# sum|x|**0.5 <= 64 ||b||**0.5 (Hölder) and s = absmax / 127**2 rounded up to bf16 <= 1.004 ||b|| / 127**2: at most
# 3.21% of ||b||, so of each row, whatever the values (typical: 0.7%). A cast loses at most one rounding of its
# mantissa. An unknown codec gets 5%.
WIRE_CODEC_ERROR = {"none": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8-blockwise": 0.033}
UNKNOWN_CODEC_ERROR = 0.05

# Relative error per row, per block, between a peer's cached decoding step and another peer's full forward of the
# same inputs in the same dtype. Measured on random-weight tiny/small models (8/16 blocks) on CPU: float32 ~1e-6,
# float16 ~5e-4, bfloat16 ~4e-3 per block; the figures below leave 5x (float32: 100x, for GPU vs CPU kernels).
# LLM.int8 weights pick their outlier columns per batch, so a step and a full pass differ more: a guess, unmeasured.
BLOCK_ERROR = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 2e-2}
UNKNOWN_DTYPE_BLOCK_ERROR = 2e-2
QUANT_BLOCK_ERROR = {"none": 0.0, "nf4": 0.0, "int8": 1e-2}

# A checker that failed (dead, hung, or refusing a long history) is not asked again for this long. It is not banned:
# it may serve this client's sessions well, and a ban would move them off it.
FAILED_CHECKER_PAUSE = 60.0


def tolerance(hop: Hop, codecs: Sequence[str]) -> float:
    """The largest relative error per row between two honest peers' outputs for `hop`'s blocks, each output having
    crossed the wire with one of `codecs`: the codecs' worst case plus the compute dtype's drift, which grows with
    the number of blocks. Honest peers must never be flagged, so these are upper bounds with a margin; a lie
    smaller than this goes unnoticed (on bfloat16 peers only gross lies are caught)."""
    per_block = BLOCK_ERROR.get(hop.dtype, UNKNOWN_DTYPE_BLOCK_ERROR) + QUANT_BLOCK_ERROR.get(hop.quant, 1e-2)
    wire = sum(WIRE_CODEC_ERROR.get(codec, UNKNOWN_CODEC_ERROR) for codec in codecs)
    return wire + per_block * (hop.end - hop.start)


def relative_error(claimed: torch.Tensor, reference: torch.Tensor) -> float:
    """max over rows of ||claimed - reference|| / ||reference||; inf for another shape or non-finite values."""
    if claimed.shape != reference.shape:
        return float("inf")
    claimed, reference = claimed.float(), reference.float()
    if not bool(torch.isfinite(claimed).all()):
        return float("inf")
    norms = reference.norm(dim=-1).clamp_min(1e-6)
    return float(((claimed - reference).norm(dim=-1) / norms).max())


@dataclass(frozen=True)
class LieReport:
    """A peer caught returning wrong outputs for blocks [start, end). `confirmed`: outvoted by two peers that agree
    with each other; False when nobody could settle a dispute between two peers (either may be honest)."""

    peer_id: str
    start: int
    end: int
    detected_at: float  # unix time
    confirmed: bool
    witnesses: tuple[str, ...]  # the peers whose outputs disagreed with it
    relative_error: float
    tolerance: float

    def as_dict(self) -> dict:
        return asdict(self)


class LieDetected(PeerError):
    """The peer of a checked hop returned outputs that other peers do not confirm."""


@dataclass
class _Output:
    hop: Hop
    tensor: torch.Tensor
    codec: str  # how it crossed the wire


@dataclass
class PendingCheck:
    """A checker's forward of a hop's inputs, running while the hop's own peer computes."""

    hop: Hop
    checker: Hop
    payloads: list[bytes]  # the exact inputs the hop's peer got, then the adapter's tensors
    adapter: AdapterSpec | None
    tail: int  # the last positions of the checker's output that the hop's peer computed
    task: asyncio.Future

    @property
    def span(self) -> tuple[int, int]:
        return self.hop.start, self.hop.end

    def cancel(self) -> None:
        self.task.cancel()


class Verifier:
    """Spot-checks a random `fraction` of hops; shared by a client's sessions and chain, keeps every `LieReport`."""

    def __init__(
        self,
        p2p: P2P,
        router: Router,
        fraction: float,
        timeout: float,
        rng: random.Random | None = None,
        on_report: Callable[[LieReport], None] | None = None,
    ):
        """`on_report` is called (on the event loop, so it must not block) with each new report."""
        self.p2p = p2p
        self.on_report = on_report
        self.router = router
        self.fraction = check_fraction(fraction)
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.reports: list[LieReport] = []
        self.checked = 0  # hops compared with a checker's outputs
        self.unverifiable = 0  # hops drawn for a check that no other peer could compute
        self.skipped = 0  # checks abandoned because the checker failed or refused (e.g. a history over its limits)
        self._failed_checkers: dict = {}  # peer id -> monotonic time until which it is not asked

    def draw(self) -> bool:
        """Whether to check the next hop: true with probability `fraction`."""
        return self.fraction > 0 and self.rng.random() < self.fraction

    def begin(
        self, hop: Hop, inputs: torch.Tensor, adapter: AdapterTensors | None = None, tail: int | None = None
    ) -> PendingCheck | None:
        """Start a checker's forward of `inputs` (exactly what the hop's peer got, [batch, positions, hidden]);
        `tail`: how many last positions the hop's peer computes (default: all). None when no peer can check."""
        candidates = self._peers_like(hop, exclude={hop.peer_id})
        if not candidates:
            self.unverifiable += 1
            return None
        checker = self.rng.choice(candidates)
        payloads = [encode_tensor(inputs, "none"), *adapter_payloads(adapter, hop.start, hop.end)]
        spec = None if adapter is None else adapter.spec
        task = asyncio.ensure_future(self._forward(checker, payloads, spec))
        task.add_done_callback(_retrieve)  # a check abandoned with its hop's failure logs no "never retrieved"
        return PendingCheck(hop, checker, payloads, spec, inputs.shape[1] if tail is None else tail, task)

    async def settle(self, check: PendingCheck, claimed: torch.Tensor, codec: str) -> None:
        """Compare the hop's outputs (crossed the wire with `codec`) with the checker's; raises LieDetected when the
        hop's peer is outvoted, or when a dispute cannot be settled."""
        try:
            reference = await check.task
        except Exception as error:  # a checker that cannot help is not a liar: the check is skipped
            log = logger.debug if isinstance(error, PeerError) else logger.warning
            log("spot check of blocks %d:%d skipped: %r", check.hop.start, check.hop.end, error)
            self._failed_checkers[check.checker.peer_id] = time.monotonic() + FAILED_CHECKER_PAUSE
            self.skipped += 1
            return
        self.checked += 1
        claim = _Output(check.hop, claimed, codec)
        second = _Output(check.checker, reference[:, -check.tail :], "none")
        if self._agree(claim, second)[0]:
            return
        third = await self._arbiter(check)
        if third is None:
            self._report(claim, (second,), confirmed=False)
            self._report(second, (claim,), confirmed=False)
            raise LieDetected(check.hop.peer_id, f"disputed by {check.checker.peer_id} and nobody could settle it")
        claim_holds, second_holds = self._agree(claim, third)[0], self._agree(second, third)[0]
        if claim_holds and second_holds:
            logger.warning("spot check of blocks %d:%d inconclusive: outputs near the tolerance", *check.span)
        elif claim_holds:
            self._report(second, (claim, third), confirmed=True)
        elif second_holds:
            self._report(claim, (second, third), confirmed=True)
            raise LieDetected(check.hop.peer_id, f"returned wrong outputs for blocks {check.hop.start}:{check.hop.end}")
        else:
            for output, others in ((claim, (second, third)), (second, (claim, third)), (third, (claim, second))):
                self._report(output, others, confirmed=False)
            raise LieDetected(check.hop.peer_id, "three peers disagree on the same inputs")

    async def _arbiter(self, check: PendingCheck) -> _Output | None:
        """A third peer's outputs for the same inputs; None when no such peer is there or answers."""
        candidates = self._peers_like(check.hop, exclude={check.hop.peer_id, check.checker.peer_id})
        self.rng.shuffle(candidates)
        for arbiter in candidates[:3]:
            try:
                output = await self._forward(arbiter, check.payloads, check.adapter)
                return _Output(arbiter, output[:, -check.tail :], "none")
            except PeerError as error:
                logger.debug("arbiter %s failed: %s", arbiter.peer_id, error)
                self._failed_checkers[arbiter.peer_id] = time.monotonic() + FAILED_CHECKER_PAUSE
        return None

    def _peers_like(self, hop: Hop, exclude: set) -> list[Hop]:
        """Usable peers serving all of `hop`'s blocks that compute the same numbers (same dtype and quantization)
        and did not fail a check lately."""
        now = time.monotonic()
        return [
            other
            for other in self.router.covering(hop.start, hop.end)
            if other.peer_id not in exclude
            and (other.dtype, other.quant) == (hop.dtype, hop.quant)
            and self._failed_checkers.get(other.peer_id, 0.0) <= now
        ]

    async def _forward(self, peer: Hop, payloads: list[bytes], adapter: AdapterSpec | None) -> torch.Tensor:
        request = ChainRequest(start=peer.start, end=peer.end, codec="none", adapter=adapter)
        outputs = await call(self.p2p, peer.peer_id, FORWARD_RPC, request, payloads, self.timeout)
        if len(outputs) != 1:
            raise PeerError(peer.peer_id, f"a forward reply with {len(outputs)} tensors instead of 1")
        return outputs[0]

    def _agree(self, first: _Output, second: _Output) -> tuple[bool, float, float]:
        limit = tolerance(first.hop, (first.codec, second.codec))
        error = relative_error(first.tensor, second.tensor)
        return error <= limit, error, limit

    def _report(self, liar: _Output, witnesses: Sequence[_Output], confirmed: bool) -> None:
        _, error, limit = self._agree(liar, witnesses[0])
        report = LieReport(
            peer_id=str(liar.hop.peer_id),
            start=liar.hop.start,
            end=liar.hop.end,
            detected_at=time.time(),
            confirmed=confirmed,
            witnesses=tuple(str(witness.hop.peer_id) for witness in witnesses),
            relative_error=error,
            tolerance=limit,
        )
        self.reports.append(report)
        self.router.distrust(liar.hop.peer_id)
        if self.on_report is not None:
            self.on_report(report)
        logger.warning(
            "peer %s %s for blocks %d:%d (relative error %.3g > tolerance %.3g vs %s); no longer used",
            report.peer_id,
            "returned wrong outputs" if confirmed else "disagreed with another peer, and nobody could settle it,",
            report.start,
            report.end,
            error,
            limit,
            ", ".join(report.witnesses),
        )


def check_fraction(fraction: float) -> float:
    if not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"verify_fraction must be a number between 0 and 1, got {fraction!r}")
    return float(fraction)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
