"""More gateways for a running local stack: instances of the service beside the stack's own, with
other settings, reaching the same local cloud (moto) and so sharing its tables with every other instance.

- `gateway_server(environment)`: in this process, served by uvicorn on a background thread.
- `GatewayProcess(environment)`: in a process of its own, so that a test can kill it (SIGKILL) mid-stream
  as Lambda or a crash would, with nothing in it getting the chance to clean up.

`python -m tests.support.gateways` is what that process runs: the gateway app built from its
environment (PRECIS_*, AWS_ENDPOINT_URL), served on a free port of 127.0.0.1 that it prints first.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx
import uvicorn

from tests.support.servers import BackgroundServer

ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT_S = 30.0


def gateway_server(environment: Mapping[str, str]) -> BackgroundServer:
    """The gateway app with the settings of `environment` (its PRECIS_* variables), ready to be served
    in this process: `with gateway_server(env) as gateway: gateway.url`."""
    from precis.api.app import create_app
    from precis.settings import Settings
    from precis.wiring import build_services

    app = create_app(build_services(Settings.from_env(environment)))
    return BackgroundServer(app, lifespan="on")


class GatewayProcess:
    """A gateway in a child process, its environment this process's plus `environment`.

    `__enter__` returns once it answers `GET /healthz`; `kill()` ends it with SIGKILL (no shutdown,
    no `finally`, no last write); `__exit__` kills it if it is still running.
    """

    def __init__(self, environment: Mapping[str, str]) -> None:
        self.environment = {
            **os.environ,
            **environment,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "layers" / "core"), str(ROOT)]),
        }
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Self:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.gateways"],
            cwd=ROOT,
            env=self.environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._process = process
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], _START_TIMEOUT_S)
            line = process.stdout.readline().split() if ready else []
            if len(line) != 2 or line[0] != "PORT":
                raise RuntimeError(f"the gateway process did not start (it said {line!r})")
            self.url = f"http://127.0.0.1:{line[1]}"
            deadline = time.monotonic() + _START_TIMEOUT_S
            while not self._healthy():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the gateway process never answered /healthz")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash would end it; returns once it is gone."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()


def main() -> None:
    """Serve the gateway built from this process's environment; print `PORT <n>` before serving."""
    from precis.api.app import create_app
    from precis.settings import Settings
    from precis.wiring import build_services

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    app = create_app(build_services(Settings.from_env()))
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    # The parent reads that one line and no more: what the gateway writes to stdout afterwards (logs,
    # EMF records) goes to stderr, or a full pipe would block the gateway.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
