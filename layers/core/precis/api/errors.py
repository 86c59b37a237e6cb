"""Errors become responses here and nowhere else: `{"error": {code, message, retryable}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from precis.domain.errors import PrecisError, RateLimitedError
from precis.observability import logger, throttled


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    details: Any = None,
    retry_after_s: int = 1,
    **extra: Any,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message, "retryable": retryable, **extra}
    if details is not None:
        error["details"] = details
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    if retryable and status in (409, 429, 503):
        headers = {"retry-after": str(retry_after_s)}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(PrecisError)
    async def precis_error(_: Request, exc: PrecisError) -> JSONResponse:
        if isinstance(exc, RateLimitedError):
            throttled(exc.limit)  # every 429 of admission, by the limit that refused it
            return error_response(
                exc.status, exc.code, exc.message, retryable=True, retry_after_s=exc.retry_after_s, limit=exc.limit
            )
        return error_response(exc.status, exc.code, exc.message, retryable=exc.retryable)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return error_response(422, "invalid_input", "the request is not valid", details=details)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error", retryable=True)
