"""The OpenAI-compatible provider with the real httpx client, against a fake server that streams
real chat completion chunks over real HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import anyio
import httpx
import pytest

from precis.domain.errors import ModelError, ModelThrottledError, PermanentModelError, TransientModelError
from precis.domain.models import Completion, Delta, FinishReason, ModelEvent, Prompt, Style, Usage
from precis.providers.openai import OpenAIConfig, OpenAIModel, openai_client
from tests.support.openai_server import ChatScript, FakeOpenAI
from tests.support.servers import wait_for

MODEL_ID = "llama3.2:1b"
PROMPT = Prompt(
    system="You write faithful summaries.",
    instruction="Summarize the document in one sentence.",
    document="Revenue grew by twelve percent. Costs fell.",
    style=Style.TLDR,
)


ModelFactory = Callable[..., OpenAIModel]


@pytest.fixture
async def model_for() -> AsyncIterator[ModelFactory]:
    """Builds models on real httpx clients, closed when the test ends."""
    clients: list[httpx.AsyncClient] = []

    def build(base_url: str, api_key: str | None = None, read_timeout_s: float = 5.0) -> OpenAIModel:
        client = openai_client(OpenAIConfig(base_url=base_url, api_key=api_key, read_timeout_s=read_timeout_s))
        clients.append(client)
        return OpenAIModel(client, MODEL_ID)

    yield build
    for client in clients:
        await client.aclose()


def stream(model: OpenAIModel, max_output_tokens: int = 256) -> AsyncGenerator[ModelEvent, None]:
    return model.stream(PROMPT, max_output_tokens=max_output_tokens)


async def drain(events: AsyncIterator[ModelEvent], into: list[ModelEvent]) -> None:
    """Consume a stream, keeping what arrived before it failed."""
    async for event in events:
        into.append(event)


@pytest.mark.anyio
async def test_deltas_arrive_incrementally_and_in_order(model_for: ModelFactory) -> None:
    script = ChatScript(deltas=("One", " two", " three", " four"), chunk_delay_s=0.05)
    with FakeOpenAI(script) as fake:
        sent_at_first_delta = None
        events = []
        async for event in stream(model_for(fake.base_url)):
            if sent_at_first_delta is None:
                sent_at_first_delta = fake.stream.sent
            events.append(event)
    assert [e.text for e in events if isinstance(e, Delta)] == ["One", " two", " three", " four"]
    # The first delta was in hand while the server still had most of the stream to send.
    assert sent_at_first_delta is not None
    assert sent_at_first_delta < len(script.events(MODEL_ID, include_usage=True)) - 2


@pytest.mark.anyio
async def test_stream_ends_with_one_completion_carrying_the_reported_usage(model_for: ModelFactory) -> None:
    with FakeOpenAI(ChatScript(prompt_tokens=1234, completion_tokens=56)) as fake:
        events = [event async for event in stream(model_for(fake.base_url))]
    completions = [e for e in events if isinstance(e, Completion)]
    assert completions == [
        Completion(usage=Usage(input_tokens=1234, output_tokens=56), finish_reason=FinishReason.STOP)
    ]
    assert events[-1] is completions[0]


@pytest.mark.anyio
async def test_length_finish_reason_finishes_with_length(model_for: ModelFactory) -> None:
    with FakeOpenAI(ChatScript(finish_reason="length")) as fake:
        events = [event async for event in stream(model_for(fake.base_url), max_output_tokens=5)]
    assert isinstance(events[-1], Completion)
    assert events[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.anyio
async def test_request_carries_system_prompt_document_max_tokens_and_asks_for_usage(model_for: ModelFactory) -> None:
    with FakeOpenAI() as fake:
        [event async for event in stream(model_for(fake.base_url, api_key="sk-test"), max_output_tokens=321)]
    [request] = fake.requests
    assert request.body == {
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": PROMPT.system},
            {"role": "user", "content": PROMPT.user_message()},
        ],
        "max_tokens": 321,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert PROMPT.document in request.body["messages"][1]["content"]
    assert request.headers["authorization"] == "Bearer sk-test"


@pytest.mark.anyio
async def test_no_authorization_header_without_an_api_key(model_for: ModelFactory) -> None:
    with FakeOpenAI() as fake:
        [event async for event in stream(model_for(fake.base_url))]
    assert "authorization" not in fake.requests[0].headers


def test_config_does_not_show_the_api_key() -> None:
    assert "sk-secret" not in repr(OpenAIConfig(api_key="sk-secret"))


@pytest.mark.anyio
async def test_http_429_raises_throttled_with_retry_after_and_the_upstream_message(model_for: ModelFactory) -> None:
    script = ChatScript(error_status=429, retry_after="7", error_message="Rate limit reached for requests")
    received: list[ModelEvent] = []
    with FakeOpenAI(script) as fake, pytest.raises(ModelThrottledError) as raised:
        await drain(stream(model_for(fake.base_url)), received)
    assert received == []
    assert "retry after 7 s" in raised.value.message
    assert raised.value.retry_after_s == 7.0, "the retry loop waits at least this long"
    assert "Rate limit reached for requests" in raised.value.message


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, TransientModelError),
        (502, TransientModelError),
        (503, TransientModelError),
        (408, TransientModelError),
        (409, TransientModelError),
        (400, PermanentModelError),
        (401, PermanentModelError),
        (404, PermanentModelError),
        (422, PermanentModelError),
    ],
)
async def test_http_errors_map_to_domain_errors(status: int, error: type[ModelError], model_for: ModelFactory) -> None:
    script = ChatScript(error_status=status, error_message="upstream says no")
    with FakeOpenAI(script) as fake, pytest.raises(error) as raised:
        await drain(stream(model_for(fake.base_url)), [])
    assert type(raised.value) is error
    assert str(status) in raised.value.message
    assert "upstream says no" in raised.value.message


@pytest.mark.anyio
async def test_a_long_upstream_error_message_is_truncated(model_for: ModelFactory) -> None:
    script = ChatScript(error_status=400, error_message="x" * 5000)
    with FakeOpenAI(script) as fake, pytest.raises(PermanentModelError) as raised:
        await drain(stream(model_for(fake.base_url)), [])
    assert len(raised.value.message) < 500


@pytest.mark.anyio
async def test_mid_stream_error_object_yields_the_deltas_so_far_then_raises_transient(model_for: ModelFactory) -> None:
    received: list[ModelEvent] = []
    with FakeOpenAI(ChatScript(error_after=2)) as fake, pytest.raises(TransientModelError) as raised:
        await drain(stream(model_for(fake.base_url)), received)
    assert received == [Delta(text="The"), Delta(text=" report")]
    assert "The server had an error" in raised.value.message


@pytest.mark.anyio
async def test_missing_usage_is_a_protocol_error_not_an_estimate(model_for: ModelFactory) -> None:
    received: list[ModelEvent] = []
    with FakeOpenAI(ChatScript(send_usage=False)) as fake, pytest.raises(PermanentModelError) as raised:
        await drain(stream(model_for(fake.base_url)), received)
    assert not any(isinstance(e, Completion) for e in received)
    assert "include_usage" in raised.value.message


@pytest.mark.anyio
async def test_unreachable_endpoint_raises_transient(model_for: ModelFactory) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(TransientModelError):
        await drain(stream(model_for(f"http://127.0.0.1:{port}/v1")), [])


@pytest.mark.anyio
async def test_stalled_stream_raises_transient_after_the_read_timeout(model_for: ModelFactory) -> None:
    with FakeOpenAI(ChatScript(chunk_delay_s=1.0)) as fake:
        model = model_for(fake.base_url, read_timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(TransientModelError) as raised:
            await drain(stream(model), [])
        assert time.monotonic() - started < 0.9
    assert "ReadTimeout" in raised.value.message


@pytest.mark.anyio
async def test_closing_the_stream_after_two_deltas_stops_the_server_at_once(model_for: ModelFactory) -> None:
    script = ChatScript(deltas=tuple(f" t{i}" for i in range(20)), chunk_delay_s=0.05)
    with FakeOpenAI(script) as fake:
        events = stream(model_for(fake.base_url))
        assert [await anext(events), await anext(events)] == [Delta(text=" t0"), Delta(text=" t1")]
        started = time.monotonic()
        await events.aclose()
        assert time.monotonic() - started < 0.1
        assert await wait_for(fake.stream.disconnected, timeout_s=0.5)
        sent = fake.stream.sent
        await anyio.sleep(0.15)
        assert fake.stream.sent == sent
        # The role chunk, two deltas, and at most the one chunk in flight when the client hung up.
        assert sent <= 4
        assert not fake.stream.finished.is_set()


@pytest.mark.anyio
async def test_cancelling_the_consumer_mid_read_stops_the_server_at_once(model_for: ModelFactory) -> None:
    script = ChatScript(deltas=tuple(f" t{i}" for i in range(20)), chunk_delay_s=0.25)
    with FakeOpenAI(script) as fake:
        received: list[ModelEvent] = []
        two_deltas = anyio.Event()

        async def consume() -> None:
            async for event in stream(model_for(fake.base_url)):
                received.append(event)
                if len(received) == 2:
                    two_deltas.set()

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await two_deltas.wait()
            # Let the client block in the next read, which the server answers 0.25 s later.
            await anyio.sleep(0.05)
            started = time.monotonic()
            group.cancel_scope.cancel()
        assert time.monotonic() - started < 0.1
        assert await wait_for(fake.stream.disconnected, timeout_s=0.5)
        assert received == [Delta(text=" t0"), Delta(text=" t1")]
        assert fake.stream.sent == 3
