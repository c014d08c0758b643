"""Engine deltas to OpenAI's response shapes: whole responses, streamed chunks, logprobs of both APIs."""

from __future__ import annotations

from collections.abc import Iterator

from .engine import Delta, Finished, TokenLogprob
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TopLogprob,
    Usage,
)
from .schemas import TokenLogprob as ChatTokenLogprob


def usage(finished: list[Finished]) -> Usage:
    prompt = sum(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_logprobs(logprobs: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.bytes),
                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(b)) for t, b, v in lp.top],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy completions layout; `offset` is where this text starts in the choice's whole text."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{t: v for t, _, v in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


class ChoiceTexts:
    """Whole choices gathered from deltas (for responses that are not streamed)."""

    def __init__(self) -> None:
        self.text: dict[int, str] = {}
        self.logprobs: dict[int, list[TokenLogprob]] = {}
        self.finish: dict[int, str | None] = {}

    def add(self, delta: Delta) -> None:
        index = delta.index
        self.text[index] = self.text.get(index, "") + delta.text
        self.logprobs.setdefault(index, []).extend(delta.logprobs)
        self.finish[index] = delta.finish_reason or self.finish.get(index)

    def completion(self, request_id: str, model: str, finished: list[Finished], logprobs: bool) -> Completion:
        return Completion(
            id=request_id,
            model=model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=self.text[i],
                    logprobs=completion_logprobs(self.logprobs[i], 0) if logprobs else None,
                    finish_reason=self.finish[i],
                )
                for i in sorted(self.text)
            ],
            usage=usage(finished),
        )

    def chat(self, request_id: str, model: str, finished: list[Finished], logprobs: bool) -> ChatCompletion:
        return ChatCompletion(
            id=request_id,
            model=model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=self.text[i]),
                    logprobs=chat_logprobs(self.logprobs[i]) if logprobs else None,
                    finish_reason=self.finish[i],
                )
                for i in sorted(self.text)
            ],
            usage=usage(finished),
        )


class CompletionChunks:
    """A streamed completion: a chunk per delta, its logprobs' offsets counted in the choice's whole text."""

    def __init__(self, request_id: str, model: str, logprobs: bool):
        self.request_id, self.model, self.logprobs = request_id, model, logprobs
        self.offsets: dict[int, int] = {}

    def of(self, delta: Delta) -> Iterator[Completion]:
        offset = self.offsets.get(delta.index, 0)
        choice = CompletionChoice(
            index=delta.index,
            text=delta.text,
            logprobs=completion_logprobs(delta.logprobs, offset) if self.logprobs else None,
            finish_reason=delta.finish_reason,
        )
        self.offsets[delta.index] = offset + len(delta.text)
        yield Completion(id=self.request_id, model=self.model, choices=[choice])

    def usage(self, finished: list[Finished]) -> Completion:
        return Completion(id=self.request_id, model=self.model, choices=[], usage=usage(finished))


class ChatChunks:
    """A streamed chat completion as OpenAI sends it: each choice's role first, then its content, then its finish
    reason on a chunk of its own."""

    def __init__(self, request_id: str, model: str, logprobs: bool):
        self.request_id, self.model, self.logprobs = request_id, model, logprobs
        self.started: set[int] = set()

    def of(self, delta: Delta) -> Iterator[ChatCompletionChunk]:
        if delta.index not in self.started:
            self.started.add(delta.index)
            yield self._chunk(ChatChunkChoice(index=delta.index, delta=ChatDelta(role="assistant", content="")))
        if delta.text or delta.logprobs:
            content = ChatDelta(content=delta.text)
            logprobs = chat_logprobs(delta.logprobs) if self.logprobs else None
            yield self._chunk(ChatChunkChoice(index=delta.index, delta=content, logprobs=logprobs))
        if delta.finish_reason:
            yield self._chunk(ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=delta.finish_reason))

    def usage(self, finished: list[Finished]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[], usage=usage(finished))

    def _chunk(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.request_id, model=self.model, choices=[choice])
