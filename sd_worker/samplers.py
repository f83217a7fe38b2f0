"""Automatic1111 sampler and scheduler names -> diffusers schedulers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InvalidArgument


@dataclass(frozen=True)
class Sampler:
    cls: str  # diffusers scheduler class name
    options: dict[str, Any] = field(default_factory=dict)
    karras: bool = False  # the A1111 name itself implies Karras sigmas


# "DPM++ SDE" in diffusers (DPMSolverSDEScheduler) needs torchsde; the multistep SDE variant needs nothing
# more and is the closest stochastic DPM++ solver, so that is what the name runs here.
SAMPLERS: dict[str, Sampler] = {
    "Euler": Sampler("EulerDiscreteScheduler"),
    "Euler a": Sampler("EulerAncestralDiscreteScheduler"),
    "Heun": Sampler("HeunDiscreteScheduler"),
    "DPM++ 2M": Sampler("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": Sampler("DPMSolverMultistepScheduler", karras=True),
    "DPM++ SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE": Sampler("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DDIM": Sampler("DDIMScheduler"),
    "LMS": Sampler("LMSDiscreteScheduler"),
    "UniPC": Sampler("UniPCMultistepScheduler"),
}
SCHEDULERS: tuple[str, ...] = ("Automatic", "Karras", "Exponential")
# Schedulers whose sigmas diffusers can space the Karras or exponential way; the others run "Automatic".
_SIGMA_SCHEDULES = {
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
}
DEFAULT_SAMPLER = "Euler a"
DEFAULT_SCHEDULER = "Automatic"


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise InvalidArgument(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}", field="sampler")
    return name


def check_scheduler(sampler: str, name: str) -> str:
    """The schedule that will run: `name`, or "Automatic" where the sampler has no other (A1111 accepts any
    pair; the infotext then says what ran)."""
    if name not in SCHEDULERS:
        raise InvalidArgument(
            f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}", field="scheduler"
        )
    spec = SAMPLERS[sampler]
    if spec.karras:
        return "Karras"
    return name if spec.cls in _SIGMA_SCHEDULES else DEFAULT_SCHEDULER


def make_scheduler(sampler: str, scheduler: str, base_config: Any) -> Any:
    """A fresh diffusers scheduler for the A1111 names, from the model's own scheduler config."""
    import diffusers

    from sd_worker.lms import NumpyLMSDiscreteScheduler

    spec = SAMPLERS[sampler]
    cls = NumpyLMSDiscreteScheduler if spec.cls == "LMSDiscreteScheduler" else getattr(diffusers, spec.cls)
    options = dict(spec.options)
    if scheduler == "Karras":
        options["use_karras_sigmas"] = True
    elif scheduler == "Exponential":
        options["use_exponential_sigmas"] = True
    return cls.from_config(base_config, **options)
