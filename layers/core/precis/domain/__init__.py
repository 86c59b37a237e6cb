"""Pure domain: models and stage logic. No boto3, no os.environ, no network."""
