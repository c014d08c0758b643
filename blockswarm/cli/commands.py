"""One function per `blockswarm` command; heavy packages are imported inside them, so `--help` stays fast."""

from __future__ import annotations

import argparse
import asyncio
import signal


def run_dht(args: argparse.Namespace) -> None:
    from blockswarm.dht import NodeRole, start_dht
    from blockswarm.dht.reachability import serve_dial_back

    dht = start_dht(
        NodeRole.BOOTSTRAP,
        args.initial_peers,
        host=args.host,
        port=args.port,
        announce_addrs=args.announce_addrs,
        identity_path=args.identity_path,
    ).dht
    maddrs = ",".join(str(addr) for addr in dht.get_visible_maddrs())
    print(f"blockswarm dht ready: maddrs={maddrs}", flush=True)
    print(f"Peers join with: blockswarm run-server MODEL --initial-peers {maddrs.replace(',', ' ')}", flush=True)
    stop = asyncio.Event()

    async def wait() -> None:
        await serve_dial_back(await dht.replicate_p2p())  # joining peers ask it whether they are reachable
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    try:
        asyncio.run(wait())
    finally:
        dht.shutdown()


def run_server(args: argparse.Namespace) -> None:
    from blockswarm.peer.limits import ServingLimits
    from blockswarm.peer.server import Server, ServerOptions
    from blockswarm.peer.stage_training import StageTrainingOptions

    options = ServerOptions(
        model=args.model,
        model_name=args.model_name,
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        initial_peers=args.initial_peers,
        new_swarm=args.new_swarm,
        host=args.host,
        port=args.port,
        announce_addrs=args.announce_addrs,
        identity_path=args.identity_path,
        relay=args.relay,
        device=args.device,
        dtype=args.dtype,
        cache_tokens=args.cache_tokens,
        public_name=args.public_name,
        update_period=args.update_period,
        grace_period=args.grace_period,
        balance_period=args.balance_period,
        throughput=args.throughput,
        quant=args.quant,
        limits=ServingLimits(session_timeout=args.session_timeout),
        train=args.train,
        train_key=args.train_key,
        training=StageTrainingOptions(
            learning_rate=args.learning_rate,
            target_batch_size=args.target_batch_size,
            matchmaking_time=args.matchmaking_time,
            averaging_timeout=args.averaging_timeout,
            average_state_every=args.average_state_every,
        ),
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        checkpoint_keep=args.checkpoint_keep,
    )
    Server(options).run()


def reassemble(args: argparse.Namespace) -> None:
    from blockswarm.models.checkpoints import reassemble as build_checkpoint

    path = build_checkpoint(args.base, args.spans, args.out, ends_file=args.ends)
    print(f"wrote the reassembled checkpoint to {path}")


def init_model(args: argparse.Namespace) -> None:
    from blockswarm.models.random_init import init_random_model

    path = init_random_model(args.dir, preset=args.preset, family=args.family, seed=args.seed)
    print(f"wrote a random-weight {args.family} model ({args.preset} preset) to {path}")


def generate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from blockswarm.client import DistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with DistributedModelForCausalLM.from_pretrained(args.model, args.initial_peers) as model:
        output = model.generate(
            input_ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )
    print(tokenizer.decode(output[0]))


def demo(args: argparse.Namespace) -> None:
    from blockswarm.demo import run_demo

    run_demo(args.dir, args.preset, args.peers, args.max_new_tokens, args.monitor_port)


def serve_api(args: argparse.Namespace) -> None:
    from blockswarm.api import run_api_server

    run_api_server(
        args.model,
        args.initial_peers,
        args.host,
        args.port,
        model_name=args.model_name,
        codec=args.codec,
        concurrency=args.concurrency,
    )


def monitor(args: argparse.Namespace) -> None:
    from blockswarm.monitor import run_monitor

    run_monitor(args.initial_peers, args.host, args.port, args.period, args.info_timeout)
