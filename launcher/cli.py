"""The `velesio` command line: one sub-command per process kind.

Every option of a process's settings class becomes a flag (`redis_url` -> `--redis-url`) and stays an
environment variable (`VELESIO_REDIS_URL`); a flag wins over the environment. Sub-commands name their
settings class and entry point by import path, so `velesio --help` loads neither torch nor llama.cpp.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from mesh.settings import CommonSettings
from mesh.version import VERSION


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    settings: str  # "package.module:SettingsClass"
    main: str  # "package.module:function", called with the settings; returns an exit code


COMMANDS: tuple[Command, ...] = (
    Command("broker", "the public gRPC API, job queue and dispatcher (run any number against one Redis)",
            "broker.settings:BrokerSettings", "broker.main:main"),
    Command("llm-worker", "one text worker; registers in Redis under its advertised address",
            "llm_worker.settings:TextWorkerSettings", "llm_worker.main:main"),
    Command("sd-worker", "one image worker (diffusers); registers in Redis under its advertised address",
            "sd_worker.settings:ImageWorkerSettings", "sd_worker.main:main"),
    Command("edge", "the REST bridge (OpenAI, llama.cpp / LLM for Unity, native JSON) in front of a broker",
            "edge.settings:EdgeSettings", "edge.main:main"),
    Command("up", "run everything on this machine: Redis (embedded unless --redis-url) and the services",
            "launcher.settings:UpSettings", "launcher.up:main"),
)  # fmt: skip


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    args = typing.get_args(annotation)
    return isinstance(annotation, types.UnionType) and bool in args and len(args) == 2


def _metavar(annotation: Any) -> str:
    names = {int: "N", float: "NUMBER", Path: "PATH"}
    for option in typing.get_args(annotation) or (annotation,):
        if option in names:
            return names[option]
    return "TEXT"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls: type[CommonSettings]) -> None:
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        parser.add_argument(
            _flag(name),
            dest=name,
            default=argparse.SUPPRESS,
            help=_help(field, f"{prefix}{name}".upper()),
            **(
                {"action": argparse.BooleanOptionalAction}
                if _is_bool(field.annotation)
                else {"metavar": _metavar(field.annotation)}
            ),
        )


def _help(field: FieldInfo, env: str) -> str:
    default = "" if field.is_required() else f", default {field.get_default(call_default_factory=True)!r}"
    return f"{field.description or ''} [env {env}{default}]".replace("%", "%%")


def settings_from_args(settings_cls: type[CommonSettings], namespace: argparse.Namespace) -> CommonSettings:
    given = {name: getattr(namespace, name) for name in settings_cls.model_fields if hasattr(namespace, name)}
    return settings_cls(**given)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="velesio",
        description="Velesio: self-hosted, gRPC-first inference for LLM text and Stable Diffusion images.",
    )
    parser.add_argument("--version", action="version", version=f"velesio {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        settings_cls = _load(command.settings)
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        add_settings_arguments(child, settings_cls)
        child.set_defaults(_command=command, _settings_cls=settings_cls)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    command: Command = namespace._command
    try:
        settings = settings_from_args(namespace._settings_cls, namespace)
    except ValidationError as exc:
        problems = "; ".join(f"{_flag(str(e['loc'][0]))}: {e['msg']}" for e in exc.errors())
        parser.error(f"{command.name}: {problems}")
    entry: Callable[[CommonSettings], int] = _load(command.main)
    return entry(settings)


if __name__ == "__main__":
    sys.exit(main())
