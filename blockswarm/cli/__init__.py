"""`blockswarm <command>`: run-dht, run-server, init-model, generate, demo, monitor, serve-api, reassemble."""

from __future__ import annotations

import logging
import os

from blockswarm.cli import commands
from blockswarm.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> None:
    # Peers and clients often share cores with each other: idle OpenMP threads must sleep, not spin.
    # Read once when torch loads, which every command does lazily after this point.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = {
        "run-dht": commands.run_dht,
        "run-server": commands.run_server,
        "init-model": commands.init_model,
        "generate": commands.generate,
        "demo": commands.demo,
        "monitor": commands.monitor,
        "serve-api": commands.serve_api,
        "reassemble": commands.reassemble,
    }[args.command]
    from blockswarm.dht import SwarmJoinError

    try:
        run(args)
    except SwarmJoinError as e:
        raise SystemExit(f"error: {e}") from e
