"""The local stack and the CLI; never packaged into Lambda (moto stays out of the deploy)."""
