"""Model providers behind one port (precis.domain.ports.ModelProvider)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from precis.settings import Settings

if TYPE_CHECKING:
    import httpx
    from mypy_boto3_bedrock_runtime import BedrockRuntimeClient

    from precis.domain.catalog import ModelSpec
    from precis.domain.ports import ModelProvider


class ProviderFactory:
    """Builds the provider for a resolved model. Remote providers are imported and their clients
    created on first use, so a gateway that only serves `local` pays for neither at cold start."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._bedrock_client: BedrockRuntimeClient | None = None
        self._openai_client: httpx.AsyncClient | None = None

    def validate(self, spec: ModelSpec) -> None:
        """Raise `InvalidInputError` now, before anything is stored, if the options are wrong."""
        self.build(spec)

    def build(self, spec: ModelSpec) -> ModelProvider:
        from precis.domain.errors import InvalidInputError

        if spec.info.provider == "local":
            from precis.providers.local import LocalModel

            return LocalModel.from_options(spec.options)
        if spec.options:
            raise InvalidInputError(f"model {spec.info.id!r} takes no options")
        if spec.info.provider == "bedrock":
            from precis.providers.bedrock import BedrockConfig, BedrockModel, bedrock_client

            if self._bedrock_client is None:
                config = BedrockConfig(
                    region=self.settings.bedrock_region, endpoint_url=self.settings.bedrock_endpoint_url
                )
                self._bedrock_client = bedrock_client(config)
            return BedrockModel(self._bedrock_client, spec.info.provider_model_id)
        from precis.providers.openai import OpenAIConfig, OpenAIModel, openai_client

        if self._openai_client is None:
            self._openai_client = openai_client(
                OpenAIConfig(base_url=self.settings.openai_base_url, api_key=self.settings.openai_api_key)
            )
        return OpenAIModel(self._openai_client, spec.info.provider_model_id)
