"""The image engine: one dedicated thread runs every torch call, one job at a time.

`generate()` streams a job's events from that thread into the event loop. Closing the stream early (the
gRPC call was cancelled) raises from the pipeline's step callback, so the job stops at the next step and
never reaches the VAE decode; `skip()` drops the current batch and goes on with the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from mesh.version import VERSION
from sd_worker.infotext import format_infotext
from sd_worker.lora import LoraLibrary
from sd_worker.pipelines import LoadedModel, encode_png, load_model, prepare_inputs, preview_png
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
    emit: Callable[[Event], None]
    stop: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    steps_done: int = 0


_END = object()


class ImageEngine:
    def __init__(
        self, model: LoadedModel, executor: ThreadPoolExecutor, limits: Limits, slots: int, lora: LoraLibrary
    ) -> None:
        self.model = model
        self.card: ModelCard = model.card
        self.limits = limits
        self.slots = slots
        self.samplers = list(SAMPLERS)
        self.schedulers = list(SCHEDULERS)
        self.lora = lora
        # Counters of work done, so that tests can see where a cancelled job stopped.
        self.steps_run = 0
        self.vae_decodes = 0
        self._executor = executor
        self._runs: dict[str, _Run] = {}

    @classmethod
    async def start(cls, settings: ImageWorkerSettings) -> ImageEngine:
        """Loads the model on the engine's own thread; ModelLoadError when it cannot."""
        executor = ThreadPoolExecutor(1, thread_name_prefix="sd-engine")

        def load() -> LoadedModel:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            return load_model(settings.model, settings.model_id, settings.cache_dir, settings.device)

        try:
            model = await asyncio.get_running_loop().run_in_executor(executor, load)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        limits = Limits(settings.max_size, settings.max_steps, settings.max_batch)
        base = model.pipes["txt2img"]
        lora = LoraLibrary(settings.lora_dir, base.unet, base.text_encoder)
        return cls(model, executor, limits, settings.slots, lora)

    @property
    def loras(self) -> list[str]:
        return self.lora.names()

    async def close(self) -> None:
        for run in self._runs.values():
            run.stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def skip(self, job_id: str) -> bool:
        run = self._runs.get(job_id)
        if run is None:
            return False
        run.skip.set()
        return True

    async def generate(self, job: ImageJob) -> AsyncGenerator[Event, None]:
        self.lora.check(job.loras)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        run = _Run(job, emit)
        self._runs[job.job_id] = run
        future = loop.run_in_executor(self._executor, self._run, run)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, _END))
        try:
            while (item := await queue.get()) is not _END:
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
        first_seed = job.seed if job.seed != -1 else random.randrange(2**32)
        seeds = [first_seed + i for i in range(job.batch_size * job.n_iter)]
        self.lora.apply(job.loras)
        infotexts = [self._infotext(job, seed) for seed in seeds]
        pipe = self.model.pipes[job.mode]
        pipe.scheduler = make_scheduler(job.sampler, job.scheduler, self.model.scheduler_config)
        kwargs, overlay = prepare_inputs(pipe, job)
        run.started = time.perf_counter()
        index = skipped = 0
        for iteration in range(job.n_iter):
            batch = seeds[iteration * job.batch_size : (iteration + 1) * job.batch_size]
            try:
                latents = self._denoise(pipe, run, iteration, batch, kwargs)
            except Skipped:
                log.info("job %s: skipped batch %d", job.job_id, iteration)
                skipped += len(batch)
                continue
            except Interrupted:
                log.info("job %s: stopped, nobody listens", job.job_id)
                return
            offset = iteration * job.batch_size
            for i, decoded in enumerate(self._decode(pipe, latents)):
                image = overlay(decoded) if overlay is not None else decoded
                seed, infotext = seeds[offset + i], infotexts[offset + i]
                png = encode_png(image, infotext)
                run.emit(ImageOut(png, seed, infotext, index, image.width, image.height))
                index += 1
        elapsed_ms = (time.perf_counter() - run.started) * 1000
        info = self._info(job, seeds, infotexts)
        run.emit(Done(json.dumps(info), elapsed_ms, index, skipped))

    def _denoise(
        self, pipe: Any, run: _Run, iteration: int, seeds: list[int], inputs: dict[str, Any]
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
        with torch.inference_mode():
            out = pipe(
                prompt=[job.prompt] * len(seeds),
                negative_prompt=[job.negative_prompt] * len(seeds),
                num_inference_steps=job.steps,
                guidance_scale=job.cfg_scale,
                generator=generators,
                output_type="latent",
                callback_on_step_end=on_step,
                **inputs,
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

    def _params(self, job: ImageJob, seed: int) -> dict[str, object]:
        inpaint = job.mode == "inpaint"
        return {
            "Steps": job.steps,
            "Sampler": job.sampler,
            "Schedule type": job.scheduler,
            "CFG scale": f"{job.cfg_scale:g}",
            "Seed": seed,
            "Size": f"{job.width}x{job.height}",
            "Model hash": self.card.hash or None,
            "Model": self.card.id,
            "Denoising strength": f"{job.denoising_strength:g}" if job.mode != "txt2img" else None,
            "Mask blur": job.mask_blur if inpaint else None,
            "Inpaint area": "Only masked" if inpaint and job.full_res else None,
            "Masked area padding": job.full_res_padding if inpaint and job.full_res else None,
            "Lora hashes": ", ".join(f"{x.name}: {self.lora.short_hash(x.name)}" for x in job.loras) or None,
            "Version": f"velesio {VERSION}",
        }

    def _infotext(self, job: ImageJob, seed: int) -> str:
        return format_infotext(job.written_prompt, job.negative_prompt, self._params(job, seed))

    def _info(self, job: ImageJob, seeds: list[int], infotexts: list[str]) -> dict[str, Any]:
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
            "sd_model_name": self.card.id,
            "sd_model_hash": self.card.hash,
            "denoising_strength": job.denoising_strength if job.mode != "txt2img" else None,
            "mask_blur": job.mask_blur if job.mode == "inpaint" else None,
            "inpainting_fill": job.inpainting_fill if job.mode == "inpaint" else None,
            "inpaint_full_res": job.full_res if job.mode == "inpaint" else None,
            "styles": [],
            "clip_skip": 1,
            "infotexts": infotexts,
            "version": f"velesio {VERSION}",
        }
