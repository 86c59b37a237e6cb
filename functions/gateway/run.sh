#!/bin/bash
# Started by the Lambda Web Adapter (Handler: run.sh, AWS_LAMBDA_EXEC_WRAPPER=/opt/bootstrap).
# The adapter waits until GET /healthz answers, then forwards every invocation to this server as
# HTTP and streams the response body back through the function URL (AWS_LWA_INVOKE_MODE=response_stream).
#
# - PYTHONPATH: /opt/python is the core layer (precis and its dependencies); $LAMBDA_TASK_ROOT holds app.py.
# - Port: the adapter sends traffic to AWS_LWA_PORT (falling back to PORT, then 8080); listen on the same.
#   The sandbox takes no inbound traffic, so 0.0.0.0 exposes nothing beyond the adapter on 127.0.0.1.
# - --no-access-log: Powertools Logger already writes one structured line per request; uvicorn's
#   access lines would be unstructured duplicates billed by CloudWatch.
# - --timeout-keep-alive 60: the adapter reuses its connection to uvicorn and drops it after 4 s idle
#   (AWS_LWA_POOL_IDLE_TIMEOUT_SECONDS). uvicorn's own default, 5 s, is barely above that; if uvicorn
#   closed first, the adapter could write a request into a socket that is being closed. The adapter
#   checks its limit when it next takes a connection, so while uvicorn's limit is the longer one the
#   adapter always gives a connection up first, also after the sandbox was frozen between invocations.
set -euo pipefail

export PYTHONPATH="${LAMBDA_TASK_ROOT:-.}:/opt/python${PYTHONPATH:+:$PYTHONPATH}"

exec python -m uvicorn app:app \
    --host 0.0.0.0 \
    --port "${AWS_LWA_PORT:-${PORT:-8080}}" \
    --no-access-log \
    --timeout-keep-alive 60
