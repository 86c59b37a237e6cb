"""The Bedrock provider with the real boto3 client, against a fake endpoint that speaks the real
event-stream wire format over real HTTP."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import pytest

from precis.domain.errors import ModelError, ModelThrottledError, PermanentModelError, TransientModelError
from precis.domain.models import Completion, Delta, FinishReason, ModelEvent, Prompt, Style, Usage
from precis.providers.bedrock import BedrockConfig, BedrockModel, bedrock_client
from tests.support.eventstream import ConverseScript, FakeBedrock
from tests.support.servers import wait_for

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"
PROMPT = Prompt(
    system="You write faithful summaries.",
    instruction="Summarize the document in one sentence.",
    document="Revenue grew by twelve percent. Costs fell.",
    style=Style.TLDR,
)


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, and nothing read from the machine's AWS configuration."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_BEDROCK_RUNTIME"):
        monkeypatch.delenv(name, raising=False)


ModelFactory = Callable[..., BedrockModel]


@pytest.fixture
def model_for() -> Iterator[ModelFactory]:
    """Builds models on real boto3 clients, closed when the test ends."""
    clients: list[Any] = []

    def build(endpoint_url: str, read_timeout_s: float = 5.0) -> BedrockModel:
        config = BedrockConfig(region="us-east-1", endpoint_url=endpoint_url, read_timeout_s=read_timeout_s)
        clients.append(client := bedrock_client(config))
        return BedrockModel(client, MODEL_ID)

    yield build
    for client in clients:
        client.close()


def stream(model: BedrockModel, max_output_tokens: int = 256) -> AsyncGenerator[ModelEvent, None]:
    return model.stream(PROMPT, max_output_tokens=max_output_tokens)


async def drain(events: AsyncIterator[ModelEvent], into: list[ModelEvent]) -> None:
    """Consume a stream, keeping what arrived before it failed."""
    async for event in events:
        into.append(event)


@pytest.mark.anyio
async def test_deltas_arrive_incrementally_and_in_order(model_for: ModelFactory) -> None:
    script = ConverseScript(deltas=("One", " two", " three", " four"), frame_delay_s=0.05)
    with FakeBedrock(script) as fake:
        sent_at_first_delta = None
        events = []
        async for event in stream(model_for(fake.url)):
            if sent_at_first_delta is None:
                sent_at_first_delta = fake.stream.sent
            events.append(event)
    assert [e.text for e in events if isinstance(e, Delta)] == ["One", " two", " three", " four"]
    # The first delta was in hand while the server still had most of the stream to send.
    assert sent_at_first_delta is not None
    assert sent_at_first_delta < len(script.frames()) - 2


@pytest.mark.anyio
async def test_stream_ends_with_one_completion_carrying_the_reported_usage(model_for: ModelFactory) -> None:
    with FakeBedrock(ConverseScript(input_tokens=1234, output_tokens=56)) as fake:
        events = [event async for event in stream(model_for(fake.url))]
    completions = [e for e in events if isinstance(e, Completion)]
    assert completions == [
        Completion(usage=Usage(input_tokens=1234, output_tokens=56), finish_reason=FinishReason.STOP)
    ]
    assert events[-1] is completions[0]


@pytest.mark.anyio
async def test_max_tokens_stop_reason_finishes_with_length(model_for: ModelFactory) -> None:
    with FakeBedrock(ConverseScript(stop_reason="max_tokens")) as fake:
        events = [event async for event in stream(model_for(fake.url), max_output_tokens=5)]
    assert isinstance(events[-1], Completion)
    assert events[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.anyio
async def test_request_carries_system_prompt_document_and_max_tokens(model_for: ModelFactory) -> None:
    with FakeBedrock() as fake:
        [event async for event in stream(model_for(fake.url), max_output_tokens=321)]
    [request] = fake.requests
    assert request.model_id == MODEL_ID
    assert request.body["system"] == [{"text": PROMPT.system}]
    assert request.body["messages"] == [{"role": "user", "content": [{"text": PROMPT.user_message()}]}]
    assert PROMPT.document in request.body["messages"][0]["content"][0]["text"]
    assert request.body["inferenceConfig"] == {"maxTokens": 321}


@pytest.mark.anyio
async def test_http_throttling_before_the_stream_raises_throttled_without_sdk_retries(model_for: ModelFactory) -> None:
    script = ConverseScript(error_status=429, error_type="ThrottlingException", error_message="Too many requests")
    received: list[ModelEvent] = []
    with FakeBedrock(script) as fake, pytest.raises(ModelThrottledError):
        await drain(stream(model_for(fake.url)), received)
    assert received == []
    assert len(fake.requests) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error_type", "error"),
    [
        (500, "InternalServerException", TransientModelError),
        (503, "ServiceUnavailableException", TransientModelError),
        (408, "ModelTimeoutException", TransientModelError),
        (400, "ValidationException", PermanentModelError),
        (403, "AccessDeniedException", PermanentModelError),
        (404, "ResourceNotFoundException", PermanentModelError),
    ],
)
async def test_http_errors_before_the_stream_map_to_domain_errors(
    status: int, error_type: str, error: type[ModelError], model_for: ModelFactory
) -> None:
    script = ConverseScript(error_status=status, error_type=error_type, error_message="upstream says no")
    with FakeBedrock(script) as fake, pytest.raises(error) as raised:
        await drain(stream(model_for(fake.url)), [])
    assert type(raised.value) is error
    assert error_type in raised.value.message
    assert "upstream says no" in raised.value.message


@pytest.mark.anyio
async def test_mid_stream_throttling_yields_the_deltas_so_far_then_raises_throttled(model_for: ModelFactory) -> None:
    script = ConverseScript(exception_after=2, exception_type="throttlingException")
    received: list[ModelEvent] = []
    with FakeBedrock(script) as fake, pytest.raises(ModelThrottledError):
        await drain(stream(model_for(fake.url)), received)
    assert received == [Delta(text="The"), Delta(text=" report")]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("exception_type", "error"),
    [
        ("internalServerException", TransientModelError),
        ("modelStreamErrorException", TransientModelError),
        ("serviceUnavailableException", TransientModelError),
        ("validationException", PermanentModelError),
    ],
)
async def test_mid_stream_exceptions_map_to_domain_errors(
    exception_type: str, error: type[ModelError], model_for: ModelFactory
) -> None:
    script = ConverseScript(exception_after=1, exception_type=exception_type, exception_message="stream broke")
    received: list[ModelEvent] = []
    with FakeBedrock(script) as fake, pytest.raises(error) as raised:
        await drain(stream(model_for(fake.url)), received)
    assert type(raised.value) is error
    assert "stream broke" in raised.value.message
    assert received == [Delta(text="The")]


@pytest.mark.anyio
async def test_unreachable_endpoint_raises_transient(model_for: ModelFactory) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(TransientModelError):
        [event async for event in stream(model_for(f"http://127.0.0.1:{port}"))]


@pytest.mark.anyio
async def test_stalled_stream_raises_transient_after_the_read_timeout(model_for: ModelFactory) -> None:
    with FakeBedrock(ConverseScript(frame_delay_s=1.0)) as fake:
        model = model_for(fake.url, read_timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(TransientModelError):
            await drain(stream(model), [])
        assert time.monotonic() - started < 0.9


@pytest.mark.anyio
async def test_closing_the_stream_after_two_deltas_stops_the_server_at_once(model_for: ModelFactory) -> None:
    script = ConverseScript(deltas=tuple(f" t{i}" for i in range(20)), frame_delay_s=0.05)
    with FakeBedrock(script) as fake:
        events = stream(model_for(fake.url))
        assert [await anext(events), await anext(events)] == [Delta(text=" t0"), Delta(text=" t1")]
        started = time.monotonic()
        await events.aclose()
        assert time.monotonic() - started < 0.1
        assert await wait_for(fake.stream.disconnected, timeout_s=0.5)
        sent = fake.stream.sent
        await anyio.sleep(0.15)
        assert fake.stream.sent == sent
        # messageStart, two deltas, and at most the one frame in flight when the client hung up.
        assert sent <= 4
        assert not fake.stream.finished.is_set()


@pytest.mark.anyio
async def test_cancelling_the_consumer_mid_read_stops_the_server_at_once(model_for: ModelFactory) -> None:
    script = ConverseScript(deltas=tuple(f" t{i}" for i in range(20)), frame_delay_s=0.25)
    with FakeBedrock(script) as fake:
        received: list[ModelEvent] = []
        two_deltas = anyio.Event()

        async def consume() -> None:
            async for event in stream(model_for(fake.url)):
                received.append(event)
                if len(received) == 2:
                    two_deltas.set()

        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await two_deltas.wait()
            # Let the worker thread block in the next read, which the server answers 0.25 s later.
            await anyio.sleep(0.05)
            started = time.monotonic()
            group.cancel_scope.cancel()
        assert time.monotonic() - started < 0.1
        assert await wait_for(fake.stream.disconnected, timeout_s=0.5)
        assert received == [Delta(text=" t0"), Delta(text=" t1")]
        assert fake.stream.sent == 3


@pytest.mark.anyio
async def test_cancelling_while_the_call_is_being_opened_closes_the_response_when_it_arrives(
    model_for: ModelFactory,
) -> None:
    script = ConverseScript(deltas=tuple(f" t{i}" for i in range(20)), frame_delay_s=0.05, response_delay_s=0.2)
    with FakeBedrock(script) as fake:
        model = model_for(fake.url)
        with anyio.move_on_after(0.05):
            await drain(stream(model), [])
        assert len(fake.requests) == 1
        # The abandoned worker gets the response after the server's delay and closes it unread.
        assert await wait_for(fake.stream.disconnected, timeout_s=1.0)
        assert fake.stream.sent <= 2


@pytest.mark.anyio
async def test_streams_do_not_wait_for_the_default_thread_pool(model_for: ModelFactory) -> None:
    default_limiter = anyio.to_thread.current_default_thread_limiter()
    total_tokens = default_limiter.total_tokens
    elsewhere = object()
    default_limiter.total_tokens = 1
    # Every default worker thread is busy elsewhere in the process.
    await default_limiter.acquire_on_behalf_of(elsewhere)
    try:
        with FakeBedrock() as fake, anyio.fail_after(2):
            events = [event async for event in stream(model_for(fake.url))]
    finally:
        default_limiter.release_on_behalf_of(elsewhere)
        default_limiter.total_tokens = total_tokens
    assert isinstance(events[-1], Completion)
