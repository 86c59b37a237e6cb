"""The circuit breaker and the fallback over real HTTP: a model failing for several users is paused
for everyone (fail fast, no call), a tier with a fallback keeps being served, and one probe closes
the circuit again once the model is well. (The e2e stack opens a circuit after 3 failures from 2
users and keeps it open 1.5 s.)"""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from local.stack import LocalStack
from tests.support.waiting import wait_for

HEALTHY = "The council voted to turn the old depot into a library. Work starts next spring, funded by a grant."


def client_for(stack: LocalStack, tier: str) -> httpx.Client:
    user = f"breaker-{tier}-{secrets.token_hex(4)}"
    stack.add_key(f"pk_{user}", user_id=user, tier=tier)
    return httpx.Client(
        base_url=stack.url,
        headers={"authorization": f"Bearer pk_{user}", "accept": "application/json"},
        timeout=30,
    )


def summarize(client: httpx.Client, text: str, model: str) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1/summarize", json={"text": text, "model": model})
    return response.status_code, response.json()


def test_a_model_down_for_several_users_is_paused_served_by_fallback_and_closed_by_a_probe(stack: LocalStack) -> None:
    outage = f"OUTAGE{secrets.token_hex(4)}"
    model = f"local?fail_if={outage}"  # fails transiently for documents that mention the outage
    broken = f"{HEALTHY} {outage}."
    alice, bob, carol, dave = (client_for(stack, tier) for tier in ("pro", "pro", "pro", "with-fallback"))

    status, body = summarize(alice, broken, model)
    assert status == 503 and body["error"]["code"] == "model_unavailable"
    status, body = summarize(alice, HEALTHY, model)
    assert status == 200 and body["finish_reason"] == "stop", "one user's failures do not open the circuit"

    status, _ = summarize(bob, broken, model)
    assert status == 503  # the second user's failures open it

    # Open: even a document the model would summarize fails fast, without calling it.
    status, body = summarize(carol, HEALTHY, model)
    assert status == 503 and body["error"]["code"] == "model_unavailable" and body["error"]["retryable"]
    assert "paused" in body["error"]["message"] and body["usage"] == {"input_tokens": 0, "output_tokens": 0}
    # A tier with a fallback is served by it, also for the document the primary fails on.
    status, body = summarize(dave, broken, model)
    assert status == 200 and body["finish_reason"] == "stop" and body["model"] == "local?token_ms=1"
    assert body["summary"] and "error" not in body

    # After the open period one probe goes through; it succeeds and closes the circuit for all.
    def probe_passes() -> bool:
        status, body = summarize(carol, HEALTHY, model)
        return status == 200 and body["model"] == model

    wait_for(probe_passes, timeout=10, interval=0.5)
    status, body = summarize(bob, HEALTHY, model)
    assert status == 200 and body["model"] == model
