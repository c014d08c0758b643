"""A client run on a host of the emulated WAN by tests/test_wan.py: greedy generation through the swarm, with
peer-to-peer push or (--no-push) relaying, optionally signalling (SIGSTOP, SIGKILL) the peer of the first span
before one step; prints one JSON line: tokens and step durations (and, with --show-relays, what each peer's record
says about relays)."""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.dht import get_block_servers
from blockswarm.local_swarm import generate_with_interruptions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--signal-at", type=int, default=None, help="signal the first span's peer before this step")
    parser.add_argument("--signal", default="SIGSTOP", help="which signal (--signal-at)")
    parser.add_argument("--pids", nargs="*", default=[], help="PEER_ID=PID of the swarm's peers")
    parser.add_argument("--no-push", action="store_true", help="relay every step through the client")
    parser.add_argument("--show-relays", action="store_true", help="also print each peer's announced using_relay")
    args = parser.parse_args()
    pids = dict(entry.split("=") for entry in args.pids)
    prompt = torch.randint(3, 4000, (1, 8), generator=torch.Generator().manual_seed(args.seed))

    def signal_first_span(session) -> None:
        os.kill(int(pids[str(session.spans[0].hop.peer_id)]), signal.Signals[args.signal])

    interruptions = {} if args.signal_at is None else {args.signal_at: signal_first_span}
    with DistributedModelForCausalLM.from_pretrained(
        args.model, args.initial_peers, codec="none", push=not args.no_push
    ) as model:
        model.generate(prompt, max_new_tokens=2)  # warm-up: routes, RTTs, connections
        output, durations = generate_with_interruptions(model, prompt, args.new_tokens, interruptions)
        result = {"tokens": output[0, prompt.shape[1] :].tolist(), "step_seconds": durations}
        if args.show_relays:
            remote = model.remote
            blocks = get_block_servers(remote.dht, remote.model_name, 0, remote.config.num_blocks, latest=True)
            result["using_relay"] = {str(peer): info.using_relay for block in blocks for peer, info in block.items()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
