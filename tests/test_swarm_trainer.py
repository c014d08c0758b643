"""SwarmTrainer with several micro-batches in flight: the stages see the gradients of one-at-a-time training.

Two stages of one training peer each, codec none: a stage step must be the step that local Adam takes on the
sample-weighted mean gradient of exactly the target batch, whichever order the in-flight micro-batches' passes
reach the peers in.
"""

from __future__ import annotations

import pytest
import torch

from blockswarm.client import DistributedModelForCausalLM, SwarmTrainer, causal_lm_loss
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models import load_blocks, load_ends
from blockswarm.models.checkpoints import load_span, span_tensors

RUN_KEY = "test-trainer-key"
LEARNING_RATE = 1e-3
SIZES = (2, 6, 4, 4)  # one stage step's micro-batches: their sizes differ, so their weights in the mean matter
TARGET = sum(SIZES)


def micro_batches(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randint(4, 4000, (size, 16), generator=generator) for size in SIZES]


def local_training(model_dir: str, steps: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The same steps one micro-batch at a time in one process: the blocks' tensors after them, and the embedding
    gradients of each step's micro-batches (summed, as the trainer's are)."""
    blocks, ends = load_blocks(model_dir, 0, 8, progress=False), load_ends(model_dir)
    parameters = [parameter.requires_grad_(True) for block in blocks for parameter in block.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
    embedding = ends.embed_tokens.weight.requires_grad_(True)
    embedding_grads = []
    for step in range(steps):
        for input_ids in micro_batches(step):
            hidden = ends.embed(input_ids)
            for block in blocks:
                hidden = block(hidden)
            # the trainer's loss is a mean over its micro-batch; the stage's gradient the mean over the batch
            loss = causal_lm_loss(ends.logits(hidden), input_ids)
            embedding_grad, *grads = torch.autograd.grad(loss, [embedding, *parameters])
            embedding_grads.append(embedding_grad)
            for parameter, grad in zip(parameters, grads):
                parameter.grad = grad * input_ids.shape[0] / TARGET + (0 if parameter.grad is None else parameter.grad)
        optimizer.step()
        optimizer.zero_grad()
    grads = [sum(embedding_grads[i : i + len(SIZES)]) for i in range(0, len(embedding_grads), len(SIZES))]
    return span_tensors(blocks, 0), grads


def test_micro_batches_in_flight_train_like_one_at_a_time(tiny_model, tmp_path):
    steps = 2
    expected_blocks, expected_grads = local_training(tiny_model, steps)
    training = ("--train", "--train-key", RUN_KEY, "--learning-rate", str(LEARNING_RATE))
    training += ("--target-batch-size", str(TARGET))
    with LocalSwarm(tiny_model, tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        peers = [
            swarm.start_peer("--blocks", span, *training, "--checkpoint-dir", str(tmp_path / "spans"), wait=False)
            for span in ("0:4", "4:8")
        ]
        for peer in peers:
            swarm.wait_peer(peer)
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, codec="none", swarm_training=True, train_key=RUN_KEY, step_timeout=60
        ) as model:
            model.ends.embed_tokens.weight.requires_grad_(True)
            trainer = SwarmTrainer(model, in_flight=len(SIZES), progress=False)
            with pytest.raises(ValueError, match="at least 1"):
                SwarmTrainer(model, in_flight=0)
            for step in range(steps):
                report = trainer.train(micro_batches(step))
                assert report.samples == TARGET and len(report.losses) == len(SIZES)
                trainer.wait_for_stage_steps(timeout=60)  # the next micro-batches meet the stepped blocks
                torch.testing.assert_close(
                    model.ends.embed_tokens.weight.grad, expected_grads[step], atol=1e-5, rtol=1e-4
                )
                model.ends.embed_tokens.weight.grad = None
            assert sorted(model.remote.stage_steps().values()) == [steps, steps]
        for peer in peers:
            peer.stop()
            for step in range(1, steps + 1):
                # the stage's only peer: its samples are the stage's
                assert f"step {step}: {TARGET} samples here" in peer.log()

    trained = {}
    for span in ("0-4", "4-8"):
        trained |= load_span(tmp_path / "spans" / f"blocks_{span}.step{steps:06d}.safetensors").tensors
    assert trained.keys() == expected_blocks.keys()
    for name, tensor in expected_blocks.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
