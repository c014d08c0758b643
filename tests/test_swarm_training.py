"""SWARM training on loopback: 2 stages x 2 training peers, one trainer sending micro-batches through them."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hivemind.p2p import PeerID
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models.checkpoints import load_span, reassemble
from blockswarm.pipeline.hops import PeerError
from blockswarm.pipeline.streams import call
from blockswarm.wire.messages import BACKWARD_RPC, ChainRequest
from blockswarm.wire.trainer_auth import train_proof
from blockswarm.wire.transport import encode

STAGES = ("0:4", "4:8")
RUN_KEY = "test-run-key"
TRAINING_ARGS = (
    "--train",
    "--train-key",
    RUN_KEY,
    "--learning-rate",
    "3e-3",
    "--target-batch-size",
    "8",
    "--matchmaking-time",
    "4",
    "--averaging-timeout",
    "15",
)


def data(step: int) -> torch.Tensor:
    """Four learnable sequences (arithmetic progressions of token ids), the same every time they come round."""
    first = torch.tensor([10, 200, 1000, 3000]) + 7 * (step % 2)
    return (first[:, None] + torch.arange(16) * (1 + step % 2)) % 4000 + 4


def lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def train(model, steps: int) -> list[float]:
    """`steps` stage steps of 8 samples: two micro-batches of 4, then wait until every training peer has stepped."""
    losses = []
    for step in range(steps):
        for micro_batch in range(2):
            loss = lm_loss(model, data(2 * step + micro_batch))
            loss.backward()
            losses.append(loss.item())
        model.remote.wait_for_stage_steps(timeout=60)
    return losses


def checkpoints(directory: Path) -> dict[int, Path]:
    """A training peer's saved spans by stage step."""
    return {load_span(path).epoch: path for path in directory.glob("blocks_*.step*.safetensors")}


def common_step(first: Path, second: Path, timeout: float = 60.0) -> tuple[dict, dict]:
    """The two peers' spans at the newest stage step both have saved."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps_first, steps_second = checkpoints(first), checkpoints(second)
        step = max(set(steps_first) & set(steps_second), default=0)
        if step >= 1:
            return load_span(steps_first[step]).tensors, load_span(steps_second[step]).tensors
        time.sleep(0.5)
    raise TimeoutError(f"{first} and {second} never saved the same stage step")


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


def assert_strangers_cannot_train(model, peer_id: PeerID) -> None:
    """A backward pass with train=True and no proof of the run key, or a proof made with another key or for
    another peer, is refused with a clear error; the same pass without train=True is served."""
    hidden = torch.randn(1, 4, model.remote.config.hidden_size)
    payloads = encode([hidden, torch.randn_like(hidden)])
    own_id = model.remote.p2p.peer_id
    proofs = {
        "no proof": "",
        "another key": train_proof("guessed-key", peer_id, own_id),
        "made for another peer": train_proof(RUN_KEY, own_id, own_id),
    }
    for case, proof in proofs.items():
        request = ChainRequest(start=0, end=4, train=True, train_proof=proof)
        with pytest.raises(PeerError, match="learns only from the trainers of its run"):
            model.remote.loop.run(call(model.remote.p2p, peer_id, BACKWARD_RPC, request, payloads, 30.0))
        print(f"refused a training backward with {case}")
    (grad,) = model.remote.loop.run(
        call(model.remote.p2p, peer_id, BACKWARD_RPC, ChainRequest(start=0, end=4), payloads, 30.0)
    )
    assert grad.shape == hidden.shape


def test_swarm_training(tiny_model, tmp_path):
    with LocalSwarm(tiny_model, tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        peers = {}
        for span in STAGES:
            for copy in "ab":
                directory = tmp_path / f"{span.replace(':', '-')}{copy}"
                peers[span, copy] = (
                    swarm.start_peer("--blocks", span, *TRAINING_ARGS, "--checkpoint-dir", str(directory), wait=False),
                    directory,
                )
        for process, _ in peers.values():
            swarm.wait_peer(process)

        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, swarm_training=True, train_key=RUN_KEY, step_timeout=60
        ) as model:
            assert model.remote.codec == "int8-blockwise"
            assert_strangers_cannot_train(model, PeerID.from_base58(peers["0:4", "a"][0].peer_id))
            with torch.no_grad():
                before = lm_loss(model, data(0)).item()
            train(model, 4)
            assert sorted(model.remote.stage_steps().values()) == [4, 4, 4, 4]  # every peer, idle or not, stepped
            with torch.no_grad():
                after = lm_loss(model, data(0)).item()
            assert after < before * 0.8, (before, after)

            # after averaging rounds, the two peers of each stage hold the same parameters
            for span in STAGES:
                assert_same_tensors(*common_step(peers[span, "a"][1], peers[span, "b"][1]))

            # a peer killed mid-training does not stop training
            peers["4:8", "a"][0].signal(signal.SIGKILL)
            losses = train(model, 2)
            assert all(torch.isfinite(torch.tensor(losses)))
            assert sorted(model.remote.stage_steps().values()) == [6, 6, 6]

            # a peer joining a stage late starts from the stage's current state
            late_dir = tmp_path / "4-8late"
            late = swarm.start_peer("--blocks", "4:8", *TRAINING_ARGS, "--checkpoint-dir", str(late_dir))
            assert "loaded their state" in late.log()
            assert_same_tensors(*common_step(late_dir, peers["4:8", "b"][1]))

        # the stages' spans reassemble into a checkpoint that transformers loads
        for process, _ in peers.values():
            process.stop()
        late.stop()
        spans = [max(checkpoints(directory).items())[1] for directory in (peers["0:4", "a"][1], late_dir)]
        out = reassemble(tiny_model, spans, tmp_path / "trained")
        trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        base = load_file(Path(tiny_model) / "model.safetensors")
        for path in spans:
            for name, tensor in load_span(path).tensors.items():
                assert torch.equal(trained[name], tensor), name
                assert not torch.equal(base[name], tensor), f"{name} did not train"
