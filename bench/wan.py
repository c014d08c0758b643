"""The swarm across an emulated WAN (blockswarm/emulated_wan.py), on the grid of the Petals paper (issue #15).

Hosts: a bootstrap node, 3 peers splitting the model's blocks, and the client, each in a network namespace of its
own. Grid: one-way delay {0.5, 25, 50} ms between every two hosts x bandwidth {1000, 100} Mbit/s per host (up and
down) x codec {none, int8-blockwise}; the router's settings change between cells, the swarm stays.
- Generation, tiny preset (latency-bound): a 128-token prefix, then decode steps of batch 1; steps_per_s = 1 / the
  median decode step, with peer-to-peer push and with every hop relayed through the client.
- Forward, medium preset (bandwidth-bound): `model.remote.forward` of a batch of 8 x 128 hidden states;
  forward_tokens_per_s = 1024 / the median of 3 passes.
- floor_steps_per_s = 1 / (local step time + 4 one-way delays): what push could reach at best; the local step is
  the tiny model's blocks run in this process with KV caches (bench/generate.py's loop).
- sigstop_stall_s: at 50 ms one way, the serving peer of the first span is stopped (SIGSTOP) before a decode step;
  the step's duration, median over 5 generations, each by a fresh client (a spare peer takes over; the stopped one
  is resumed after).
The client runs as a process on its host (this script in `--client` mode), answering one command per line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
from blockswarm.emulated_wan import EmulatedWan  # noqa: E402
from blockswarm.local_swarm import LocalSwarm, generate_with_interruptions  # noqa: E402
from blockswarm.models import load_config, load_ends  # noqa: E402
from blockswarm.models.random_init import init_random_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from generate import local_step, measure, spans  # noqa: E402

DELAYS_MS = (0.5, 25.0, 50.0)
BANDWIDTHS_MBIT = (1000.0, 100.0)
CODECS = ("none", "int8-blockwise")
PREFIX = 128
DECODE_STEPS = 12
FORWARD_SHAPE = (8, 128)
STOP_AT_STEP = 4  # the decode step before which the first span's peer is stopped
MARK = "WAN-REPLY "


# ---------------------------------------------------------------- client process (on its host)


class Client:
    def __init__(self, model_dir: Path, initial_peers: list[str], pids: dict[str, int]):
        self.model_dir, self.initial_peers, self.pids = model_dir, initial_peers, pids
        self.models: dict[tuple[str, bool], DistributedModelForCausalLM] = {}
        self.prompt = torch.randint(3, 1000, (1, PREFIX), generator=torch.Generator().manual_seed(0))

    def open(self, codec: str, push: bool) -> DistributedModelForCausalLM:
        model = DistributedModelForCausalLM.from_pretrained(
            self.model_dir, self.initial_peers, codec=codec, push=push, verify_fraction=0.0
        )
        model.generate(self.prompt[:, :8], max_new_tokens=2)  # warm-up: routes, RTTs, connections
        return model

    def model(self, codec: str, push: bool) -> DistributedModelForCausalLM:
        if (codec, push) not in self.models:
            self.models[codec, push] = self.open(codec, push)
        return self.models[codec, push]

    def generate(self, codec: str, push: bool) -> dict:
        _, seconds = generate_with_interruptions(self.model(codec, push), self.prompt, DECODE_STEPS + 1, {})
        return {"decode_step_s": statistics.median(seconds[1:])}

    def stopped_step(self) -> dict:
        """Seconds of the decode step before which the first span's peer is stopped, with a client of its own (no
        peer banned by an earlier round)."""

        def stop_first_span(session) -> None:
            os.kill(self.pids[str(session.spans[0].hop.peer_id)], signal.SIGSTOP)

        with self.open("none", True) as model:
            _, seconds = generate_with_interruptions(
                model, self.prompt, DECODE_STEPS + 1, {STOP_AT_STEP: stop_first_span}
            )
        return {"stalled_step_s": seconds[STOP_AT_STEP]}

    def forward(self, codec: str) -> dict:
        model = self.model(codec, True)
        hidden = torch.randn(*FORWARD_SHAPE, model.config.hidden_size)
        timings = []
        for _ in range(3):
            began = time.perf_counter()
            with torch.no_grad():
                model.remote.forward(hidden)
            timings.append(time.perf_counter() - began)
        return {"forward_s": statistics.median(timings)}

    def serve(self) -> None:
        print(MARK + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            command, *args = line.split()
            if command == "generate":
                reply = self.generate(args[0], args[1] == "push")
            elif command == "sigstop":
                reply = self.stopped_step()
            else:
                reply = self.forward(args[0])
            print(MARK + json.dumps(reply), flush=True)
        for model in self.models.values():
            model.close()


# ---------------------------------------------------------------- the bench


class ClientProcess:
    def __init__(self, wan: EmulatedWan, swarm: LocalSwarm, model_dir: Path, log: Path):
        pids = [f"{p.peer_id}={p.popen.pid}" for p in swarm.processes if p.peer_id]
        argv = [sys.executable, __file__, "--client", str(model_dir), "--initial-peers", *swarm.initial_peers]
        self.log = open(log, "w")  # noqa: SIM115 - the child's stderr
        self.process = subprocess.Popen(
            wan.command(wan.add_host("client"), [*argv, "--pids", *pids]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.receive()

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"the client exited with code {self.process.wait()}; see {self.log.name}")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)
        self.log.close()


def on_wan(preset: str, work: Path, measure_cells, spare_first_span: bool = False):
    """A swarm of `preset` on a fresh emulated WAN; `measure_cells(wan, swarm, client)` gives the results."""
    model_dir = init_random_model(work / preset, preset=preset)
    num_blocks = load_config(model_dir).num_blocks
    with EmulatedWan() as wan, LocalSwarm(model_dir, work / f"logs-{preset}", wan=wan) as swarm:
        swarm.start_bootstrap()
        peer_spans = spans(num_blocks, 3) + (spans(num_blocks, 3)[:1] if spare_first_span else [])
        swarm.start_peers(peer_spans)
        client = ClientProcess(wan, swarm, model_dir, work / f"logs-{preset}" / "client.log")
        try:
            return model_dir, measure_cells(wan, swarm, client)
        finally:
            client.close()


def grid(wan: EmulatedWan, run) -> dict:
    results = {}
    for delay in DELAYS_MS:
        wan.set_delay(delay)
        for bandwidth in BANDWIDTHS_MBIT:
            wan.set_bandwidth(bandwidth)
            for codec in CODECS:
                results[delay, bandwidth, codec] = run(codec)
    return results


def generation_cells(wan: EmulatedWan, swarm: LocalSwarm, client: ClientProcess) -> dict:
    cells = grid(
        wan,
        lambda codec: {
            "steps_per_s_push": 1 / client.ask(f"generate {codec} push")["decode_step_s"],
            "steps_per_s_relay": 1 / client.ask(f"generate {codec} relay")["decode_step_s"],
        },
    )
    wan.set_delay(50.0)
    wan.set_bandwidth(1000.0)
    stalls = []
    for _ in range(5):
        stalls.append(client.ask("sigstop")["stalled_step_s"])
        for process in swarm.processes:
            process.signal(signal.SIGCONT)
    return {"cells": cells, "sigstop_stall_s": statistics.median(stalls)}


def forward_cells(wan: EmulatedWan, swarm: LocalSwarm, client: ClientProcess) -> dict:
    tokens = FORWARD_SHAPE[0] * FORWARD_SHAPE[1]
    return grid(wan, lambda codec: {"forward_tokens_per_s": tokens / client.ask(f"forward {codec}")["forward_s"]})


def local_step_s(model_dir: Path) -> float:
    ends = load_ends(model_dir)
    prompt = torch.randint(3, 1000, (1, PREFIX), generator=torch.Generator().manual_seed(0))
    return min(measure(ends, local_step(model_dir, PREFIX + 32), prompt, 24)[0] for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--client", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--initial-peers", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pids", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        pids = {peer: int(pid) for peer, pid in (entry.split("=") for entry in args.pids)}
        return Client(args.client, args.initial_peers, pids).serve()

    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-wan-"))
    tiny_dir, generation = on_wan("tiny", work, generation_cells, spare_first_span=True)
    _, forward = on_wan("medium", work, forward_cells)
    local_s = local_step_s(tiny_dir)
    cells = []
    for (delay, bandwidth, codec), speeds in generation["cells"].items():
        floor = 1 / (local_s + 4 * delay / 1e3)
        cells.append(
            {
                "delay_ms": delay,
                "bandwidth_mbit": bandwidth,
                "codec": codec,
                **{name: round(value, 2) for name, value in speeds.items()},
                "floor_steps_per_s": round(floor, 2),
                "forward_tokens_per_s": round(forward[delay, bandwidth, codec]["forward_tokens_per_s"], 1),
            }
        )
    at_50 = [cell for cell in cells if cell["delay_ms"] == 50.0]
    forward_100 = {(c["delay_ms"], c["codec"]): c["forward_tokens_per_s"] for c in cells if c["bandwidth_mbit"] == 100}
    result = {
        "cells": cells,
        "local_step_ms": round(local_s * 1e3, 2),
        "push_vs_relay_steps_at_50ms": round(
            statistics.median(cell["steps_per_s_push"] / cell["steps_per_s_relay"] for cell in at_50), 3
        ),
        "steps_vs_floor_at_50ms": round(
            statistics.median(cell["steps_per_s_push"] / cell["floor_steps_per_s"] for cell in at_50), 3
        ),
        "int8_vs_none_forward_at_100mbit": round(
            statistics.median(forward_100[d, "int8-blockwise"] / forward_100[d, "none"] for d in DELAYS_MS), 2
        ),
        "sigstop_stall_s": round(generation["sigstop_stall_s"], 2),
        "wall_s": round(time.monotonic() - began, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
