"""DistributedModelForCausalLM: embeddings and head here, transformer blocks on the swarm."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from blockswarm.client.constraints import Grammars
from blockswarm.client.generation import LogitsProcessor, TokenStep, token_steps
from blockswarm.client.remote_blocks import RemoteBlocks
from blockswarm.client.sampling import SamplingParams
from blockswarm.client.session import GenerationSession
from blockswarm.client.tuning import Adapters, TuningConfig
from blockswarm.dht import get_models
from blockswarm.models import ModelConfig, load_config, load_ends, weights_fingerprint
from blockswarm.models.naming import swarm_model_name
from blockswarm.pipeline.retry import RetryPolicy
from blockswarm.pipeline.verification import LieReport


class DistributedModelForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        ends: nn.Module,
        remote: RemoteBlocks,
        adapters: Adapters | None = None,
        name_or_path: str | Path | None = None,
    ):
        super().__init__()
        self.config = config
        self.name_or_path = name_or_path  # where the tokenizer is
        self._tokenizer = None
        self._grammars: Grammars | None = None
        self.ends = ends
        self.remote = remote
        self.adapters = adapters  # the client's trainable parameters; the only ones: ends and peers stay frozen
        self.active_session: GenerationSession | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        initial_peers: list[str],
        *,
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        codec: str = "int8-blockwise",
        step_timeout: float = 30.0,
        failover_deadline: float = 60.0,
        allowed_peers: list[str] | None = None,
        blocked_peers: list[str] = (),
        show_route: bool = False,
        tuning: TuningConfig | None = None,
        swarm_training: bool = False,
        train_key: str | None = None,
        verify_fraction: float = 0.05,
        push: bool = True,
    ) -> DistributedModelForCausalLM:
        """Load the embeddings and head from `name_or_path` and join the swarm through `initial_peers`.

        `model_name` is the name the peers announce; by default it is derived from the checkpoint exactly as
        `blockswarm run-server` derives it. `codec` is how hidden states and gradients travel on every hop whose
        peer supports it: 8-bit blockwise by default (about 1/4 of fp32 traffic, <1% relative error), "none"
        for bit-exact results. A peer that does not answer a step within `step_timeout` seconds is
        replaced; when no peer can serve some blocks for `failover_deadline` seconds, the call fails naming them.
        `allowed_peers` pins routes to those peer ids, `blocked_peers` excludes some; `show_route=True` prints
        every route an inference session takes (at open and after each failover) to stderr.
        `tuning` adds new trainable soft/deep prompts and LoRA adapters (`model.adapters`); `load_adapters` loads
        saved ones. `swarm_training=True` makes this client a SWARM trainer: it routes only through peers started
        with `run-server --train`, and each `loss.backward()` makes those peers learn (each stage steps together
        once it has seen its target batch size); the local embeddings and head are the caller's to train.
        `train_key` is the run's secret, the one its peers got with `--train-key`: they learn only from trainers
        that know it. `verify_fraction` (0..1) of the steps and forward spans are also computed by a second peer
        serving the same blocks and compared; a peer caught lying is never used again and is listed in
        `model.lie_reports` (see "Spot-checking peers" in the README). SWARM trainers do not spot-check.
        `push=False` relays every inference step's hidden states through the client instead of having each peer
        push them to the next (fewer trips across the network per step; see docs/architecture.md).
        """
        config = load_config(name_or_path)
        model_name = model_name or swarm_model_name(name_or_path, weights_fingerprint(name_or_path))
        ends = load_ends(name_or_path, dtype=dtype)
        remote = RemoteBlocks(
            model_name,
            config,
            list(initial_peers),
            codec=codec,
            step_timeout=step_timeout,
            retry_policy=RetryPolicy(deadline=failover_deadline),
            allowed_peers=allowed_peers,
            blocked_peers=list(blocked_peers),
            show_route=show_route,
            swarm_training=swarm_training,
            train_key=train_key,
            verify_fraction=verify_fraction,
            push=push,
        )
        # anyone may add claims to the index: only a swarm that announces no claim matching ours is refused
        claims = get_models(remote.dht, latest=True).get(model_name, [])
        if claims and all(claim.config_hash != config.fingerprint() for claim in claims):
            announced = claims[0]
            remote.shutdown()
            raise ValueError(
                f"the swarm's peers serve {model_name!r} with another architecture ({announced.family}, "
                f"{announced.num_blocks} blocks, config {announced.config_hash}) than {name_or_path} "
                f"({config.family}, {config.num_blocks} blocks, config {config.fingerprint()}): "
                "load the checkpoint the peers serve, or pass the right model_name"
            )
        return cls(config, ends, remote, None if tuning is None else Adapters(tuning, config), name_or_path)

    @property
    def lie_reports(self) -> list[LieReport]:
        """Peers caught returning wrong outputs by this client's spot checks (`verify_fraction`)."""
        return self.remote.lie_reports

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Logits [batch, seq_len, vocab]; `.backward()` flows through the remote blocks into the adapters."""
        adapters = self.adapters
        if adapters is None:
            return self.logits(self.remote.forward(self.embed(input_ids)))
        hidden = adapters.prepend_prompt(self.embed(input_ids))
        hidden = self.remote.forward(hidden, adapters.spec, adapters.remote_tensors() if adapters.spec else [])
        return self.logits(hidden[:, adapters.tuning.prompt_len :])

    def embed(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.ends.embed(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's outputs, through the LM head (and its LoRA, if tuned)."""
        return self.ends.logits(hidden) if self.adapters is None else self.adapters.logits(self.ends, hidden)

    def save_adapters(self, path: str | Path) -> Path:
        if self.adapters is None:
            raise ValueError("this model has no adapters: pass tuning=TuningConfig(...) to from_pretrained")
        return self.adapters.save(path)

    def load_adapters(self, path: str | Path) -> Adapters:
        """Use adapters saved by `save_adapters` (for generation, or to go on training them)."""
        self.adapters = Adapters.load(path, self.config)
        return self.adapters

    def inference_session(self, max_length: int, batch_size: int = 1) -> GenerationSession:
        return GenerationSession(self, max_length, batch_size)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded on first use (structured output needs it)."""
        if self._tokenizer is None:
            if self.name_or_path is None:
                raise ValueError("no tokenizer: load the model with from_pretrained, or pass name_or_path")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        return self._tokenizer

    @property
    def grammars(self) -> Grammars:
        """Compiles structured-output constraints for this model's tokenizer (see `client/constraints.py`)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size)
        return self._grammars

    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        max_new_tokens: int = 20,
        *,
        attention_mask: torch.Tensor | None = None,
        session: GenerationSession | None = None,
        **options,
    ) -> torch.LongTensor:
        """Like Hugging Face `generate`. Inside an inference session, `input_ids` are tokens to append after
        everything the session has seen (None: just continue), and the result is the session's whole sequence.
        `options` are those of `stream`."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported: pass sequences of equal length without padding")
        session = session or self.active_session
        if session is None:
            if input_ids is None:
                raise ValueError("input_ids are required outside an inference session")
            with self.inference_session(input_ids.shape[1] + max_new_tokens, input_ids.shape[0]) as temporary:
                return self.generate(input_ids, max_new_tokens, session=temporary, **options)
        for _ in self.stream(input_ids, max_new_tokens, session=session, **options):
            pass
        return session.token_ids.clone()

    def stream(
        self,
        input_ids: torch.LongTensor | None,
        max_new_tokens: int,
        *,
        session: GenerationSession,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        seed: int | None = None,
        logits_processor: Sequence[LogitsProcessor] = (),
        json_schema: dict | str | None = None,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> Iterator[TokenStep]:
        """Yields every generated position of `session` as it comes; stop iterating to stop generating.

        `seed` makes sampling reproducible (its own generator, whatever else runs). `logits_processor`: Hugging
        Face-style `(token_ids, scores) -> scores` callables, applied in order before sampling. `json_schema`
        (a dict or JSON text), `regex` or `grammar` (EBNF, rule `root`) constrain the output: it always matches,
        ending with EOS (`eos_token_id`, by default the tokenizer's), unless `max_new_tokens` cuts it first.
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        processors = list(logits_processor)
        if json_schema is not None or regex is not None or grammar is not None:
            compiled = self.grammars.compile(json_schema=json_schema, regex=regex, grammar=grammar)
            processors.append(self.grammars.constraint(compiled, session.batch_size))
            eos_token_id = self.grammars.eos_token_id if eos_token_id is None else eos_token_id
        if input_ids is not None:
            input_ids = torch.as_tensor(input_ids, dtype=torch.long)
            if input_ids.dim() != 2 or input_ids.shape[0] != session.batch_size:
                raise ValueError(
                    f"input_ids must have shape [{session.batch_size}, seq_len], got {list(input_ids.shape)}"
                )
            session.token_ids = torch.cat([session.token_ids, input_ids], dim=1)
            session.pending_ids = torch.cat([session.pending_ids, input_ids], dim=1)
        if session.pending_ids.shape[1] == 0:
            raise ValueError("nothing to continue from: pass input_ids")
        needed = session.position + session.pending_ids.shape[1] + max_new_tokens - 1
        if needed > session.max_length:
            raise ValueError(
                f"generating {max_new_tokens} tokens needs a session of max_length >= {needed}, "
                f"this one has {session.max_length}"
            )
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        steps = token_steps(
            self,
            session.step,
            session.token_ids,
            session.pending_ids,
            max_new_tokens,
            params,
            eos_token_id,
            processors,
            generator,
        )
        for step in steps:
            session.token_ids, session.pending_ids = step.token_ids, step.token_ids[:, -1:]
            yield step

    def close(self) -> None:
        self.remote.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
