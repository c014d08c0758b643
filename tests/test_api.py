"""The OpenAI-compatible API against a live loopback swarm, driven by the official `openai` client."""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import openai
import pytest
import torch
from transformers import AutoTokenizer

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.client.constraints import KnownTokensOnly
from blockswarm.local_swarm import LocalSwarm

PROMPT = "Once upon a time, in a small village by the sea,"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "score", "color", "tags", "address"],
}


@pytest.fixture(scope="module")
def api_url(swarm) -> str:
    return swarm.start_api("--codec", "none", name="api")


@pytest.fixture(scope="module")
def client(api_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_url + "v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(swarm, tiny_model):
    """The Python client the API must agree with (codec none: bit-exact)."""
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, codec="none") as model:
        yield model


@pytest.fixture(scope="module")
def name(client) -> str:
    return client.models.list().data[0].id


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    return [int(token.removeprefix("token_id:")) for token in logprobs_tokens]


def test_lists_the_swarms_model(client, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model.remote.model_name]


def test_greedy_completion_reproduces_the_python_client(client, name, model):
    answer = client.completions.create(
        model=name,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        seed=7,
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    prompt_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = model.generate(prompt_ids, 12, logits_processor=[KnownTokensOnly(model.tokenizer)])
    expected_ids = expected[0, prompt_ids.shape[1] :].tolist()
    choice = answer.choices[0]
    assert token_ids(choice.logprobs.tokens) == expected_ids
    assert choice.text == model.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert choice.finish_reason == "length"
    assert answer.usage.prompt_tokens == prompt_ids.shape[1] and answer.usage.completion_tokens == 12


def test_seeded_sampling_reproduces_the_python_client(client, name, model):
    messages = [{"role": "user", "content": "Tell me about the fisherman."}]
    answer = client.chat.completions.create(
        model=name,
        messages=messages,
        max_tokens=10,
        temperature=0.8,
        seed=123,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    expected = model.generate(
        prompt_ids,
        10,
        do_sample=True,
        temperature=0.8,
        seed=123,
        eos_token_id=model.tokenizer.eos_token_id,
        logits_processor=[KnownTokensOnly(model.tokenizer)],
    )[0, prompt_ids.shape[1] :].tolist()
    got = token_ids([entry.token for entry in answer.choices[0].logprobs.content])
    assert got == expected


def test_chat_streamed_equals_not_streamed(client, name):
    request = dict(model=name, messages=[{"role": "user", "content": "Hello!"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1, "the answer came in one piece: not streamed"
    assert "".join(content) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_completion_streamed_equals_not_streamed(client, name):
    request = dict(model=name, prompt=PROMPT, max_tokens=16, temperature=0)
    whole = client.completions.create(**request)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**request, stream=True))
    assert streamed == whole.choices[0].text


def test_stop_sequences_cut_where_they_should(client, name):
    request = dict(model=name, prompt=PROMPT, max_tokens=30, temperature=0)
    full = client.completions.create(**request).choices[0].text
    stop = next(
        full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    expected = full[: full.find(stop)]
    cut = client.completions.create(**request, stop=[stop, "never appears here"]).choices[0]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**request, stop=stop, stream=True))
    assert streamed == expected


def test_logprobs_are_log_probabilities(client, name):
    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, logprobs=True, top_logprobs=3
    )
    for entry in answer.choices[0].logprobs.content:
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        assert entry.logprob <= tops[0] + 1e-6


@pytest.mark.parametrize(
    "request_fields, message",
    [
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 1_000_000}, "maximum context length"),
        ({"messages": []}, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
            "JSON",
        ),
        ({"extra_body": {"regex": "(unclosed"}}, "regex"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ],
)
def test_bad_requests_get_400_with_a_message(client, name, request_fields, message):
    request = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | request_fields
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    assert error.value.status_code == 400
    assert message.lower() in error.value.body["message"].lower()
    assert error.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert "no-such-model" in error.value.body["message"]


def test_uncovered_blocks_give_503_naming_them(tiny_model, tmp_path):
    with LocalSwarm(tiny_model, tmp_path) as partial:
        partial.start_bootstrap()
        partial.start_peers(["0:5"])
        url = partial.start_api()
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as error:
                client.chat.completions.create(
                    model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=stream
                )
            assert error.value.status_code == 503
            assert "5, 6, 7" in error.value.body["message"]


def test_eight_concurrent_streams_all_complete(client, name):
    results: dict[int, tuple[float, float, str, str | None]] = {}

    def chat(i: int) -> None:
        first = None
        parts, finish = [], None
        stream = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"Story {i}"}], max_tokens=24, stream=True, seed=i
        )
        for chunk in stream:
            first = first or time.monotonic()
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        results[i] = (first, time.monotonic(), "".join(parts), finish)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert sorted(results) == list(range(8))
    assert all(finish in ("stop", "length") for *_, finish in results.values())
    # they ran at the same time: every stream had begun before the first one ended
    assert max(first for first, *_ in results.values()) < min(end for _, end, *_ in results.values())


def test_json_schema_outputs_always_parse_and_validate(client, name):
    outputs = []
    for seed in range(4):  # 4 x 5: a session of 5 x ~830 tokens fits the peers' KV caches
        answer = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": "A person, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
            n=5,
            seed=seed,
            max_tokens=800,
        )
        assert all(choice.finish_reason == "stop" for choice in answer.choices)
        outputs += [choice.message.content for choice in answer.choices]
    assert len(outputs) == 20
    for text in outputs:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_grammar_and_regex(client, name):
    base = dict(model=name, messages=[{"role": "user", "content": "Answer."}], max_tokens=300, seed=3)
    obj = client.chat.completions.create(**base, response_format={"type": "json_object"}).choices[0].message.content
    assert isinstance(json.loads(obj), dict)
    pattern = r"[a-z]{2,6}-[0-9]{3}"
    for seed in range(3):
        text = (
            client.completions.create(
                model=name, prompt=PROMPT, max_tokens=20, seed=seed, extra_body={"regex": pattern}
            )
            .choices[0]
            .text
        )
        assert re.fullmatch(pattern, text), text
    grammar = 'root ::= ("yes" | "no") " because " [a-z]{1,8}'
    text = client.chat.completions.create(**base, extra_body={"grammar": grammar}).choices[0].message.content
    assert re.fullmatch(r"(yes|no) because [a-z]{1,8}", text), text


def test_python_client_structured_output(model, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    output = model.generate(prompt.repeat(3, 1), 800, do_sample=True, seed=5, json_schema=SCHEMA)
    for row in output[:, prompt.shape[1] :]:
        jsonschema.validate(json.loads(tokenizer.decode(row, skip_special_tokens=True)), SCHEMA)
    output = model.generate(prompt, 20, do_sample=True, seed=5, regex=r"\d{4}-\d{2}")
    assert re.fullmatch(r"\d{4}-\d{2}", tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True))
    with pytest.raises(ValueError, match="invalid regex"):
        model.generate(prompt, 4, regex="(unclosed")
    assert torch.equal(
        model.generate(prompt, 6, do_sample=True, seed=9), model.generate(prompt, 6, do_sample=True, seed=9)
    )
