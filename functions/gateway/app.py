"""The gateway function: one FastAPI app, two ways in.

- `app`: served by uvicorn (run.sh) behind the Lambda Web Adapter: function URL, response streaming.
- `handler`: mangum, for buffered invocations of the same app (an API Gateway or a test event).
"""

from mangum import Mangum

from precis.api.app import create_app
from precis.settings import Settings
from precis.wiring import build_services

app = create_app(build_services(Settings.from_env()))
handler = Mangum(app, lifespan="off")
