"""The mock LLM speaks OpenAI's protocol well enough for the official client."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.runtime.conftest import MOCK_ANSWER_TOKENS, Service, serve_mock_llm

# Slower than the mock's defaults (200 ms, 40 tokens/s), so a mock that ignored its settings
# would answer too early.
PACED_FIRST_TOKEN_S = 0.6
PACED_TOKENS_PER_S = 10.0


@pytest.fixture
async def llm(mock_llm: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mock_llm.url}/v1", api_key="sk-x", max_retries=0)


@pytest.fixture(scope="module")
def paced_llm(stack_dir: Path) -> Iterator[Service]:
    yield from serve_mock_llm("mockllm-paced", stack_dir, {
        "MOCKLLM_FIRST_TOKEN_MS": str(int(PACED_FIRST_TOKEN_S * 1000)),
        "MOCKLLM_TOKENS_PER_S": str(PACED_TOKENS_PER_S),
    })


async def test_streamed_answer_with_usage(llm: openai.AsyncOpenAI) -> None:
    stream = await llm.chat.completions.create(
        model="gpt-4o-mini", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "#tokens=7 track my order"}],
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    text = "".join(pieces)
    assert len([p for p in pieces if p]) == 7
    assert text.startswith("You asked about track my order")
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == 7
    assert usage.prompt_tokens == 2 + 4  # words of both messages, the hook included
    again = await llm.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "#tokens=7 track my order"}]
    )
    assert "".join([c.choices[0].delta.content or "" async for c in again if c.choices]) == text


async def test_plain_answer_default_length_and_max_tokens(llm: openai.AsyncOpenAI) -> None:
    answer = await llm.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.usage is not None and answer.usage.completion_tokens == MOCK_ANSWER_TOKENS
    content = answer.choices[0].message.content or ""
    assert len(content.split()) == MOCK_ANSWER_TOKENS
    short = await llm.chat.completions.create(
        model="m", max_tokens=3, messages=[{"role": "user", "content": "hello"}]
    )
    assert short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == "You asked about"


async def test_fail_hook_breaks_the_stream(llm: openai.AsyncOpenAI) -> None:
    stream = await llm.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "#fail now"}]
    )
    received = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 3


async def test_embeddings_are_deterministic_and_normalised(llm: openai.AsyncOpenAI) -> None:
    texts = ["Where is my parcel?", "where is my PARCEL", "refund policy for shoes"]
    floats = await llm.embeddings.create(model="e", input=texts, encoding_format="float")
    packed = await llm.embeddings.create(model="e", input=texts)  # the client asks for base64
    a, b, c = (item.embedding for item in floats.data)
    assert len(a) == 256
    unpacked = packed.data[0].embedding
    assert all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(a, unpacked, strict=True))
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-6)
    assert a == b  # same words, other case and punctuation
    assert sum(x * y for x, y in zip(a, c, strict=True)) < 0.5
    small = await llm.embeddings.create(model="e", input="hi there", dimensions=32,
                                        encoding_format="float")
    assert len(small.data[0].embedding) == 32
    assert floats.usage.prompt_tokens == 4 + 4 + 4


async def test_models_and_bad_requests(llm: openai.AsyncOpenAI, mock_llm: Service) -> None:
    assert "mock-gpt" in [m.id async for m in llm.models.list()]
    async with httpx.AsyncClient(base_url=mock_llm.url) as client:
        bad = await client.post("/v1/chat/completions", content=b"{oops")
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
        assert (await client.get("/nope")).status_code == 404


async def test_the_pace_settings_shape_a_streamed_answer(paced_llm: Service) -> None:
    n = 8
    interval = 1 / PACED_TOKENS_PER_S
    body = {"model": "m", "stream": True,
            "messages": [{"role": "user", "content": f"#tokens={n} where is my parcel"}]}
    arrivals: list[float] = []
    async with httpx.AsyncClient(base_url=paced_llm.url, timeout=10) as client:
        started = time.monotonic()
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                choices = json.loads(line.removeprefix("data: "))["choices"]
                if choices and choices[0]["delta"].get("content"):
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == n
    # Lower bounds hold on any machine (a busy one only delays). The slack covers the
    # event loop's millisecond clock.
    slack = 0.02
    assert arrivals[0] >= PACED_FIRST_TOKEN_S - slack
    for i, arrival in enumerate(arrivals):
        assert arrival >= PACED_FIRST_TOKEN_S + i * interval - slack, (i, arrivals)
    # Spread over the answer, not sent in one burst: half the paced span, in case this
    # process reads the first token late.
    assert arrivals[-1] - arrivals[0] >= (n - 1) * interval / 2, arrivals
    # And paced at the rate asked for, not slower; the bound is generous.
    assert arrivals[-1] < PACED_FIRST_TOKEN_S + (n - 1) * interval + 2.0, arrivals
