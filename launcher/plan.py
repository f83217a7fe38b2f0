"""What `velesio up` runs and what it prints: each child's command line (ports, worker ids, telemetry
flags), the checks before anything starts (every port it needs is free, tokens guard an API beyond
loopback), and the banner with the URLs and example commands once the stack is ready."""

from __future__ import annotations

import json
import os
import shlex
import socket
from dataclasses import dataclass, field

from launcher.settings import UpSettings
from launcher.spawn import velesio_argv
from mesh.auth import Tokens
from mesh.ports import port_free
from mesh.server import join_host_port
from mesh.settings import is_loopback

# Options that name one process (its port, address, id, metrics port) or a secret passed on purpose:
# set for `velesio up` as a whole they would reach every child alike, so children never inherit them.
PER_PROCESS_ENV = (
    "VELESIO_PORT", "VELESIO_ADVERTISE_ADDR", "VELESIO_WORKER_ID", "VELESIO_BROKER_ID",
    "VELESIO_METRICS_PORT", "VELESIO_MODEL_ID", "VELESIO_API_TOKENS", "VELESIO_API_TOKENS_FILE",
    "VELESIO_REDIS_URL",
)  # fmt: skip
WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1", "[::]": "::1"}
WORKER_HOST = "127.0.0.1"  # the worker API has no authentication; only the local broker dials it
EXAMPLE_MAX_TOKENS = 32


class CannotStart(Exception):
    """A check before anything starts failed: a port is taken (or wanted twice), or the API would be open
    beyond loopback without tokens."""


@dataclass(frozen=True)
class Proc:
    """One child process of `velesio up`."""

    name: str
    role: str  # "redis", "broker", "text", "image" or "edge"
    argv: list[str]
    doing: str  # what it is busy with until it is ready: "{name} {doing}" reads as a sentence
    env: dict[str, str] = field(default_factory=dict)
    worker_id: str = ""
    metrics_port: int = 0
    metrics_url: str = ""


@dataclass(frozen=True)
class Plan:
    redis_url: str
    processes: list[Proc]

    @property
    def has_workers(self) -> bool:
        return any(p.role in ("text", "image") for p in self.processes)


def connect_host(host: str) -> str:
    """An address a client on this machine can dial for a server listening on `host`."""
    return WILDCARDS.get(host, host)


def text_doing(model: str) -> str:
    if model in ("default", "smollm2"):
        return "loading the packaged SmolLM2-135M-Instruct model"
    if model == "echo":
        return "starting the echo test engine (no model)"
    return f"loading {model}"


def image_doing(model: str) -> str:
    if model == "tiny":
        return "generating the tiny random-weight pipeline (it draws noise)"
    return f"loading {model}"


def child_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PER_PROCESS_ENV}
    env["VELESIO_REDIS_URL"] = redis_url  # not a flag: it may hold a password, and flags show in `ps`
    return env


def common_options(settings: UpSettings) -> dict[str, object]:
    """The options every child takes from `velesio up`'s own (settings field names, for velesio_argv)."""
    options: dict[str, object] = {
        "key_prefix": settings.key_prefix,
        "log_level": settings.log_level,
        "log_format": settings.log_format,
    }
    if settings.log_content:
        options["log_content"] = True
    if settings.otlp_endpoint:
        options["otlp_endpoint"] = settings.otlp_endpoint
    return options


def metrics_port(settings: UpSettings, offset: int) -> int:
    return settings.metrics_port + offset if settings.metrics_port else 0


def _metrics_url(host: str, port: int) -> str:
    return f"http://{join_host_port(host, port)}/metrics" if port else ""


def text_workers(
    settings: UpSettings, tag: str, common: dict[str, object], env: dict[str, str]
) -> list[Proc]:
    count = settings.llm_workers
    threads = {"threads": max(1, (os.cpu_count() or 1) // count)} if count > 1 else {}
    found = []
    for i in range(count):
        port = metrics_port(settings, 1 + i)
        worker_id = f"text-{tag}-{i}"
        argv = velesio_argv(
            "llm-worker", **common, host=WORKER_HOST, worker_id=worker_id, model=settings.llm_model,
            slots=settings.llm_slots, **threads, metrics_port=port,
        )  # fmt: skip
        name = "llm-worker" if count == 1 else f"llm-worker-{i}"
        found.append(Proc(name, "text", argv, text_doing(settings.llm_model), env, worker_id, port,
                          _metrics_url(WORKER_HOST, port)))  # fmt: skip
    return found


def plan(settings: UpSettings, redis_url: str, tag: str) -> Plan:
    """The children of `velesio up` (Redis aside), in start order; `tag` makes worker ids unique."""
    env, common = child_env(redis_url), common_options(settings)
    host = connect_host(settings.host)
    broker_port = metrics_port(settings, 0)
    broker_env = {**env, "VELESIO_API_TOKENS": settings.api_tokens} if settings.api_tokens else env
    tokens_file = {"api_tokens_file": settings.api_tokens_file} if settings.api_tokens_file else {}
    broker = velesio_argv(
        "broker", **common, host=settings.host, grpc_port=settings.grpc_port, broker_id=f"broker-{tag}",
        metrics_port=broker_port, **tokens_file,
    )  # fmt: skip
    grpc_address = join_host_port(host, settings.grpc_port)
    found = [Proc("broker", "broker", broker, f"opening {grpc_address}", broker_env,
                  metrics_port=broker_port, metrics_url=_metrics_url(host, broker_port))]  # fmt: skip
    if settings.llm:
        found += text_workers(settings, tag, common, env)
    if settings.sd:
        port = metrics_port(settings, 1 + settings.llm_workers)
        worker_id = f"image-{tag}"
        argv = velesio_argv(
            "sd-worker", **common, host=WORKER_HOST, worker_id=worker_id, model=settings.sd_model,
            metrics_port=port,
        )  # fmt: skip
        found.append(Proc("sd-worker", "image", argv, image_doing(settings.sd_model), env, worker_id, port,
                          _metrics_url(WORKER_HOST, port)))  # fmt: skip
    if settings.edge:
        argv = velesio_argv(
            "edge", **common, host=settings.host, http_port=settings.http_port, broker_addr=grpc_address
        )
        http = f"http://{join_host_port(host, settings.http_port)}"
        doing = f"opening {http}" + (
            ", ready once a worker has registered" if settings.llm or settings.sd else ""
        )
        found.append(Proc("edge", "edge", argv, doing, env,
                          metrics_url=f"{http}/metrics"))  # fmt: skip
    return Plan(redis_url, found)


def has_tokens(settings: UpSettings) -> bool:
    return bool(settings.api_tokens or settings.api_tokens_file)


def check_exposure(settings: UpSettings) -> None:
    """The broker's own rule, checked before anything starts: no tokens, no listening beyond loopback."""
    try:
        tokens = Tokens.parse(settings.api_tokens, settings.api_tokens_file)
    except (ValueError, OSError) as exc:
        raise CannotStart(f"--api-tokens / --api-tokens-file: {exc}") from None
    if not tokens and not is_loopback(settings.host):
        raise CannotStart(
            f"refusing to listen on {settings.host} without API tokens: pass --api-tokens (or "
            "--api-tokens-file), or listen on 127.0.0.1"
        )


def check_ports(settings: UpSettings, the_plan: Plan, redis_port: int = 0) -> None:
    """Raises CannotStart naming the port, its user and the flag that moves it, before anything starts."""
    wanted = [(settings.host, settings.grpc_port, "the broker's gRPC API", "--grpc-port")]
    if settings.edge:
        wanted.append((settings.host, settings.http_port, "the REST edge", "--http-port"))
    for proc in the_plan.processes:
        if proc.metrics_port:
            bind = WORKER_HOST if proc.role in ("text", "image") else settings.host
            what = f"the {proc.name}'s /metrics"
            wanted.append((bind, proc.metrics_port, what, "--metrics-port (another first port, or 0: none)"))
    if redis_port:
        wanted.append(("127.0.0.1", redis_port, "the embedded Redis", "--redis-port"))
    seen: dict[int, str] = {}
    for _, port, what, flag in wanted:
        if port in seen:
            raise CannotStart(f"port {port} is wanted twice: by {seen[port]} and {what}; change {flag}")
        seen[port] = what
    for host, port, what, flag in wanted:
        try:
            free = port_free(host, port)
        except socket.gaierror as exc:
            raise CannotStart(f"cannot listen on {host}: {exc}") from None
        if not free:
            raise CannotStart(f"port {port} ({what}) is in use on {host}; choose another with {flag}")


def examples(settings: UpSettings, models: dict[str, str]) -> list[str]:
    """Commands to paste: a chat over REST (OpenAI) and over gRPC, or what the running workers allow."""
    host = connect_host(settings.host)
    http = f"http://{join_host_port(host, settings.http_port)}"
    grpc_address = join_host_port(host, settings.grpc_port)
    auth = ' -H "authorization: Bearer $TOKEN"' if has_tokens(settings) else ""
    text, image = models.get("text"), models.get("image")
    messages = [{"role": "user", "content": "Say hi in five words."}]
    found = []
    if settings.edge and text:
        body = {"model": text, "messages": messages, "max_tokens": EXAMPLE_MAX_TOKENS}
        found.append(f"curl {http}/v1/chat/completions{auth} -H 'content-type: application/json' "
                     f"-d {shlex.quote(json.dumps(body))}")  # fmt: skip
    elif settings.edge and image:
        body = {"prompt": "a lighthouse at dusk", "steps": 8, "width": 256, "height": 256}
        found.append(f"curl {http}/sdapi/v1/txt2img{auth} -H 'content-type: application/json' "
                     f"-d {shlex.quote(json.dumps(body))} -o txt2img.json")  # fmt: skip
    if text:
        body = {"model": text, "messages": messages, "sampling": {"max_tokens": EXAMPLE_MAX_TOKENS}}
        found.append(f"grpcurl -plaintext{auth} -d {shlex.quote(json.dumps(body))} {grpc_address} "
                     "velesio.v1.Inference/Chat")  # fmt: skip
    else:
        found.append(f"grpcurl -plaintext{auth} {grpc_address} velesio.v1.Inference/ListModels")
    return found


def banner(settings: UpSettings, the_plan: Plan, models: dict[str, str], redis: str, took_s: float) -> str:
    host = connect_host(settings.host)
    http = f"http://{join_host_port(host, settings.http_port)}"
    grpc_address = join_host_port(host, settings.grpc_port)
    lines = [f"Velesio is up (ready in {took_s:.1f}s)."]
    if settings.edge:
        lines += [
            f"  REST API   {http}  (OpenAI /v1, llama.cpp, Automatic1111 /sdapi/v1, native /v1/jobs)",
            f"  API docs   {http}/docs",
        ]
    lines.append(
        f"  gRPC API   {grpc_address}  (velesio.v1.Inference; reflection on, so grpcurl needs no protos)"
    )
    if models:
        lines.append(
            "  models     "
            + ", ".join(f"{models[kind]} ({kind})" for kind in ("text", "image") if kind in models)
        )
    urls = [(p.metrics_url, p.name) for p in the_plan.processes if p.metrics_url]
    for i, (url, name) in enumerate(urls):
        lines.append(f"  {'metrics' if i == 0 else '':9}  {url}  ({name})")
    lines.append(f"  Redis      {redis}")
    if host != settings.host:
        lines.append(f"  listening on {settings.host} (every interface); the URLs above use {host}")
    lines.append("Try:")
    lines += [f"  {command}" for command in examples(settings, models)]
    if has_tokens(settings):
        lines.append("  (first set TOKEN to one of the API tokens: export TOKEN=...)")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)
