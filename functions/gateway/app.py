"""The gateway function: one FastAPI app, two ways in.

- `app`: served by uvicorn (run.sh) behind the Lambda Web Adapter: function URL, response streaming.
- `handler`: mangum, for buffered invocations of the same app (an API Gateway or a test event).
"""

from functools import cache
from typing import Any

from precis.api.app import create_app
from precis.settings import Settings
from precis.wiring import build_services

app = create_app(build_services(Settings.from_env()))


@cache
def _buffered() -> Any:
    from mangum import Mangum  # only the buffered path needs it: keep it out of the streaming cold start

    return Mangum(app, lifespan="off")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    response: dict[str, Any] = _buffered()(event, context)
    return response
