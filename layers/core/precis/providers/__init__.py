"""Model providers behind one port (precis.domain.ports.ModelProvider)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

    from precis.domain.catalog import ModelSpec
    from precis.domain.ports import ModelProvider
    from precis.providers.bedrock import BedrockConfig, ConverseStreamClient
    from precis.providers.openai import OpenAIConfig


class ProviderFactory:
    """Builds the provider for a resolved model. Remote clients are created once, on first use, so a
    gateway that only ever serves `local` never imports boto3's bedrock-runtime or opens a socket."""

    def __init__(self, bedrock: BedrockConfig | None = None, openai: OpenAIConfig | None = None) -> None:
        self._bedrock_config = bedrock
        self._openai_config = openai
        self._bedrock_client: ConverseStreamClient | None = None
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
                self._bedrock_client = bedrock_client(self._bedrock_config or BedrockConfig())
            return BedrockModel(self._bedrock_client, spec.info.provider_model_id)
        from precis.providers.openai import OpenAIConfig, OpenAIModel, openai_client

        config = self._openai_config or OpenAIConfig()
        if self._openai_client is None:
            self._openai_client = openai_client(config)
        return OpenAIModel(self._openai_client, spec.info.provider_model_id)
