"""Any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server) behind
the model port, streamed over HTTP as server-sent events.

The usage in the `Completion` is the one the server reports in its last chunk, which it sends
because the request asks for it (`stream_options.include_usage`): that is what is billed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any, Literal

import httpx
from pydantic import Field, SecretStr

from precis.domain.errors import ModelError, ModelThrottledError, PermanentModelError, TransientModelError
from precis.domain.models import Completion, Delta, FinishReason, Frozen, ModelEvent, Prompt, Usage


class OpenAIConfig(Frozen):
    """How to reach an OpenAI-compatible endpoint. The default is a local Ollama."""

    base_url: str = "http://127.0.0.1:11434/v1"
    # A SecretStr so that logging the config never prints the key.
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Between two reads of the stream, so it also bounds the model's time to first token.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # One client serves every concurrent stream of the process.
    max_connections: int = Field(default=50, ge=1)


def openai_client(config: OpenAIConfig) -> httpx.AsyncClient:
    """The HTTP client for `config`'s endpoint, meant to be shared by every `OpenAIModel` on it."""
    headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
    timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
    limits = httpx.Limits(max_connections=config.max_connections)
    return httpx.AsyncClient(base_url=config.base_url, headers=headers, timeout=timeout, limits=limits)


# 408 and 409 are what overloaded proxies and servers answer to a call that may well pass next time.
_ERRORS_BY_STATUS: dict[int, type[ModelError]] = {
    429: ModelThrottledError,
    408: TransientModelError,
    409: TransientModelError,
}
# `stop` is a normal stop. `content_filter` (and `tool_calls`, though no tools are offered) also
# end the answer, but the port only knows STOP and LENGTH, and the text streamed so far is the answer.
_FINISH_REASONS: dict[str, Literal[FinishReason.STOP, FinishReason.LENGTH]] = {"length": FinishReason.LENGTH}
_MAX_ERROR_CHARS = 300


def _upstream_message(body: Any) -> str:
    """The human-readable part of an error: `{"error": {"message": ...}}` (OpenAI, vLLM) or
    `{"error": "..."}` (Ollama), else the body itself; truncated."""
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", error) if isinstance(error, dict) else error
    text = message if isinstance(message, str) else json.dumps(message)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


async def _http_error(response: httpx.Response) -> ModelError:
    await response.aread()
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    status = response.status_code
    kind = _ERRORS_BY_STATUS.get(status) or (TransientModelError if status >= 500 else PermanentModelError)
    retry_after = response.headers.get("retry-after")
    hint = f" (retry after {retry_after} s)" if retry_after else ""
    wait = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
    return kind(f"OpenAI-compatible endpoint answered {status}{hint}: {_upstream_message(body)}", retry_after_s=wait)


class _EventData:
    """Collects the `data` of one server-sent event from its lines (the SSE format's rules)."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line; return the event's data when the blank line that ends it arrives."""
        if line.startswith("data:"):
            self._lines.append(line.removeprefix("data:").removeprefix(" "))
        elif not line and self._lines:
            data = "\n".join(self._lines)
            self._lines.clear()
            return data
        # Comments (`:` lines, used as keep-alives) and the other fields carry nothing for chat.
        return None


class OpenAIModel:
    """A model behind an OpenAI-compatible `/chat/completions`, streamed (one system message,
    one user message)."""

    def __init__(self, client: httpx.AsyncClient, model_id: str) -> None:
        self._client = client
        self._model_id = model_id

    def _request(self, prompt: Prompt, max_output_tokens: int) -> dict[str, Any]:
        return {
            "model": self._model_id,
            "messages": [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user_message()},
            ],
            "max_tokens": max_output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def stream(self, prompt: Prompt, *, max_output_tokens: int) -> AsyncGenerator[ModelEvent, None]:
        finish_reason: str | None = None
        usage: Usage | None = None
        event = _EventData()
        try:
            # Inside the generator, so that closing the generator closes the response (and its connection).
            async with self._client.stream(
                "POST", "/chat/completions", json=self._request(prompt, max_output_tokens)
            ) as response:
                if response.status_code != httpx.codes.OK:
                    raise await _http_error(response)
                async for line in response.aiter_lines():
                    data = event.feed(line)
                    if data is None:
                        continue
                    if data == "[DONE]":
                        break
                    chunk = _parse_chunk(data)
                    if "error" in chunk:
                        raise TransientModelError(f"OpenAI-compatible stream failed: {_upstream_message(chunk)}")
                    if reported := chunk.get("usage"):
                        usage = Usage(
                            input_tokens=reported["prompt_tokens"], output_tokens=reported["completion_tokens"]
                        )
                    # The usage chunk has no choices; the others have one, as n=1.
                    if choices := chunk.get("choices"):
                        if text := (choices[0].get("delta") or {}).get("content"):
                            yield Delta(text=text)
                        finish_reason = choices[0].get("finish_reason") or finish_reason
        except httpx.HTTPError as exc:
            # Timeouts (their message is often empty, hence the type), refused and dropped connections.
            raise TransientModelError(f"OpenAI-compatible endpoint unreachable: {type(exc).__name__}: {exc}") from exc
        if finish_reason is None:
            raise TransientModelError("OpenAI-compatible stream ended before a finish_reason")
        if usage is None:
            # vLLM, Ollama and OpenAI all report it when asked: its absence is a protocol error, and
            # estimating it here would bill something the provider never said.
            raise PermanentModelError("upstream did not report usage; it must support stream_options.include_usage")
        yield Completion(usage=usage, finish_reason=_FINISH_REASONS.get(finish_reason, FinishReason.STOP))


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        raise PermanentModelError(f"OpenAI-compatible stream sent a malformed chunk: {data[:_MAX_ERROR_CHARS]}")
    return chunk
