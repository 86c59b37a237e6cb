"""precis on one machine: `python -m local serve | run | summarize`.

- serve: start the local stack (moto, the template's resources, the gateway) and wait.
- run: serve, then summarize the bundled sample document live, printing tokens as they arrive and the
  done event's usage, cost and per-stage latency; keep serving (or exit with --once).
- summarize FILE: stream a summary of FILE from a running stack (`--url`, `--key`).
- drop FILE: put FILE under inbox/<user>/ of a running stack's bucket and watch its job's events.
- add-key: create an API key in a deployed stack's KeysTable (uses your AWS credentials).
- invoke FUNCTION EVENT: invoke a function of template.yaml with an event file (what `sam local invoke`
  does, without Docker): on the local stack, through moto's Lambda API, so it runs as a state machine
  or the SQS poller would run it; prints the response payload and any function error.
- report: cost and tokens per user and model, latency per stage (p50/p99) and a PNG chart of it, from
  the running local stack's cost ledger, or the last one's (saved when it stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from rich.console import Console
from rich.table import Table

SAMPLE = Path(__file__).resolve().parent / "samples" / "lighthouses.txt"
#: Where a serving stack says how to reach it, for the commands that talk to it (drop).
STATE = Path(__file__).resolve().parent.parent / ".local" / "stack.json"
#: The cost ledger of the last local stack, saved when it stopped (moto keeps nothing), for `report`.
LEDGER_COPY = STATE.parent / "ledger.json"
#: Where `report` draws its latency chart unless told otherwise.
CHART = STATE.parent / "latency.png"
#: The demo's model: the local summarizer, slowed to a remote model's pace so streaming is visible.
DEMO_MODEL = "local?ttft_ms=400&token_ms=25"

console = Console(highlight=False)


def stream_summary(url: str, api_key: str, text: str, model: str | None, style: str) -> dict[str, Any]:
    """Stream one summary to the terminal; return the done event."""
    body: dict[str, Any] = {"text": text, "style": style}
    if model:
        body["model"] = model
    headers = {"authorization": f"Bearer {api_key}", "accept": "text/event-stream"}
    with (
        httpx.Client(timeout=httpx.Timeout(10.0, read=120.0)) as client,
        connect_sse(client, "POST", f"{url}/v1/summarize", json=body, headers=headers) as source,
    ):
        if source.response.status_code != 200:
            source.response.read()
            console.print(f"[red]{source.response.status_code}[/red] {source.response.text}")
            raise SystemExit(1)
        return _print_events(source)


def _print_events(source: Any) -> dict[str, Any]:
    """Print an event stream of the streaming contract as it arrives; return its done event."""
    done: dict[str, Any] = {}
    for sse in source.iter_sse():
        data = json.loads(sse.data)
        if sse.event == "meta":
            console.print(
                f"[dim]{data['request_id']} · model {data['model']} · "
                f"{data['input_tokens']} input tokens · {data['chunks']} chunk(s)[/dim]\n"
            )
        elif sse.event == "progress":
            console.print(f"[dim]{data['stage']} {data['done']}/{data['total']}[/dim]")
        elif sse.event == "token":
            console.print(data["text"], end="", soft_wrap=True)
        elif sse.event == "error":
            console.print(f"\n[red]error[/red] {data['code']}: {data['message']}")
        elif sse.event == "done":
            done = data
    console.print()
    _print_done(done)
    return done


def _print_done(done: dict[str, Any]) -> None:
    table = Table(title="done", show_header=False, title_justify="left")
    table.add_row("finish_reason", str(done.get("finish_reason")))
    usage = done.get("usage", {})
    table.add_row("tokens", f"{usage.get('input_tokens')} in / {usage.get('output_tokens')} out")
    table.add_row("cost_usd", f"{done.get('cost_usd', 0):.6f}")
    for stage, ms in done.get("latency_ms", {}).items():
        table.add_row(f"latency {stage}", f"{ms:.1f} ms")
    console.print(table)


def _serve(args: argparse.Namespace) -> Any:
    from local.stack import LocalStack

    port = int(os.environ.get("PRECIS_PORT", "8080"))
    api_key = os.environ.get("PRECIS_DEV_API_KEY", "")
    stack = LocalStack(port=port, api_key=api_key).start()
    console.print(f"[bold]precis[/bold] local stack on [cyan]{stack.url}[/cyan] (moto at {stack.moto_endpoint})")
    console.print(f"dev API key: [green]{stack.api_key}[/green]")
    console.print(
        "try: [dim]curl -N " + stack.url + "/v1/summarize -H 'Authorization: Bearer " + stack.api_key + "' "
        '-H \'Content-Type: application/json\' -d \'{"text": "...your document...", "style": "bullets"}\'[/dim]\n',
        soft_wrap=True,
    )
    STATE.parent.mkdir(exist_ok=True)
    STATE.write_text(
        json.dumps(
            {
                "url": stack.url,
                "api_key": stack.api_key,
                "moto_endpoint": stack.moto_endpoint,
                "bucket": stack.template.physical["DocumentsBucket"],
                "ledger_table": stack.template.physical["LedgerTable"],
            }
        )
    )
    return stack


def _wait(stack: Any) -> None:
    console.print("serving; Ctrl-C to stop")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    finally:
        STATE.unlink(missing_ok=True)
        _stop(stack)


def _stop(stack: Any) -> None:
    """Stop the stack, keeping its cost ledger for `report` first."""
    from botocore.exceptions import BotoCoreError, ClientError

    from local.report import dump, live_entries

    state = {"moto_endpoint": stack.moto_endpoint, "ledger_table": stack.template.physical.get("LedgerTable")}
    try:
        if stack.moto_endpoint and state["ledger_table"]:
            dump(live_entries(state), LEDGER_COPY)
    except (BotoCoreError, ClientError, OSError) as exc:
        console.print(f"[yellow]the cost ledger was not saved[/yellow]: {exc}")
    finally:
        stack.stop()


def _report(chart: Path, user: str | None) -> int:
    """Report from the running stack's ledger, else from the last one's saved copy."""
    import time

    from botocore.exceptions import BotoCoreError

    from local.report import live_entries, load, report

    entries, source = None, ""
    if STATE.exists():
        state = json.loads(STATE.read_text())
        try:
            entries, source = live_entries(state), f"the running local stack ({state.get('url', '?')})"
        except BotoCoreError:  # a stack that died without removing its state file
            entries = None
    if entries is None:
        if not LEDGER_COPY.exists():
            console.print("[red]no local stack is running, and none ran here before[/red]: `make serve` or `make run`")
            return 2
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(LEDGER_COPY.stat().st_mtime))
        entries, source = load(LEDGER_COPY), f"the last local stack (saved {saved})"
    if user is not None:
        entries = [entry for entry in entries if entry.user_id == user]
    out = Console(highlight=False, width=max(console.width, 110))
    jobs = sum(entry.kind == "job" for entry in entries)
    out.print(f"[dim]cost ledger of {source}: {len(entries) - jobs} requests, {jobs} jobs[/dim]")
    report(entries, out, chart)
    return 0


def _drop(path: Path, user: str, watch: bool) -> int:
    """Drop a file into the running stack's inbox, say where its summary will land, watch its job."""
    import re

    import boto3

    from precis.domain.jobs import job_id_for_object, summary_keys

    if not STATE.exists():
        console.print("[red]no local stack is running[/red]: start one with `make serve` (or `make run`)")
        return 2
    state = json.loads(STATE.read_text())
    s3 = boto3.client(
        "s3",
        endpoint_url=state["moto_endpoint"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    name = re.sub(r"[^\w.,=+@()-]+", "-", path.name)
    key = f"inbox/{user}/{name}"
    etag = s3.put_object(Bucket=state["bucket"], Key=key, Body=path.read_bytes())["ETag"]
    job_id = job_id_for_object(state["bucket"], key, etag)
    summary, markdown = summary_keys(job_id, key)
    console.print(f"dropped [cyan]s3://{state['bucket']}/{key}[/cyan] -> job [green]{job_id}[/green]", soft_wrap=True)
    console.print(f"its summary will appear at s3://{state['bucket']}/{summary} (and {markdown})", soft_wrap=True)
    console.print(
        f"[dim]curl -N {state['url']}/v1/jobs/{job_id}/events -H 'Authorization: Bearer {state['api_key']}'[/dim]\n",
        soft_wrap=True,
    )
    if not watch:
        return 0
    headers = {"authorization": f"Bearer {state['api_key']}"}
    with httpx.Client(base_url=state["url"], headers=headers, timeout=httpx.Timeout(10.0, read=600.0)) as client:
        for _ in range(120):  # the starter creates the job once the S3 event has come through SQS
            if client.get(f"/v1/jobs/{job_id}").status_code == 200:
                break
            threading.Event().wait(0.25)
        with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events") as source:
            done = _print_events(source)
    return 0 if done.get("finish_reason") in ("stop", "length") else 1


def _invoke(template_path: Path, logical_id: str, event_path: Path) -> int:
    """Start the local stack without its gateway, invoke one function with one event, print the answer."""
    import boto3

    from local.stack import REGION, LocalStack, Template

    template = Template.read(template_path)
    functions = sorted(template.resources("AWS::Serverless::Function"))
    if logical_id not in functions:
        print(f"{logical_id} is not a function of {template_path}: {', '.join(functions)}", file=sys.stderr)
        return 2
    payload = event_path.read_bytes()
    stack = LocalStack(template=template, gateway=False).start()
    try:
        response = boto3.client("lambda", region_name=REGION).invoke(
            FunctionName=stack.template.physical[logical_id], Payload=payload
        )
        body = response["Payload"].read().decode()
    finally:
        stack.stop()
    with contextlib.suppress(ValueError):  # a payload that is not JSON is printed as it came
        body = json.dumps(json.loads(body), indent=2)
    sys.stdout.write(body + "\n")
    if response.get("FunctionError"):
        print(f"FunctionError: {response['FunctionError']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="start the local stack and wait")
    run = commands.add_parser("run", help="serve and summarize the sample document live")
    run.add_argument("--once", action="store_true", help="stop after the demo instead of serving on")
    run.add_argument("--model", default=DEMO_MODEL)
    run.add_argument("--style", default="bullets", choices=["tldr", "bullets", "paragraph"])
    summarize = commands.add_parser("summarize", help="stream a summary of FILE from a running stack")
    summarize.add_argument("file", type=Path)
    summarize.add_argument("--url", default=f"http://127.0.0.1:{os.environ.get('PRECIS_PORT', '8080')}")
    summarize.add_argument("--key", default=os.environ.get("PRECIS_DEV_API_KEY", ""))
    summarize.add_argument("--model", default=None)
    summarize.add_argument("--style", default="paragraph", choices=["tldr", "bullets", "paragraph"])
    add_key = commands.add_parser("add-key", help="create an API key in a deployed KeysTable")
    add_key.add_argument("--table", required=True, help="the KeysTableName output of the stack")
    add_key.add_argument("--user", required=True, help="the user id the key acts as")
    add_key.add_argument("--tier", default="free")
    drop = commands.add_parser("drop", help="drop FILE into a running stack's inbox and watch its job")
    drop.add_argument("file", type=Path)
    drop.add_argument("--user", default="dev", help="the inbox folder, inbox/<user>/: the user who owns the job")
    drop.add_argument("--no-watch", dest="watch", action="store_false", help="do not stream the job's events")
    invoke = commands.add_parser("invoke", help="invoke a function with an event file (sam local invoke, no Docker)")
    invoke.add_argument("function", help="the function's logical id in the template, e.g. PreprocessFunction")
    invoke.add_argument("event", type=Path, help="a JSON event, e.g. events/preprocess-job.json")
    invoke.add_argument("--template", type=Path, default=Path(__file__).resolve().parent.parent / "template.yaml")
    report = commands.add_parser("report", help="cost, tokens and latency per stage from the local stack's ledger")
    report.add_argument("--chart", type=Path, default=CHART, help=f"where to write the PNG chart (default {CHART})")
    report.add_argument("--user", default=None, help="only this user's requests and jobs")
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args.chart, args.user)
    if args.command == "invoke":
        return _invoke(args.template, args.function, args.event)
    if args.command == "drop":
        return _drop(args.file, args.user, args.watch)
    if args.command == "add-key":
        import boto3

        from precis.adapters.dynamodb import KeyStore

        api_key = f"pk_{secrets.token_urlsafe(24)}"
        KeyStore(boto3.resource("dynamodb").Table(args.table)).add(api_key, user_id=args.user, tier=args.tier)
        console.print(f"API key for {args.user} ({args.tier}): [green]{api_key}[/green] (stored only as its SHA-256)")
        return 0
    if args.command == "run":
        # The demo's terminal shows the summary; the gateway's JSON logs and EMF lines would bury it
        # (`make serve` keeps them). Set before precis is imported: its Logger reads them once.
        os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
        os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

    if args.command == "summarize":
        if not args.key:
            parser.error("--key (or PRECIS_DEV_API_KEY) is required")
        stream_summary(args.url, args.key, args.file.read_text("utf-8"), args.model, args.style)
        return 0
    stack = _serve(args)
    if args.command == "run":
        console.print(f"[bold]summarizing[/bold] {SAMPLE.name} with {args.model}\n")
        try:
            stream_summary(stack.url, stack.api_key, SAMPLE.read_text("utf-8"), args.model, args.style)
        except BaseException:
            stack.stop()
            raise
        if args.once:
            _stop(stack)
            return 0
    _wait(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
