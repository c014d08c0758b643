"""The OpenAI-compatible API vs the Python client, and constrained vs unconstrained decoding, in one run.

Tiny preset, a bootstrap node and 3 peers on loopback (disjoint spans), `blockswarm serve-api` in its own process
(8-bit wire, as the Python client by default). The same prompt token ids, greedy, the same number of new tokens:
the API through a streamed completion (time to the first text chunk, then tokens per second over the whole
request, from `usage`), the Python client through `model.stream` in this process (time to the first step, tokens
per second of the whole call), with the same logits processor the API applies. json_schema_tokens_per_s: the
same API request with a JSON schema (`response_format`), which ends where the JSON does or at the same token
limit. Rounds alternate API / Python / constrained; medians over the rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as `blockswarm` commands do

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import openai  # noqa: E402
import torch  # noqa: E402

from blockswarm.client import DistributedModelForCausalLM  # noqa: E402
from blockswarm.client.constraints import KnownTokensOnly  # noqa: E402
from blockswarm.client.session import GenerationSession  # noqa: E402
from blockswarm.local_swarm import LocalSwarm  # noqa: E402
from blockswarm.models.random_init import init_random_model  # noqa: E402

PROMPT = torch.randint(3, 700, (16,), generator=torch.Generator().manual_seed(0)).tolist()
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "color", "tags", "address"],
}


def api_round(client: openai.OpenAI, name: str, new_tokens: int, **extra_body) -> tuple[float, float]:
    """(ms to the first text chunk, tokens/s of the whole request) of a streamed greedy completion."""
    began, first, tokens = time.perf_counter(), None, 0
    stream = client.completions.create(
        model=name,
        prompt=PROMPT,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra_body,
    )
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    elapsed = time.perf_counter() - began
    return (first - began) * 1000, tokens / elapsed


def python_round(model: DistributedModelForCausalLM, new_tokens: int) -> tuple[float, float]:
    """(ms to the first generated token, tokens/s of the whole call) of the Python client."""
    began, first, tokens = time.perf_counter(), None, 0
    session = GenerationSession(model, len(PROMPT) + new_tokens, 1)
    try:
        steps = model.stream(
            torch.tensor([PROMPT]),
            new_tokens,
            session=session,
            eos_token_id=model.tokenizer.eos_token_id,
            logits_processor=[KnownTokensOnly(model.tokenizer)],
        )
        for _ in steps:
            first = first or time.perf_counter()
            tokens += 1
    finally:
        session.close()
    return (first - began) * 1000, tokens / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blockswarm-bench-api-") as tmp:
        model_dir = init_random_model(Path(tmp) / "tiny", preset="tiny")
        with LocalSwarm(model_dir, Path(tmp) / "swarm") as swarm:
            swarm.start_bootstrap()
            swarm.start_peers(["0:3", "3:6", "6:8"])
            client = openai.OpenAI(base_url=swarm.start_api() + "v1", api_key="unused", max_retries=0, timeout=300)
            name = client.models.list().data[0].id
            schema = {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
            with DistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers) as model:
                api_round(client, name, 8), python_round(model, 8), api_round(client, name, 8, **schema)  # warm-up
                api, python, constrained = [], [], []
                for _ in range(args.rounds):
                    api.append(api_round(client, name, args.new_tokens))
                    python.append(python_round(model, args.new_tokens))
                    constrained.append(api_round(client, name, args.new_tokens, **schema))
    result = {
        "ttft_ms_api": statistics.median(t for t, _ in api),
        "ttft_ms_python": statistics.median(t for t, _ in python),
        "tokens_per_s_api": statistics.median(r for _, r in api),
        "tokens_per_s_python": statistics.median(r for _, r in python),
        "json_schema_tokens_per_s": statistics.median(r for _, r in constrained),
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
    }
    result["api_vs_python_tokens_per_s"] = result["tokens_per_s_api"] / result["tokens_per_s_python"]
    result["json_schema_vs_unconstrained_tokens_per_s"] = (
        result["json_schema_tokens_per_s"] / result["tokens_per_s_api"]
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
