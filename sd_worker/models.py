"""The models a worker serves: what `--model` and `--models-dir` name, each with the card clients see
(name, A1111 short hash, filename), and the loaded ones, kept least recently used first within a memory
bound."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from mesh.errors import NotFound
from sd_worker.loading import CHECKPOINT_SUFFIXES, LoadedModel, ModelLoadError, ModelSpec
from sd_worker.presets import PRESETS
from sd_worker.types import ModelCard

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


def find_models(
    model: str | None, model_id: str, models_dir: Path | None
) -> tuple[ModelSpec, list[ModelSpec]]:
    """The default model and every model served, the default first; ModelLoadError for what is not one.
    `model` None (not given): the first model of `models_dir`, else the `tiny` preset."""
    in_dir = scan_models_dir(models_dir) if models_dir is not None else []
    by_id = {spec.id: spec for spec in in_dir}
    if model is None:
        model = in_dir[0].id if in_dir else "tiny"
    if model in PRESETS:
        default = ModelSpec(model_id or model, "preset", model)
    elif model in by_id and not Path(model).expanduser().exists():
        found = by_id[model]
        default = ModelSpec(model_id or found.id, found.kind, found.location)
    else:
        default = spec_for_path(Path(model).expanduser(), model_id)
    others = [
        spec
        for spec in in_dir
        if spec.id != default.id and (default.kind == "preset" or not _same_file(spec, default))
    ]
    return default, [default, *others]


def check_checkpoint_config(specs: list[ModelSpec], config: Path | None) -> None:
    """Single-file checkpoints load only with a config folder: say so at start, not at the first request."""
    files = [spec.location for spec in specs if spec.kind == "file"]
    if files and config is None:
        raise ModelLoadError(
            f"{files[0]}: a single-file checkpoint needs --checkpoint-config (a local diffusers folder with "
            "the model's configs)"
        )
    if config is not None and not (config / "model_index.json").is_file():
        raise ModelLoadError(f"--checkpoint-config {config}: not a diffusers folder (no model_index.json)")


def _same_file(a: ModelSpec, b: ModelSpec) -> bool:
    return a.path.resolve() == b.path.resolve()


def spec_for_path(path: Path, model_id: str = "") -> ModelSpec:
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        return ModelSpec(model_id or path.stem, "file", str(path))
    if (path / "model_index.json").is_file():
        return ModelSpec(model_id or path.name.lower(), "folder", str(path))
    raise ModelLoadError(
        f"{path}: not a diffusers folder (no model_index.json), not a .safetensors/.ckpt file, "
        f"not a preset ({', '.join(PRESETS)}) and not a model of --models-dir"
    )


def scan_models_dir(folder: Path) -> list[ModelSpec]:
    """Diffusers folders and single-file checkpoints directly in `folder`, by name."""
    if not folder.is_dir():
        raise ModelLoadError(f"--models-dir {folder}: not a folder")
    specs: dict[str, ModelSpec] = {}
    for path in sorted(folder.iterdir()):
        if not (path.suffix in CHECKPOINT_SUFFIXES or (path / "model_index.json").is_file()):
            continue
        spec = spec_for_path(path)
        if spec.id in specs:
            log.warning("%s: a model named %s is already in %s; ignored", path, spec.id, folder)
            continue
        specs[spec.id] = spec
    return list(specs.values())


class HashCache:
    """A1111's short hashes (the first 10 hex digits of a file's sha256), remembered in a JSON file by path,
    size and modification time, as A1111's cache.json does: a large checkpoint is read once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._known: dict[str, dict[str, object]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self._known = {}

    def short_hash(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self._known.get(key, {})
        if entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return str(entry["sha256"])[:10]
        if stat.st_size > 256 * _HASH_CHUNK:
            log.info("hashing %s (%d MiB), once", file, stat.st_size >> 20)
        digest = hashlib.sha256()
        with file.open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        self._known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self._known, indent=1))
        except OSError as exc:
            log.warning("cannot keep model hashes in %s: %s", self.path, exc)
        return digest.hexdigest()[:10]


def weights_file(spec: ModelSpec) -> Path | None:
    """The file whose hash names the model: the checkpoint, or a diffusers folder's UNet weights."""
    if spec.kind == "file":
        return spec.path
    if spec.kind == "folder":
        files = sorted((spec.path / "unet").glob("diffusion_pytorch_model*.safetensors"))
        files = files or sorted((spec.path / "unet").glob("diffusion_pytorch_model*"))
        return files[0] if files else None
    return None


def make_card(spec: ModelSpec, hashes: HashCache, device: torch.device) -> ModelCard:
    if spec.kind == "preset":
        preset = PRESETS[spec.location]
        return ModelCard(spec.id, preset.description, spec.location, preset.hash(device), test_only=True)
    weights = weights_file(spec)
    what = "single-file checkpoint" if spec.kind == "file" else "diffusers folder"
    return ModelCard(
        id=spec.id,
        description=f"{what} {spec.location}",
        filename=spec.location,
        hash=hashes.short_hash(weights) if weights is not None else "",
        test_only=False,
    )


def estimated_bytes(spec: ModelSpec) -> int:
    """What loading `spec` will add, judged before loading it: the size of its weight files."""
    if spec.kind == "file":
        return spec.path.stat().st_size
    if spec.kind == "folder":
        names = ("unet", "vae", "text_encoder")
        return sum(f.stat().st_size for name in names for f in (spec.path / name).glob("*.safetensors"))
    return 0


class ModelCache:
    """Loaded models by id, least recently used first. Loads on demand (ModelLoadError when it fails);
    unloads the least recently used to keep their weights within `limit_bytes` (the model a job needs now
    always stays). Engine thread only."""

    def __init__(
        self,
        specs: list[ModelSpec],
        cards: dict[str, ModelCard],
        load: Callable[[ModelSpec, ModelCard], LoadedModel],
        limit_bytes: int,
    ) -> None:
        self.specs = {spec.id: spec for spec in specs}
        self.cards = cards
        self.limit_bytes = limit_bytes
        self._load = load
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.loads = 0

    def check(self, model_id: str) -> None:
        if model_id not in self.specs:
            raise NotFound(f"model: no model named {model_id!r} here; available: {', '.join(self.specs)}")

    def loaded(self) -> list[str]:
        """Ids of the loaded models, least recently used first."""
        return list(self._loaded)

    def get(self, model_id: str) -> LoadedModel:
        self.check(model_id)
        model = self._loaded.get(model_id)
        if model is not None:
            self._loaded.move_to_end(model_id)
            return model
        spec = self.specs[model_id]
        try:
            needed = estimated_bytes(spec)
        except OSError as exc:  # the file went away after start-up
            raise ModelLoadError(f"{spec.location}: {exc}") from exc
        self._make_room(needed)
        log.info("loading model %s (%s)", model_id, spec.location)
        model = self._load(spec, self.cards[model_id])
        self.loads += 1
        self._loaded[model_id] = model
        self._make_room(0, after_load=True)
        return model

    def _make_room(self, extra: int, *, after_load: bool = False) -> None:
        keep = 1 if after_load else 0  # after a load, the newest (the one in use) stays whatever its size
        unloaded = False
        while len(self._loaded) > keep and self._used() + extra > self.limit_bytes:
            oldest = next(iter(self._loaded))
            del self._loaded[oldest]  # no reference may stay, or its memory is not freed below
            unloaded = True
            log.info("unloaded model %s to make room (--model-cache-mb %d)", oldest, self.limit_bytes >> 20)
        if unloaded:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _used(self) -> int:
        return sum(model.nbytes for model in self._loaded.values())
