"""A SWARM trainer: many micro-batches in flight through the swarm's training stages at once.

`loss.backward()` through `DistributedModelForCausalLM` runs one micro-batch at a time: forward through every
stage, backward through every stage, then the next, so each stage's peers idle most of the time. `SwarmTrainer`
keeps `in_flight` micro-batches going concurrently on the client's event loop, each wired through the stages on
its own (stochastic wiring, a failed stage retried on another of its peers), and counts a micro-batch's samples
once, when its backward has reached every stage. The stages step on their own as their target batch fills; the
trainer waits for them only when asked (`wait_for_stage_steps`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from blockswarm.client.model import DistributedModelForCausalLM


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of predicting each next token."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainingReport:
    """What one `SwarmTrainer.train` call did: every micro-batch's loss in the order they were given, samples whose
    backward reached every stage, and the rate."""

    losses: list[float]
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class SwarmTrainer:
    """Trains the swarm's `--train` peers with micro-batches of token ids, `in_flight` of them at a time.

    The model must be loaded with `swarm_training=True`. The local embeddings and head get gradients too when
    their parameters require them (they are the caller's to step). `in_flight` defaults to twice the number of
    stages a micro-batch crosses, enough to keep every stage busy while others compute.
    """

    def __init__(
        self,
        model: DistributedModelForCausalLM,
        loss_fn: LossFunction = causal_lm_loss,
        in_flight: int | None = None,
        progress: bool = True,
    ):
        if not model.remote.chain.train:
            raise ValueError("SwarmTrainer needs a SWARM trainer's model: from_pretrained(..., swarm_training=True)")
        if model.adapters is not None:
            raise ValueError("SwarmTrainer trains the swarm's blocks; fine-tune adapters with loss.backward()")
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.model = model
        self.loss_fn = loss_fn
        self.in_flight = in_flight or 2 * len(model.remote.router.wire(0, model.config.num_blocks))
        self.progress = progress

    def train(self, micro_batches: Iterable[torch.Tensor], total: int | None = None) -> TrainingReport:
        """Run every micro-batch ([batch, length] token ids) forward and backward through the stages, `in_flight`
        at a time; returns their losses in order. `total`: how many micro-batches there are, for the progress bar.
        Raises the first micro-batch's error (after the others in flight finished) when its retries ran out."""
        if total is None and hasattr(micro_batches, "__len__"):
            total = len(micro_batches)
        self.model.remote.open_stage_batch()
        with tqdm(total=total, desc="SWARM training", unit="micro-batch", disable=not self.progress) as bar:
            return self.model.remote.loop.run(self._train(iter(micro_batches), bar))

    def wait_for_stage_steps(self, timeout: float = 120.0) -> None:
        """Block until every training peer has stepped since the last wait (see `RemoteBlocks.wait_for_stage_steps`),
        e.g. before evaluating."""
        self.model.remote.wait_for_stage_steps(timeout)

    async def _train(self, micro_batches, bar: tqdm) -> TrainingReport:
        losses: dict[int, float] = {}
        samples, began = 0, time.perf_counter()
        running: set[asyncio.Task] = set()
        error: BaseException | None = None

        def finished(index: int, task: asyncio.Task) -> None:
            nonlocal samples, error
            if task.cancelled() or task.exception() is not None:
                error = error or (task.exception() or asyncio.CancelledError())
                return
            losses[index], batch_size = task.result()
            samples += batch_size
            elapsed = time.perf_counter() - began
            bar.set_postfix(samples=samples, loss=f"{losses[index]:.4f}", samples_per_s=f"{samples / elapsed:.1f}")
            bar.update()

        for index, input_ids in enumerate(micro_batches):
            if error is not None:
                break
            while len(running) >= self.in_flight:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                running -= done
            task = asyncio.ensure_future(self._micro_batch(input_ids))
            task.add_done_callback(lambda task, index=index: finished(index, task))
            running.add(task)
        if running:
            await asyncio.wait(running)
        if error is not None:
            raise error
        return TrainingReport([losses[i] for i in sorted(losses)], samples, time.perf_counter() - began)

    async def _micro_batch(self, input_ids: torch.Tensor) -> tuple[float, int]:
        """Forward and backward of one micro-batch; its loss and size."""
        model, chain = self.model, self.model.remote.chain
        if input_ids.dim() != 2:
            raise ValueError(f"a micro-batch is [batch, length] token ids, got shape {list(input_ids.shape)}")
        embedded = await asyncio.to_thread(model.embed, input_ids)
        outputs, hop_inputs = await chain.forward(embedded.detach(), 0, model.config.num_blocks)
        loss, grad_outputs = await asyncio.to_thread(self._loss_and_grad, outputs, input_ids)
        grad_inputs, _ = await chain.backward(hop_inputs, grad_outputs)
        if embedded.requires_grad:
            await asyncio.to_thread(embedded.backward, grad_inputs.to(embedded.dtype))
        return loss, input_ids.shape[0]

    def _loss_and_grad(self, outputs: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
        hidden = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(self.model.logits(hidden), input_ids)
            loss.backward()
        return loss.item(), hidden.grad
