"""The mock LLM speaks OpenAI's protocol well enough for the official client."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from tests.runtime.conftest import MOCK_ANSWER_TOKENS, Service


@pytest.fixture
async def llm(mock_llm: Service) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mock_llm.url}/v1", api_key="sk-x", max_retries=0)


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
