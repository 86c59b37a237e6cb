"""Settings, read from the environment once per process (the only module that reads os.environ)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import Field, SecretStr

from precis.domain.breaker import BreakerPolicy
from precis.domain.models import Frozen


class Settings(Frozen):
    keys_table: str = "precis-keys"
    requests_table: str = "precis-requests"
    jobs_table: str = "precis-jobs"
    quotas_table: str = "precis-quotas"
    idempotency_table: str = "precis-idempotency"
    #: The cost ledger: an entry per request and job, and per-user day totals (precis.domain.ledger).
    ledger_table: str = "precis-ledger"
    #: How long ledger entries and day totals are kept.
    ledger_ttl_days: int = Field(default=400, gt=0)
    documents_bucket: str = "precis-documents"
    ingest_queue_url: str = ""
    state_machine_arn: str = ""
    #: Documents above this many tokens sent to POST /v1/summarize become asynchronous jobs.
    async_threshold_tokens: int = Field(default=50_000, gt=0)
    #: Largest document object the asynchronous path reads from S3, in bytes.
    max_document_bytes: int = Field(default=10_000_000, gt=0)
    #: New jobs are refused (429) while this many messages wait in the ingest queue...
    max_queue_backlog: int = Field(default=1_000, gt=0)
    #: ...with a Retry-After from this estimate of how many jobs the pipeline starts a minute.
    queue_drain_per_minute: float = Field(default=60.0, gt=0)
    #: The longest a stream may run; under the Lambda Web Adapter, also no later than the
    #: invocation's deadline (x-amzn-lambda-context) less `deadline_margin_s`, so that `done` is
    #: written and the usage settled before Lambda stops the function.
    stream_deadline_s: float = Field(default=870.0, gt=0)
    deadline_margin_s: float = Field(default=10.0, ge=0)
    #: How often `GET /v1/jobs/{id}/events` reads the job record.
    job_poll_s: float = Field(default=0.5, gt=0)
    default_model: str = "local"
    #: A tiers file to use instead of the bundled precis/data/tiers.json.
    tiers_file: str | None = None
    #: Largest document accepted, in cl100k_base tokens.
    max_input_tokens: int = Field(default=200_000, gt=0)
    #: Largest request body accepted, in bytes (checked before anything is parsed).
    max_body_bytes: int = Field(default=4_000_000, gt=0)
    default_max_output_tokens: int = Field(default=512, gt=0)
    #: Chunk summaries computed at once for one request's map step.
    map_concurrency: int = Field(default=4, gt=0)
    #: How often a stream persists its text so far (when it changed).
    checkpoint_interval_s: float = Field(default=1.0, gt=0)
    #: A request still `in_progress` whose record has not been written for this long is reported
    #: `interrupted` (the instance serving it is gone); a live stream rewrites it at least every third of this.
    interrupted_after_s: float = Field(default=30.0, gt=0)
    #: A model call that sends nothing (no token, no end) for this long fails as transient, so a hung
    #: upstream is retried or ends the stream with `error` and `done` instead of holding it to its deadline.
    model_idle_timeout_s: float = Field(default=60.0, gt=0)
    #: How often this process checks whether any of its streams was asked to cancel.
    cancel_poll_s: float = Field(default=0.25, gt=0)
    #: Seconds of silence after which the stream sends an SSE `: ping` comment.
    ping_interval_s: float = Field(default=10.0, gt=0)
    request_ttl_days: int = Field(default=7, gt=0)
    #: How long a looked-up API key is trusted without asking DynamoDB again.
    key_cache_s: float = Field(default=60.0, ge=0)
    #: A model's circuit opens after this many transient failures in `breaker_window_s`, from at
    #: least `breaker_users` different users, for `breaker_open_s` (precis.domain.breaker).
    breaker_failures: int = Field(default=5, ge=1)
    breaker_users: int = Field(default=2, ge=1)
    breaker_window_s: float = Field(default=30.0, gt=0)
    breaker_open_s: float = Field(default=30.0, gt=0)
    bedrock_region: str | None = None
    bedrock_endpoint_url: str | None = None
    openai_base_url: str = "http://127.0.0.1:11434/v1"
    openai_api_key: str | None = None
    #: An X-Ray segment per gateway request, its stages as subsegments, sent to the daemon at
    #: AWS_XRAY_DAEMON_ADDRESS (precis.api.tracing). template.yaml turns it on; off locally.
    tracing: bool = False
    #: The deployment's key for the pseudonyms users appear as in logs (precis.observability.pseudonym):
    #: template.yaml gives every function the stack's id.
    pseudonym_key: SecretStr = SecretStr("")

    def breaker_policy(self) -> BreakerPolicy:
        return BreakerPolicy(
            failures_to_open=self.breaker_failures,
            users_to_open=self.breaker_users,
            window_s=self.breaker_window_s,
            open_s=self.breaker_open_s,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every field can be set as PRECIS_<FIELD> (upper case)."""
        env = os.environ if env is None else env
        values = {name: env[f"PRECIS_{name.upper()}"] for name in cls.model_fields if f"PRECIS_{name.upper()}" in env}
        return cls.model_validate(values)
