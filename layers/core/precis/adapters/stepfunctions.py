"""Step Functions adapter: executions of the summarize state machine, named by their job id."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from precis.domain.errors import TransientStorageError


class Executions:
    def __init__(self, client: Any, state_machine_arn: str) -> None:
        self.client = client
        self.state_machine_arn = state_machine_arn

    def start(self, name: str, payload: dict[str, Any]) -> str:
        """Start the execution `name`, or return the one that already has that name: Standard
        workflows run a name once, which is what makes a duplicate drop start nothing."""
        try:
            response = self.client.start_execution(
                stateMachineArn=self.state_machine_arn, name=name, input=json.dumps(payload)
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "ExecutionAlreadyExists":
                machine = self.state_machine_arn.split(":stateMachine:", 1)
                return f"{machine[0]}:execution:{machine[1]}:{name}"
            if code in ("ThrottlingException", "ServiceUnavailable", "InternalServerError"):
                raise TransientStorageError(f"Step Functions is unavailable: {code}") from exc
            raise
        arn: str = response["executionArn"]
        return arn

    def stop(self, execution_arn: str, cause: str) -> None:
        try:
            self.client.stop_execution(executionArn=execution_arn, error="JobCancelled", cause=cause)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ExecutionDoesNotExist":
                raise
