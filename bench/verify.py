"""What spot-checking costs, and how fast it catches a liar, on one local swarm (tiny preset by default).

Swarm: two honest peers splitting the blocks (0:4, 4:8), two honest checkers serving all blocks with almost no KV
cache (sessions never go through them; they compute the checks' stateless forwards), and a liar serving all blocks
that adds noise of `--noise` times its outputs' std to every output (a test-only peer, BLOCKSWARM_TEST_NOISE).

Cost: one client that never uses the liar (blocked_peers), the default int8 wire codec; rounds alternate
verify_fraction 0 and the case's fraction on the same client and sessions of the same length, each round a greedy
generation of `--new-tokens` tokens; steps/s counts single-token steps (prefill excluded); medians over rounds.
Catching: fresh clients whose router prefers one hop, so their sessions run through the liar (checked below);
each trial counts the steps the liar served until the client reported it; the median over trials is reported.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
from blockswarm.client.generation import token_steps  # noqa: E402
from blockswarm.client.sampling import SamplingParams  # noqa: E402
from blockswarm.local_swarm import LocalSwarm  # noqa: E402
from blockswarm.models import load_config  # noqa: E402
from blockswarm.models.random_init import init_random_model  # noqa: E402
from blockswarm.routing.route import LatencyModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from generate import timed  # noqa: E402

PROMPT = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))


def steps_per_second(model, new_tokens: int) -> float:
    """Single-token steps per second of one greedy generation in a fresh session (prefill excluded)."""
    times: list[float] = []
    with model.inference_session(max_length=PROMPT.shape[1] + new_tokens) as session:
        for _ in token_steps(model, timed(session.step, times), PROMPT, PROMPT, new_tokens, SamplingParams()):
            pass
    return (len(times) - 1) / sum(times[1:])


def measure_cost(model, fraction: float, rounds: int, new_tokens: int) -> tuple[float, float]:
    """Median steps/s without checks and with `fraction`, rounds alternating on the same client."""
    without, with_checks = [], []
    for _ in range(rounds):
        model.remote.verifier.fraction = 0.0
        without.append(steps_per_second(model, new_tokens))
        model.remote.verifier.fraction = fraction
        with_checks.append(steps_per_second(model, new_tokens))
    return statistics.median(without), statistics.median(with_checks)


def steps_until_caught(model_dir: Path, swarm: LocalSwarm, liar: str, fraction: float, max_steps: int) -> int | None:
    """Steps a fresh client's session runs through the liar before reporting it (None: not within max_steps)."""
    with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, verify_fraction=fraction) as model:
        model.remote.router.costs = LatencyModel(hop_overhead=1.0)  # one hop (the liar) beats two honest ones
        max_length = PROMPT.shape[1] + max_steps
        route = model.remote.router.route(0, model.config.num_blocks, max_length)
        if [str(hop.peer_id) for hop in route] != [liar]:
            raise RuntimeError(f"the session would not run through the liar: {route}")
        with model.inference_session(max_length=max_length):
            model.generate(PROMPT, max_new_tokens=1)  # the prefill: step 1
            for step in range(1, max_steps + 1):
                if any(report.peer_id == liar for report in model.lie_reports):
                    return step
                if step < max_steps:
                    model.generate(None, max_new_tokens=1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each of without/with checks, per fraction")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 1.0])
    parser.add_argument("--trials", type=int, default=5, help="fresh clients meeting the liar, per fraction")
    parser.add_argument("--max-steps", type=int, default=400, help="steps a trial waits for the liar to be caught")
    parser.add_argument("--noise", type=float, default=0.1, help="the liar's noise, times its outputs' std")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    model_dir = init_random_model(work / args.preset, preset=args.preset)
    cases = []
    with LocalSwarm(model_dir, work / "logs") as swarm:
        swarm.start_bootstrap()
        num_blocks = load_config(model_dir).num_blocks
        half, whole, checker = f"0:{num_blocks // 2}", f"0:{num_blocks}", ("--cache-tokens", "8")
        launched = [
            swarm.start_peer("--blocks", half, wait=False),
            swarm.start_peer("--blocks", f"{num_blocks // 2}:{num_blocks}", wait=False),
            swarm.start_peer("--blocks", whole, *checker, wait=False),
            swarm.start_peer("--blocks", whole, *checker, wait=False),
            swarm.start_peer("--blocks", whole, name="liar", wait=False, test_noise=args.noise),
        ]
        for process in launched:
            swarm.wait_peer(process)
        liar = launched[-1].peer_id

        with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, blocked_peers=[liar]) as model:
            steps_per_second(model, 8)  # warm-up
            costs = {f: measure_cost(model, f, args.rounds, args.new_tokens) for f in args.fractions}
            assert not model.lie_reports, f"an honest peer was reported: {model.lie_reports}"
        for fraction in args.fractions:
            trials = [steps_until_caught(model_dir, swarm, liar, fraction, args.max_steps) for _ in range(args.trials)]
            caught = [t for t in trials if t is not None]
            without, with_checks = costs[fraction]
            cases.append(
                {
                    "verify_fraction": fraction,
                    "steps_per_s_without": round(without, 2),
                    "steps_per_s_with": round(with_checks, 2),
                    "relative_speed": round(with_checks / without, 3),
                    "liar_caught_after_steps": statistics.median(caught) if len(caught) == len(trials) else None,
                    "liar_caught_after_steps_trials": trials,
                }
            )
    result = {
        "preset": args.preset,
        "codec": "int8-blockwise",
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "liar_noise": args.noise,
        "cases": cases,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
