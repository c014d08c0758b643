"""A peer's life: join the DHT, pick and load blocks, announce, serve, and announce OFFLINE on the way out."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P
from hivemind.utils import get_dht_time

from blockswarm import __version__
from blockswarm.compression.codecs import CODECS
from blockswarm.dht import (
    ModelInfo,
    ServerInfo,
    ServerState,
    announce_model,
    announce_server,
    exit_with_parent,
    get_block_servers,
    make_validators,
)
from blockswarm.models import load_blocks, load_config, weights_fingerprint
from blockswarm.models.checkpoints import save_span
from blockswarm.models.naming import swarm_model_name
from blockswarm.models.quantization import QUANT_TYPES, quantize_block
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.block_selection import block_coverage, choose_mover, choose_span_start
from blockswarm.peer.cache import CachePool
from blockswarm.peer.handlers import RequestHandlers, ServingLimits
from blockswarm.peer.stage_training import StageOptimizer, StageTrainingOptions, stage_run_id
from blockswarm.peer.throughput import Throughput, measure_throughput
from blockswarm.wire.ping import RttEma, measure_rtt

logger = logging.getLogger(__name__)

MAX_NEXT_PINGS = 8
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ServerOptions:
    model: str
    model_name: str | None = None  # name on the DHT; derived from the checkpoint when omitted
    blocks: tuple[int, int] | None = None  # pinned span [start, end)
    num_blocks: int | None = None  # otherwise: how many blocks to take where the swarm is weakest
    initial_peers: list[str] = field(default_factory=list)
    new_swarm: bool = False
    host: str = "0.0.0.0"
    port: int = 0
    announce_addrs: list[str] = field(default_factory=list)
    identity_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    cache_tokens: int = 8192
    public_name: str | None = None
    update_period: float = 30.0
    grace_period: float = 10.0  # on SIGTERM: how long running requests may take to finish
    balance_period: float = 120.0  # mean seconds between rebalancing checks (peers with pinned --blocks never move)
    throughput: float | None = None  # override the measured forward throughput (tokens/s per block)
    quant: str = "none"  # weight quantization of the served blocks: none | int8 | nf4
    limits: ServingLimits = field(default_factory=ServingLimits)
    train: bool = False  # SWARM training: the blocks learn from trainers' backward passes, averaged per stage
    training: StageTrainingOptions = field(default_factory=StageTrainingOptions)
    checkpoint_dir: str | None = None  # where a training peer saves its span (every `checkpoint_every` stage steps)
    checkpoint_every: int = 1
    checkpoint_keep: int = 3  # newest checkpoints kept per span


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def start_dht(options: ServerOptions, client_mode: bool = False) -> tuple[DHT, bytes]:
    """Start a hivemind DHT node (in its own process) with blockswarm's record validators."""
    if not options.initial_peers and not options.new_swarm:
        raise SystemExit(
            "error: pass --initial-peers with the multiaddr of a peer or `blockswarm run-dht` node of an "
            "existing swarm, or --new-swarm to start a new one"
        )
    validators, public_key = make_validators()
    host_maddrs = [f"/ip4/{options.host}/tcp/{options.port}"]
    try:
        dht = DHT(
            initial_peers=options.initial_peers,
            start=True,
            host_maddrs=host_maddrs,
            announce_maddrs=options.announce_addrs or None,
            identity_path=options.identity_path,
            record_validators=validators,
            client_mode=client_mode,
        )
    except Exception as e:
        raise SystemExit(
            f"error: could not join the swarm through {options.initial_peers or 'no initial peers'} "
            f"while listening on {host_maddrs}: {e}. Check that the initial peers are running and reachable."
        ) from e
    exit_with_parent(dht)
    return dht, public_key


class Server:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.config = load_config(options.model)
        self.weights_hash = weights_fingerprint(options.model)
        self.model_name = options.model_name or swarm_model_name(options.model, self.weights_hash)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if options.quant not in QUANT_TYPES:
            raise SystemExit(f"error: unknown --quant {options.quant!r}; choose one of {', '.join(QUANT_TYPES)}")
        if options.train and options.quant != "none":
            raise SystemExit("error: --train needs full-precision weights to learn: drop --quant")
        if options.checkpoint_every < 1 or options.checkpoint_keep < 1:
            raise SystemExit("error: --checkpoint-every and --checkpoint-keep must be at least 1")
        self.state = ServerState.JOINING
        self.span = (0, 0)
        self.throughput: Throughput | None = None
        self.next_pings = RttEma()
        self.stage: StageOptimizer | None = None

    def run(self) -> None:
        """Blocks until SIGINT/SIGTERM; the DHT process is forked before any torch threads start."""
        dht, public_key = start_dht(self.options)
        try:
            self.span = self._choose_blocks(dht)
            self._announce(dht, public_key, cache_tokens_left=0)
            backend = self._load(*self.span)
            try:
                if self.options.train:
                    self._join_stage(dht, backend)
                import uvloop

                uvloop.run(self._serve(dht, public_key, backend))
            finally:
                backend.shutdown()
                if self.stage is not None:
                    self.stage.shutdown()
                    self._save_checkpoint(backend)
        finally:
            dht.shutdown()

    def _join_stage(self, dht: DHT, backend: BlockBackend) -> None:
        """Make the blocks trainable and join the stage of peers serving the same span; a late joiner first
        downloads the stage's current parameters and optimizer state."""
        start, end = self.span
        for parameter in backend.parameters():
            parameter.requires_grad_(True)
        backend.parameters_lock = threading.Lock()
        self.stage = StageOptimizer(
            dht,
            stage_run_id(self.model_name, start, end),
            backend.parameters(),
            self.options.training,
            parameters_lock=backend.parameters_lock,
        )
        (servers,) = get_block_servers(dht, self.model_name, start, start + 1, latest=True)
        mates = [
            peer
            for peer, info in servers.items()
            if info.training and (info.start, info.end) == (start, end) and info.state == ServerState.ONLINE
        ]
        if mates:
            loaded = self.stage.load_state_from_peers()
            if loaded:
                self._save_checkpoint(backend)
            print(
                f"blockswarm peer joined stage {start}:{end} with {len(mates)} peer(s): "
                + (f"loaded their state at step {self.stage.epoch}" if loaded else "could not load their state"),
                flush=True,
            )
        backend.learn = self.stage.submit
        self.stage.on_step = lambda epoch: self._on_stage_step(backend, epoch)

    def _on_stage_step(self, backend: BlockBackend, epoch: int) -> None:
        if epoch % self.options.checkpoint_every == 0:
            self._save_checkpoint(backend)

    def _save_checkpoint(self, backend: BlockBackend) -> None:
        """blocks_START-END.stepN.safetensors in --checkpoint-dir; older steps beyond the newest few are removed."""
        if self.options.checkpoint_dir is None:
            return
        start, end = self.span
        directory = Path(self.options.checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        epoch = self.stage.epoch
        save_span(
            backend.blocks,
            start,
            directory / f"blocks_{start}-{end}.step{epoch:06d}.safetensors",
            {"epoch": str(epoch), "model": self.model_name},
        )
        for old in sorted(directory.glob(f"blocks_{start}-{end}.step*.safetensors"))[: -self.options.checkpoint_keep]:
            old.unlink(missing_ok=True)

    def _load(self, start: int, end: int) -> BlockBackend:
        """Load (on the CPU when quantizing: the full-precision weights never occupy the GPU) and quantize."""
        quant = self.options.quant
        blocks = load_blocks(
            self.options.model, start, end, dtype=self.dtype, device="cpu" if quant != "none" else self.device
        )
        blocks = [quantize_block(block, quant, self.device) for block in blocks]
        if self.throughput is None:
            self.throughput = measure_throughput(blocks[0], self.config, self.dtype, self.device, quant)
        return BlockBackend(self.config, blocks, start, self.dtype, self.device)

    def _choose_blocks(self, dht: DHT) -> tuple[int, int]:
        total = self.config.num_blocks
        if self.options.blocks is not None:
            start, end = self.options.blocks
            if not 0 <= start < end <= total:
                raise SystemExit(f"error: --blocks {start}:{end} is outside the model's blocks 0:{total}")
            return start, end
        count = self.options.num_blocks or total
        if not 0 < count <= total:
            raise SystemExit(f"error: --num-blocks {count} must be between 1 and {total}")
        coverage = block_coverage(get_block_servers(dht, self.model_name, 0, total, latest=True), exclude=[dht.peer_id])
        start = choose_span_start(coverage, count)
        return start, start + count

    @property
    def published_throughput(self) -> float:
        if self.options.throughput is not None:
            return self.options.throughput
        return self.throughput.forward_rps if self.throughput else 1.0

    def _status(self) -> dict:
        return dict(
            state=self.state.value,
            version=__version__,
            dtype=str(self.dtype).removeprefix("torch."),
            quant=self.options.quant,
            codecs=sorted(CODECS),
            training_step=None if self.stage is None else self.stage.epoch,
        )

    def _announce(
        self, dht: DHT, public_key: bytes, cache_tokens_left: int, span: tuple[int, int] | None = None
    ) -> None:
        start, end = span or self.span
        ttl = max(2 * self.options.update_period, self.options.update_period + 10)
        expiration = get_dht_time() + ttl
        info = ServerInfo(
            state=self.state,
            start=start,
            end=end,
            throughput=self.published_throughput,
            inference_rps=self.throughput.inference_rps if self.throughput else None,
            forward_rps=self.throughput.forward_rps if self.throughput else None,
            cache_tokens_left=cache_tokens_left,
            public_name=self.options.public_name,
            next_pings={peer.to_base58(): rtt for peer, rtt in self.next_pings.snapshot().items()},
            training=self.options.train,
            balancing=self._balancing,
            # a stage's step count changes every few seconds, far more often than records: trainers ask `info`
            **{k: v for k, v in self._status().items() if k not in ("state", "training_step")},
        )
        if not announce_server(dht, self.model_name, info, public_key, expiration):
            logger.warning("could not store this peer's record on the DHT; will retry")
        model_info = ModelInfo(
            num_blocks=self.config.num_blocks,
            family=self.config.family,
            config_hash=self.config.fingerprint(),
            weights_hash=self.weights_hash,
        )
        announce_model(dht, self.model_name, model_info, expiration)

    async def _serve(self, dht: DHT, public_key: bytes, backend: BlockBackend) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        p2p = await dht.replicate_p2p()
        handlers = RequestHandlers(
            self.model_name, backend, self._cache_for(backend), self.options.limits, self._status
        )
        await handlers.register(p2p)

        async def announce(span: tuple[int, int] | None = None) -> None:
            await asyncio.to_thread(self._announce, dht, public_key, handlers.cache.tokens_left, span)

        self.state = ServerState.ONLINE
        await announce()
        maddrs = " ".join(str(a) for a in await p2p.get_visible_maddrs())
        print(
            f"blockswarm peer ready: model={self.model_name} blocks={self.span[0]}:{self.span[1]} "
            f"peer_id={dht.peer_id} maddrs={maddrs}",
            flush=True,
        )
        next_balance = loop.time() + self._balance_delay()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.options.update_period)
            except TimeoutError:
                await self._ping_next_peers(dht, p2p)
                if self._balancing and loop.time() >= next_balance:
                    await self._rebalance(dht, handlers, announce)
                    next_balance = loop.time() + self._balance_delay()
                await announce()
        await self._drain(handlers, announce)
        self.state = ServerState.OFFLINE
        await announce()
        print("blockswarm peer stopped: announced OFFLINE", file=sys.stderr, flush=True)

    def _cache_for(self, backend: BlockBackend) -> CachePool:
        return CachePool(self.options.cache_tokens, len(backend.blocks), backend.make_cache)

    @property
    def _balancing(self) -> bool:
        """Pinned spans (--blocks) and training stages (--train) stay where they started."""
        return self.options.blocks is None and not self.options.train

    def _balance_delay(self) -> float:
        """Randomized so that peers do not all read the DHT in the same instant."""
        return self.options.balance_period * random.uniform(0.5, 1.5)

    async def _drain(self, handlers: RequestHandlers, announce) -> None:
        self.state = ServerState.DRAINING
        await announce()
        handlers.begin_leaving()
        await handlers.wait_idle(self.options.grace_period)

    async def _rebalance(self, dht: DHT, handlers: RequestHandlers, announce) -> None:
        """Move when this peer is the swarm's chosen mover (see `choose_mover`): drain, load, serve."""
        total = self.config.num_blocks
        records = await asyncio.to_thread(get_block_servers, dht, self.model_name, 0, total, latest=True)
        mover = choose_mover(records)
        if mover is None or mover[0] != dht.peer_id:
            return
        new_start = mover[1]
        old = self.span
        await self._drain(handlers, announce)
        self.state = ServerState.OFFLINE
        await announce()
        self.span = (new_start, new_start + old[1] - old[0])
        self.state = ServerState.JOINING
        await announce()
        old_backend = handlers.backend
        backend = await asyncio.to_thread(self._load, *self.span)
        handlers.serve(backend, self._cache_for(backend))
        old_backend.shutdown()
        self.state = ServerState.ONLINE
        print(f"blockswarm peer moved: blocks={old[0]}:{old[1]} -> {self.span[0]}:{self.span[1]}", flush=True)

    async def _ping_next_peers(self, dht: DHT, p2p: P2P) -> None:
        """RTTs to the peers serving the block right after this span, published as next_pings."""
        if self.span[1] >= self.config.num_blocks:
            return
        (successors,) = await asyncio.to_thread(get_block_servers, dht, self.model_name, self.span[1], self.span[1] + 1)
        peers = list(successors)[:MAX_NEXT_PINGS]
        for peer, rtt in zip(peers, await asyncio.gather(*(measure_rtt(p2p, peer, timeout=2.0) for peer in peers))):
            if rtt is not None:
                self.next_pings.update(peer, rtt)
