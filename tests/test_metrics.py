"""Metrics: names, labels and values through the middleware; one registry shared safely; the exposition validates."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_ratelimit import Backend, BackendError, MemoryBackend, RateLimitMiddleware, Rule
from asgi_ratelimit._metrics import ERROR_KINDS, LATENCY_BUCKETS, LatencyHistogram


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def by_user(request: object) -> str | None:
    return request.headers.get("x-user")  # type: ignore[attr-defined, no-any-return]


class Broken(MemoryBackend):
    # Decided through its own async methods, as a network backend is: the Limiter awaits them.
    in_process = False
    submit = Backend.submit

    async def hit_many(self, hits: object) -> list[object]:  # type: ignore[override]
        raise BackendError("down")


class AwaitedMemory(MemoryBackend):
    """A subclass: the limiter awaits its hit_many() as it would a network backend's."""

    # Decided through its own async methods, as a network backend is: the Limiter awaits them.
    in_process = False
    submit = Backend.submit


def make(registry: CollectorRegistry, **kwargs: object) -> RateLimitMiddleware:
    app = Starlette(routes=[Route("/a", ok), Route("/b", ok)])
    rules = kwargs.pop("rules", [Rule("/a", "2/minute", key=by_user, name="a")])
    return RateLimitMiddleware(app, rules=rules, registry=registry, **kwargs)  # type: ignore[arg-type]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def get(app: RateLimitMiddleware, path: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(path, headers=headers)


class TestDecisions:
    async def test_allowed_and_denied_by_rule(self) -> None:
        registry = CollectorRegistry()
        app = make(registry)
        for _ in range(3):
            await get(app, "/a", **{"x-user": "203.0.113.9"})
        assert value(registry, "asgi_ratelimit_decisions_total", rule="a", result="allowed") == 2
        assert value(registry, "asgi_ratelimit_decisions_total", rule="a", result="denied") == 1
        # MemoryBackend decides in process, with no I/O to watch: its decisions are not timed.
        assert value(registry, "asgi_ratelimit_backend_latency_seconds_count") == 0
        # No identity ever becomes a label.
        assert "203.0.113.9" not in exposition(registry)

    async def test_dry_run_denials(self) -> None:
        registry = CollectorRegistry()
        app = make(registry, dry_run=True)
        for _ in range(3):
            assert (await get(app, "/a", **{"x-user": "u"})).status_code == 200
        assert value(registry, "asgi_ratelimit_decisions_total", rule="a", result="dry_run_denied") == 1

    @pytest.mark.parametrize(
        ("fail_open", "result", "status"), [(True, "failed_open", 200), (False, "failed_closed", 503)]
    )
    async def test_failures(self, fail_open: bool, result: str, status: int) -> None:
        registry = CollectorRegistry()
        app = make(registry, backend=Broken(), fail_open=fail_open)
        response = await get(app, "/a", **{"x-user": "u"})
        assert response.status_code == status
        assert "ratelimit" not in response.headers
        assert value(registry, "asgi_ratelimit_decisions_total", rule="a", result=result) == 1
        assert value(registry, "asgi_ratelimit_backend_errors_total", kind="other") == 1

    async def test_every_request_is_counted_once(self) -> None:
        registry = CollectorRegistry()
        # A backend reached through the awaited path (any but MemoryBackend itself) is timed on every call.
        app = make(registry, rules=[Rule("/a", "100/minute", key=by_user, name="a")], backend=AwaitedMemory())
        for _ in range(6):
            await get(app, "/a", **{"x-user": "u"})
        assert value(registry, "asgi_ratelimit_decisions_total", rule="a", result="allowed") == 6
        assert value(registry, "asgi_ratelimit_backend_latency_seconds_count") == 6

    @given(st.lists(st.floats(min_value=0, max_value=5, allow_nan=False) | st.sampled_from(LATENCY_BUCKETS)))
    def test_the_latency_histogram_exports_what_prometheus_clients_own_would(self, seconds: list[float]) -> None:
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        histogram = LatencyHistogram()
        ours.register(histogram)
        reference = Histogram(LatencyHistogram.NAME, LatencyHistogram.DOC, buckets=LATENCY_BUCKETS, registry=theirs)
        for value_ in seconds:
            histogram.observe(value_)
            reference.observe(value_)

        def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in registry.collect()
                for s in family.samples
                if not s.name.endswith("_created")
            }

        assert samples(ours).keys() == samples(theirs).keys()
        for name, expected in samples(theirs).items():
            assert samples(ours)[name] == pytest.approx(expected), name

    async def test_metrics_off(self) -> None:
        registry = CollectorRegistry()
        app = make(registry, metrics=False)
        await get(app, "/a", **{"x-user": "u"})
        assert app.limiter.metrics is None
        assert list(registry.collect()) == []


class TestRegistry:
    def test_two_middlewares_share_one_registry(self) -> None:
        registry = CollectorRegistry()
        first, second = make(registry), make(registry)
        assert first.limiter.metrics is second.limiter.metrics

    def test_the_global_registry_by_default(self) -> None:
        from prometheus_client import REGISTRY

        app = Starlette()
        assert RateLimitMiddleware(app).registry is REGISTRY
        RateLimitMiddleware(app)  # built twice: no duplicated-timeseries error

    def test_every_error_kind_is_exported_at_zero(self) -> None:
        registry = CollectorRegistry()
        make(registry)
        for kind in ERROR_KINDS:
            assert registry.get_sample_value("asgi_ratelimit_backend_errors_total", {"kind": kind}) == 0
        assert registry.get_sample_value("asgi_ratelimit_breaker_state") == 0


def exposition(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


class TestExposition:
    async def test_served_as_prometheus_text_and_exempt_from_limiting(self) -> None:
        registry = CollectorRegistry()
        app = make(
            registry, rules=[Rule("/{p:path}", "1/minute", key=lambda r: "all", name="all")], metrics_path="/metrics"
        )
        await get(app, "/a")
        for _ in range(3):
            response = await get(app, "/metrics")
            assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=")
        assert "ratelimit" not in response.headers
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        assert {
            "asgi_ratelimit_decisions",
            "asgi_ratelimit_backend_latency_seconds",
            "asgi_ratelimit_backend_errors",
            "asgi_ratelimit_breaker_state",
            "asgi_ratelimit_slot_release_retries",
            "asgi_ratelimit_memory_evictions",
        } <= set(families)
        assert families["asgi_ratelimit_decisions"].type == "counter"
        # Exported at zero from the start, every label value, so rate() and alerts see them before the first event.
        for name, label, values in (
            ("asgi_ratelimit_slot_release_retries", "result", {"released", "expired", "dropped"}),
            ("asgi_ratelimit_memory_evictions", "kind", {"at_rest", "live"}),
        ):
            assert families[name].type == "counter"
            samples = {
                sample.labels[label]: sample.value
                for sample in families[name].samples
                if sample.name.endswith("_total")
            }
            assert samples == dict.fromkeys(values, 0.0)
        assert families["asgi_ratelimit_backend_latency_seconds"].type == "histogram"

    async def test_openmetrics_when_asked(self) -> None:
        registry = CollectorRegistry()
        app = make(registry, metrics_path="/metrics")
        await get(app, "/a", **{"x-user": "u"})
        response = await get(app, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.endswith("# EOF\n")

    async def test_promtool_accepts_it(self) -> None:
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (CI installs the prometheus package): cannot run promtool check")
        registry = CollectorRegistry()
        app = make(registry, backend=Broken(), metrics_path="/metrics")
        await get(app, "/a", **{"x-user": "u"})
        text = (await get(app, "/metrics")).text
        result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


class TestDocs:
    def test_the_grafana_dashboard_uses_only_these_metrics(self) -> None:
        import json
        import re
        from pathlib import Path

        dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
        exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
        assert exprs and dashboard["title"] and dashboard["uid"]
        names = {name for expr in exprs for name in re.findall(r"asgi_ratelimit_\w+", expr)}
        assert names <= {
            "asgi_ratelimit_decisions_total",
            "asgi_ratelimit_backend_latency_seconds_bucket",
            "asgi_ratelimit_backend_errors_total",
            "asgi_ratelimit_breaker_state",
        }

    def test_promtool_accepts_the_alert_rules(self, tmp_path: object) -> None:
        import re
        from pathlib import Path

        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (CI installs the prometheus package): cannot check the rules")
        text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
        match = re.search(r"```yaml\n(groups:.*?)```", text, re.S)
        assert match is not None
        rules = Path(str(tmp_path)) / "rules.yml"
        rules.write_text(match.group(1))
        result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
