"""The OpenAI-compatible HTTP API (FastAPI): models, completions and chat completions, streamed or not, the chat
page at `/`, and errors as OpenAI error objects."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel
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

CHAT_PAGE = resources.files(__package__).joinpath("chat_page.html")


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
        return CHAT_PAGE.read_text()

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
        if not request.stream:
            return await _collect(events, lambda texts, done: texts.completion(request_id, model_name, done, logprobs))

        def chunks(delta: Delta, index: int, offsets: dict[int, int]) -> Iterator[BaseModel]:
            yield responses.completion_chunk(request_id, model_name, delta, index, offsets.get(index, 0), logprobs)
            offsets[index] = offsets.get(index, 0) + len(delta.text)

        usage = _wants_usage(request) and (lambda done: responses.usage_completion_chunk(request_id, model_name, done))
        return _sse(events, chunks, usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        messages = [{"role": m.role, "content": _bad_request(m.text)} for m in request.messages]
        prompt_ids = [_bad_request(generator.chat_prompt, messages)]
        top = (request.top_logprobs or 0) if request.logprobs else None
        options = await _options(request, prompt_ids, request.max_completion_tokens or request.max_tokens, top)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        events = _generate(executor, generator, prompt_ids, options)
        if not request.stream:
            return await _collect(
                events, lambda texts, done: texts.chat(request_id, model_name, done, request.logprobs)
            )

        def chunks(delta: Delta, index: int, started: dict[int, int]) -> Iterator[BaseModel]:
            yield from responses.chat_chunks(
                request_id, model_name, delta, index, started.setdefault(index, 0) == 0, request.logprobs
            )
            started[index] = 1

        usage = _wants_usage(request) and (lambda done: responses.usage_chat_chunk(request_id, model_name, done))
        return _sse(events, chunks, usage)

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
        except NoRouteError as e:
            raise ApiError(503, str(e), "service_unavailable", "blocks_not_served") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
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
) -> AsyncIterator[tuple[int, Delta | Finished]]:
    """(choice index, event) from a thread of `executor`; each prompt's choices are numbered after the last's.
    Leaving early (the client went away) tells the thread to stop after its current step, closing the session."""
    loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    end = object()

    def produce() -> None:
        try:
            for number, ids in enumerate(prompt_ids):
                for event in generator.run(ids, options, cancelled):
                    index = number * options.n + event.index if isinstance(event, Delta) else -1
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                if cancelled.is_set():
                    break
        except BaseException as e:  # handed to the request's task, which answers with it
            loop.call_soon_threadsafe(queue.put_nowait, (-1, e))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, (-1, end))

    loop.run_in_executor(executor, produce)
    try:
        while (item := await queue.get())[1] is not end:
            if isinstance(item[1], BaseException):
                raise _api_error(item[1])
            yield item
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


async def _collect(events: AsyncIterator, build: Callable) -> BaseModel:
    texts, finished = responses.ChoiceTexts(), []
    async for index, event in events:
        if isinstance(event, Finished):
            finished.append(event)
        else:
            texts.add(event, index)
    return build(texts, finished)


def _sse(events: AsyncIterator, chunks: Callable, usage: Callable | bool) -> StreamingResponse:
    async def stream() -> AsyncIterator[str]:
        state: dict[int, int] = {}
        finished: list[Finished] = []
        try:
            async for index, event in events:
                if isinstance(event, Finished):
                    finished.append(event)
                    continue
                for chunk in chunks(event, index, state):
                    yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
            if usage:
                yield f"data: {usage(finished).model_dump_json(exclude_none=True)}\n\n"
        except ApiError as e:  # the response has begun: the error travels as an event, as OpenAI's do
            body = ErrorResponse(error=ErrorBody(message=str(e), type=e.kind, code=e.code))
            yield f"data: {body.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
