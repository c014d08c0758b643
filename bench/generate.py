"""Swarm vs local generation speed, measured in one run on this machine.

Local: the same block code with KV caches in a fresh process with default torch settings, as a user would
run the model. Swarm: a bootstrap node and 3 peers on loopback with disjoint spans (3 hops per step), driven
from this process with the settings every `blockswarm` command uses (idle OpenMP threads sleep). Both run the
same token loop (`token_steps`); a step is one call of the blocks for one new token, and rounds alternate
local / swarm. per_hop_overhead_ms = (median swarm step - median local step) / hops.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
from blockswarm.client.generation import token_steps  # noqa: E402
from blockswarm.client.sampling import SamplingParams  # noqa: E402
from blockswarm.local_swarm import LocalSwarm  # noqa: E402
from blockswarm.models import KVCache, load_blocks, load_config, load_ends  # noqa: E402
from blockswarm.models.random_init import FAMILY_SETTINGS, init_random_model  # noqa: E402

PROMPT = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))


def timed(step, times: list[float]):
    def run(hidden: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        out = step(hidden)
        times.append(time.perf_counter() - began)
        return out

    return run


def measure(ends, step, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(median seconds per single-token step, tokens per second of the whole loop), prefill excluded."""
    times: list[float] = []
    began = time.perf_counter()
    for _ in token_steps(ends, timed(step, times), prompt, prompt, new_tokens, SamplingParams()):
        pass
    total = time.perf_counter() - began - times[0]
    decode_steps = times[1:]
    return statistics.median(decode_steps), len(decode_steps) / total


def local_step(model_dir: Path, max_length: int):
    config = load_config(model_dir)
    blocks = load_blocks(model_dir, 0, config.num_blocks, progress=False)
    caches = [KVCache.allocate(config, 1, max_length, torch.float32, "cpu") for _ in blocks]
    position = 0

    def step(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal position
        with torch.no_grad():
            for block, cache in zip(blocks, caches):
                hidden = block(hidden, position=position, cache=cache)
        position += hidden.shape[1]
        return hidden

    return step


def serve_local_rounds(model_dir: Path, new_tokens: int) -> None:
    """Child-process entry: load the model once, then measure one local round per line read from stdin."""
    ends = load_ends(model_dir)
    max_length = PROMPT.shape[1] + new_tokens
    measure(ends, local_step(model_dir, max_length), PROMPT, 8)
    for _ in sys.stdin:
        median, rate = measure(ends, local_step(model_dir, max_length), PROMPT, new_tokens)
        print(json.dumps({"median": median, "rate": rate}), flush=True)


class LocalBaseline:
    """The local model in its own process with default torch settings, driven round by round."""

    def __init__(self, model_dir: Path, new_tokens: int):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        command = [sys.executable, __file__, "--local-rounds", str(model_dir), "--new-tokens", str(new_tokens)]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def round(self) -> tuple[float, float]:
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        result = json.loads(self.process.stdout.readline())
        return result["median"], result["rate"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def spans(num_blocks: int, peers: int) -> list[str]:
    bounds = [round(i * num_blocks / peers) for i in range(peers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--family", default="llama", choices=list(FAMILY_SETTINGS))
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9, help="alternating local/swarm rounds")
    parser.add_argument("--codec", default="int8-blockwise", help="wire codec of the swarm (the client's default)")
    parser.add_argument("--local-rounds", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.local_rounds is not None:
        return serve_local_rounds(args.local_rounds, args.new_tokens)

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    model_dir = init_random_model(work / f"{args.family}-{args.preset}", preset=args.preset, family=args.family)
    config = load_config(model_dir)
    ends = load_ends(model_dir)
    max_length = PROMPT.shape[1] + args.new_tokens

    with LocalSwarm(model_dir, work / "logs") as swarm:
        swarm.start_bootstrap()
        launched = [swarm.start_peer("--blocks", span, wait=False) for span in spans(config.num_blocks, args.peers)]
        for process in launched:
            swarm.wait_peer(process)
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, codec=args.codec) as model:
            hops = len(model.remote.router.route(0, config.num_blocks))
            local_medians, local_rates, swarm_medians, swarm_rates = [], [], [], []
            with model.inference_session(max_length=max_length) as warmup:
                measure(ends, warmup.step, PROMPT, 8)
            local = LocalBaseline(model_dir, args.new_tokens)
            for _ in range(args.rounds):
                median, rate = local.round()
                local_medians.append(median)
                local_rates.append(rate)
                with model.inference_session(max_length=max_length) as session:
                    median, rate = measure(ends, session.step, PROMPT, args.new_tokens)
                swarm_medians.append(median)
                swarm_rates.append(rate)
            local.close()

    local_ms = statistics.median(local_medians) * 1e3
    swarm_ms = statistics.median(swarm_medians) * 1e3
    result = {
        "preset": args.preset,
        "family": args.family,
        "peers": args.peers,
        "codec": args.codec,
        "hops": hops,
        "swarm_steps_per_s": round(statistics.median(swarm_rates), 2),
        "local_steps_per_s": round(statistics.median(local_rates), 2),
        "ratio": round(local_ms / swarm_ms, 3),
        "per_hop_overhead_ms": round((swarm_ms - local_ms) / hops, 3),
        "swarm_step_ms_median": round(swarm_ms, 3),
        "local_step_ms_median": round(local_ms, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
