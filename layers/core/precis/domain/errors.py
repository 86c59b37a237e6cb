"""Typed errors.

Lambda reports an exception's class name as the Step Functions error, so these class names are
what a state machine's Retry and Catch match: rename them only together with statemachine/.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from precis.domain.models import Usage


class PrecisError(Exception):
    """Base of every error precis raises on purpose. `code` is the stable, machine-readable name."""

    code = "internal_error"
    status = 500
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# Input -------------------------------------------------------------------------------------------


class InvalidInputError(PrecisError):
    code = "invalid_input"
    status = 422


class InputTooLargeError(PrecisError):
    code = "input_too_large"
    status = 413


class UnknownModelError(InvalidInputError):
    code = "unknown_model"


# Identity and ownership -------------------------------------------------------------------------


class UnauthenticatedError(PrecisError):
    code = "unauthenticated"
    status = 401


class NotFoundError(PrecisError):
    """Unknown id, or an id that belongs to someone else: the two are indistinguishable on purpose."""

    code = "not_found"
    status = 404


class ConflictError(PrecisError):
    code = "conflict"
    status = 409
    retryable = True


class NotResumableError(ConflictError):
    """`resume_from` names a request that has nothing to continue: it finished complete (or predates
    resumable records). Retrying cannot help."""

    code = "not_resumable"
    retryable = False


# Model ------------------------------------------------------------------------------------------


class ModelError(PrecisError):
    """The model call failed. `usage` is what the provider had consumed when it failed, if known;
    `retry_after_s`, when the upstream said how long to wait before trying again."""

    status = 502

    def __init__(self, message: str, *, usage: Usage | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.usage = usage
        self.retry_after_s = retry_after_s


class TransientModelError(ModelError):
    """Worth retrying: throttling, timeouts, 5xx, a dropped stream."""

    code = "model_unavailable"
    status = 503
    retryable = True


class ModelThrottledError(TransientModelError):
    code = "model_throttled"


class CircuitOpenError(TransientModelError):
    """The model failed for several users lately: calls to it fail fast, without reaching it, until a
    probe finds it well again (precis.domain.breaker)."""


class PermanentModelError(ModelError):
    """Retrying the same call cannot help: validation, access denied, unknown model id upstream."""

    code = "model_error"


# Storage ----------------------------------------------------------------------------------------


class TransientStorageError(PrecisError):
    """S3 or DynamoDB throttled or failed on their side: worth retrying."""

    code = "storage_unavailable"
    status = 503
    retryable = True


class InvalidDocumentError(InvalidInputError):
    """The document itself cannot be summarized: empty, not UTF-8 text, too large."""

    code = "invalid_document"


# Admission --------------------------------------------------------------------------------------


class RateLimitedError(PrecisError):
    """Over one of the caller's tier limits. `limit` names which; retrying after `retry_after_s`
    seconds is when that limit can admit the request again."""

    code = "rate_limited"
    status = 429
    retryable = True

    def __init__(self, message: str, *, limit: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = max(1, retry_after_s)
