"""Batches on POST /check (``{"checks": [...]}``), on MemoryBackend and a real Redis: all taken, or none.

A batch is decided in one backend call, so one denying check leaves every other check's count as it
was, even under concurrent batches; a bad check refuses the whole batch, naming its index, and
counts nothing.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_service import (
    FW,
    GC,
    PROBLEM,
    SW,
    SWC,
    TB,
    Failing,
    Store,
    check_bodies,
    counted,
    post,
    store,
)

from asgi_ratelimit import MemoryBackend
from asgi_ratelimit.service import MAX_BATCH, MAX_SLIDING_WINDOW_LIMIT, create_app

__all__ = ["store"]  # the fixture, imported for this module's tests

A = {"key": "batch:a", "algorithm": "fixed_window", "limit": 3, "window": 60}
B = {"key": "batch:b", "algorithm": "token_bucket", "capacity": 10, "refill_rate": 1}
C = {"key": "batch:c", "algorithm": "gcra", "limit": 10, "period": 1, "burst": 5}


def remaining(response: httpx.Response) -> list[int]:
    return [result["remaining"] for result in response.json()["results"]]


async def test_a_batch_decides_every_check_in_order(store: Store) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    response = await post(app, {"checks": [A, B, {**C, "cost": 2}]})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"allowed", "results"}
    assert body["allowed"] is True
    assert [r["allowed"] for r in body["results"]] == [True, True, True]
    assert [r["limit"] for r in body["results"]] == [3, 10, 5]
    assert remaining(response) == [2, 9, 3]
    # A batch's checks may be on several keys: no one RateLimit header describes them.
    assert "ratelimit" not in response.headers
    assert "ratelimit-policy" not in response.headers
    # Each check was taken: the same checks alone see the batch's hits.
    assert (await post(app, A)).json()["remaining"] == 1
    assert (await post(app, B)).json()["remaining"] == 8
    assert counted(registry, "service:fixed_window", "allowed") == 2
    assert counted(registry, "service:gcra", "allowed") == 1


async def test_one_denying_check_takes_nothing_from_the_others(store: Store) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    assert (await post(app, {**A, "cost": 3})).json()["remaining"] == 0  # A is spent
    response = await post(app, {"checks": [B, A, C]})
    assert response.status_code == 200
    body = response.json()
    assert body["allowed"] is False
    # Each result is that check's own verdict: the caller sees which one denied.
    assert [r["allowed"] for r in body["results"]] == [True, False, True]
    assert body["results"][1]["retry_after"] > 0
    # ... and the state before the batch, since nothing was taken.
    assert remaining(response) == [10, 0, 5]
    assert (await post(app, B)).json()["remaining"] == 9
    assert (await post(app, C)).json()["remaining"] == 4
    assert counted(registry, "service:fixed_window", "denied") == 1


async def test_a_never_check_denies_the_batch_without_a_wait(store: Store) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    response = await post(app, {"checks": [B, {**A, "cost": 4}]})
    raw = response.text
    body = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in {raw}"))
    assert body["allowed"] is False
    assert body["results"][1]["never"] is True
    assert body["results"][1]["retry_after"] is None
    assert (await post(app, B)).json()["remaining"] == 9


async def test_concurrent_batches_are_all_or_nothing(store: Store) -> None:
    # Key "scarce" allows 10; key "plenty" allows 1000.  Of 40 concurrent batches taking one from
    # each, exactly 10 pass, and "plenty" lost exactly those 10: a denied batch took nothing from it.
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=5.0)
    scarce = {"key": "scarce", "algorithm": "fixed_window", "limit": 10, "window": 60}
    plenty = {"key": "plenty", "algorithm": "sliding_window_counter", "limit": 1000, "window": 60}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        responses = await asyncio.gather(*(client.post("/check", json={"checks": [plenty, scarce]}) for _ in range(40)))
    assert [r.status_code for r in responses] == [200] * 40
    assert sum(r.json()["allowed"] for r in responses) == 10
    after = await post(app, plenty)
    assert after.json()["remaining"] == 1000 - 10 - 1


async def test_a_batch_of_the_largest_size_is_decided(store: Store) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=5.0)
    checks = [{**SWC, "key": f"many:{index}"} for index in range(MAX_BATCH)]
    response = await post(app, {"checks": checks})
    assert response.status_code == 200, response.text
    assert response.json()["allowed"] is True
    assert len(response.json()["results"]) == MAX_BATCH
    assert await store.keys() == MAX_BATCH


def bad_batch(case_id: str, checks: Any, field: str, index: int | None, extra: dict[str, Any] | None = None) -> Any:
    return pytest.param({"checks": checks, **(extra or {})}, field, index, id=case_id)


BAD_BATCHES = [
    bad_batch("empty", [], "checks", None),
    bad_batch("too-many", [{**FW, "key": f"k{i}"} for i in range(MAX_BATCH + 1)], "checks", None),
    bad_batch("not-an-array", FW, "checks", None),
    bad_batch("null", None, "checks", None),
    bad_batch("another-field", [FW], "key", None, extra={"key": "user:1"}),
    bad_batch("first-check-bad", [{**FW, "limit": 0}, SW], "checks[0].limit", 0),
    bad_batch("third-check-bad", [FW, SW, {**GC, "period": "1"}], "checks[2].period", 2),
    bad_batch("last-check-unknown-field", [FW, {**TB, "window": 1}], "checks[1].window", 1),
    bad_batch("check-not-an-object", [FW, [SW]], "checks[1]", 1),
    bad_batch("check-missing-key", [FW, {k: v for k, v in SW.items() if k != "key"}], "checks[1].key", 1),
    bad_batch("nested-batch", [{"checks": [FW]}], "checks[0].algorithm", 0),
    bad_batch("same-key-and-policy-twice", [FW, SW, FW], "checks[2]", 2),
    # A GCRA without a burst has the burst of its limit: the two are one state.
    bad_batch("same-state-twice", [{**GC, "burst": 10}, {k: v for k, v in GC.items() if k != "burst"}], "checks[1]", 1),
    bad_batch(
        "sliding-window-costs-past-the-cap",
        [
            {**SW, "key": f"log:{i}", "limit": MAX_SLIDING_WINDOW_LIMIT, "cost": MAX_SLIDING_WINDOW_LIMIT}
            for i in range(2)
        ],
        "checks[1].cost",
        1,
    ),
]


@pytest.mark.parametrize(("body", "field", "index"), BAD_BATCHES)
async def test_a_bad_batch_is_refused_naming_the_check_and_counts_nothing(
    store: Store, body: dict[str, Any], field: str, index: int | None
) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    response = await post(app, body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["field"] == field
    if index is None:
        assert "index" not in problem
    else:
        assert problem["index"] == index
        assert problem["detail"].startswith(f"checks[{index}]: ")
    assert len(problem["detail"]) < 400
    assert await store.keys() == 0
    samples = [s for m in registry.collect() if m.name == "asgi_ratelimit_decisions" for s in m.samples]
    assert all(s.value == 0 for s in samples if s.name.endswith("_total"))


async def test_same_key_under_different_policies_is_one_batch(store: Store) -> None:
    # Two policies of one key (a burst limit and a daily one) are the usual reason to batch.
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    burst = {"key": "user:9", "algorithm": "fixed_window", "limit": 2, "window": 1}
    daily = {"key": "user:9", "algorithm": "fixed_window", "limit": 1000, "window": 86400}
    assert (await post(app, {"checks": [burst, daily]})).json()["allowed"] is True


async def test_a_failing_backend_fails_the_whole_batch_closed() -> None:
    registry = CollectorRegistry()
    app = create_app(Failing(), registry=registry)
    response = await post(app, {"checks": [SW, FW, {**SW, "key": "other"}]})
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert counted(registry, "service:sliding_window", "failed_closed") == 2
    assert counted(registry, "service:fixed_window", "failed_closed") == 1


@given(checks=st.lists(check_bodies, max_size=4), extra=st.sampled_from([{}, {"cost": 1}]))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_random_batches_never_get_a_5xx(checks: list[Any], extra: dict[str, Any]) -> None:
    backend = MemoryBackend()
    app = create_app(backend, registry=CollectorRegistry())
    response = await post(app, raw=json.dumps({"checks": checks, **extra}).encode())
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        body = response.json()
        assert len(body["results"]) == len(checks)
        assert body["allowed"] == all(result["allowed"] for result in body["results"])
    else:
        assert response.headers["content-type"] == PROBLEM
        assert len(backend) == 0
