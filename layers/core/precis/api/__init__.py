"""The HTTP API: one FastAPI app, served by uvicorn locally and by the Lambda Web Adapter on AWS."""
