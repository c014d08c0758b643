"""Engine deltas to OpenAI's response shapes: whole responses, streamed chunks, logprobs of both APIs."""

from __future__ import annotations

from collections.abc import Iterable

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

    def add(self, delta: Delta, index: int) -> None:
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


def completion_chunk(request_id: str, model: str, delta: Delta, index: int, offset: int, logprobs: bool) -> Completion:
    choice = CompletionChoice(
        index=index,
        text=delta.text,
        logprobs=completion_logprobs(delta.logprobs, offset) if logprobs else None,
        finish_reason=delta.finish_reason,
    )
    return Completion(id=request_id, model=model, choices=[choice])


def chat_chunks(request_id: str, model: str, delta: Delta, index: int, first: bool, logprobs: bool) -> Iterable:
    """The role first (once per choice), then content, then the finish reason on a chunk of its own, as OpenAI."""
    if first:
        yield _chat_chunk(
            request_id, model, ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
        )
    if delta.text or delta.logprobs:
        content = ChatChunkChoice(
            index=index,
            delta=ChatDelta(content=delta.text),
            logprobs=chat_logprobs(delta.logprobs) if logprobs else None,
        )
        yield _chat_chunk(request_id, model, content)
    if delta.finish_reason:
        ending = ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=delta.finish_reason)
        yield _chat_chunk(request_id, model, ending)


def _chat_chunk(request_id: str, model: str, choice: ChatChunkChoice) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=request_id, model=model, choices=[choice])


def usage_chat_chunk(request_id: str, model: str, finished: list[Finished]) -> ChatCompletionChunk:
    return ChatCompletionChunk(id=request_id, model=model, choices=[], usage=usage(finished))


def usage_completion_chunk(request_id: str, model: str, finished: list[Finished]) -> Completion:
    return Completion(id=request_id, model=model, choices=[], usage=usage(finished))
