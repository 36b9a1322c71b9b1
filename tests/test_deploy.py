"""The Dockerfile and the Kubernetes manifests agree with each other and with the example app.

No container engine runs here, so the files are parsed: the probes' paths are requested from the app in
process, the ports are compared across the Dockerfile, the image's command and the manifests, and the
image's command is run through the example app's own argument parser.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shlex
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from asgi_ratelimit import MemoryBackend
from example_app import __main__ as example_main
from example_app.app import create_app

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def instruction(keyword: str) -> str:
    """The arguments of the final stage's last ``keyword`` instruction (the one that takes effect)."""
    found = [arguments for name, arguments in final_stage() if name == keyword]
    assert found, f"the Dockerfile's final stage has no {keyword}"
    return found[-1]


def image_command() -> list[str]:
    command = json.loads(instruction("CMD"))  # exec form: no shell between the signal and python
    assert isinstance(command, list)
    return command


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return documents


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r} in deploy/k8s/"
    return matches[0]


def app_container() -> dict[str, Any]:
    (container,) = find("Deployment", "asgi-ratelimit-example")["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (match,) = [entry["containerPort"] for entry in container["ports"] if entry.get("name") == port]
    return int(match)


# --- the Dockerfile ---------------------------------------------------------------------------------


def test_the_image_is_built_in_stages() -> None:
    stages = [arguments for keyword, arguments in dockerfile() if keyword == "FROM"]
    assert len(stages) >= 2
    build_stage = stages[0].split()[-1]
    assert stages[0].split()[-2].upper() == "AS"
    # The final stage takes the wheels from the build stage instead of building again.
    assert any(f"from={build_stage}" in arguments for keyword, arguments in final_stage() if keyword in ("RUN", "COPY"))


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    user = instruction("USER").split(":")[0]
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    assert int(user) != 0


def test_the_image_command_is_accepted_by_the_example_app(monkeypatch: pytest.MonkeyPatch) -> None:
    command = image_command()
    assert command[:3] == ["python", "-m", "example_app"]
    assert importlib.util.find_spec(command[2]) is not None
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(example_main.uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    example_main.main(command[3:])
    ((target,), settings) = calls[0]
    assert settings["host"] == "0.0.0.0"  # reachable from outside the container
    assert settings["port"] == int(option(command, "--port"))
    module, _, attribute = target.partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_the_image_contains_the_example_app() -> None:
    copied = [shlex.split(arguments) for keyword, arguments in final_stage() if keyword == "COPY"]
    assert any("example_app" in words for words in copied)
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    sources = [
        word.rstrip("/")
        for keyword, arguments in dockerfile()
        if keyword == "COPY"
        for word in [w for w in shlex.split(arguments) if not w.startswith("--")][:-1]
    ]
    assert set(sources) <= allowed, ".dockerignore must let every COPY source into the build context"


def test_the_healthcheck_asks_liveness_with_python() -> None:
    healthcheck = instruction("HEALTHCHECK")
    words = shlex.split(healthcheck)
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert "CMD" in words
    assert command[:2] == ["python", "-c"]  # slim images have no curl
    compile(command[2], "<healthcheck>", "exec")
    assert f"http://127.0.0.1:{option(image_command(), '--port')}/health/live" in command[2]


# --- the manifests ----------------------------------------------------------------------------------


def test_every_manifest_parses_with_kind_and_name() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in manifests())
    assert kinds == [
        ("Deployment", "asgi-ratelimit-example"),
        ("Deployment", "asgi-ratelimit-service"),
        ("Deployment", "redis"),
        ("Service", "asgi-ratelimit-example"),
        ("Service", "asgi-ratelimit-service"),
        ("Service", "redis"),
    ]


@pytest.mark.parametrize("name", ["asgi-ratelimit-example", "asgi-ratelimit-service", "redis"])
def test_services_select_their_deployments_pods(name: str) -> None:
    deployment, service = find("Deployment", name), find("Service", name)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {entry["containerPort"] for entry in container["ports"]}
    for entry in service["spec"]["ports"]:
        assert container_port(container, entry["targetPort"]) in ports


@pytest.mark.parametrize("name", ["asgi-ratelimit-example", "asgi-ratelimit-service", "redis"])
def test_pods_run_as_non_root_without_privileges(name: str) -> None:
    pod = find("Deployment", name)["spec"]["template"]["spec"]
    for container in pod["containers"]:
        context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] != 0
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]


def test_the_app_pod_runs_as_the_images_user() -> None:
    pod = find("Deployment", "asgi-ratelimit-example")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(instruction("USER").split(":")[0])


def test_ports_agree_everywhere() -> None:
    container = app_container()
    port = int(option(image_command(), "--port"))
    assert port in [int(word) for word in instruction("EXPOSE").split()]
    assert [entry["containerPort"] for entry in container["ports"]] == [port]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == port
    (service_port,) = find("Service", "asgi-ratelimit-example")["spec"]["ports"]
    assert container_port(container, service_port["targetPort"]) == port


def test_the_app_is_pointed_at_the_redis_service() -> None:
    env = {entry["name"]: entry.get("value") for entry in app_container()["env"]}
    (redis_port,) = find("Service", "redis")["spec"]["ports"]
    assert env["REDIS_URL"].startswith(f"redis://redis:{redis_port['port']}/")


def test_liveness_never_depends_on_redis() -> None:
    # Restarting pods does not bring Redis back; see docs/operations.md, "Kubernetes probes".
    assert app_container()["livenessProbe"]["httpGet"]["path"] == "/health/live"


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
async def test_probe_paths_answer_200_in_the_example_app(probe: str) -> None:
    path = app_container()[probe]["httpGet"]["path"]
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await client.get(path)
    assert response.status_code == 200, (path, response.text)


# --- the decision service ---------------------------------------------------------------------------


def service_container() -> dict[str, Any]:
    (container,) = find("Deployment", "asgi-ratelimit-service")["spec"]["template"]["spec"]["containers"]
    return container


def image_environment() -> dict[str, str]:
    """The variables the final stage's ENV instructions set."""
    environment: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                environment[name] = value
    return environment


def service_environment() -> dict[str, str]:
    """What ``asgi-ratelimit serve`` sees in the pod: the image's variables, then the container's."""
    plain = {entry["name"]: entry["value"] for entry in service_container()["env"] if "value" in entry}
    return {**image_environment(), **plain}


def service_command() -> list[str]:
    command = service_container()["command"]
    assert command[0] == "asgi-ratelimit"
    # The command the image installs with the package (tomllib is not in Python 3.10: the line is read as text).
    scripts = (ROOT / "pyproject.toml").read_text(encoding="utf-8").split("[project.scripts]")[1]
    assert 'asgi-ratelimit = "asgi_ratelimit.__main__:main"' in scripts.split("\n[")[0]
    return list(command[1:])


def test_the_service_runs_the_command_with_workers_on_the_redis_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import uvicorn

    from asgi_ratelimit import __main__ as cli

    environment = service_environment()
    token_file = tmp_path / "token"
    token_file.write_text("a-token-of-the-secret-0123456789")
    environment["ASGI_RATELIMIT_TOKEN_FILE"] = str(token_file)  # the Secret's file, here
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(os, "environ", environment)
    cli.main(service_command())
    (settings,) = calls
    assert settings["host"] == "0.0.0.0"  # reachable from outside the container
    assert settings["workers"] >= 2
    (redis_port,) = find("Service", "redis")["spec"]["ports"]
    assert environment["ASGI_RATELIMIT_REDIS_URL"].startswith(f"redis://redis:{redis_port['port']}/")
    assert settings["port"] == container_port(service_container(), "http")
    (service_port,) = find("Service", "asgi-ratelimit-service")["spec"]["ports"]
    assert container_port(service_container(), service_port["targetPort"]) == settings["port"]
    assert settings["port"] in [int(word) for word in instruction("EXPOSE").split()]


def test_the_service_token_comes_from_a_secret() -> None:
    container = service_container()
    assert all(entry["name"] != "ASGI_RATELIMIT_TOKEN" or "valueFrom" in entry for entry in container["env"])
    token_path = service_environment()["ASGI_RATELIMIT_TOKEN_FILE"]
    (mount,) = [m for m in container["volumeMounts"] if token_path.startswith(m["mountPath"].rstrip("/") + "/")]
    assert mount["readOnly"] is True
    volumes = find("Deployment", "asgi-ratelimit-service")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    items = {item["path"]: item["key"] for item in volume["secret"]["items"]}
    assert token_path[len(mount["mountPath"].rstrip("/")) + 1 :] in items
    # The pod's user reads it: through its group, which the volume takes from fsGroup.
    pod = find("Deployment", "asgi-ratelimit-service")["spec"]["template"]["spec"]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert volume["secret"]["defaultMode"] & 0o040


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
async def test_the_service_probes_answer_200_without_the_token(probe: str) -> None:
    from asgi_ratelimit.service import create_app as create_service

    path = service_container()[probe]["httpGet"]["path"]
    app = create_service(MemoryBackend(), registry=CollectorRegistry(), token="a-token-of-the-secret-0123456789")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        response = await client.get(path)
    assert response.status_code == 200, (path, response.text)
