"""A peer, composed: join the DHT, choose and load blocks, announce, serve, rebalance, and leave cleanly.

Each concern is its own piece: `SpanLoader` (weights, quantization, throughput), `Balancer` (which blocks, when
to move), `Announcer` (DHT records), `NextPeerPinger` (next_pings), `Lifecycle` (JOINING -> ONLINE -> DRAINING ->
OFFLINE, signals), `RequestHandlers` (RPCs), `StageMember` (SWARM training and checkpoints).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass, field

from blockswarm import __version__
from blockswarm.compression.codecs import CODECS
from blockswarm.dht import ModelInfo, NodeRole, ServerState, SwarmNode, start_dht
from blockswarm.dht.reachability import RelayMode, choose_relay, serve_dial_back, visible_maddrs, wait_for_relayed_addrs
from blockswarm.models import load_config, weights_fingerprint
from blockswarm.models.naming import swarm_model_name
from blockswarm.peer.announcer import Announcer, PeerProfile, check_record_bounds
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.balancer import Balancer, check_span_request
from blockswarm.peer.cache import CachePool
from blockswarm.peer.handlers import RequestHandlers
from blockswarm.peer.lifecycle import Lifecycle
from blockswarm.peer.limits import ServingLimits
from blockswarm.peer.loader import SpanLoader
from blockswarm.peer.pinger import NextPeerPinger
from blockswarm.peer.scheduler import Scheduler
from blockswarm.peer.stage_member import StageMember
from blockswarm.peer.stage_training import StageTrainingOptions

logger = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT = 20.0  # seconds one announcement may take before the peer goes on without it


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
    relay: RelayMode = RelayMode.AUTO  # serve through circuit relays: when others cannot dial in (auto), always, never
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
    train_key: str | None = None  # the run's secret: only trainers that know it make a --train peer learn
    checkpoint_dir: str | None = None  # where a training peer saves its span (every `checkpoint_every` stage steps)
    checkpoint_every: int = 1
    checkpoint_keep: int = 3  # newest checkpoints kept per span

    @property
    def balancing(self) -> bool:
        """Pinned spans (--blocks) and training stages (--train) stay where they started."""
        return self.blocks is None and not self.train


class Server:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.config = load_config(options.model)
        self.weights_hash = weights_fingerprint(options.model)
        self.model_name = options.model_name or swarm_model_name(options.model, self.weights_hash)
        try:
            self.loader = SpanLoader(options.model, self.config, options.device, options.dtype, options.quant)
            if options.train and options.quant != "none":
                raise ValueError("--train needs full-precision weights to learn: drop --quant")
            if options.train and not options.train_key:
                raise ValueError(
                    "--train needs --train-key (or BLOCKSWARM_TRAIN_KEY): the secret shared with the run's trainers, "
                    "so that strangers cannot make this peer learn"
                )
            if options.checkpoint_every < 1 or options.checkpoint_keep < 1:
                raise ValueError("--checkpoint-every and --checkpoint-keep must be at least 1")
            check_span_request(self.config.num_blocks, options.blocks, options.num_blocks)
            check_record_bounds(self.config.num_blocks, options.throughput, options.cache_tokens)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        self.span = (0, 0)
        self.stage: StageMember | None = None

    def run(self) -> None:
        """Blocks until SIGINT/SIGTERM; the DHT process is forked before any torch threads start."""
        options = self.options
        host_maddrs = [f"/ip4/{options.host}/tcp/{options.port}"]
        self.using_relay = choose_relay(options.relay, options.initial_peers, host_maddrs, options.announce_addrs)
        node = start_dht(
            NodeRole.PEER,
            options.initial_peers,
            new_swarm=options.new_swarm,
            host=options.host,
            port=options.port,
            announce_addrs=options.announce_addrs,
            identity_path=options.identity_path,
            relay=self.using_relay,
        )
        try:
            self._compose(node)
            self.span = self.balancer.initial_span()
            self.announcer.announce(self._record(ServerState.JOINING, cache_tokens_left=0), ANNOUNCE_TIMEOUT)
            backend = self.loader.load(*self.span)
            self.scheduler = Scheduler(options.limits)
            try:
                if options.train:
                    self.stage = StageMember(
                        self.model_name,
                        backend,
                        options.checkpoint_dir,
                        options.checkpoint_every,
                        options.checkpoint_keep,
                    )
                    self.stage.join(node, options.training)
                import uvloop

                uvloop.run(self._serve(node, backend))
            finally:
                self.scheduler.stop()
                if self.stage is not None:
                    self.stage.leave()
        finally:
            node.shutdown()

    def _compose(self, node: SwarmNode) -> None:
        options, total = self.options, self.config.num_blocks
        self.balancer = Balancer(
            node, self.model_name, total, options.blocks, options.num_blocks, options.balance_period, options.balancing
        )
        model_info = ModelInfo(
            num_blocks=total,
            family=self.config.family,
            config_hash=self.config.fingerprint(),
            weights_hash=self.weights_hash,
        )
        profile = PeerProfile(
            dtype=str(self.loader.dtype).removeprefix("torch."),
            quant=options.quant,
            codecs=sorted(CODECS),
            version=__version__,
            public_name=options.public_name,
            training=options.train,
            balancing=options.balancing,
            using_relay=self.using_relay,
        )
        self.announcer = Announcer(
            node, self.model_name, model_info, profile, options.update_period, options.throughput
        )
        self.pinger = NextPeerPinger(node, self.model_name, total)

    def _record(self, state: ServerState, cache_tokens_left: int, active_sessions: int = 0, queued_requests: int = 0):
        return self.announcer.record(
            state,
            self.span,
            self.loader.throughput,
            cache_tokens_left,
            self.pinger.snapshot(),
            active_sessions=active_sessions,
            queued_requests=queued_requests,
        )

    def _status(self) -> dict:
        """What `info` says besides the span and limits (a stage's step count changes faster than records: trainers
        ask `info` for it)."""
        profile = self.announcer.profile
        return dict(
            state=self.lifecycle.state.value,
            version=profile.version,
            dtype=profile.dtype,
            quant=profile.quant,
            codecs=profile.codecs,
            training_step=None if self.stage is None else self.stage.step,
        )

    async def _serve(self, node: SwarmNode, backend: BlockBackend) -> None:
        p2p = await node.dht.replicate_p2p()
        handlers = RequestHandlers(
            self.model_name,
            backend,
            self._cache_for(backend),
            self.options.limits,
            self._status,
            train_key=self.options.train_key if self.options.train else None,
            scheduler=self.scheduler,
        )

        async def announce() -> None:
            cache = handlers.cache
            record = self._record(
                self.lifecycle.state, cache.tokens_left, cache.sessions, self.scheduler.active_requests
            )
            await self.announcer.announce_async(record, ANNOUNCE_TIMEOUT)

        self.lifecycle = Lifecycle(announce, self.options.grace_period)
        self.lifecycle.stop_on_signals()
        await handlers.register(p2p)
        await serve_dial_back(p2p)
        if self.using_relay:
            await wait_for_relayed_addrs(p2p)
        await self._go_online()
        maddrs = " ".join(await visible_maddrs(p2p))
        print(
            f"blockswarm peer ready: model={self.model_name} blocks={self.span[0]}:{self.span[1]} "
            f"peer_id={node.dht.peer_id} maddrs={maddrs}",
            flush=True,
        )
        while not await self.lifecycle.wait_stop(self.options.update_period):
            if not node.dht.is_alive():
                logger.error("this peer's DHT process died: nobody can find it any more, so it leaves")
                break
            await self.pinger.ping(p2p, self.span[1])
            target = await self.balancer.move_target(self.span)
            if target is not None:
                await self._move(handlers, target)
            await announce()
        await self.lifecycle.leave(handlers)
        print("blockswarm peer stopped: announced OFFLINE", file=sys.stderr, flush=True)

    async def _go_online(self) -> None:
        await self.lifecycle.enter(ServerState.ONLINE)
        self.balancer.reschedule()

    async def _move(self, handlers: RequestHandlers, target: tuple[int, int]) -> None:
        """Drain, announce OFFLINE for the old span and JOINING for the new one, load it, serve it."""
        old = self.span
        await self.lifecycle.drain(handlers)
        await self.lifecycle.enter(ServerState.OFFLINE)
        self.span = target
        await self.lifecycle.enter(ServerState.JOINING)
        backend = await asyncio.to_thread(self.loader.load, *self.span)
        handlers.serve(backend, self._cache_for(backend))  # work queued for the old span still runs on it
        await self._go_online()
        print(f"blockswarm peer moved: blocks={old[0]}:{old[1]} -> {self.span[0]}:{self.span[1]}", flush=True)

    def _cache_for(self, backend: BlockBackend) -> CachePool:
        return CachePool(self.options.cache_tokens, len(backend.blocks), backend.make_cache)
