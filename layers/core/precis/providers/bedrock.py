"""Amazon Bedrock behind the model port, through boto3's ConverseStream.

boto3 is blocking, so each read of the event stream runs in a worker thread. The usage in the
`Completion` is the one the stream's `metadata` event reports: that is what Bedrock bills.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any, Literal

import anyio
from botocore.eventstream import ParserError
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import Field
from urllib3.exceptions import HTTPError as URLLib3Error

from precis.domain.errors import ModelError, ModelThrottledError, PermanentModelError, TransientModelError
from precis.domain.models import Completion, Delta, FinishReason, Frozen, ModelEvent, Prompt, Usage

if TYPE_CHECKING:
    from botocore.eventstream import EventStream
    from mypy_boto3_bedrock_runtime import BedrockRuntimeClient


class BedrockConfig(Frozen):
    """How to reach Bedrock Runtime. `None` region and endpoint fall back to the AWS environment."""

    region: str | None = None
    endpoint_url: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Between two reads of the stream, so it also bounds the model's time to first token.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # Attempts in all, the first included: 1 leaves retrying to precis, which knows what was streamed.
    max_attempts: int = Field(default=1, ge=1)
    # One client serves every concurrent stream of the process; botocore's default pool is 10.
    max_pool_connections: int = Field(default=50, ge=1)


def bedrock_client(config: BedrockConfig) -> BedrockRuntimeClient:
    """A boto3 `bedrock-runtime` client. boto3 is imported here so that importing this module is cheap."""
    import boto3
    from botocore.config import Config

    client_config = Config(
        connect_timeout=config.connect_timeout_s,
        read_timeout=config.read_timeout_s,
        retries={"total_max_attempts": config.max_attempts, "mode": "standard"},
        max_pool_connections=config.max_pool_connections,
    )
    # A session of its own: boto3's default session is not safe to create clients from concurrently.
    return boto3.session.Session().client(
        "bedrock-runtime", region_name=config.region, endpoint_url=config.endpoint_url, config=client_config
    )


# Error codes are compared lowercased: the same error is `ThrottlingException` in an HTTP error
# response and `throttlingException` as an exception event inside the stream.
_ERRORS_BY_CODE: dict[str, type[ModelError]] = {
    "throttlingexception": ModelThrottledError,
    "internalserverexception": TransientModelError,
    "serviceunavailableexception": TransientModelError,
    "modelstreamerrorexception": TransientModelError,
    "modeltimeoutexception": TransientModelError,
    "modelnotreadyexception": TransientModelError,
    "validationexception": PermanentModelError,
    "accessdeniedexception": PermanentModelError,
    "resourcenotfoundexception": PermanentModelError,
    "modelerrorexception": PermanentModelError,
}

# `end_turn` and `stop_sequence` are normal stops. `content_filtered`, `guardrail_intervened` and
# `malformed_*` also end the answer early, but the port only knows STOP and LENGTH, and the text
# streamed so far is the answer: they count as STOP. No tools are offered, so no `tool_use`.
_FINISH_REASONS: dict[str, Literal[FinishReason.STOP, FinishReason.LENGTH]] = {
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
}

# Everything the call and the stream can raise that is the upstream's fault, not a bug here.
# botocore does not wrap the event stream's socket errors: urllib3's arrive as they are.
_UPSTREAM_ERRORS = (ClientError, BotoCoreError, URLLib3Error, ParserError)


@functools.singledispatch
def _model_error(exc: Exception) -> ModelError:
    """The domain error for a failure of the Bedrock call (one of `_UPSTREAM_ERRORS`)."""
    # Credentials, parameter validation and the like: retrying the same call cannot help.
    return PermanentModelError(f"Bedrock call failed: {exc}")


@_model_error.register
def _(exc: ClientError) -> ModelError:
    error = exc.response.get("Error", {})
    code = error.get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    # An unmodelled error (a proxy's 503, a new error code) is judged by its HTTP status instead.
    kind = _ERRORS_BY_CODE.get(code.lower()) or (
        ModelThrottledError if status == 429 else TransientModelError if status >= 500 else PermanentModelError
    )
    return kind(f"Bedrock {code or status}: {error.get('Message') or exc}")


@_model_error.register(BotoConnectionError)
@_model_error.register(HTTPClientError)
@_model_error.register(URLLib3Error)
@_model_error.register(ParserError)
def _(exc: Exception) -> ModelError:
    # Connect and read timeouts, dropped connections, a stream cut or garbled on the way.
    return TransientModelError(f"Bedrock connection failed: {exc}")


class _ConverseStreamCall:
    """One ConverseStream call whose blocking parts run in worker threads.

    `close` is called from the event loop and must not wait on the network: it shuts the socket
    down so that a worker blocked in a read returns at once, then closes the response. A call given
    up while still being opened is closed by the worker that opens it, when the response arrives.
    """

    def __init__(self, client: BedrockRuntimeClient, request: dict[str, Any]) -> None:
        self._client = client
        self._request = request
        self._lock = threading.Lock()
        self._closed = False
        self._stream: EventStream | None = None
        self._events: Iterator[dict[str, Any]] = iter(())

    def open(self) -> None:
        stream: EventStream = self._client.converse_stream(**self._request)["stream"]
        with self._lock:
            if not self._closed:
                self._stream, self._events = stream, iter(stream)
                return
        stream.close()

    def next_event(self) -> dict[str, Any] | None:
        return next(self._events, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream = self._stream
        if stream is None:
            return
        # Closing alone waits for the read in progress (it holds the response's buffer lock) until
        # the next event or the read timeout. urllib3 >= 2.3 offers `shutdown` for exactly this;
        # botocore keeps its urllib3 response private, hence the getattrs. `shutdown` refuses
        # (RuntimeError) once a fully read response has returned its connection to the pool, so a
        # finished stream keeps its keep-alive connection.
        shutdown = getattr(getattr(stream, "_raw_stream", None), "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                shutdown()
        stream.close()


class BedrockModel:
    """A Bedrock model, streamed with ConverseStream (one system prompt, one user message)."""

    def __init__(self, client: BedrockRuntimeClient, model_id: str) -> None:
        self._client = client
        self._model_id = model_id

    def _request(self, prompt: Prompt, max_output_tokens: int) -> dict[str, Any]:
        request: dict[str, Any] = {
            "modelId": self._model_id,
            "messages": [{"role": "user", "content": [{"text": prompt.user_message()}]}],
            "inferenceConfig": {"maxTokens": max_output_tokens},
        }
        # Bedrock rejects an empty system block rather than ignoring it.
        if prompt.system:
            request["system"] = [{"text": prompt.system}]
        return request

    async def stream(self, prompt: Prompt, *, max_output_tokens: int) -> AsyncGenerator[ModelEvent, None]:
        call = _ConverseStreamCall(self._client, self._request(prompt, max_output_tokens))
        stop_reason: str | None = None
        usage: Usage | None = None
        # A stream holds a thread for as long as the model takes between two events. A limiter of
        # its own keeps many concurrent streams from exhausting anyio's default one (40 threads,
        # shared with everything else in the process that runs in threads).
        limiter = anyio.CapacityLimiter(1)
        try:
            # abandon_on_cancel: a cancelled consumer does not wait for the thread; `close` below
            # makes the abandoned thread return.
            await anyio.to_thread.run_sync(call.open, abandon_on_cancel=True, limiter=limiter)
            while (
                event := await anyio.to_thread.run_sync(call.next_event, abandon_on_cancel=True, limiter=limiter)
            ) is not None:
                if "contentBlockDelta" in event:
                    # Only text: other delta kinds (reasoning, tool use) are not part of the answer.
                    text = event["contentBlockDelta"]["delta"].get("text")
                    if text:
                        yield Delta(text=text)
                elif "messageStop" in event:
                    stop_reason = event["messageStop"]["stopReason"]
                elif "metadata" in event:
                    reported = event["metadata"]["usage"]
                    usage = Usage(input_tokens=reported["inputTokens"], output_tokens=reported["outputTokens"])
        except _UPSTREAM_ERRORS as exc:
            raise _model_error(exc) from exc
        finally:
            call.close()
        if stop_reason is None or usage is None:
            raise TransientModelError("Bedrock stream ended before its messageStop and metadata events")
        yield Completion(usage=usage, finish_reason=_FINISH_REASONS.get(stop_reason, FinishReason.STOP))
