"""The OpenAI-compatible HTTP API (FastAPI): models, completions and chat completions, streamed or not, the chat
page at `/`, and errors as OpenAI error objects."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from blockswarm.client.constraints import JSON_OBJECT_SCHEMA
from blockswarm.pipeline.hops import NoRouteError, PeerError

from . import responses
from .engine import Delta, Finished, Options, TextGenerator
from .schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
)

CHAT_PAGE = resources.files(__package__).joinpath("chat_page.html").read_text()


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def create_app(generator: TextGenerator, model_name: str, concurrency: int = 64) -> FastAPI:
    """`concurrency` requests generate at once (each in its own thread and inference session); more wait."""
    app = FastAPI(title="blockswarm OpenAI-compatible API")
    executor = ThreadPoolExecutor(concurrency, thread_name_prefix="blockswarm-api")
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, str(e), e.kind, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        return _error(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return _error(
            e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error"
        )

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return CHAT_PAGE

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompts = request.prompt if _many_prompts(request.prompt) else [request.prompt]
        prompt_ids = [_bad_request(generator.text_prompt, prompt) for prompt in prompts]
        options = await _options(request, prompt_ids, request.max_tokens, request.logprobs)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        events = _generate(executor, generator, prompt_ids, options)
        logprobs = request.logprobs is not None
        if request.stream:
            return _sse(events, responses.CompletionChunks(request_id, model_name, logprobs), _wants_usage(request))
        texts, finished = await _collect(events)
        return texts.completion(request_id, model_name, finished, logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        messages = [{"role": m.role, "content": _bad_request(m.text)} for m in request.messages]
        prompt_ids = [_bad_request(generator.chat_prompt, messages)]
        top = (request.top_logprobs or 0) if request.logprobs else None
        options = await _options(request, prompt_ids, request.max_completion_tokens or request.max_tokens, top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        events = _generate(executor, generator, prompt_ids, options)
        if request.stream:
            return _sse(events, responses.ChatChunks(request_id, model_name, request.logprobs), _wants_usage(request))
        texts, finished = await _collect(events)
        return texts.chat(request_id, model_name, finished, request.logprobs)

    async def _options(
        request: SamplingRequest, prompt_ids: list[list[int]], max_tokens: int | None, top_logprobs: int | None
    ) -> Options:
        if request.model != model_name:
            raise ApiError(
                404,
                f"the model {request.model!r} does not exist: this server serves {model_name!r}",
                "not_found_error",
                "model_not_found",
            )
        longest = max(prompt_ids, key=len)
        options = Options(
            max_tokens=_bad_request(generator.check, longest, max_tokens),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=tuple(request.stop),
            n=request.n,
            top_logprobs=top_logprobs,
            tokens_as_ids=request.return_tokens_as_token_ids,
            constraint=_bad_request(_constraint, request),
        )
        try:
            await run_in_threadpool(generator.ready, options)
        except (NoRouteError, ValueError) as e:
            raise _api_error(e) from None
        return options

    return app


def _constraint(request: SamplingRequest) -> dict:
    given = {
        "response_format": request.response_format is not None and request.response_format.type != "text",
        "regex": request.regex is not None,
        "grammar": request.grammar is not None,
    }
    if sum(given.values()) > 1:
        raise ValueError(f"give only one of {', '.join(name for name, on in given.items() if on)}")
    if request.regex is not None:
        return {"regex": request.regex}
    if request.grammar is not None:
        return {"grammar": request.grammar}
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.type == "json_object":
        return {"json_schema": JSON_OBJECT_SCHEMA}
    if response_format.json_schema is None:
        raise ValueError("response_format of type json_schema needs its json_schema: {name, schema}")
    return {"json_schema": response_format.json_schema.schema_}


def _many_prompts(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def _bad_request(function: Callable, *args):
    try:
        return function(*args)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _wants_usage(request: SamplingRequest) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


def _error(
    status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


async def _generate(
    executor: ThreadPoolExecutor, generator: TextGenerator, prompt_ids: list[list[int]], options: Options
) -> AsyncIterator[Delta | Finished]:
    """The events of every prompt, from a thread of `executor`; each prompt's choices are numbered after the last's.
    Leaving early (the client went away) tells the thread to stop after its current step, closing the session."""
    loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    end = object()

    def produce() -> None:
        try:
            for number, ids in enumerate(prompt_ids):
                for event in generator.run(ids, options, cancelled):
                    if isinstance(event, Delta):
                        event = replace(event, index=number * options.n + event.index)
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                if cancelled.is_set():
                    break
        except BaseException as e:  # handed to the request's task, which answers with it
            loop.call_soon_threadsafe(queue.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, end)

    loop.run_in_executor(executor, produce)
    try:
        while (event := await queue.get()) is not end:
            if isinstance(event, BaseException):
                raise _api_error(event)
            yield event
    finally:
        cancelled.set()


def _api_error(e: BaseException) -> BaseException:
    if isinstance(e, NoRouteError):
        return ApiError(503, str(e), "service_unavailable", "blocks_not_served")
    if isinstance(e, PeerError):
        return ApiError(503, f"the swarm failed this request: {e}", "service_unavailable", "peer_failed")
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    return e


async def _collect(events: AsyncIterator[Delta | Finished]) -> tuple[responses.ChoiceTexts, list[Finished]]:
    texts, finished = responses.ChoiceTexts(), []
    async for event in events:
        if isinstance(event, Finished):
            finished.append(event)
        else:
            texts.add(event)
    return texts, finished


def _sse(
    events: AsyncIterator[Delta | Finished],
    chunks: responses.ChatChunks | responses.CompletionChunks,
    include_usage: bool,
) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        finished: list[Finished] = []
        try:
            async for event in events:
                if isinstance(event, Finished):
                    finished.append(event)
                    continue
                for chunk in chunks.of(event):
                    yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
            if include_usage:
                yield f"data: {chunks.usage(finished).model_dump_json(exclude_none=True)}\n\n"
        except ApiError as e:  # the response has begun: the error travels as an event, as OpenAI's do
            body = ErrorResponse(error=ErrorBody(message=str(e), type=e.kind, code=e.code))
            yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
