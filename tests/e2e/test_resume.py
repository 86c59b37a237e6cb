"""`resume_from` over real HTTP: a partial summary continued where it stopped, charged only for the
new tokens, and refused (without storing anything) when there is nothing to continue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from precis.domain.models import Style
from precis.domain.prompts import continuation_prompt, prompt_tokens, summary_prompt
from tests.e2e.test_streaming import SAMPLE, start_stream, stream
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
#: Three chunks for the local model (8k window), under the e2e async threshold (20k tokens), and no
#: blank line: only the final prompt (the chunk summaries joined by blank lines) contains "\n\n", so
#: `fail_if=%0A%0A` fails the final call and nothing else.
LONG = " ".join((ROOT / "tests" / "data" / "python-language-reference.txt").read_text().split())[:80_000]
FAIL_IN_FINAL_CALL = "local?fail_if=%0A%0A&fail_after=5"


def partial(client: httpx.Client, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Run `body` (whose model fails mid-stream) to its partial end: its request id and `done`."""
    got = stream(client, body)
    done = got.of("done")[0]
    assert got.names[-2:] == ["error", "done"] and done["partial"] is True
    return got.of("meta")[0]["request_id"], done


def test_resume_streams_only_the_new_tokens_and_completes_the_uninterrupted_summary(client: httpx.Client) -> None:
    whole = stream(client, {"text": SAMPLE}).of("done")[0]
    original, cut = partial(client, {"text": SAMPLE, "model": "local?fail_after=7"})
    assert cut["usage"]["output_tokens"] == 7

    got = stream(client, {"text": SAMPLE, "resume_from": original, "model": "local"})
    assert got.status == 200 and got.names[0] == "meta" and got.names[-1] == "done"
    meta, done = got.of("meta")[0], got.of("done")[0]
    assert meta["resumed_from"] == original and meta["request_id"] != original
    assert got.headers["x-request-id"] == meta["request_id"]
    assert [t["index"] for t in got.of("token")] == list(range(len(got.of("token"))))
    assert cut["summary"] + got.text == whole["summary"], "only the rest is streamed, nothing repeated"
    assert done["summary"] == whole["summary"] and done["finish_reason"] == "stop" and done["partial"] is False
    assert done["usage"]["output_tokens"] == len(got.of("token")) < whole["usage"]["output_tokens"]
    final = continuation_prompt(summary_prompt(SAMPLE, Style.PARAGRAPH, 512), cut["summary"])
    assert done["usage"]["input_tokens"] == prompt_tokens(final), "charged for the continuation call alone"

    record = client.get(f"/v1/requests/{meta['request_id']}").json()
    assert record["resumed_from"] == original and record["status"] == "completed"
    assert record["text"] == whole["summary"] and record["usage"] == done["usage"]
    assert "document_sha256" not in record and "final_inputs" not in record
    assert client.get(f"/v1/requests/{original}").json()["text"] == cut["summary"], "the original is left as it was"


def test_resume_of_a_multi_chunk_request_goes_straight_to_the_final_call(client: httpx.Client) -> None:
    whole = stream(client, {"text": LONG})
    assert whole.of("meta")[0]["chunks"] >= 3
    original, cut = partial(client, {"text": LONG, "model": FAIL_IN_FINAL_CALL})
    assert cut["usage"]["output_tokens"] > 5, "the map step finished (its outputs) before the final call failed"

    got = stream(client, {"text": LONG, "resume_from": original})
    done = got.of("done")[0]
    assert "progress" not in got.names and "map" not in done["latency_ms"], "the map step did not run again"
    assert done["summary"] == whole.of("done")[0]["summary"]
    assert done["usage"]["output_tokens"] == len(got.of("token"))
    assert done["usage"]["input_tokens"] < cut["usage"]["input_tokens"] / 5, "one final call, not every chunk again"


def test_resume_is_refused_when_the_text_differs_the_request_runs_or_it_is_complete(
    client: httpx.Client, requests_table: Any
) -> None:
    original, _ = partial(client, {"text": SAMPLE, "model": "local?fail_after=3"})
    finished = stream(client, {"text": SAMPLE, "style": "tldr"}).of("meta")[0]["request_id"]
    running, seen = start_stream(client, {"text": SAMPLE, "model": "local?ttft_ms=1500"})
    assert seen["meta"].wait(10)
    before = requests_table.scan(Select="COUNT")["Count"]

    other_text = client.post("/v1/summarize", json={"text": SAMPLE + " One more line.", "resume_from": original})
    assert other_text.status_code == 422 and other_text.json()["error"]["code"] == "invalid_input"
    assert "not the document" in other_text.json()["error"]["message"]

    other_style = client.post("/v1/summarize", json={"text": SAMPLE, "resume_from": original, "style": "bullets"})
    assert other_style.status_code == 422 and "style" in other_style.json()["error"]["message"]

    in_progress = client.post(
        "/v1/summarize", json={"text": SAMPLE, "resume_from": running.of("meta")[0]["request_id"]}
    )
    assert in_progress.status_code == 409 and in_progress.headers["retry-after"]
    assert in_progress.json()["error"] == {
        "code": "conflict",
        "message": in_progress.json()["error"]["message"],
        "retryable": True,
    }

    complete = client.post("/v1/summarize", json={"text": SAMPLE, "resume_from": finished})
    assert complete.status_code == 409 and "retry-after" not in complete.headers
    assert complete.json()["error"]["code"] == "not_resumable" and complete.json()["error"]["retryable"] is False

    assert requests_table.scan(Select="COUNT")["Count"] == before, "a refused resume stores nothing"
    assert seen["closed"].wait(10) and running.names[-1] == "done"


def test_another_users_request_cannot_be_resumed_and_looks_unknown(client: httpx.Client, other_user: str) -> None:
    original, _ = partial(client, {"text": SAMPLE, "model": "local?fail_after=3"})
    as_other = {"authorization": f"Bearer {other_user}"}
    theirs = client.post("/v1/summarize", json={"text": SAMPLE, "resume_from": original}, headers=as_other)
    unknown = client.post("/v1/summarize", json={"text": SAMPLE, "resume_from": "req_" + "0" * 32})
    malformed = client.post("/v1/summarize", json={"text": SAMPLE, "resume_from": "req_../../x"})
    for refused in (theirs, unknown, malformed):
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "not_found"
    unknown_id = "req_" + "0" * 32
    assert theirs.json()["error"]["message"].replace(original, unknown_id) == unknown.json()["error"]["message"]
    wait_for(lambda: client.get("/healthz").json()["streams_in_flight"] == 0)
