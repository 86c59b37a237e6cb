"""The local stack's "AWS": moto in server mode, in a process of its own.

Like AWS, it runs apart from the functions that call it: the gateway's event loop never shares a
GIL with moto's request handling (about 8 ms of CPU per DynamoDB call). Started by `LocalStack`;
prints `READY <port>` once it listens, and exits when its standard input closes (so it never
outlives the stack that started it, even if that one is killed).
"""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per AWS call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(f"READY {server.get_host_and_port()[1]}", flush=True)
    sys.stdin.read()  # until the parent closes the pipe or dies
    server.stop()


if __name__ == "__main__":
    main()
