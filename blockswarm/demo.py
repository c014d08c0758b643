"""`make demo`: a random-weight model, a local swarm of several peers, and text generated through it."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path

from blockswarm.local_swarm import LocalSwarm


def _spans(num_blocks: int, peers: int) -> list[str]:
    """Overlapping spans that together cover every block, so routes have a choice."""
    width = max(1, -(-num_blocks * 3 // (2 * peers)))  # about 1.5x coverage
    starts = [round(i * (num_blocks - width) / max(1, peers - 1)) for i in range(peers)]
    return [f"{s}:{s + width}" for s in starts]


def run_demo(directory: str, preset: str, peers: int, max_new_tokens: int, monitor_port: int = 8080) -> None:
    from transformers import AutoTokenizer

    from blockswarm.client import DistributedModelForCausalLM
    from blockswarm.models import load_config
    from blockswarm.models.random_init import init_random_model
    from blockswarm.routing.route import describe_route

    work = Path(directory).resolve()
    model_dir = work / f"model-{preset}"
    if not (model_dir / "config.json").exists():
        print(f"[demo] writing a random-weight {preset} model to {model_dir}")
        init_random_model(model_dir, preset=preset)
    num_blocks = load_config(model_dir).num_blocks
    with LocalSwarm(model_dir, work / "logs") as swarm:
        swarm.start_bootstrap()
        print(f"[demo] bootstrap node: {' '.join(swarm.initial_peers)}")
        launched = [swarm.start_peer("--blocks", span, wait=False) for span in _spans(num_blocks, peers)]
        for process in launched:
            swarm.wait_peer(process)
            print(f"[demo] {process.name} serves blocks {process.span[0]}:{process.span[1]} as {process.peer_id}")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = "A swarm of volunteer machines"
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers) as model:
            route = model.remote.router.route(0, num_blocks)
            print(f"[demo] route: {describe_route(route)}")
            began = time.perf_counter()
            output = model.generate(input_ids, max_new_tokens=max_new_tokens)
            elapsed = time.perf_counter() - began
        print(f"[demo] prompt: {prompt!r}")
        print(f"[demo] generated ({max_new_tokens} tokens in {elapsed:.2f} s; random weights, so it is gibberish):")
        print("       " + repr(tokenizer.decode(output[0, input_ids.shape[1] :])))
        print(f"[demo] token ids: {output[0].tolist()}")
        print(f"[demo] logs of every process are in {swarm.work_dir}")
        url = swarm.start_monitor(port=monitor_port)
        print(f"[demo] swarm monitor: {url}")
        if sys.stdin.isatty():
            print("[demo] the swarm and its monitor keep running; press Ctrl-C to stop them")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
