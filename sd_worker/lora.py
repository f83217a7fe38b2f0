"""LoRA files merged into the loaded weights (no peft needed), and unmerged bit-exactly afterwards.

Reads the two layouts that circulate: kohya / A1111 (`lora_unet_<module_path_with_underscores>` +
`.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_...` for the text encoder) and diffusers / peft
(`unet.<module.path>.lora_A.weight`, `.lora_B.weight`; `text_encoder.` likewise).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from mesh.errors import InvalidArgument
from sd_worker.types import Lora

log = logging.getLogger(__name__)


def lora_names(folder: Path | None) -> list[str]:
    """The LoRAs of `folder` by file stem, as prompts name them."""
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.safetensors"))


@dataclass(frozen=True)
class _Pair:
    module: torch.nn.Module
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank


class LoraLibrary:
    def __init__(self, folder: Path | None, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
        self.folder = folder
        self._modules = {
            "unet": dict(unet.named_modules()),
            "text_encoder": dict(text_encoder.named_modules()),
        }
        self._kohya = {
            "lora_unet_": {k.replace(".", "_"): m for k, m in self._modules["unet"].items()},
            "lora_te_": {k.replace(".", "_"): m for k, m in self._modules["text_encoder"].items()},
        }
        self._originals: dict[torch.nn.Module, torch.Tensor] = {}
        self._applied: tuple[tuple[str, float], ...] = ()
        self._hashes: dict[tuple[str, int, int], str] = {}

    def short_hash(self, name: str) -> str:
        """A1111's short LoRA hash (sha256, 12 hex digits), remembered while the file stays the same."""
        assert self.folder is not None
        path = self.folder / f"{name}.safetensors"
        stat = path.stat()
        key = (name, stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        return self._hashes[key]

    def apply(self, loras: Sequence[Lora]) -> None:
        """Makes the weights base + exactly these LoRAs (weight 0 ones left out). Engine thread only."""
        wanted = tuple((lora.name, lora.weight) for lora in loras if lora.weight != 0)
        if wanted == self._applied:
            return
        self._restore()
        for name, weight in wanted:
            self._merge(name, weight)
        self._applied = wanted

    def _restore(self) -> None:
        with torch.no_grad():
            for module, original in self._originals.items():
                _weight(module).copy_(original)
        self._originals.clear()
        self._applied = ()

    def _merge(self, name: str, weight: float) -> None:
        assert self.folder is not None
        pairs = self._pairs(load_file(str(self.folder / f"{name}.safetensors")))
        if not pairs:
            raise InvalidArgument(f"{name}: no LoRA weights that fit this model", field="loras")
        with torch.no_grad():
            for pair in pairs:
                target = _weight(pair.module)
                if pair.module not in self._originals:
                    self._originals[pair.module] = target.detach().clone()
                up, down = pair.up.float(), pair.down.float()
                delta = (up.flatten(1) @ down.flatten(1)).reshape(target.shape)
                target.add_((delta * (weight * pair.scale)).to(target.dtype))
        log.info("LoRA %s merged at %g (%d modules)", name, weight, len(pairs))

    def _pairs(self, state: dict[str, torch.Tensor]) -> list[_Pair]:
        pairs: list[_Pair] = []
        for key, down in state.items():
            for down_suffix, up_suffix in (
                (".lora_down.weight", ".lora_up.weight"),
                (".lora_A.weight", ".lora_B.weight"),
            ):
                if not key.endswith(down_suffix):
                    continue
                base = key[: -len(down_suffix)]
                module = self._module(base)
                up = state.get(base + up_suffix)
                if (
                    module is None
                    or up is None
                    or not isinstance(getattr(module, "weight", None), torch.Tensor)
                ):
                    log.warning("LoRA key %s fits no module of this model; ignored", key)
                    continue
                alpha = state.get(base + ".alpha")
                rank = down.shape[0]
                scale = float(alpha) / rank if alpha is not None else 1.0
                if up.flatten(1).shape[0] * down.flatten(1).shape[1] != _weight(module).numel():
                    log.warning("LoRA key %s does not fit the shape of %s; ignored", key, base)
                    continue
                pairs.append(_Pair(module, down, up, scale))
        return pairs

    def _module(self, base: str) -> torch.nn.Module | None:
        for prefix, modules in self._kohya.items():
            if base.startswith(prefix):
                return modules.get(base[len(prefix) :])
        part, _, path = base.partition(".")
        return self._modules.get(part, {}).get(path)


def _weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight
