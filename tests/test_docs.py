"""docs/configuration.md is what scripts/gen-config-ref.py makes from the settings classes (no drift), and
the docs' links between each other and into the repository lead somewhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from launcher.cli import COMMANDS, _load

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "scripts" / "gen-config-ref.py"


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_configuration_reference_matches_the_settings_classes() -> None:
    result = generate("--check")
    assert result.returncode == 0, result.stderr


def test_the_check_fails_on_a_stale_reference(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    current = (REPO / "docs" / "configuration.md").read_text()
    stale.write_text(current.replace("`VELESIO_REDIS_URL`", "`VELESIO_REDIS`", 1))
    result = generate("--check", "--path", str(stale))
    assert result.returncode == 1
    assert "make docs" in result.stderr
    assert "VELESIO_REDIS" in result.stderr


def test_the_reference_lists_every_option_of_every_command() -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [s.split("\n", 1)[0] for s in sections] == [f"`velesio {c.name}`" for c in COMMANDS]
    for command, section in zip(COMMANDS, sections, strict=True):
        for name in _load(command.settings).model_fields:
            assert f"`VELESIO_{name.upper()}`" in section, (command.name, name)
            assert f"`--{name.replace('_', '-')}" in section, (command.name, name)


def test_relative_links_in_the_docs_resolve() -> None:
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
