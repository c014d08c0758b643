"""The command line: every command, its options and their help."""

from __future__ import annotations

import argparse
import os

DEFAULT_HOST = "0.0.0.0"


def _span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (e.g. 0:8), got {text!r}") from None
    return start, end


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MADDR",
        help="multiaddrs of any peers of the swarm to join through",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: all interfaces)")
    parser.add_argument("--port", type=int, default=0, help="TCP port to listen on (default: any free port)")
    parser.add_argument(
        "--announce-addr",
        nargs="*",
        default=[],
        metavar="MADDR",
        dest="announce_addrs",
        help="multiaddrs others should use to reach this node (behind NAT/port forwarding)",
    )
    parser.add_argument(
        "--identity",
        dest="identity_path",
        default=None,
        metavar="PATH",
        help="private key file: keeps the same peer id across restarts (created if missing)",
    )


def _add_web_server_args(parser: argparse.ArgumentParser, port: int) -> None:
    """The swarm to join and where to serve, for the commands that are web servers (monitor, serve-api)."""
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address of the web server (default: all interfaces)")
    parser.add_argument("--port", type=int, default=port, help=f"port of the web server (default: {port})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockswarm",
        description="`blockswarm <command>`: run-dht, run-server, init-model, generate, demo, monitor, serve-api, "
        "reassemble.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("run-dht", help="run a bootstrap DHT node and print its multiaddrs")
    _add_network_args(dht)

    server = commands.add_parser(
        "run-server",
        help="serve a span of a model's blocks to the swarm",
        description="Serve a span of transformer blocks. Loads only the tensors of the served blocks.",
    )
    server.add_argument("model", help="local Hugging Face checkpoint directory or hub id (from the local cache)")
    _add_network_args(server)
    span = server.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=_span, metavar="START:END", help="serve exactly blocks [START, END)")
    span.add_argument(
        "--num-blocks",
        type=int,
        metavar="N",
        help="serve N blocks where the swarm is weakest (default: all blocks)",
    )
    server.add_argument("--new-swarm", action="store_true", help="start a new swarm instead of joining one")
    server.add_argument(
        "--relay",
        choices=("auto", "always", "never"),
        default="auto",
        help="serve through the initial peers' circuit relays: when they cannot dial this peer directly (auto, "
        "checked at start), always, or never",
    )
    server.add_argument(
        "--model-name",
        default=None,
        help="name announced on the DHT (default: hub id, or folder name + weights hash)",
    )
    server.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    server.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="compute dtype (default: float32 on CPU, bfloat16/float16 on GPU)",
    )
    server.add_argument(
        "--cache-tokens",
        type=int,
        default=8192,
        help="KV cache size in tokens (for every served block), shared by all sessions",
    )
    server.add_argument("--public-name", default=None, help="a name shown in the swarm monitor")
    server.add_argument("--update-period", type=float, default=30.0, help="seconds between DHT re-announcements")
    server.add_argument(
        "--session-timeout",
        type=float,
        default=120.0,
        help="idle seconds before an inference session is closed and its cache freed",
    )
    server.add_argument(
        "--quant",
        default="none",
        choices=["none", "int8", "nf4"],
        help="weight quantization of the served blocks with bitsandbytes: int8 (LLM.int8, outlier threshold 6.0; "
        "~1/4 of fp32 memory) or nf4 (QLoRA 4-bit, block 64; ~1/7 of fp32 memory), on CPU and GPU. Default none: "
        "quantized matmuls are slow on CPUs, so a CPU peer serves full precision unless memory is what limits it",
    )
    server.add_argument(
        "--balance-period",
        type=float,
        default=120.0,
        help="mean seconds between checks whether moving to other blocks would help the swarm (randomized "
        "+-50%%); peers started with --blocks or --train never move",
    )
    server.add_argument(
        "--throughput",
        type=float,
        default=None,
        help="announce this throughput (tokens/s per block) instead of measuring it at start",
    )
    server.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        help="on SIGTERM/Ctrl-C: seconds running requests may take to finish before the peer goes OFFLINE",
    )

    training = server.add_argument_group(
        "SWARM training",
        "With --train the peer's blocks learn from the backward passes of SWARM trainers (clients created with "
        "swarm_training=True). Peers serving the same span form a stage: they average gradients through "
        "hivemind.Optimizer and step together once the stage has seen --target-batch-size samples. A peer joining "
        "a stage late downloads the stage's parameters and optimizer state before serving. Training peers are "
        "pinned to their span and are used by trainers only, never by inference clients.",
    )
    training.add_argument("--train", action="store_true", help="train the served blocks (needs --quant none)")
    training.add_argument(
        "--train-key",
        default=os.environ.get("BLOCKSWARM_TRAIN_KEY"),
        help="the run's secret, shared with its trainers (train_key=... on the client): the peer learns only from "
        "backward passes that prove they know it (default: $BLOCKSWARM_TRAIN_KEY)",
    )
    training.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    training.add_argument(
        "--target-batch-size",
        type=int,
        default=32,
        help="samples per optimizer step, summed over the stage's peers (default: 32)",
    )
    training.add_argument(
        "--matchmaking-time",
        type=float,
        default=3.0,
        help="seconds a peer waits for stage-mates to join a gradient averaging round (default: 3)",
    )
    training.add_argument(
        "--averaging-timeout",
        type=float,
        default=30.0,
        help="an averaging round that takes longer is abandoned; the peer steps on its own gradients (default: 30)",
    )
    training.add_argument(
        "--average-state-every",
        type=int,
        default=5,
        help="stage steps between averaging rounds of the parameters (gradients are averaged every step; default: 5)",
    )
    training.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save the span's parameters there (blocks_START-END.stepN.safetensors) every --checkpoint-every "
        "steps, after loading a stage's state and on exit; `blockswarm reassemble` builds a full checkpoint from "
        "such files",
    )
    training.add_argument("--checkpoint-every", type=int, default=1, help="stage steps between checkpoints")
    training.add_argument("--checkpoint-keep", type=int, default=3, help="newest checkpoints kept (default: 3)")

    reassemble = commands.add_parser(
        "reassemble",
        help="build a Hugging Face checkpoint from the span files saved by training peers",
        description="Copy BASE's config and tokenizer and write its weights with every block taken from the span "
        "files (the newest step wins where several cover a block) and, optionally, the ends from --ends.",
    )
    reassemble.add_argument("base", help="the checkpoint the swarm started from")
    reassemble.add_argument("spans", nargs="+", help="blocks_START-END.stepN.safetensors files of training peers")
    reassemble.add_argument("--out", required=True, help="output checkpoint directory")
    reassemble.add_argument(
        "--ends", default=None, help="safetensors with trained embeddings, final norm and LM head (from the trainer)"
    )

    init = commands.add_parser("init-model", help="write a random-weight Hugging Face checkpoint for testing")
    init.add_argument("dir")
    init.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    init.add_argument(
        "--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"]
    )
    init.add_argument("--seed", type=int, default=0)

    generate = commands.add_parser("generate", help="generate text through the swarm")
    generate.add_argument("model")
    generate.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    generate.add_argument("--prompt", default="A swarm of volunteers")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--do-sample", action="store_true")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)

    demo = commands.add_parser("demo", help="build a tiny model, start a local swarm and generate through it")
    demo.add_argument("--dir", default=".demo", help="where the model and the logs go (default: .demo)")
    demo.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    demo.add_argument("--peers", type=int, default=3)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--monitor-port", type=int, default=8080, help="port of the swarm monitor's page")

    monitor = commands.add_parser(
        "monitor",
        help="crawl the swarm and serve a health page, a JSON API and Prometheus metrics",
        description="Crawl the swarm every --period seconds; serve / (page), /api/v1/state, /metrics.",
    )
    _add_web_server_args(monitor, port=8080)
    monitor.add_argument("--period", type=float, default=30.0, help="seconds between crawls (default: 30)")
    monitor.add_argument(
        "--info-timeout", type=float, default=5.0, help="seconds a peer may take to answer `info` (default: 5)"
    )

    api = commands.add_parser(
        "serve-api",
        help="serve an OpenAI-compatible HTTP API (and a chat page) over the swarm",
        description="Join the swarm as a client of MODEL and serve /v1/models, /v1/completions, "
        "/v1/chat/completions (streamed or not, with structured output) and a chat page at /.",
    )
    api.add_argument("model", help="local checkpoint directory (embeddings, head and tokenizer are loaded here)")
    _add_web_server_args(api, port=8000)
    api.add_argument(
        "--model-name",
        default=None,
        help="the name the peers announce, and the API's model id (default: derived from MODEL as run-server does)",
    )
    api.add_argument(
        "--codec",
        default="int8-blockwise",
        choices=["int8-blockwise", "none", "fp16", "bf16"],
        help="how hidden states travel between peers (default: int8-blockwise; none for bit-exact results)",
    )
    api.add_argument(
        "--concurrency", type=int, default=64, help="requests generating at once; more wait their turn (default: 64)"
    )
    return parser
