"""Fine-tune a soft prompt, deep prompts and LoRA through frozen swarm peers, then generate with the saved adapter.

Without --initial-peers it builds a tiny random model and starts a local swarm (a bootstrap node and 2 peers).
The dataset is a small local text file (one example per line; a built-in one by default), tokenized with the
model's tokenizer. Prints the loss after every step.

    python examples/finetune.py                       # everything local
    python examples/finetune.py --model DIR --initial-peers MADDR ... --data lines.txt
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.client.tuning import TuningConfig
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models.random_init import init_random_model

BUILT_IN_DATA = [
    "the swarm serves every block of the model",
    "peers announce the blocks they hold on the dht",
    "a client routes through a pipeline of peers",
    "when a peer dies the client replays its inputs",
]


def batches(tokenizer, lines: list[str], batch_size: int, length: int):
    ids = [tokenizer(line).input_ids[:length] for line in lines]
    ids = [row + [tokenizer.eos_token_id or 0] * (length - len(row)) for row in ids]
    data = torch.tensor(ids)
    while True:
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory the swarm serves (default: a new tiny random one)")
    parser.add_argument("--initial-peers", nargs="*", default=[])
    parser.add_argument("--data", help="text file, one training example per line")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default="adapter", help="where the trained adapter is saved")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="blockswarm-finetune-"))
    model_dir = args.model or str(init_random_model(work / "tiny", preset="tiny"))
    lines = Path(args.data).read_text().splitlines() if args.data else BUILT_IN_DATA
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tuning = TuningConfig(prompt_len=8, deep_prompts=True, lora_rank=8, lora_head=True)

    with contextlib.ExitStack() as stack:
        peers = args.initial_peers
        if not peers:
            swarm = stack.enter_context(LocalSwarm(model_dir, work / "logs"))
            swarm.start_bootstrap()
            for process in [swarm.start_peer("--blocks", span, wait=False) for span in ("0:4", "4:8")]:
                swarm.wait_peer(process)
            peers = swarm.initial_peers
        model = stack.enter_context(DistributedModelForCausalLM.from_pretrained(model_dir, peers, tuning=tuning))
        optimizer = torch.optim.Adam(model.adapters.parameters(), lr=args.lr)
        data = batches(tokenizer, lines, batch_size=4, length=16)
        for step in range(args.steps):
            input_ids = next(data)
            logits = model(input_ids)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
        saved = model.save_adapters(args.out)
        print(f"saved the adapter to {saved}")

        model.load_adapters(saved)
        prompt = tokenizer(lines[0].split()[0], return_tensors="pt").input_ids
        print("generated:", tokenizer.decode(model.generate(prompt, max_new_tokens=12)[0]))


if __name__ == "__main__":
    main()
