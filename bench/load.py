"""Many clients at once on one small local swarm: aggregate throughput, step latency, errors (issue #14).

Swarm: a bootstrap node and 2 peers splitting the blocks (0:B/2, B/2:B) on loopback, every hop with
`codec="none"`. Clients are real OS processes (this script with a hidden `--client` mode), so they share no GIL;
each opens `DistributedModelForCausalLM` pinned to those 2 peers with spot checks off (`verify_fraction=0`), warms
up with a short generation, and then, one at a time, generates `--new-tokens` tokens greedily from its own prompt
(a different seed per client): the "solo" tokens of that prompt.

Load: for each N in `--clients`, clients 0..N-1 get a start time a moment ahead and all begin then; each
generates `--new-tokens` tokens greedily in a fresh inference session, timing every remote step
(`session.step`, the prefill excluded from the step percentiles). Per N and round: agg_tokens_per_s = all new
tokens / (last client's finish - common start); the reported value is the median over rounds; step_ms_p50/p99
are over all clients' decode steps of all rounds. errors = clients whose generation raised; busy_replies = busy
answers the clients' routers were told to wait out (counted by wrapping `router.ban` in the client process: the
pipeline calls it with `retry_after` for a busy reply, without one for a failed peer, which is counted as
peer_failures); neither stops a client from finishing. tokens_equal_to_solo = fraction of (client, round) runs with
N > 1 whose tokens equal that prompt's solo tokens. scaling[N] = agg_tokens_per_s(N) / agg_tokens_per_s(1).

Single peer vs local, measured first, in the same run: a third peer serving every block; rounds alternate an
end-to-end `model.generate(prompt, max_new_tokens)` through it (`allowed_peers=[it]`, in this process, with the
settings every `blockswarm` command uses) and local `transformers` `AutoModelForCausalLM.generate` (greedy, in a
fresh process with default torch settings, as a user would run it); tokens/s = new tokens / wall time of the call;
single_peer_vs_local = median over rounds of (swarm tokens/s / local tokens/s of the round), robust to load from
other processes drifting between rounds (the ratio of the two medians is reported too). That peer is stopped before
the load test.
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
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
from blockswarm.client.generation import token_steps  # noqa: E402
from blockswarm.client.sampling import SamplingParams  # noqa: E402
from blockswarm.local_swarm import LocalSwarm  # noqa: E402
from blockswarm.models import load_config  # noqa: E402
from blockswarm.models.random_init import init_random_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from generate import timed  # noqa: E402

PROMPT_LENGTH = 16
WARMUP_TOKENS = 4
START_DELAY_S = 0.5  # how far ahead of "now" the common start time is set, so every client is waiting for it
REPLY_MARK = "LOAD-REPLY "  # clients' protocol lines on stdout; anything else a library prints there is skipped


def prompt_for(client_index: int) -> torch.Tensor:
    return torch.randint(3, 1000, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(client_index))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# ---------------------------------------------------------------- client process


class BanCounter:
    """Counts what the client's router is told by the pipeline: busy replies (`seconds` given) and failed peers."""

    def __init__(self, router):
        self.busy_replies = 0
        self.peer_failures = 0
        original_ban = router.ban

        def counting_ban(peer_id, seconds=None):
            if seconds is None:
                self.peer_failures += 1
            else:
                self.busy_replies += 1
            return original_ban(peer_id, seconds)

        router.ban = counting_ban  # the sessions call the same router object

    def take(self) -> tuple[int, int]:
        counts = self.busy_replies, self.peer_failures
        self.busy_replies = self.peer_failures = 0
        return counts


def timed_generation(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens of a fresh session, and the seconds of each remote step (the prefill first)."""
    step_seconds: list[float] = []
    with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
        step = timed(session.step, step_seconds)
        *_, last = token_steps(model, step, prompt, prompt, new_tokens, SamplingParams())
    return last.token_ids[0, prompt.shape[1] :].tolist(), step_seconds


def reply(payload: dict) -> None:
    print(REPLY_MARK + json.dumps(payload), flush=True)


def run_client(model_dir: Path, initial_peers: list[str], allowed_peers: list[str], index: int, new_tokens: int):
    """Client-process entry: answers "solo" (generate now) and "run START" (generate at wall time START)."""
    prompt = prompt_for(index)
    model = DistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers, codec="none", verify_fraction=0.0, allowed_peers=allowed_peers
    )
    counter = BanCounter(model.remote.router)
    timed_generation(model, prompt, WARMUP_TOKENS)
    counter.take()
    reply({"ready": index})
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            time.sleep(max(0.0, float(command[1]) - time.time()))
        began = time.time()
        tokens, step_seconds, error = None, [], None
        try:
            tokens, step_seconds = timed_generation(model, prompt, new_tokens)
        except Exception as e:  # reported and counted; the client stays up for the next round
            error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finished = time.time()
        busy_replies, peer_failures = counter.take()
        reply(
            {
                "index": index,
                "tokens": tokens,
                "step_seconds": step_seconds,
                "began": began,
                "finished": finished,
                "error": error,
                "busy_replies": busy_replies,
                "peer_failures": peer_failures,
            }
        )
    model.close()


class ClientProcess:
    def __init__(self, model_dir: Path, swarm: LocalSwarm, allowed_peers: list[str], index: int, args, log_dir: Path):
        command = [
            sys.executable,
            __file__,
            "--client",
            str(index),
            "--model-dir",
            str(model_dir),
            "--new-tokens",
            str(args.new_tokens),
            "--initial-peers",
            *swarm.initial_peers,
            "--allowed-peers",
            *allowed_peers,
        ]
        self.log = open(log_dir / f"client{index}.log", "w")  # noqa: SIM115 - the child's stderr
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )

    def send(self, line: str) -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY_MARK):
                return json.loads(line[len(REPLY_MARK) :])
        raise RuntimeError(f"client exited with code {self.process.wait()}; see {self.log.name}")

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# ---------------------------------------------------------------- single peer vs local transformers


def serve_local_rounds(model_dir: Path, new_tokens: int) -> None:
    """Local-process entry: load with transformers once, then one timed greedy `generate` per line of stdin."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = prompt_for(0)

    def generate(tokens: int) -> torch.Tensor:
        with torch.inference_mode():
            mask = torch.ones_like(prompt)
            return model.generate(
                prompt, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )

    generate(WARMUP_TOKENS)
    for _ in sys.stdin:
        began = time.perf_counter()
        output = generate(new_tokens)
        seconds = time.perf_counter() - began
        reply({"tokens_per_s": new_tokens / seconds, "tokens": output[0, PROMPT_LENGTH:].tolist()})


def single_peer_vs_local(model_dir: Path, swarm: LocalSwarm, whole_peer: str, args, log_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    command = [sys.executable, __file__, "--local-rounds", str(model_dir), "--new-tokens", str(args.new_tokens)]
    with open(log_dir / "local.log", "w") as log:
        local = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    prompt = prompt_for(0)
    local_rates, swarm_rates, same_tokens = [], [], []
    with DistributedModelForCausalLM.from_pretrained(
        model_dir, swarm.initial_peers, codec="none", verify_fraction=0.0, allowed_peers=[whole_peer]
    ) as model:
        model.generate(prompt, max_new_tokens=WARMUP_TOKENS)
        for _ in range(args.single_rounds):
            local.stdin.write("round\n")
            local.stdin.flush()
            line = next(line for line in local.stdout if line.startswith(REPLY_MARK))
            local_round = json.loads(line[len(REPLY_MARK) :])
            local_rates.append(local_round["tokens_per_s"])
            began = time.perf_counter()
            output = model.generate(prompt, max_new_tokens=args.new_tokens)
            swarm_rates.append(args.new_tokens / (time.perf_counter() - began))
            same_tokens.append(output[0, PROMPT_LENGTH:].tolist() == local_round["tokens"])
    local.stdin.close()
    local.wait()
    return {
        "single_peer_tokens_per_s": round(statistics.median(swarm_rates), 2),
        "local_tokens_per_s": round(statistics.median(local_rates), 2),
        # paired: each swarm round over the local round just before it, so that load from others cancels out
        "single_peer_vs_local": round(
            statistics.median(swarm_rate / local_rate for swarm_rate, local_rate in zip(swarm_rates, local_rates)), 3
        ),
        "single_peer_vs_local_of_medians": round(statistics.median(swarm_rates) / statistics.median(local_rates), 3),
        "single_peer_tokens_equal_local": all(same_tokens),
    }


# ---------------------------------------------------------------- load test


def load_rounds(clients: list[ClientProcess], solo_tokens: list[list[int]], rounds: int) -> dict:
    """`rounds` rounds of all `clients` starting together; throughput, step latency, errors, equality with solo."""
    rates, decode_steps, equal = [], [], []
    errors = busy_replies = peer_failures = 0
    for _ in range(rounds):
        start_at = time.time() + START_DELAY_S
        for client in clients:
            client.send(f"run {start_at}")
        results = [client.receive() for client in clients]
        last_finish = max(result["finished"] for result in results)
        new_tokens = sum(len(result["tokens"] or []) for result in results)
        rates.append(new_tokens / (last_finish - start_at))
        for result in results:
            decode_steps += [s * 1e3 for s in result["step_seconds"][1:]]
            errors += result["error"] is not None
            busy_replies += result["busy_replies"]
            peer_failures += result["peer_failures"]
            equal.append(result["tokens"] == solo_tokens[result["index"]])
            if result["error"] is not None:
                print(f"client {result['index']}: {result['error']}", file=sys.stderr)
    return {
        "agg_tokens_per_s": round(statistics.median(rates), 2),
        "step_ms_p50": round(percentile(decode_steps, 0.5), 2) if decode_steps else None,
        "step_ms_p99": round(percentile(decode_steps, 0.99), 2) if decode_steps else None,
        "errors": errors,
        "busy_replies": busy_replies,
        "peer_failures": peer_failures,
        "rounds": rounds,
        "equal_to_solo": equal,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="medium", choices=["tiny", "small", "medium"])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrent clients, per case")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="load rounds per N (N >= 16 gets at most 2)")
    parser.add_argument("--single-rounds", type=int, default=7, help="alternating single-peer/local rounds")
    parser.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--allowed-peers", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local-rounds", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        return run_client(args.model_dir, args.initial_peers, args.allowed_peers, args.client, args.new_tokens)
    if args.local_rounds is not None:
        return serve_local_rounds(args.local_rounds, args.new_tokens)

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    log_dir = work / "logs"
    model_dir = init_random_model(work / args.preset, preset=args.preset)
    num_blocks = load_config(model_dir).num_blocks
    half = num_blocks // 2
    with LocalSwarm(model_dir, log_dir) as swarm:
        swarm.start_bootstrap()
        launched = [
            swarm.start_peer("--blocks", f"0:{half}", wait=False),
            swarm.start_peer("--blocks", f"{half}:{num_blocks}", wait=False),
            swarm.start_peer("--blocks", f"0:{num_blocks}", name="whole", wait=False),
        ]
        for process in launched:
            swarm.wait_peer(process)
        *split_peers, whole_peer = launched
        single = single_peer_vs_local(model_dir, swarm, whole_peer.peer_id, args, log_dir)
        whole_peer.stop()

        allowed = [peer.peer_id for peer in split_peers]
        clients = [ClientProcess(model_dir, swarm, allowed, i, args, log_dir) for i in range(max(args.clients))]
        try:
            for client in clients:
                client.receive()  # ready: loaded and warmed up
            solo_tokens = []
            for client in clients:  # one at a time: each prompt's tokens with no other load
                client.send("solo")
                solo = client.receive()
                if solo["error"] is not None:
                    raise RuntimeError(f"solo run of client {solo['index']} failed: {solo['error']}")
                solo_tokens.append(solo["tokens"])
            by_clients = {}
            for count in args.clients:
                rounds = args.rounds if count < 16 else min(args.rounds, 2)
                by_clients[str(count)] = load_rounds(clients[:count], solo_tokens, rounds)
        finally:
            for client in clients:
                client.close()

    equal_runs = [same for count, case in by_clients.items() if int(count) > 1 for same in case.pop("equal_to_solo")]
    for case in by_clients.values():
        case.pop("equal_to_solo", None)
    base = by_clients.get("1", {}).get("agg_tokens_per_s")
    result = {
        "preset": args.preset,
        "codec": "none",
        "new_tokens": args.new_tokens,
        "by_clients": by_clients,
        "scaling": {n: round(case["agg_tokens_per_s"] / base, 3) for n, case in by_clients.items()} if base else None,
        "tokens_equal_to_solo": round(sum(equal_runs) / len(equal_runs), 3) if equal_runs else None,
        **single,
        "single_rounds": args.single_rounds,
        "wall_s": round(time.monotonic() - began, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
