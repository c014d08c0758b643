"""SWARM training on loopback: 2 stages x 2 training peers, two trainers keeping micro-batches in flight through
them at once."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hivemind.p2p import PeerID
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM, SwarmTrainer, TrainingReport
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models.checkpoints import load_span, reassemble
from blockswarm.monitor import start_monitor
from blockswarm.monitor.page import render_page
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
    # a step every few seconds: averaging rounds are booked --matchmaking-time ahead, so batches that fill faster
    # than that leave stage-mates without a group, each stepping on its own gradients until the next state average
    "32",
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


def train_together(trainers: list[SwarmTrainer], micro_batches: int) -> list[TrainingReport]:
    """Each trainer sends `micro_batches` micro-batches (4 samples each) at the same time as the others, never
    waiting for the stages."""
    reports: list[TrainingReport | BaseException] = [RuntimeError("did not finish")] * len(trainers)

    def run(index: int) -> None:
        try:
            reports[index] = trainers[index].train([data(2 * i + index) for i in range(micro_batches)])
        except BaseException as error:
            reports[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(trainers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for report in reports:
        if isinstance(report, BaseException):
            raise report
    return reports


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


def assert_monitor_shows_training(swarm: LocalSwarm, steps: dict[str, int], timeout: float = 60.0) -> None:
    """A monitor crawling the swarm lists every training peer with its stage and at least its step in `steps`."""
    monitor = start_monitor(swarm.initial_peers, "127.0.0.1", 0, period=1.0)
    try:
        deadline = time.monotonic() + timeout
        while True:
            snapshot = monitor.crawler.history.latest()
            peers = {peer.peer_id: peer for model in (snapshot.models if snapshot else []) for peer in model.peers}
            shown = {peer_id: peers[peer_id].training_step for peer_id in steps if peer_id in peers}
            if all(peers[p].training and (shown[p] or 0) >= steps[p] for p in shown) and len(shown) == len(steps):
                break
            assert time.monotonic() < deadline, f"the monitor shows {shown}, not the peers' steps {steps}"
            time.sleep(0.5)
        page = render_page(snapshot, {}, period=1.0)
        assert page.count('<span class="badge training">stage 0:4</span> step') == 2
        assert page.count('<span class="badge training">stage 4:8</span> step') == 2
    finally:
        monitor.stop()


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

        connect = dict(swarm_training=True, train_key=RUN_KEY, step_timeout=60)
        with (
            DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, **connect) as model,
            DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, **connect) as other,
        ):
            assert model.remote.codec == "int8-blockwise"
            assert_strangers_cannot_train(model, PeerID.from_base58(peers["0:4", "a"][0].peer_id))
            with torch.no_grad():
                before = lm_loss(model, data(0)).item()
            trainers = [SwarmTrainer(model, progress=False), SwarmTrainer(other, progress=False)]
            assert trainers[0].in_flight == 4  # twice the stages
            reports = train_together(trainers, 12)
            assert [report.samples for report in reports] == [48, 48]
            # every peer, however many micro-batches it got, takes the steps that 96 samples complete
            deadline = time.monotonic() + 60
            while min(model.remote.stage_steps().values()) < 2:
                assert time.monotonic() < deadline, f"steps {model.remote.stage_steps()} after 96 samples"
                time.sleep(0.5)
            trainers[0].wait_for_stage_steps(timeout=60)  # the next phase waits for steps after this one
            with torch.no_grad():
                after = lm_loss(model, data(0)).item()
            assert after < before * 0.8, (before, after)

            assert_monitor_shows_training(swarm, model.remote.stage_steps())

            # after averaging rounds, the two peers of each stage hold the same parameters
            for span in STAGES:
                assert_same_tensors(*common_step(peers[span, "a"][1], peers[span, "b"][1]))

            # a peer killed mid-training does not stop training: its micro-batches go to its stage-mate, and
            # every sample is counted once
            killer = threading.Timer(1.0, peers["4:8", "a"][0].signal, args=(signal.SIGKILL,))
            killer.start()
            reports = train_together(trainers, 8)
            killer.join()
            assert [report.samples for report in reports] == [32, 32]
            assert all(torch.isfinite(torch.tensor(report.losses)).all() for report in reports)
            trainers[0].wait_for_stage_steps(timeout=60)  # the living peers stepped again
            assert len(model.remote.stage_steps()) == 3

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
