"""A training peer's membership in its SWARM stage: trainable blocks, the stage optimizer they learn through, a log
line per stage step, and the span checkpoints written as the stage steps."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from blockswarm.dht import ServerState, SwarmNode, get_block_servers
from blockswarm.models.checkpoints import span_tensors, write_span
from blockswarm.peer.backend import BlockBackend
from blockswarm.peer.stage_training import StageOptimizer, StageTrainingOptions, stage_run_id

logger = logging.getLogger(__name__)


class StageMember:
    def __init__(
        self,
        model_name: str,
        backend: BlockBackend,
        checkpoint_dir: str | None,
        checkpoint_every: int,
        checkpoint_keep: int,
    ):
        self.model_name = model_name
        self.backend = backend
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.checkpoint_keep = checkpoint_keep
        self.optimizer: StageOptimizer | None = None
        # checkpoints are written off the compute thread, one at a time, from snapshots taken between passes
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockswarm-checkpoint")
        self._last_step_at = time.monotonic()

    @property
    def step(self) -> int | None:
        return None if self.optimizer is None else self.optimizer.epoch

    def join(self, node: SwarmNode, options: StageTrainingOptions) -> None:
        """Make the blocks trainable and join the stage of peers serving the same span; a late joiner first
        downloads the stage's current parameters and optimizer state."""
        backend, start, end = self.backend, self.backend.start, self.backend.end
        for parameter in backend.parameters():
            parameter.requires_grad_(True)
        backend.parameters_lock = threading.Lock()
        self.optimizer = StageOptimizer(
            node.dht,
            stage_run_id(self.model_name, start, end),
            backend.parameters(),
            options,
            parameters_lock=backend.parameters_lock,
            signing_key=node.signing_key,
        )
        (servers,) = get_block_servers(node.dht, self.model_name, start, start + 1, latest=True)
        mates = [
            peer
            for peer, info in servers.items()
            if info.training and (info.start, info.end) == (start, end) and info.state == ServerState.ONLINE
        ]
        if mates:
            loaded = self.optimizer.load_state_from_peers()
            if loaded:
                self.save_checkpoint()
            print(
                f"blockswarm peer joined stage {start}:{end} with {len(mates)} peer(s): "
                + (f"loaded their state at step {self.optimizer.epoch}" if loaded else "could not load their state"),
                flush=True,
            )
        backend.learn = self.optimizer.accumulate
        self.optimizer.on_step = self._on_step

    def leave(self) -> None:
        """Finish and apply a step in progress, stop averaging, and save the span as it ends."""
        if self.optimizer is not None:
            self.optimizer.shutdown()
            self.save_checkpoint()
        self._writer.shutdown(wait=True)

    def _on_step(self, epoch: int) -> None:
        """Called by the stage optimizer, between passes, once a step's parameters are in place."""
        now, here = time.monotonic(), self.optimizer.samples_here(epoch)
        print(
            f"blockswarm stage {self.backend.start}:{self.backend.end} step {epoch}: {here} samples here, "
            f"{now - self._last_step_at:.1f} s since the previous step",
            flush=True,
        )
        self._last_step_at = now
        if epoch % self.checkpoint_every == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """blocks_START-END.stepN.safetensors in the checkpoint directory, from a snapshot taken now and written in the
        background; older steps beyond the newest few are removed."""
        if self.checkpoint_dir is None or self.optimizer is None:
            return
        start, end, epoch = self.backend.start, self.backend.end, self.optimizer.epoch
        tensors = span_tensors(self.backend.blocks, start)
        self._writer.submit(self._write, tensors, start, end, epoch)

    def _write(self, tensors: dict, start: int, end: int, epoch: int) -> None:
        directory = Path(self.checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"blocks_{start}-{end}.step{epoch:06d}.safetensors"
        try:
            write_span(tensors, start, end, path, {"epoch": str(epoch), "model": self.model_name})
        except OSError:
            logger.exception("could not save the span at step %d to %s", epoch, path)
            return
        for old in sorted(directory.glob(f"blocks_{start}-{end}.step*.safetensors"))[: -self.checkpoint_keep]:
            old.unlink(missing_ok=True)
