"""The local stack's "AWS": moto in server mode, in a process of its own.

Like AWS, it runs apart from the functions that call it: the gateway's event loop never shares a
GIL with moto's request handling (about 8 ms of CPU per DynamoDB call). Started by `LocalStack`;
prints `READY <port>` once it listens, and exits when its standard input closes (so it never
outlives the stack that started it, even if that one is killed).

It also plays Lambda's part, with no Docker:

- Step Functions runs the real ASL on moto's interpreter (`{"stepfunctions": {"execute_state_machine": true}}`).
  Its Lambda tasks call moto's Lambda API over HTTP, like every other caller.
- Every Lambda invoke (from a state machine, from boto3, from the SQS poller) is dispatched in-process to
  the function's Python handler: moto's docker-less backend (`LambdaSimpleBackend.invoke`, which only
  echoes) is replaced by `FunctionDispatcher`. A handler's exception becomes a function error
  (`FunctionError: Unhandled`, payload `{"errorType": <class name>, "errorMessage": ...}`), as in AWS,
  so the ASL's Retry and Catch match the exception's class name.
- SQS event source mappings (`lambda.create_event_source_mapping`, which the local stack calls for the
  template's `Events: {Type: SQS}`) are polled here, in Lambda's place (`SqsPoller`), because moto's own
  mapping fires only when a message is sent and never re-polls a failed one.

Which code a function runs is read from its configuration in moto: `Handler` (`app.handler`) inside
the directory named by its environment variable `PRECIS_LOCAL_CODE_URI`. The local stack creates the
template's functions that way (local/stack.py); a test can create a function of its own the same way
with boto3's `create_function`.

Commands on standard input, one per line, after the parent has created the resources:

    START {"environment": {...}}

applies the union of every function's environment, then the parent's overrides, to this process (the
handlers share it), and answers `STARTED` on stdout. The parent then creates the event source mappings.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote_plus

from local.stack import ACCOUNT_ID, CODE_URI_VARIABLE, REGION, ROOT

#: How long a message whose processing failed stays invisible before the poller sees it again.
RETRY_VISIBILITY_VARIABLE = "PRECIS_LOCAL_RETRY_VISIBILITY_S"

# Not under "precis": the service's Logger (Powertools JSON at INFO) would print this stack's own
# lines as if the functions had logged them, under the ids of whichever invocation ran last.
log = logging.getLogger("local.cloud")

Handler = Callable[[Any, Any], Any]


# Lambda, in-process -----------------------------------------------------------------------------


@dataclass
class LambdaContext:
    """The context object the Python runtime passes to a handler (the fields Powertools reads)."""

    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    timeout_s: float
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    identity: Any = None
    client_context: Any = None
    started: float = field(default_factory=time.monotonic)

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return f"local/[{self.function_version}]{self.aws_request_id.replace('-', '')}"

    def get_remaining_time_in_millis(self) -> int:
        # Locally nothing stops a handler at its timeout; the deadline is reported so that code
        # which plans by it (stage deadlines, Powertools Idempotency) behaves as in Lambda.
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


@dataclass(frozen=True)
class Invocation:
    """What Lambda answers: the payload, and `Unhandled` when the function failed."""

    payload: bytes
    function_error: str | None = None


def _error_payload(error_type: str, message: str, request_id: str, exc: BaseException | None = None) -> bytes:
    body: dict[str, Any] = {"errorMessage": message, "errorType": error_type, "requestId": request_id}
    if exc is not None:
        body["stackTrace"] = traceback.format_list(traceback.extract_tb(exc.__traceback__))
    return json.dumps(body).encode()


class FunctionDispatcher:
    """Runs Lambda functions in this process, each from its handler module, imported once.

    A function is anything moto's Lambda backend knows (`moto.awslambda.models.LambdaFunction`); its
    `Handler` and the `PRECIS_LOCAL_CODE_URI` of its environment name the file and the attribute.
    All handlers share this process's environment, as every function of one template agrees on the
    variables they share: the union of their environments is applied before any handler is imported.
    """

    def __init__(self) -> None:
        self._handlers: dict[tuple[str, str, str], Handler] = {}
        self._environment_applied: set[str] = set()
        self._overrides: dict[str, str] = {}
        # Imports and os.environ changes are serialized: a Map state invokes many functions at once.
        self._lock = threading.RLock()

    def apply_environment(self, functions: Iterable[Any], overrides: Mapping[str, str] | None = None) -> None:
        """Put every function's environment into os.environ, then the overrides (the parent's PRECIS_*)."""
        with self._lock:
            if overrides is not None:
                self._overrides = dict(overrides)
            for fn in functions:
                self._apply_function_environment(fn)
            os.environ.update(self._overrides)

    def _apply_function_environment(self, fn: Any) -> None:
        variables = {k: str(v) for k, v in (fn.environment_vars or {}).items() if k != CODE_URI_VARIABLE}
        os.environ.update(variables)
        os.environ.update(self._overrides)
        self._environment_applied.add(fn.function_name)

    def invoke(self, fn: Any, body: str | bytes | None, invocation_type: str = "RequestResponse") -> Invocation:
        """Invoke `fn` with the raw request body, as Lambda would; never raises for the handler's errors."""
        request_id = str(uuid.uuid4())
        raw = body.decode() if isinstance(body, bytes) else (body or "")
        try:
            event = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            return Invocation(_error_payload("InvalidRequestContentException", str(exc), request_id), "Unhandled")
        if invocation_type == "DryRun":
            return Invocation(b"")
        if invocation_type == "Event":
            # Asynchronous invoke: Lambda answers 202 at once and runs the function later.
            threading.Thread(
                target=self._run, args=(fn, event, request_id), name=f"event-{fn.function_name}", daemon=True
            ).start()
            return Invocation(b"")
        return self._run(fn, event, request_id)

    def _run(self, fn: Any, event: Any, request_id: str) -> Invocation:
        try:
            handler = self.handler_for(fn)
        except _InitError as exc:
            log.error("function %s failed to initialise: %s: %s", fn.function_name, exc.error_type, exc)
            return Invocation(_error_payload(exc.error_type, str(exc), request_id, exc.__cause__), "Unhandled")
        # Created after the init phase: as in Lambda, the import does not count against the timeout.
        context = LambdaContext(
            function_name=fn.function_name,
            invoked_function_arn=fn.function_arn,
            memory_limit_in_mb=int(fn.memory_size),
            timeout_s=float(fn.timeout),
            aws_request_id=request_id,
        )
        try:
            result = handler(event, context)
        except Exception as exc:  # the function's error: Lambda reports it, the caller decides
            log.info("function %s raised %s: %s", fn.function_name, type(exc).__name__, exc)
            return Invocation(_error_payload(type(exc).__name__, str(exc), request_id, exc), "Unhandled")
        try:
            return Invocation(json.dumps(result).encode())
        except (TypeError, ValueError) as exc:
            message = f"Unable to marshal response: {exc}"
            return Invocation(_error_payload("Runtime.MarshalError", message, request_id), "Unhandled")

    def handler_for(self, fn: Any) -> Handler:
        """The handler callable of `fn`, importing its module on first use."""
        code_uri = (fn.environment_vars or {}).get(CODE_URI_VARIABLE)
        handler_name = fn.handler or ""
        if not code_uri:
            raise _InitError("Runtime.ImportModuleError", f"{fn.function_name} has no {CODE_URI_VARIABLE}")
        if handler_name.endswith(".sh"):
            # A script handler is run by the Lambda Web Adapter (AWS_LAMBDA_EXEC_WRAPPER); invoked
            # locally, the adapter's part is played by the same app's buffered handler, `app.handler`.
            handler_name = "app.handler"
        key = (fn.function_name, code_uri, handler_name)
        if key in self._handlers:  # warm: no lock, a slow import elsewhere must not hold this up
            return self._handlers[key]
        with self._lock:
            if key in self._handlers:
                return self._handlers[key]
            if not self._environment_applied:
                # No START yet (a direct invoke right after creation): the environment of every
                # function known so far, so that shared modules see all their variables.
                self.apply_environment(_all_functions())
            if fn.function_name not in self._environment_applied:
                self._apply_function_environment(fn)
            handler = _import_handler(fn.function_name, Path(code_uri), handler_name)
            self._handlers[key] = handler
            return handler


class _InitError(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _import_handler(function_name: str, code_dir: Path, handler_name: str) -> Handler:
    """Import `<code_dir>/<module>.py` under a name of its own per function, as Lambda's separate
    sandboxes would (module state is never shared between two functions), and return the attribute."""
    module_path, _, attribute = handler_name.rpartition(".")
    if not module_path or not attribute:
        raise _InitError("Runtime.MalformedHandlerName", f"Bad handler '{handler_name}': not enough values to unpack")
    path = code_dir / (module_path.replace(".", "/") + ".py")
    unique = "".join(c if c.isalnum() else "_" for c in f"precis_local_fn__{function_name}__{module_path}")
    spec = importlib.util.spec_from_file_location(unique, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise _InitError("Runtime.ImportModuleError", f"Unable to import module '{module_path}': no file {path}")
    module: ModuleType = importlib.util.module_from_spec(spec)
    # As in Lambda: the core layer (/opt/python) and the function's own directory are importable.
    for entry in (str(code_dir), str(ROOT / "layers" / "core")):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    # Registered before it runs, as `import` would: dataclasses and pydantic look their module up there.
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[unique]
        raise _InitError("Runtime.ImportModuleError", f"Unable to import module '{module_path}': {exc}") from exc
    handler = getattr(module, attribute, None)
    if not callable(handler):
        raise _InitError("Runtime.HandlerNotFound", f"Handler '{attribute}' missing on module '{module_path}'")
    gc.freeze()  # like moto's own (see main): what the function's init loaded lives as long as the process
    return handler


def _all_functions() -> list[Any]:
    from moto.awslambda_simple.models import lambda_simple_backends

    return list(lambda_simple_backends[ACCOUNT_ID][REGION].list_functions())


# SQS event sources, polled in Lambda's place ------------------------------------------------------


def sqs_event(messages: list[dict[str, Any]], queue_arn: str) -> dict[str, Any]:
    """The event Lambda's SQS poller passes to a function, from ReceiveMessage's messages."""
    records = []
    for message in messages:
        attributes = message.get("Attributes", {})
        records.append(
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": {
                    "ApproximateReceiveCount": attributes.get("ApproximateReceiveCount", "1"),
                    "SentTimestamp": attributes.get("SentTimestamp", str(int(time.time() * 1000))),
                    "SenderId": attributes.get("SenderId", ACCOUNT_ID),
                    "ApproximateFirstReceiveTimestamp": attributes.get(
                        "ApproximateFirstReceiveTimestamp", str(int(time.time() * 1000))
                    ),
                    **{
                        k: v
                        for k, v in attributes.items()
                        if k in ("MessageGroupId", "MessageDeduplicationId", "SequenceNumber", "AWSTraceHeader")
                    },
                },
                "messageAttributes": {
                    name: {
                        "stringValue": value.get("StringValue"),
                        "binaryValue": value.get("BinaryValue"),
                        "stringListValues": value.get("StringListValues", []),
                        "binaryListValues": value.get("BinaryListValues", []),
                        "dataType": value.get("DataType", "String"),
                    }
                    for name, value in message.get("MessageAttributes", {}).items()
                },
                "md5OfBody": message.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": queue_arn.split(":")[3],
            }
        )
    return {"Records": records}


def failed_message_ids(
    message_ids: list[str], function_error: str | None, payload: bytes, report_batch_item_failures: bool
) -> set[str]:
    """Which messages of a batch failed, by Lambda's rules for an SQS event source."""
    if function_error:
        return set(message_ids)
    if not report_batch_item_failures:
        return set()  # without ReportBatchItemFailures, whatever the function returns is success
    try:
        response = json.loads(payload) if payload.strip() else None
    except json.JSONDecodeError:
        return set(message_ids)  # an invalid response fails the whole batch
    if not isinstance(response, dict):
        return set()  # a null or empty response is a complete success
    failures = response.get("batchItemFailures")
    if not failures:
        return set()
    if not isinstance(failures, list):
        return set(message_ids)
    failed: set[str] = set()
    for failure in failures:
        identifier = failure.get("itemIdentifier") if isinstance(failure, dict) else None
        if not identifier or identifier not in message_ids:
            return set(message_ids)  # an empty, null or unknown identifier fails the whole batch
        failed.add(identifier)
    return failed


class SqsPoller:
    """Lambda's poller for one SQS event source mapping: MaximumConcurrency threads, each receiving a
    batch (long poll), invoking the function through moto's Lambda API, deleting what succeeded and
    making what failed visible again soon, so that moto's redrive policy moves a poison message to the
    DLQ after maxReceiveCount receives, as SQS does. It reads the mapping on every batch (BatchSize,
    Enabled, FunctionResponseTypes) and stops when the mapping is deleted."""

    #: Without ScalingConfig, Lambda starts with five concurrent batches per queue.
    DEFAULT_CONCURRENCY = 5

    def __init__(self, backend: Any, mapping: Any, retry_visibility_s: int, stop: threading.Event) -> None:
        self.backend = backend
        self.uuid: str = mapping.uuid
        self.function_arn: str = mapping.function_arn
        self.queue_arn: str = mapping.event_source_arn
        self.retry_visibility_s = retry_visibility_s
        self._stop = stop
        # moto's ReceiveMessage is not atomic across threads: two concurrent receives could both take
        # one message. One receive at a time per queue; the invocations still run concurrently.
        self._receive_lock = threading.Lock()
        concurrency = int((mapping.scaling_config or {}).get("MaximumConcurrency") or self.DEFAULT_CONCURRENCY)
        name = self.function_arn.rsplit(":", 1)[-1]
        self.threads = [
            threading.Thread(target=self._poll, name=f"sqs-{name}-{i}", daemon=True) for i in range(concurrency)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _poll(self) -> None:
        import boto3
        from botocore.config import Config

        sqs: Any = boto3.client("sqs", region_name=REGION)  # the messages go on as plain dicts
        # One attempt, and as long as the function may run: a retry would invoke it twice.
        lambda_ = boto3.client(
            "lambda", region_name=REGION, config=Config(read_timeout=960, retries={"total_max_attempts": 1})
        )
        queue_url = sqs.get_queue_url(QueueName=self.queue_arn.rsplit(":", 1)[-1])["QueueUrl"]
        while not self._stop.is_set():
            mapping = self.backend.get_event_source_mapping(self.uuid)
            if mapping is None:
                return  # deleted
            if not mapping.enabled:
                self._stop.wait(1)
                continue
            try:
                with self._receive_lock:
                    if self._stop.is_set():
                        return
                    messages = sqs.receive_message(
                        QueueUrl=queue_url,
                        MaxNumberOfMessages=min(int(mapping.batch_size or 10), 10),
                        WaitTimeSeconds=1,
                        MessageSystemAttributeNames=["All"],
                        MessageAttributeNames=["All"],
                    ).get("Messages", [])
                if messages:
                    report = "ReportBatchItemFailures" in (mapping.function_response_types or [])
                    self._process(sqs, lambda_, queue_url, messages, report)
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("SQS poller for %s failed; polling on", self.function_arn)
                self._stop.wait(1)

    def _process(self, sqs: Any, lambda_: Any, queue_url: str, messages: list[dict[str, Any]], report: bool) -> None:
        response = lambda_.invoke(
            FunctionName=self.function_arn, Payload=json.dumps(sqs_event(messages, self.queue_arn)).encode()
        )
        ids = [m["MessageId"] for m in messages]
        failed = failed_message_ids(ids, response.get("FunctionError"), response["Payload"].read(), report)
        done = [m for m in messages if m["MessageId"] not in failed]
        retry = [m for m in messages if m["MessageId"] in failed]
        if failed:
            log.warning("%s failed %d of %d SQS messages", self.function_arn, len(failed), len(messages))
        for start in range(0, len(done), 10):
            batch = done[start : start + 10]
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(batch)],
            )
        for start in range(0, len(retry), 10):
            batch = retry[start : start + 10]
            # AWS leaves a failed message invisible for the rest of the queue's VisibilityTimeout (>= 6x
            # the function's timeout: minutes). Locally it comes back after a second or so, so that a
            # retry, and a poison message's way to the DLQ, take seconds, not an afternoon.
            sqs.change_message_visibility_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": self.retry_visibility_s}
                    for i, m in enumerate(batch)
                ],
            )


# The process ---------------------------------------------------------------------------------------


class Cloud:
    """What this process adds to moto: the in-process dispatcher and the SQS pollers."""

    def __init__(self) -> None:
        self.dispatcher = FunctionDispatcher()
        self.stop_polling = threading.Event()
        self.pollers: list[SqsPoller] = []

    def install(self) -> None:
        """Patch moto's docker-less Lambda backend (`LambdaSimpleBackend`):

        - `invoke`, which echoes its input, dispatches to the handler instead. moto's Lambda API
          (`LambdaResponse.invoke`) answers with the bytes it returns and the headers it puts in
          `response_headers`: `x-amz-function-error` becomes boto3's `FunctionError`, which moto's
          Step Functions interpreter turns into the task's error, named by the payload's `errorType`.
        - `create_event_source_mapping` for a queue starts an `SqsPoller` and takes the mapping off the
          queue, where moto would invoke the function once per SendMessage and never again.
        """
        from moto.awslambda_simple.models import LambdaSimpleBackend
        from moto.sqs.models import sqs_backends

        dispatcher = self.dispatcher
        create_mapping = LambdaSimpleBackend.create_event_source_mapping

        def invoke(
            backend: LambdaSimpleBackend,
            function_name: str,
            qualifier: str | None,
            body: Any,
            headers: Any,
            response_headers: dict[str, str],
        ) -> bytes:
            fn = backend.get_function(function_name, qualifier)  # ResourceNotFoundException, as in AWS
            invocation_type = (headers or {}).get("X-Amz-Invocation-Type") or "RequestResponse"
            result = dispatcher.invoke(fn, body, invocation_type)
            response_headers["x-amz-executed-version"] = "$LATEST"
            if result.function_error:
                response_headers["x-amz-function-error"] = result.function_error
            response_headers["Content-Length"] = str(len(result.payload))
            return result.payload

        def create_event_source_mapping(backend: LambdaSimpleBackend, spec: dict[str, Any]) -> Any:
            mapping = create_mapping(backend, spec)
            if mapping.event_source_arn.split(":")[2] == "sqs":
                for queue in sqs_backends[backend.account_id][backend.region_name].queues.values():
                    if queue.queue_arn == mapping.event_source_arn:
                        queue.lambda_event_source_mappings.pop(mapping.function_arn, None)
                self.poll(backend, mapping)
            return mapping

        LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign,assignment]
        LambdaSimpleBackend.create_event_source_mapping = create_event_source_mapping  # type: ignore[method-assign,assignment]
        _encode_notification_keys_as_s3_does()
        _keep_stopped_executions_aborted()

    def poll(self, backend: Any, mapping: Any) -> None:
        retry_visibility_s = int(float(os.environ.get(RETRY_VISIBILITY_VARIABLE, "1")))
        poller = SqsPoller(backend, mapping, retry_visibility_s, self.stop_polling)
        poller.start()
        self.pollers.append(poller)

    def start(self, command: Mapping[str, Any]) -> None:
        self.dispatcher.apply_environment(_all_functions(), command.get("environment") or {})

    def stop(self) -> None:
        self.stop_polling.set()


def _encode_notification_keys_as_s3_does() -> None:
    """S3 notifications carry the object key form-encoded but with its slashes as they are
    (`inbox/a+report%2Bv2.txt`); moto 5.2.5 encodes the slashes too (`inbox%2Fa+...`). Both decode
    the same with unquote_plus, but a check on the raw key (`startswith("inbox/")`) would pass on
    AWS and fail here, so the local notifications are made to look like S3's."""
    from moto.s3 import notifications

    notifications.quote_plus = partial(quote_plus, safe="/")


def _keep_stopped_executions_aborted() -> None:
    """In AWS a stopped execution is ABORTED, whatever its running tasks do next. In moto 5.2.5,
    StopExecution during a Map makes the aborted iterations raise (`executionFailedEventDetails` is
    the empty string moto's stop passes as error) and the interpreter's catch-all then overwrites the
    stopped state with an error: the execution ends FAILED. Once stopped, an execution stays stopped."""
    from moto.stepfunctions.parser.asl.eval.environment import Environment
    from moto.stepfunctions.parser.asl.eval.program_state import ProgramStopped

    set_error = Environment.set_error

    def set_error_unless_stopped(env: Environment, error: Any) -> None:
        if not isinstance(env.program_state(), ProgramStopped):
            set_error(env, error)

    Environment.set_error = set_error_unless_stopped  # type: ignore[method-assign,assignment]


def _serialize_dynamodb_writes() -> None:
    """DynamoDB applies a conditional write atomically: no other write to the item comes between the
    condition's check and the change. moto's server handles requests on many threads and does not,
    so two concurrent admissions could both pass a `requests < limit` condition. One lock around
    moto's write operations gives the local stack DynamoDB's guarantee (reads stay concurrent)."""
    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    for name in ("put_item", "update_item", "delete_item", "batch_write_item", "transact_write_items"):
        operation = getattr(DynamoHandler, name)

        def serialized(self: Any, _operation: Callable[[Any], Any] = operation) -> Any:
            with lock:
                return _operation(self)

        setattr(DynamoHandler, name, serialized)


class _Discarded(list[Any]):
    """A list that keeps nothing appended to it."""

    def append(self, _: Any) -> None:
        pass


def _forget_dynamodb_items() -> None:
    """moto keeps every model instance it ever creates (`instances_tracked`, for its dashboard),
    DynamoDB items included, and it creates several per write (copies for conditions and return
    values): a stack serving streams grew by ~200 items a second that nothing needed, and the
    collector's full passes over them stopped every AWS call of the stack for ~0.2 s every ~20 s.
    The dashboard is not used here, so items are not tracked."""
    from moto.dynamodb.models.dynamo_type import Item

    Item.instances_tracked = _Discarded()  # type: ignore[attr-defined]


def _back_up_items_not_tables_in_transactions() -> None:
    """A cancelled TransactWriteItems changes nothing. moto 5.2.5 makes sure of it by deep-copying
    every table the transaction writes to before it starts, so each admission (which also creates
    the request's record) cost time in proportion to the requests table, about 0.1 ms a record,
    under the write lock above: the longer a local stack served, the slower every admission and
    every refusal. DynamoDB's cost does not grow with the table. Back up only the items the
    transaction names, and put them back if it fails (writes are serialized, so nothing else
    changed them meanwhile)."""
    import copy

    from moto.dynamodb import models
    from moto.dynamodb.models.table import Table

    class _TablesUncopied:
        """What moto's transaction sees as `copy`: a table "copy" is the table itself."""

        @staticmethod
        def deepcopy(value: Any, memo: dict[int, Any] | None = None) -> Any:
            return value if isinstance(value, Table) else copy.deepcopy(value, memo)

    models.copy = _TablesUncopied  # type: ignore[assignment]
    transact = models.DynamoDBBackend.transact_write_items

    def restore(table: Table, hash_key: Any, range_key: Any, item: Any) -> None:
        items = table.items[hash_key] if range_key is not None else table.items
        key = range_key if range_key is not None else hash_key
        if item is None:
            items.pop(key, None)
        else:
            items[key] = item

    def transact_write_items(backend: Any, transact_items: list[dict[str, Any]]) -> None:
        backups = []
        for entry in transact_items:
            op: dict[str, Any] = next(iter(entry.values()), {})
            table = backend.tables.get(op.get("TableName"))
            if table is None:
                continue
            keys = op.get("Key") or op.get("Item") or {}
            try:
                hash_key, range_key = backend.get_keys_value(table, keys)
            except Exception:  # a malformed key: moto's own validation reports it
                continue
            backups.append((table, hash_key, range_key, copy.deepcopy(table.get_item(hash_key, range_key))))
        try:
            transact(backend, transact_items)
        except BaseException:
            for backup in reversed(backups):
                restore(*backup)
            raise

    models.DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign,assignment]


def _configure_moto(port: int) -> None:
    """What moto must know before the first resource is created: the docker-less Lambda backend
    (functions created before this would live in the other backend) and the ASL interpreter."""
    config = {"lambda": {"use_docker": False}, "stepfunctions": {"execute_state_machine": True}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/moto-api/config",
        data=json.dumps(config).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _shorten(record: logging.LogRecord) -> bool:
    """moto's ASL interpreter logs a failing state with the repr of its whole program (kilobytes)."""
    message = record.getMessage()
    if len(message) > 500:
        record.msg, record.args = message[:500] + " [...]", None
    return True


def _import_backends() -> None:
    for module in (
        "moto.stepfunctions.parser.models",
        "moto.awslambda_simple.models",
        "moto.dynamodb.models",
        "moto.sqs.models",
        "moto.s3.models",
        "moto.iam.models",
    ):
        importlib.import_module(module)


def main() -> None:
    from moto.server import ThreadedMotoServer

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="cloud %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_shorten)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per AWS call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    # Everything in this process that calls AWS must reach this moto: the handlers' boto3 clients, the
    # pollers, and moto's Step Functions interpreter (whose clients go to localhost:$MOTO_PORT).
    os.environ.update(
        MOTO_PORT=str(port),
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION=REGION,
        AWS_REGION=REGION,
    )
    os.environ.pop("AWS_PROFILE", None)
    _configure_moto(port)
    _serialize_dynamodb_writes()
    _back_up_items_not_tables_in_transactions()
    _forget_dynamodb_items()
    cloud = Cloud()
    cloud.install()
    print(f"READY {port}", flush=True)
    # moto imports a service's backend on its first request; the ASL interpreter alone takes ~2 s.
    # Import them while the parent starts creating resources, not when it waits for the state machine.
    threading.Thread(target=_import_backends, name="import-backends", daemon=True).start()
    # The parent reads only the answers to its commands on stdout: the handlers' logs (Powertools
    # writes to stdout) go to stderr instead, which the parent shares, so they never fill the pipe.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:  # until the parent closes the pipe or dies
        command, _, argument = line.strip().partition(" ")
        if command == "START":
            cloud.start(json.loads(argument or "{}"))
            # What is loaded by now (moto, its backends, the ASL interpreter: ~300,000 objects) lives
            # as long as the process: kept out of the collector's full passes, each of which would
            # otherwise hold up every AWS call of the stack for 0.1-0.3 s.
            gc.collect()
            gc.freeze()
            print("STARTED", file=replies, flush=True)
        elif command:
            log.warning("unknown command %r", command)
    # Nothing here outlives the process (moto keeps its state in memory), so it ends at once: no
    # server.stop() (half a second of werkzeug's poll interval), no waiting for pollers in a long poll
    # or executions in a Retry's sleep, nor for the interpreter's own atexit joins (another second).
    cloud.stop()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
