"""Fairness over real HTTP (issue 4): a user flooding the gateway far past their tier is throttled
with cheap 429s, and the other users' time to first token does not notice.

Ten users on a local stack with model `local?ttft_ms=300&token_ms=10`: nine well-behaved ones (tier
`pro`) each send one request a second, in turn; the tenth (tier `ten-a-minute`) sends ten a second
for 20 s. The nine's time to first token is measured alone (10 s before the flood and 10 s after it,
pooled) and during the flood. The scenario is bench/fairness.py's (`python -m bench admission`
prints it); its stack is a fresh one in processes of its own, not the session's: the comparison must
not depend on what the other tests left in moto's tables or on sharing a GIL with the load.
"""

from __future__ import annotations

import asyncio

from bench import fairness

#: The others' p99 time to first token during the flood may be at most this times their p99 alone.
BOUND = 1.2
#: How a stream that ran its course ends (the summary whole, or cut at its output budget).
SERVED = ("stop", "length")


def test_a_flooding_user_is_throttled_and_the_others_time_to_first_token_holds() -> None:
    with fairness.ScenarioStack() as stack:
        result = asyncio.run(fairness.scenario(stack.url, stack.steady_keys, stack.flooder_key))
    alone, flood = result.alone, result.flood

    # The others were all served, in their steady pattern (a slot is skipped only when the previous
    # request ran past it), alone and during the flood.
    for phase in (alone, flood):
        unserved = [(s.status, s.error, s.finish_reason) for s in phase.steady if s.finish_reason not in SERVED]
        assert not unserved, unserved
        slots = fairness.STEADY_USERS * phase.seconds / fairness.PERIOD_S
        assert len(phase.steady_ttft()) >= 0.75 * slots, (len(phase.steady), slots)

    # The flooder was throttled: at most its tier's requests in each minute the flood touched, the
    # rest refused with a 429 that says which limit and when to come back.
    sent = round(fairness.FLOOD_RATE * fairness.FLOOD_S)
    admitted, refused = flood.admitted(), flood.refused()
    assert len(flood.flooder) == sent and len(admitted) + len(refused) == sent, [s.status for s in flood.flooder]
    assert 1 <= len(admitted) <= 2 * fairness.FLOODER_RPM, len(admitted)
    for response in refused:
        error = response.error
        assert error["code"] == "rate_limited" and error["retryable"] is True, error
        assert error["limit"] == "requests_per_minute", error
        assert response.retry_after is not None and 1 <= int(response.retry_after) <= 60, response.retry_after

    alone_p99 = fairness.percentile(alone.steady_ttft(), 99)
    flood_p99 = fairness.percentile(flood.steady_ttft(), 99)
    report = (
        f"the others' TTFT p50/p99: alone {fairness.percentile(alone.steady_ttft(), 50) * 1000:.0f}/"
        f"{alone_p99 * 1000:.0f} ms ({len(alone.steady)} requests), during the flood "
        f"{fairness.percentile(flood.steady_ttft(), 50) * 1000:.0f}/{flood_p99 * 1000:.0f} ms "
        f"({len(flood.steady)} requests): p99 {flood_p99 / alone_p99:.2f}x; the flooder: {len(admitted)} "
        f"admitted, {len(refused)} refused (429 in {fairness.percentile([s.total_s for s in refused], 50) * 1000:.0f} "
        f"ms p50); slowest first tokens during the flood: {flood.slowest()}"
    )
    print(report)
    assert flood_p99 <= BOUND * alone_p99, report
