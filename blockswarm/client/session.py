"""An inference session: KV caches kept on the peers across `generate` calls, and the tokens they have seen."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from blockswarm.pipeline.inference import InferenceSession

if TYPE_CHECKING:
    from blockswarm.client.model import DistributedModelForCausalLM


class GenerationSession:
    """KV caches kept on the peers across `generate` calls; tracks every token the session has seen.

    Use through `with model.inference_session(max_length=N) as session:`.
    """

    def __init__(self, model: DistributedModelForCausalLM, max_length: int, batch_size: int):
        self.model = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.token_ids = torch.empty(batch_size, 0, dtype=torch.long)
        self.pending_ids = torch.empty(batch_size, 0, dtype=torch.long)
        self._remote: InferenceSession | None = None

    @property
    def position(self) -> int:
        """Tokens the peers have processed."""
        return self.token_ids.shape[1] - self.pending_ids.shape[1]

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        adapters = self.model.adapters
        if self._remote is not None:
            return self.model.remote.step(self._remote, hidden)
        # the first step opens the session, with the soft prompt's positions before the first token
        prompt_len = 0 if adapters is None else adapters.tuning.prompt_len
        adapter = None if adapters is None or adapters.spec is None else adapters.wire(adapters.remote_tensors())
        self._remote = self.model.remote.open_session(self.max_length + prompt_len, self.batch_size, adapter)
        if adapters is not None:
            hidden = adapters.prepend_prompt(hidden)
        return self.model.remote.step(self._remote, hidden)[:, prompt_len:]

    def close(self) -> None:
        if self._remote is not None:
            self.model.remote.close_session(self._remote)
            self._remote = None

    def __enter__(self) -> GenerationSession:
        if self.model.active_session is not None:
            raise RuntimeError("an inference session is already active on this model; close it first")
        self.model.active_session = self
        return self

    def __exit__(self, *exc) -> None:
        self.model.active_session = None
        self.close()
