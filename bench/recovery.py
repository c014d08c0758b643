"""Recovery from a SIGKILLed peer in the middle of generation.

Tiny preset, a bootstrap node and 4 peers on loopback (every block held by two). Each round generates 64
tokens greedily and SIGKILLs the peer serving a random span at a random step, then starts a fresh peer for
that span before the next round. The stall of a round is the duration of the step that spanned the failure
minus the median step of the same round; tokens must equal the output of a run without failures.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
from blockswarm.local_swarm import LocalSwarm, generate_with_interruptions  # noqa: E402
from blockswarm.models.random_init import init_random_model  # noqa: E402

SPANS = ("0:4", "0:4", "4:8", "4:8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    model_dir = init_random_model(work / "tiny", preset="tiny")
    prompt = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(args.seed))
    stalls, steady, matches = [], [], []
    with LocalSwarm(model_dir, work / "logs") as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(SPANS)
        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, step_timeout=10) as model:
            expected, _ = generate_with_interruptions(model, prompt, args.new_tokens, {})
            for _ in range(args.kills):
                victim = {}

                def kill(session, span_index=rng.randrange(2), victim=victim):
                    peer_id = str(session.spans[span_index].hop.peer_id)
                    victim["process"] = next(p for p in swarm.processes if p.peer_id == peer_id)
                    victim["process"].signal(signal.SIGKILL)

                kill_at = rng.randint(1, args.new_tokens - 2)
                output, durations = generate_with_interruptions(model, prompt, args.new_tokens, {kill_at: kill})
                matches.append(torch.equal(output, expected))
                normal = statistics.median(durations[1:kill_at] + durations[kill_at + 1 :])
                stalls.append(durations[kill_at] - normal)
                steady.append(normal)
                span = victim["process"].span
                swarm.start_peer("--blocks", f"{span[0]}:{span[1]}")

    print(
        json.dumps(
            {
                "kills": len(stalls),
                "tokens_match": all(matches),
                "recovery_stall_s_median": round(statistics.median(stalls), 4),
                "recovery_stall_s_max": round(max(stalls), 4),
                "steady_step_ms": round(statistics.median(steady) * 1e3, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
