"""Text in, text out over the swarm: prompts to token ids, token steps to text deltas with stop strings, logprobs
and finish reasons. Each request runs in its own thread with its own inference session (`events` in app.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from math import inf
from typing import Any

import torch

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.client.constraints import KnownTokensOnly
from blockswarm.client.session import GenerationSession
from blockswarm.pipeline.hops import NoRouteError


@dataclass(frozen=True)
class Options:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N" (vLLM's extension), exact for any tokenizer
    constraint: dict[str, Any] = field(default_factory=dict)  # one of json_schema= / regex= / grammar=


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


@dataclass
class Delta:
    """New text of one choice, the tokens' logprobs behind it, and `finish_reason` when the choice ended."""

    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass(frozen=True)
class Finished:
    prompt_tokens: int
    completion_tokens: int


class TextGenerator:
    def __init__(self, model: DistributedModelForCausalLM, default_chat_tokens: int = 512):
        self.model = model
        self.tokenizer = model.tokenizer
        self.context_length = model.config.max_position_embeddings
        self.default_chat_tokens = default_chat_tokens
        self.known_tokens = KnownTokensOnly(self.tokenizer)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template: use /v1/completions, or add a `chat_template` to the "
                "checkpoint's tokenizer_config.json (`blockswarm init-model` writes one)"
            )
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if any(not 0 <= token < self.model.config.vocab_size for token in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.model.config.vocab_size})")
        return list(prompt)

    def check(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """The number of tokens to generate at most; ValueError when the prompt leaves no room for them."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        room = self.context_length - len(prompt_ids)
        wanted = max_tokens if max_tokens is not None else min(self.default_chat_tokens, room)
        if wanted < 1 or wanted > room:
            raise ValueError(
                f"this model's maximum context length is {self.context_length} tokens: the prompt has "
                f"{len(prompt_ids)}, and {wanted} more were asked for"
            )
        return wanted

    def ready(self, options: Options) -> None:
        """Before any swarm work: NoRouteError when blocks are uncovered, ValueError for a bad constraint."""
        missing = self.model.remote.missing_blocks()
        if missing:
            raise NoRouteError(self.model.remote.model_name, missing)
        if options.constraint:
            self.model.grammars.compile(**options.constraint)

    def run(self, prompt_ids: list[int], options: Options, cancelled: threading.Event) -> Iterator[Delta | Finished]:
        """Deltas as tokens come, then one Finished; stops early when `cancelled` is set."""
        choices = [_Choice(index, self.tokenizer, options.stop) for index in range(options.n)]
        session = GenerationSession(self.model, len(prompt_ids) + options.max_tokens, options.n)
        try:
            steps = self.model.stream(
                torch.tensor([prompt_ids] * options.n),
                options.max_tokens,
                session=session,
                do_sample=options.temperature > 0,
                temperature=options.temperature or 1.0,
                top_p=options.top_p,
                eos_token_id=self.tokenizer.eos_token_id,
                seed=options.seed,
                logits_processor=[self.known_tokens],
                **options.constraint,
            )
            for position, step in enumerate(steps, start=1):
                tokens, logprobs = step.tokens.tolist(), self._logprobs(step.scores, step.tokens, options)
                last = position == options.max_tokens
                for choice in choices:
                    if choice.finish_reason is None:
                        row = choice.index
                        delta = choice.add(tokens[row], logprobs[row : row + 1], last)
                        if delta.text or delta.logprobs or delta.finish_reason:
                            yield delta
                if cancelled.is_set() or all(choice.finish_reason for choice in choices):
                    break
        finally:
            session.close()
        yield Finished(len(prompt_ids), sum(choice.tokens for choice in choices))

    def _logprobs(self, scores: torch.Tensor, tokens: torch.Tensor, options: Options) -> list[TokenLogprob]:
        """Each row's chosen token and its `options.top_logprobs` most likely ones (none masked out); [] when off."""
        if options.top_logprobs is None:
            return []
        name = self._token_id if options.tokens_as_ids else self._token
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        best = torch.topk(logprobs, options.top_logprobs, dim=-1)
        rows = []
        for row, token in enumerate(tokens.tolist()):
            top = [(*name(i), lp) for lp, i in zip(best.values[row].tolist(), best.indices[row].tolist()) if lp > -inf]
            rows.append(TokenLogprob(*name(token), float(logprobs[row, token]), top))
        return rows

    def _token_id(self, token_id: int) -> tuple[str, bytes]:
        return f"token_id:{token_id}", self._token(token_id)[1]

    def _token(self, token_id: int) -> tuple[str, bytes]:
        raw = self.model.grammars.token_bytes[token_id] if token_id < len(self.model.grammars.token_bytes) else b""
        return raw.decode("utf-8", errors="replace"), raw


class _Choice:
    """One choice's text as its tokens come, cut before the first stop string, holding back any tail that could
    still become one.

    Decoded incrementally, as vLLM does: the new tokens together with the last settled ones as context (so that a
    word's leading space comes out right), settled once they decode to whole characters. Decoding the whole text
    again at every token would cost time quadratic in its length.
    """

    def __init__(self, index: int, tokenizer, stops: tuple[str, ...]):
        self.index = index
        self.tokenizer = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""  # the settled text: whole characters
        self._context = 0  # ids[_context:_settled] are the context the next tokens decode with
        self._settled = 0  # ids[:_settled] make up `text`
        self.sent = 0  # characters of `text` already given out
        self.tokens = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int, logprobs: list[TokenLogprob], last: bool) -> Delta:
        self.tokens += 1
        if token_id == self.tokenizer.eos_token_id:
            return self._give(self.text, logprobs, "stop")
        self.ids.append(token_id)
        unsettled = self._decode()
        # text given out never holds the start of a stop string, so one can only begin after it
        cut = min((i for i in (self.text.find(stop, self.sent) for stop in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return self._give(self.text[:cut], logprobs, "stop")
        if last:
            return self._give(self.text + unsettled, logprobs, "length")
        held = max((_overlap(self.text, stop) for stop in self.stops), default=0)
        return self._give(self.text[: len(self.text) - held], logprobs)

    def _decode(self) -> str:
        """Settles what the new tokens spell in whole characters; returns the text of those still in pieces."""
        context = self.tokenizer.decode(self.ids[self._context : self._settled], skip_special_tokens=True)
        spelled = self.tokenizer.decode(self.ids[self._context :], skip_special_tokens=True)[len(context) :]
        if not spelled or spelled.endswith("\ufffd"):  # a character still in byte pieces
            return spelled
        self.text += spelled
        self._context, self._settled = self._settled, len(self.ids)
        return ""

    def _give(self, text: str, logprobs: list[TokenLogprob], finish_reason: str | None = None) -> Delta:
        """Everything of `text` not given out yet."""
        delta = Delta(self.index, text[self.sent :], logprobs, finish_reason)
        self.sent = max(self.sent, len(text))
        self.finish_reason = finish_reason
        return delta


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop`."""
    return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if stop.startswith(text[-n:])), 0)
