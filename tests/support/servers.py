"""Serve an ASGI app over real HTTP on 127.0.0.1 for the length of a test.

The fakes of remote model APIs (Bedrock, OpenAI-compatible) run in uvicorn on a background thread,
so the clients under test (boto3, httpx) talk to them through real sockets, exactly as in production.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any, Literal, Self

import anyio
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STARTUP_TIMEOUT_S = 5.0


class BackgroundServer:
    """An ASGI app served by uvicorn on a free port of 127.0.0.1, in a daemon thread.

    Use it as a context manager: the server is accepting connections when `__enter__` returns and
    is stopped (open connections dropped) by `__exit__`. `lifespan="on"` runs the app's lifespan
    (startup before the first request), as a real app such as the gateway needs.
    """

    def __init__(self, app: ASGIApp, lifespan: Literal["on", "off"] = "off") -> None:
        # Bind here, not in uvicorn: port 0 gives a free port with no race between choosing and binding.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        # With a lifespan, stop gracefully (so that the app's shutdown runs) but bounded: open streams
        # are cancelled after a second.
        config = uvicorn.Config(
            app,
            interface="asgi3",
            lifespan=lifespan,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1 if lifespan == "on" else None,
        )
        self._lifespan = lifespan
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=f"fake-server-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake server on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # force_exit: do not wait for streams a test left open; they are cancelled with the loop.
        self._server.should_exit = True
        self._server.force_exit = self._lifespan == "off"
        self._thread.join(timeout=_STARTUP_TIMEOUT_S)
        self._socket.close()


async def read_body(receive: Receive) -> bytes:
    """The whole request body of an ASGI HTTP request."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    return bytes(body)


async def send_response(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A complete, non-streaming ASGI response."""
    all_headers = [(b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


class StreamRecorder:
    """Streams scripted body parts to one client and records what happened: how many parts were
    actually handed to the server before the client went away, and whether it went away."""

    def __init__(self) -> None:
        self.sent = 0
        self.finished = threading.Event()
        self.disconnected = threading.Event()

    async def stream(self, receive: Receive, send: Send, parts: list[bytes], delay_s: float) -> None:
        """Send `parts` one by one, `delay_s` apart, stopping as soon as the client disconnects.

        The request body must have been read already: the next ASGI `receive` then returns only
        when the client disconnects, which a watcher task turns into `disconnected`.
        """

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            # uvicorn also wakes `receive` when the response completes: that is not a disconnect.
            if not self.finished.is_set():
                self.disconnected.set()
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch_disconnect, group.cancel_scope)
            for part in parts:
                if delay_s:
                    await anyio.sleep(delay_s)
                await send({"type": "http.response.body", "body": part, "more_body": True})
                self.sent += 1
            self.finished.set()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            group.cancel_scope.cancel()


async def wait_for(event: threading.Event, timeout_s: float = 1.0) -> bool:
    """Wait for an event set by a server thread without blocking the test's event loop."""
    return await anyio.to_thread.run_sync(event.wait, timeout_s)
