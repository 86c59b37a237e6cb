"""Build the gateway's services from settings: the one place adapters are chosen and connected."""

from __future__ import annotations

from typing import Any

from precis.adapters.breakers import BreakerTable
from precis.adapters.dynamodb import KeyStore, RequestStore
from precis.adapters.jobs import JobStore
from precis.adapters.ledger import LedgerStore
from precis.adapters.quotas import QuotaStore
from precis.adapters.s3 import DocumentStore
from precis.adapters.stepfunctions import Executions
from precis.api.app import Services
from precis.domain.breaker import CircuitBreaker
from precis.domain.cancellation import CancelWatch
from precis.domain.pipeline import JobIntake, JobPipeline
from precis.domain.summarize import Summarizer
from precis.domain.tiers import Tiers
from precis.observability import JobMetrics, RequestTelemetry, use_pseudonym_key
from precis.providers import ProviderFactory
from precis.settings import Settings


def dynamodb_resource() -> Any:
    """boto3 reads AWS_ENDPOINT_URL itself, which is how the local stack points it at moto. The
    connection pool is sized for many concurrent streams (botocore's default of 10 would open and
    drop a TCP connection for every call beyond it)."""
    import boto3
    from botocore.config import Config

    return boto3.resource("dynamodb", config=Config(max_pool_connections=64, retries={"mode": "standard"}))


def build_services(settings: Settings, dynamodb: Any | None = None) -> Services:
    use_pseudonym_key(settings.pseudonym_key.get_secret_value())
    dynamodb = dynamodb if dynamodb is not None else dynamodb_resource()
    ledger = LedgerStore(dynamodb.Table(settings.ledger_table), ttl_days=settings.ledger_ttl_days)
    requests = RequestStore(
        dynamodb.Table(settings.requests_table),
        ttl_days=settings.request_ttl_days,
        interrupted_after_s=settings.interrupted_after_s,
        ledger=ledger,
    )
    quotas = QuotaStore(dynamodb.Table(settings.quotas_table))
    breaker = CircuitBreaker(BreakerTable(dynamodb.Table(settings.quotas_table)), settings.breaker_policy())
    providers = ProviderFactory(settings)
    return Services(
        settings=settings,
        keys=KeyStore(dynamodb.Table(settings.keys_table)),
        requests=requests,
        quotas=quotas,
        tiers=Tiers.load(settings.tiers_file),
        ledger=ledger,
        providers=providers,
        summarizer=Summarizer(
            providers,
            requests,
            RequestTelemetry(),
            CancelWatch(requests, interval_s=settings.cancel_poll_s),
            admission=quotas,
            breaker=breaker,
            map_concurrency=settings.map_concurrency,
            checkpoint_interval_s=settings.checkpoint_interval_s,
            # Three beats per staleness period: one lost or slow write does not make a live stream look dead.
            heartbeat_interval_s=settings.interrupted_after_s / 3,
            model_idle_timeout_s=settings.model_idle_timeout_s,
        ),
    )


def build_pipeline(settings: Settings) -> JobPipeline:
    """The asynchronous path's stages, wired to S3, DynamoDB and the model providers."""
    import boto3

    use_pseudonym_key(settings.pseudonym_key.get_secret_value())

    dynamodb = dynamodb_resource()
    quotas_table = dynamodb.Table(settings.quotas_table)
    return JobPipeline(
        JobStore(dynamodb.Table(settings.jobs_table)),
        DocumentStore(boto3.client("s3"), settings.documents_bucket),
        ProviderFactory(settings),
        max_input_tokens=settings.max_input_tokens,
        max_document_bytes=settings.max_document_bytes,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        admission=QuotaStore(quotas_table),
        model_idle_timeout_s=settings.model_idle_timeout_s,
        breaker=CircuitBreaker(BreakerTable(quotas_table), settings.breaker_policy()),
        telemetry=JobMetrics(),
        ledger=LedgerStore(dynamodb.Table(settings.ledger_table), ttl_days=settings.ledger_ttl_days),
    )


def build_intake(settings: Settings) -> JobIntake:
    import boto3

    use_pseudonym_key(settings.pseudonym_key.get_secret_value())

    return JobIntake(
        JobStore(dynamodb_resource().Table(settings.jobs_table)),
        Executions(boto3.client("stepfunctions"), settings.state_machine_arn),
        bucket=settings.documents_bucket,
        default_model=settings.default_model,
        default_max_output_tokens=settings.default_max_output_tokens,
        max_document_bytes=settings.max_document_bytes,
        telemetry=JobMetrics(),
    )
