"""SWARM training (2 stages x 2 training peers, 8-bit wire) vs the same training in one local process.

Tiny preset, a bootstrap node and 4 `run-server --train` peers on loopback. Both train the transformer blocks (the
embeddings and head stay frozen) with Adam on the same micro-batches of the same learnable token sequences, one
optimizer step per `--target-batch-size` samples. On the swarm, `SwarmTrainer`s keep micro-batches in flight and
never wait for the stages, which step in the background as their batches fill; it runs once per `--trainers`
count, on fresh stages, the trainers in processes of their own sharing the micro-batches. Final losses are measured
on the training sequences once the stages' steps are in place: the swarm's trained blocks exactly (codec none, as
the local blocks are read), and also through the run's wire (`swarm_final_loss_through_wire`). `speed_ratio` is
the swarm's samples/s over local training's (timed before and after the swarm runs, averaged); wire bytes count
every activation and gradient the trainers send and receive: as they travel (`--codec`, int8-blockwise by default)
and as fp32 would. The JSON's top-level figures are the first `--trainers` count's; the others' under `trainers_N`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import blockswarm.pipeline.chain as chain_module  # noqa: E402
from blockswarm.client import DistributedModelForCausalLM, SwarmTrainer  # noqa: E402
from blockswarm.local_swarm import LocalSwarm  # noqa: E402
from blockswarm.models import load_blocks, load_ends  # noqa: E402
from blockswarm.models.random_init import init_random_model  # noqa: E402

STAGES = ("0:4", "0:4", "4:8", "4:8")
MICRO_BATCH = 4
RUN_KEY = "bench-run"  # the run's secret, shared by the training peers and the trainer
SEQUENCE = 32


def micro_batch(index: int) -> torch.Tensor:
    """Learnable sequences: arithmetic progressions of token ids, 8 of them in rotation."""
    rows = (torch.arange(MICRO_BATCH) + MICRO_BATCH * index) % 8
    first, stride = 17 + 331 * rows, 1 + rows % 3
    return (first[:, None] + stride[:, None] * torch.arange(SEQUENCE)) % 4000 + 4


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def evaluate(logits_of) -> float:
    with torch.no_grad():
        return sum(lm_loss(logits_of(micro_batch(i)), micro_batch(i)).item() for i in range(2)) / 2


def train_locally(model_dir: Path, steps: int, accumulation: int, lr: float) -> tuple[float, float]:
    blocks, ends = load_blocks(model_dir, 0, 8, progress=False), load_ends(model_dir)
    parameters = [p.requires_grad_(True) for block in blocks for p in block.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr)

    def logits_of(input_ids: torch.Tensor) -> torch.Tensor:
        hidden = ends.embed(input_ids)
        for block in blocks:
            hidden = block(hidden)
        return ends.logits(hidden)

    began = time.perf_counter()
    for index in range(steps * accumulation):
        (lm_loss(logits_of(micro_batch(index)), micro_batch(index)) / accumulation).backward()
        if (index + 1) % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad()
    samples_per_s = steps * accumulation * MICRO_BATCH / (time.perf_counter() - began)
    return evaluate(logits_of), samples_per_s


class WireCounter:
    """Counts the activations and gradients of the trainer's forward and backward calls, as sent and received (the
    hop's codec) and as fp32 would be; installed in the pipeline's chain module. Received tensors are only noted
    during training and measured afterwards, so the timed loop pays for no extra encoding."""

    def __init__(self):
        self.compressed = self.uncompressed = 0
        self._received: list[tuple[torch.Size, torch.dtype, str]] = []
        self._call, self._encode = chain_module.call, chain_module.encode_tensor

    def __enter__(self) -> WireCounter:
        chain_module.call, chain_module.encode_tensor = self.call, self.encode
        return self

    def __exit__(self, *exc) -> None:
        chain_module.call, chain_module.encode_tensor = self._call, self._encode

    def encode(self, tensor: torch.Tensor, codec: str) -> bytes:
        payload = self._encode(tensor, codec)
        self.compressed += len(payload)
        self.uncompressed += 4 * tensor.numel()
        return payload

    async def call(self, p2p, peer_id, rpc, request, payloads, timeout):
        outputs = await self._call(p2p, peer_id, rpc, request, payloads, timeout)
        self._received += [(tensor.shape, tensor.dtype, request.codec) for tensor in outputs]
        return outputs

    def totals(self) -> tuple[int, int]:
        """(bytes as they travelled, bytes in fp32); an encoding's size depends only on shape, dtype and codec."""
        received = [
            (len(self._encode(torch.zeros(shape, dtype=dtype), codec)), 4 * shape.numel())
            for shape, dtype, codec in self._received
        ]
        return self.compressed + sum(r[0] for r in received), self.uncompressed + sum(r[1] for r in received)


def start_stages(swarm: LocalSwarm, target: int, lr: float) -> None:
    swarm.start_bootstrap()
    training_args = ("--train", "--train-key", RUN_KEY, "--learning-rate", str(lr), "--target-batch-size", str(target))
    for process in [swarm.start_peer("--blocks", span, *training_args, wait=False) for span in STAGES]:
        swarm.wait_peer(process)


def connect(model_dir: Path, initial_peers: list[str], codec: str) -> DistributedModelForCausalLM:
    return DistributedModelForCausalLM.from_pretrained(
        model_dir, initial_peers, codec=codec, swarm_training=True, train_key=RUN_KEY, step_timeout=60
    )


def run_trainer(
    model_dir: Path, initial_peers: list[str], codec: str, indices: range, in_flight: int | None, ready
) -> dict:
    """One trainer's share of the micro-batches, begun when every trainer has connected (`ready`, a barrier)."""
    with WireCounter() as counter, connect(model_dir, initial_peers, codec) as model:
        trainer = SwarmTrainer(model, in_flight=in_flight, progress=False)
        ready.wait()
        began = time.time()
        report = trainer.train(micro_batch(index) for index in indices)
        finished = time.time()
        compressed, uncompressed = counter.totals()
    return dict(
        samples=report.samples,
        began=began,
        finished=finished,
        in_flight=trainer.in_flight,
        compressed=compressed,
        uncompressed=uncompressed,
    )


def _trainer_process(results, *args) -> None:
    try:
        results.put(run_trainer(*args))
    except BaseException:  # the parent waits for every trainer's result: it gets the failure instead
        results.put(traceback.format_exc())
        raise


def settled_stage_steps(model: DistributedModelForCausalLM, quiet: float = 3.0, timeout: float = 120.0) -> list[int]:
    """Each training peer's stage steps once none has changed for `quiet` seconds (the steps that the trained
    samples completed are in place; samples of a last, partial batch stay accumulated, unused, as locally)."""
    steps, deadline = model.remote.stage_steps(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet)
        steps, previous = model.remote.stage_steps(), steps
        if steps == previous:
            break
    return sorted(steps.values())


def train_on_swarm(
    model_dir: Path, work: Path, micro_batches: int, target: int, lr: float, codec: str, trainers: int, in_flight
) -> dict:
    """Fresh stages trained by `trainers` trainers at once, each in a process of its own with every `trainers`-th
    micro-batch; samples/s: all samples over the time from the trainers' common start to the last one's end."""
    with LocalSwarm(model_dir, work / f"logs-{trainers}") as swarm:
        start_stages(swarm, target, lr)
        context = multiprocessing.get_context("spawn")
        results, ready = context.Queue(), context.Barrier(trainers)
        processes = [
            context.Process(
                target=_trainer_process,
                args=(
                    results,
                    model_dir,
                    swarm.initial_peers,
                    codec,
                    range(first, micro_batches, trainers),
                    in_flight,
                    ready,
                ),
            )
            for first in range(trainers)
        ]
        for process in processes:
            process.start()
        reports = [results.get(timeout=3600) for _ in processes]
        failures = [report for report in reports if isinstance(report, str)]
        if failures:
            raise RuntimeError(f"a trainer failed:\n{failures[0]}")
        for process in processes:
            process.join()
        samples = sum(report["samples"] for report in reports)
        with connect(model_dir, swarm.initial_peers, codec) as model:
            stage_steps = settled_stage_steps(model)
            wire_loss = evaluate(model)
        # the trained blocks, read exactly (as the local run's are), not through the 8-bit wire
        with connect(model_dir, swarm.initial_peers, "none") as exact:
            final_loss = evaluate(exact)
    return dict(
        samples=samples,
        in_flight=reports[0]["in_flight"],
        stage_steps=stage_steps,
        swarm_final_loss=final_loss,
        swarm_final_loss_through_wire=wire_loss,
        swarm_samples_per_s=samples / (max(r["finished"] for r in reports) - min(r["began"] for r in reports)),
        compressed_wire_bytes_per_sample=sum(report["compressed"] for report in reports) / samples,
        uncompressed_wire_bytes_per_sample=sum(report["uncompressed"] for report in reports) / samples,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2560, help="training samples, locally and on each swarm run")
    parser.add_argument("--target-batch-size", type=int, default=128, help="samples per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--in-flight", type=int, default=None, help="micro-batches each trainer keeps in flight")
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 2], help="trainer counts to run")
    parser.add_argument("--codec", default="int8-blockwise", help="wire codec of the swarm run ('none': exact)")
    args = parser.parse_args()
    if args.target_batch_size % MICRO_BATCH or args.samples % args.target_batch_size:
        parser.error(f"--samples must be a multiple of --target-batch-size, a multiple of {MICRO_BATCH}")
    accumulation = args.target_batch_size // MICRO_BATCH
    steps = args.samples // args.target_batch_size

    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    model_dir = init_random_model(work / "tiny", preset="tiny")
    initial_loss, _ = train_locally(model_dir, 0, accumulation, args.lr)
    local_loss, local_rate_before = train_locally(model_dir, steps, accumulation, args.lr)
    runs = {
        trainers: train_on_swarm(
            model_dir,
            work,
            args.samples // MICRO_BATCH,
            args.target_batch_size,
            args.lr,
            args.codec,
            trainers,
            args.in_flight,
        )
        for trainers in args.trainers
    }

    # local training again, after the swarm runs: the machine's speed drifts, and the mean of both is compared
    _, local_rate_after = train_locally(model_dir, steps, accumulation, args.lr)
    local_rate = (local_rate_before + local_rate_after) / 2

    def summary(run: dict) -> dict:
        return {
            "swarm_final_loss": round(run["swarm_final_loss"], 4),
            "swarm_final_loss_through_wire": round(run["swarm_final_loss_through_wire"], 4),
            "loss_gap_rel": round(abs(run["swarm_final_loss"] - local_loss) / local_loss, 4),
            "swarm_samples_per_s": round(run["swarm_samples_per_s"], 2),
            "speed_ratio": round(run["swarm_samples_per_s"] / local_rate, 3),
            "compressed_wire_bytes_per_sample": round(run["compressed_wire_bytes_per_sample"]),
            "uncompressed_wire_bytes_per_sample": round(run["uncompressed_wire_bytes_per_sample"]),
            "stage_steps_per_peer": run["stage_steps"],
        }

    for trainers, run in runs.items():
        print(f"{trainers} trainer(s): {summary(run)}")
    first, *others = runs.items()
    result = {
        "preset": "tiny",
        "codec": args.codec,
        "samples": args.samples,
        "target_batch_size": args.target_batch_size,
        "in_flight": first[1]["in_flight"],
        "trainers": first[0],
        "initial_loss": round(initial_loss, 4),
        "local_final_loss": round(local_loss, 4),
        "local_samples_per_s": round(local_rate, 2),
        **summary(first[1]),
        **{f"trainers_{trainers}": summary(run) for trainers, run in others},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
