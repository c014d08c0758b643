"""SWARM training (2 stages x 2 training peers, 8-bit wire) vs the same training in one local process.

Tiny preset, a bootstrap node and 4 `run-server --train` peers on loopback. Both runs train the transformer
blocks (the embeddings and head stay frozen) with Adam on the same micro-batches of the same learnable token
sequences, one optimizer step per `--target-batch-size` samples: the swarm's trainer waits for the stages' step
after each batch (`wait_for_stage_steps`), and the JSON reports each peer's step count. Final losses are measured
on the training sequences after the last step: the swarm's trained blocks exactly (codec none, as the local
blocks are read), and also through the run's wire (`swarm_final_loss_through_wire`). Wire bytes count every
activation and gradient the trainer sends and receives: as they travel (`--codec`, int8-blockwise by default) and
as fp32 would.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import blockswarm.pipeline.chain as chain_module  # noqa: E402
from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
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


def train_on_swarm(model_dir: Path, work: Path, steps: int, accumulation: int, lr: float, codec: str) -> dict:
    target = accumulation * MICRO_BATCH
    with LocalSwarm(model_dir, work / "logs") as swarm:
        swarm.start_bootstrap()
        training_args = (
            "--train",
            "--train-key",
            RUN_KEY,
            "--learning-rate",
            str(lr),
            "--target-batch-size",
            str(target),
        )
        for process in [swarm.start_peer("--blocks", span, *training_args, wait=False) for span in STAGES]:
            swarm.wait_peer(process)
        with (
            WireCounter() as counter,
            DistributedModelForCausalLM.from_pretrained(
                model_dir, swarm.initial_peers, codec=codec, swarm_training=True, train_key=RUN_KEY, step_timeout=60
            ) as model,
        ):
            began = time.perf_counter()
            for index in range(steps * accumulation):
                # unscaled: each stage averages its micro-batches' gradients (by samples) into one step
                lm_loss(model(micro_batch(index)), micro_batch(index)).backward()
                if (index + 1) % accumulation == 0:
                    model.remote.wait_for_stage_steps()  # one step per batch, as local training does
            samples = steps * accumulation * MICRO_BATCH
            samples_per_s = samples / (time.perf_counter() - began)
            compressed, uncompressed = (total / samples for total in counter.totals())
            wire_loss = evaluate(model)
            stage_steps = sorted(model.remote.stage_steps().values())
        # the trained blocks, read exactly (as the local run's are), not through the 8-bit wire
        with DistributedModelForCausalLM.from_pretrained(
            model_dir, swarm.initial_peers, codec="none", swarm_training=True, train_key=RUN_KEY, step_timeout=60
        ) as exact:
            final_loss = evaluate(exact)
    return dict(
        stage_steps=stage_steps,
        swarm_final_loss=final_loss,
        swarm_final_loss_through_wire=wire_loss,
        swarm_samples_per_s=samples_per_s,
        compressed_wire_bytes_per_sample=compressed,
        uncompressed_wire_bytes_per_sample=uncompressed,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--target-batch-size", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--codec", default="int8-blockwise", help="wire codec of the swarm run ('none': exact)")
    args = parser.parse_args()
    if args.target_batch_size % MICRO_BATCH:
        parser.error(f"--target-batch-size must be a multiple of the micro-batch size {MICRO_BATCH}")
    accumulation = args.target_batch_size // MICRO_BATCH

    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    model_dir = init_random_model(work / "tiny", preset="tiny")
    initial_loss, _ = train_locally(model_dir, 0, accumulation, args.lr)
    local_loss, local_rate = train_locally(model_dir, args.steps, accumulation, args.lr)
    swarm = train_on_swarm(model_dir, work, args.steps, accumulation, args.lr, args.codec)
    print(f"loss: initial {initial_loss:.4f}, local {local_loss:.4f}, swarm {swarm['swarm_final_loss']:.4f}")
    result = {
        "preset": "tiny",
        "codec": args.codec,
        "samples": args.steps * args.target_batch_size,
        "initial_loss": round(initial_loss, 4),
        "local_final_loss": round(local_loss, 4),
        "swarm_final_loss": round(swarm["swarm_final_loss"], 4),
        "swarm_final_loss_through_wire": round(swarm["swarm_final_loss_through_wire"], 4),
        "loss_gap_rel": round(abs(swarm["swarm_final_loss"] - local_loss) / local_loss, 4),
        "swarm_samples_per_s": round(swarm["swarm_samples_per_s"], 2),
        "local_samples_per_s": round(local_rate, 2),
        "compressed_wire_bytes_per_sample": round(swarm["compressed_wire_bytes_per_sample"]),
        "uncompressed_wire_bytes_per_sample": round(swarm["uncompressed_wire_bytes_per_sample"]),
        "stage_steps_per_peer": swarm["stage_steps"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
