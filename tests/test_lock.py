"""requirements.lock agrees with pyproject.toml: every dependency the locked extras declare is pinned at a
version its range admits, nothing is pinned that no longer comes from them, and the pins the Makefile keeps
outside the lock (pip, torch, the model package) are the ones the lock and pyproject expect."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PROJECT = "velesio"
OUTSIDE_THE_LOCK = {
    "torch"
}  # pinned by the Makefile's TORCH_SPEC: the CPU wheel here, a CUDA one in its image


@dataclass(frozen=True)
class Pin:
    version: Version
    via: frozenset[str]  # the packages (or "velesio") that pull this one in, from pip-compile's annotations


def makefile_value(name: str) -> str:
    found = re.search(rf"^{name} \??:?= ?(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert found is not None, f"the Makefile sets {name}"
    return found[1]


def parse_lock(text: str) -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    name, version, via = "", "", set[str]()

    def flush() -> None:
        if name:
            pins[canonicalize_name(name)] = Pin(Version(version), frozenset(via))

    for line in text.splitlines():
        if found := re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line):
            flush()
            name, version, via = found[1], found[2], set()
        elif found := re.fullmatch(r"    #(?: via|  ) +([A-Za-z0-9._-]+)(?: \(.*\))?", line):
            via.add(canonicalize_name(found[1]))
        elif line.strip() and not line.lstrip().startswith("#"):
            raise AssertionError(f"a line the lock should not have: {line!r}")
    flush()
    return pins


def locked_requirements(pyproject: dict[str, object]) -> list[Requirement]:
    """The project's dependencies plus those of the extras `make lock` resolves, extras expanded."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    extras: dict[str, list[str]] = project["optional-dependencies"]
    wanted = makefile_value("LOCK_EXTRAS").split(",")
    found = [Requirement(spec) for spec in project["dependencies"]]
    seen: set[str] = set()
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for spec in extras[extra]:
            requirement = Requirement(spec)
            if canonicalize_name(requirement.name) == PROJECT:
                wanted += sorted(requirement.extras)
            else:
                found.append(requirement)
    environment = {k: str(v) for k, v in default_environment().items()}
    return [r for r in found if r.marker is None or r.marker.evaluate(environment)]


@pytest.fixture(scope="module")
def pins() -> dict[str, Pin]:
    return parse_lock((REPO / makefile_value("LOCK")).read_text())


@pytest.fixture(scope="module")
def requirements() -> list[Requirement]:
    return locked_requirements(tomllib.loads((REPO / "pyproject.toml").read_text()))


def lock_problems(pins: dict[str, Pin], requirements: list[Requirement]) -> list[str]:
    """What makes a lock disagree with the declared requirements; empty when they agree."""
    problems = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name in OUTSIDE_THE_LOCK:
            continue
        if name not in pins:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(pins[name].version, prereleases=True):
            problems.append(f"{requirement}: the lock pins {pins[name].version}")
    reachable: set[str] = set()
    frontier: list[str] = [PROJECT, *OUTSIDE_THE_LOCK]  # what torch pulls in is locked too
    while frontier:
        current = frontier.pop()
        for pinned, pin in pins.items():
            if pinned not in reachable and current in pin.via:
                reachable.add(pinned)
                frontier.append(pinned)
    problems += [
        f"{name} is pinned but nothing declared pulls it in" for name in sorted(set(pins) - reachable)
    ]
    return problems


def test_the_lock_agrees_with_pyproject(pins: dict[str, Pin], requirements: list[Requirement]) -> None:
    problems = lock_problems(pins, requirements)
    assert not problems, "requirements.lock lags pyproject.toml (run `make lock`): " + "; ".join(problems)


def test_a_lagging_lock_is_caught() -> None:
    lock = "\n".join([
        "grpcio==1.0.0", "    # via velesio (pyproject.toml)",
        "protobuf==7.36.2", "    # via", "    #   grpcio", "    #   velesio (pyproject.toml)",
        "six==1.16.0", "    # via left-behind",
    ])  # fmt: skip
    requirements = [Requirement(s) for s in ("grpcio>=1.85", "protobuf>=7.35.1,<8", "redis>=5")]
    assert lock_problems(parse_lock(lock), requirements) == [
        "grpcio>=1.85: the lock pins 1.0.0",
        "redis>=5 is not in the lock",
        "six is pinned but nothing declared pulls it in",
    ]


def test_the_pins_kept_outside_the_lock_agree_with_it(
    pins: dict[str, Pin], requirements: list[Requirement]
) -> None:
    pip = Requirement(makefile_value("PIP_SPEC"))
    assert pip.specifier.contains(pins["pip"].version), "PIP_SPEC and the lock's pip differ"
    torch = Requirement(makefile_value("TORCH_SPEC"))
    (torch_version,) = (Version(s.version) for s in torch.specifier)
    for requirement in requirements:
        if canonicalize_name(requirement.name) == "torch":
            assert requirement.specifier.contains(torch_version), f"TORCH_SPEC is outside {requirement}"
    assert "torch" not in pins, "torch stays out of the lock: TORCH_SPEC pins it per image"
    assert "==" in makefile_value("LLM_MODEL_SPEC"), "the model package is pinned to one version"
