"""The image engine: one dedicated thread runs every torch call, one job at a time.

`generate()` streams a job's events from that thread into the event loop. Closing the stream early (the
gRPC call was cancelled) raises from the pipeline's step callback, so the job stops at the next step and
never reaches the VAE decode; `skip()` drops the current batch and goes on with the next.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.version import VERSION
from sd_worker.infotext import format_infotext
from sd_worker.loading import LoadedModel, LoadOptions, ModelLoadError, load_model, pick_device
from sd_worker.lora import lora_names
from sd_worker.models import HashCache, ModelCache, check_checkpoint_config, find_models, make_card
from sd_worker.pipelines import Inputs, encode_png, prepare_inputs, preview_png
from sd_worker.samplers import SAMPLERS, SCHEDULERS, make_scheduler
from sd_worker.settings import ImageWorkerSettings
from sd_worker.types import Done, ImageJob, ImageOut, Limits, ModelCard, Progress

log = logging.getLogger(__name__)

Event = Progress | ImageOut | Done


class Interrupted(Exception):
    """Raised from the step callback: nobody listens to the job any more."""


class Skipped(Exception):
    """Raised from the step callback: skip the current batch."""


@dataclass
class _Run:
    job: ImageJob
    post: Callable[[Callable[[], Event]], None]  # makes the event on the output thread, sends it in order
    stop: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    steps_done: int = 0

    def emit(self, event: Event) -> None:
        self.post(lambda: event)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


@dataclass(frozen=True)
class Vae:
    """The VAE that replaces every model's own (`--vae`), as A1111 names it in infotexts and options."""

    name: str  # file or folder name
    hash: str

    def accepts(self, requested: str) -> bool:
        return requested in ("", "Automatic", self.name, Path(self.name).stem)


class ImageEngine:
    def __init__(
        self,
        models: ModelCache,
        default_model: str,
        executor: ThreadPoolExecutor,
        limits: Limits,
        slots: int,
        lora_dir: Path | None,
        vae: Vae | None = None,
    ) -> None:
        self.models = models
        self.default_model = default_model
        self.limits = limits
        self.slots = slots
        self.samplers = list(SAMPLERS)
        self.schedulers = list(SCHEDULERS)
        self.lora_dir = lora_dir
        self.vae = vae
        self.device = ""  # where the models run, for logs: "cuda float16"
        # Counters of work done, so that tests can see where a cancelled job stopped.
        self.steps_run = 0
        self.vae_decodes = 0
        self._executor = executor
        # PNG encoding and sending run on a second thread, so that the GPU goes on with the next batch or
        # job (with --slots 2 or more) while a finished image is written.
        self._output = ThreadPoolExecutor(1, thread_name_prefix="sd-output")
        self._runs: dict[str, _Run] = {}

    @classmethod
    async def start(cls, settings: ImageWorkerSettings) -> ImageEngine:
        """Finds the models and loads the default one on the engine's own thread; ModelLoadError when a
        model is not one or the default does not load."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="sd-engine")

        def load() -> ImageEngine:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            device, dtype = pick_device(settings.device)
            cache_dir = settings.cache_dir or Path(tempfile.gettempdir()) / "velesio-sd"
            given = settings.model if "model" in settings.model_fields_set else None
            default, specs = find_models(given, settings.model_id, settings.models_dir)
            check_checkpoint_config(specs, settings.checkpoint_config)
            hashes = HashCache(cache_dir / "model-hashes.json")
            cards = {spec.id: make_card(spec, hashes, device) for spec in specs}
            options = LoadOptions(
                device, dtype, cache_dir, settings.checkpoint_config, settings.vae, settings.lora_dir
            )
            models = ModelCache(
                specs,
                cards,
                lambda spec, card: load_model(spec, card, options),
                settings.model_cache_mb << 20,
            )
            models.get(default.id)
            vae = None
            if settings.vae is not None:
                vae = Vae(settings.vae.name, _vae_hash(settings.vae, hashes))
            limits = Limits(settings.max_size, settings.max_steps, settings.max_batch)
            engine = cls(models, default.id, executor, limits, settings.slots, settings.lora_dir, vae)
            engine.device = f"{device} {str(dtype).removeprefix('torch.')}"
            return engine

        try:
            return await asyncio.get_running_loop().run_in_executor(executor, load)
        except BaseException:
            executor.shutdown(wait=False)
            raise

    @property
    def cards(self) -> list[ModelCard]:
        """Every model this worker serves, the default first."""
        return [self.models.cards[model_id] for model_id in self.models.specs]

    @property
    def card(self) -> ModelCard:
        """The default model's card."""
        return self.models.cards[self.default_model]

    @property
    def loras(self) -> list[str]:
        return lora_names(self.lora_dir)

    def loaded(self, model_id: str = "") -> LoadedModel:
        """A model, loaded when it is not (engine thread; tests call it when no job runs)."""
        return self.models.get(model_id or self.default_model)

    async def close(self) -> None:
        for run in self._runs.values():
            run.stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        await asyncio.get_running_loop().run_in_executor(None, self._output.shutdown)

    def skip(self, job_id: str) -> bool:
        run = self._runs.get(job_id)
        if run is None:
            return False
        run.skip.set()
        return True

    def check(self, job: ImageJob) -> None:
        """What only the engine knows about a request: its model, LoRAs and VAE exist."""
        self.models.check(job.model or self.default_model)
        known = set(self.loras)
        for lora in job.loras:
            if lora.name not in known:
                valid = ", ".join(sorted(known)) or "none: this worker has no LoRA directory"
                raise InvalidArgument(f"no LoRA named {lora.name!r}; valid: {valid}", field="loras")
        if job.vae and not (self.vae.accepts(job.vae) if self.vae else job.vae in ("Automatic", "None")):
            names = ["Automatic", self.vae.name] if self.vae else ["Automatic", "None"]
            raise InvalidArgument(f"unknown VAE {job.vae!r}; valid: {', '.join(names)}", field="vae")

    async def generate(self, job: ImageJob) -> AsyncGenerator[Event, None]:
        self.check(job)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def post(make: Callable[[], Any]) -> None:
            def deliver() -> None:
                try:
                    item = make()
                except BaseException as exc:  # raised again in the event loop, in order
                    item = _Failed(exc)
                loop.call_soon_threadsafe(queue.put_nowait, item)

            self._output.submit(deliver)

        run = _Run(job, post)
        self._runs[job.job_id] = run
        future = loop.run_in_executor(self._executor, self._run, run)
        future.add_done_callback(lambda _: post(lambda: _END))  # after every event the job posted
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
            await future
        finally:
            run.stop.set()
            if self._runs.get(job.job_id) is run:
                del self._runs[job.job_id]

    # -- on the engine thread ---------------------------------------------------------------------------

    def _run(self, run: _Run) -> None:
        job = run.job
        if run.stop.is_set():  # cancelled while it waited for the thread
            return
        model_id = job.model or self.default_model
        try:
            model = self.models.get(model_id)
        except ModelLoadError as exc:
            raise FailedPrecondition(f"model {model_id!r} does not load: {exc}", field="model") from exc
        first_seed = job.seed if job.seed != -1 else random.randrange(2**32)
        seeds = [first_seed + i for i in range(job.batch_size * job.n_iter)]
        model.lora.apply(job.loras)
        infotexts = [self._infotext(model, job, seed) for seed in seeds]
        pipe = model.pipes[job.mode]
        pipe.scheduler = make_scheduler(job.sampler, job.scheduler, model.scheduler_config)
        inputs = prepare_inputs(pipe, job, model.inpainting)
        run.started = time.perf_counter()
        index = skipped = 0
        for iteration in range(job.n_iter):
            batch = seeds[iteration * job.batch_size : (iteration + 1) * job.batch_size]
            try:
                latents = self._denoise(pipe, run, iteration, batch, inputs)
            except Skipped:
                log.info("job %s: skipped batch %d", job.job_id, iteration)
                skipped += len(batch)
                continue
            except Interrupted:
                log.info("job %s: stopped, nobody listens", job.job_id)
                return
            offset = iteration * job.batch_size
            for i, decoded in enumerate(self._decode(pipe, latents)):
                seed, infotext = seeds[offset + i], infotexts[offset + i]
                run.post(functools.partial(_image_out, decoded, inputs, seed, infotext, index))
                index += 1
        elapsed_ms = (time.perf_counter() - run.started) * 1000
        info = self._info(model, job, seeds, infotexts)
        run.emit(Done(json.dumps(info), elapsed_ms, index, skipped))

    def _denoise(
        self, pipe: Any, run: _Run, iteration: int, seeds: list[int], inputs: Inputs
    ) -> torch.Tensor:
        job = run.job

        def on_step(p: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if run.stop.is_set():
                raise Interrupted
            if run.skip.is_set():
                run.skip.clear()
                raise Skipped
            total = int(p.num_timesteps)
            self.steps_run += 1
            run.steps_done += 1
            per_step = (time.perf_counter() - run.started) / run.steps_done
            remaining = total - step - 1 + total * (job.n_iter - iteration - 1)
            preview = b""
            if job.preview_every and (step + 1) % job.preview_every == 0:
                preview = preview_png(tensors["latents"])
            run.emit(Progress(step + 1, total, iteration, job.n_iter, per_step * remaining, preview))
            return {}

        # CPU generators, so that a seed draws the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs = dict(inputs.kwargs)
        if inputs.fill is not None:
            kwargs["latent_fill"] = inputs.fill(seeds)
        with torch.inference_mode():
            out = pipe(
                prompt=[job.prompt] * len(seeds),
                negative_prompt=[job.negative_prompt] * len(seeds),
                num_inference_steps=job.steps,
                guidance_scale=job.cfg_scale,
                generator=generators,
                output_type="latent",
                callback_on_step_end=on_step,
                **kwargs,
            )
        if run.stop.is_set():  # cancelled during the last step: do not decode
            raise Interrupted
        latents: torch.Tensor = out.images
        return latents

    def _decode(self, pipe: Any, latents: torch.Tensor) -> list[Any]:
        vae = pipe.vae
        with torch.inference_mode():
            pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        self.vae_decodes += 1
        images: list[Any] = pipe.image_processor.postprocess(pixels, output_type="pil")
        return images

    def _params(self, model: LoadedModel, job: ImageJob, seed: int) -> dict[str, object]:
        inpaint = job.mode == "inpaint"
        card = model.card
        return {
            "Steps": job.steps,
            "Sampler": job.sampler,
            "Schedule type": job.scheduler,
            "CFG scale": f"{job.cfg_scale:g}",
            "Seed": seed,
            "Size": f"{job.width}x{job.height}",
            "Model hash": card.hash or None,
            "Model": card.id,
            "VAE hash": (self.vae.hash or None) if self.vae else None,
            "VAE": self.vae.name if self.vae else None,
            "Denoising strength": f"{job.denoising_strength:g}" if job.mode != "txt2img" else None,
            "Mask blur": job.mask_blur if inpaint else None,
            "Inpaint area": "Only masked" if inpaint and job.full_res else None,
            "Masked area padding": job.full_res_padding if inpaint and job.full_res else None,
            "Lora hashes": ", ".join(f"{x.name}: {model.lora.short_hash(x.name)}" for x in job.loras) or None,
            "Version": f"velesio {VERSION}",
        }

    def _infotext(self, model: LoadedModel, job: ImageJob, seed: int) -> str:
        return format_infotext(job.written_prompt, job.negative_prompt, self._params(model, job, seed))

    def _info(
        self, model: LoadedModel, job: ImageJob, seeds: list[int], infotexts: list[str]
    ) -> dict[str, Any]:
        count = len(seeds)
        return {
            "prompt": job.written_prompt,
            "all_prompts": [job.written_prompt] * count,
            "negative_prompt": job.negative_prompt,
            "all_negative_prompts": [job.negative_prompt] * count,
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * count,
            "subseed_strength": 0,
            "width": job.width,
            "height": job.height,
            "sampler_name": job.sampler,
            "scheduler": job.scheduler,
            "cfg_scale": job.cfg_scale,
            "steps": job.steps,
            "batch_size": job.batch_size,
            "n_iter": job.n_iter,
            "restore_faces": False,
            "sd_model_name": model.card.id,
            "sd_model_hash": model.card.hash,
            "sd_vae_name": self.vae.name if self.vae else None,
            "sd_vae_hash": self.vae.hash if self.vae else None,
            "denoising_strength": job.denoising_strength if job.mode != "txt2img" else None,
            "mask_blur": job.mask_blur if job.mode == "inpaint" else None,
            "inpainting_fill": job.inpainting_fill if job.mode == "inpaint" else None,
            "inpaint_full_res": job.full_res if job.mode == "inpaint" else None,
            "styles": [],
            "clip_skip": 1,
            "infotexts": infotexts,
            "version": f"velesio {VERSION}",
        }


def _image_out(decoded: Any, inputs: Inputs, seed: int, infotext: str, index: int) -> ImageOut:
    image = inputs.overlay(decoded) if inputs.overlay is not None else decoded
    return ImageOut(encode_png(image, infotext), seed, infotext, index, image.width, image.height)


def _vae_hash(path: Path, hashes: HashCache) -> str:
    if path.is_file():
        return hashes.short_hash(path)
    files = sorted(path.glob("diffusion_pytorch_model*"))
    return hashes.short_hash(files[0]) if files else ""
