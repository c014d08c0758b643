"""SWARM training: a trainer keeps micro-batches in flight through stages of `run-server --train` peers, which
average gradients within each stage and step together in the background; then the trained spans are reassembled
into one checkpoint.

Without --initial-peers it builds a tiny random model and starts a local swarm: a bootstrap node and two stages
of two training peers each, saving their spans under --out/spans. The trainer trains the blocks only (the
embeddings and head stay as they are), shows a progress bar (samples, loss, samples/s) and, every
--eval-every micro-batches, waits for the stages' steps and prints the loss. Run several copies of it against
the same --initial-peers and they train the same stages together.

    python examples/swarm_train.py
    python examples/swarm_train.py --model DIR --initial-peers MADDR ...   # peers started with --train
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch

from blockswarm.client import DistributedModelForCausalLM, SwarmTrainer, causal_lm_loss
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models.checkpoints import reassemble
from blockswarm.models.random_init import init_random_model

STAGES = ("0:4", "0:4", "4:8", "4:8")


def micro_batch(index: int, size: int = 4, length: int = 32) -> torch.Tensor:
    """Learnable token sequences (arithmetic progressions), 8 of them in rotation."""
    rows = (torch.arange(size) + size * index) % 8
    return (17 + 331 * rows[:, None] + (1 + rows[:, None] % 3) * torch.arange(length)) % 4000 + 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint the swarm trains (default: a new tiny random one)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument(
        "--train-key", default="example-run", help="the run's secret (the --train-key its training peers got)"
    )
    parser.add_argument("--micro-batches", type=int, default=320)
    parser.add_argument("--in-flight", type=int, default=None, help="micro-batches in flight (default: 2 x stages)")
    parser.add_argument("--eval-every", type=int, default=80, help="micro-batches between evaluations")
    parser.add_argument("--out", default="swarm-trained", help="where span checkpoints and the result go")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="blockswarm-swarm-train-"))
    model_dir = args.model or str(init_random_model(work / "tiny", preset="tiny"))
    out = Path(args.out)
    with contextlib.ExitStack() as stack:
        peers = args.initial_peers
        if not peers:
            swarm = stack.enter_context(LocalSwarm(model_dir, work / "logs"))
            swarm.start_bootstrap()
            training = ("--train", "--train-key", args.train_key, "--target-batch-size", "64")
            training += ("--checkpoint-dir", str(out / "spans"))
            for process in [swarm.start_peer("--blocks", span, *training, wait=False) for span in STAGES]:
                swarm.wait_peer(process)
            peers = swarm.initial_peers
        with DistributedModelForCausalLM.from_pretrained(
            model_dir, peers, swarm_training=True, train_key=args.train_key
        ) as model:
            trainer = SwarmTrainer(model, in_flight=args.in_flight)
            for first in range(0, args.micro_batches, args.eval_every):
                indices = range(first, min(first + args.eval_every, args.micro_batches))
                report = trainer.train([micro_batch(index) for index in indices])
                trainer.wait_for_stage_steps()  # evaluate on the blocks that these samples trained
                with torch.no_grad():
                    loss = causal_lm_loss(model(micro_batch(0)), micro_batch(0)).item()
                print(f"after {indices.stop * 4} samples ({report.samples_per_s:.1f}/s): loss {loss:.4f}", flush=True)
            print(f"optimizer steps per training peer: {model.remote.stage_steps()}")
    # the peers saved their spans on exit; where several files cover a block, reassemble takes the newest step
    spans = sorted((out / "spans").glob("blocks_*.safetensors"))
    if spans:
        print(f"reassembled the trained model into {reassemble(model_dir, spans, out / 'checkpoint')}")


if __name__ == "__main__":
    main()
