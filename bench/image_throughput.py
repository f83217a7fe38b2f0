"""Image throughput: images/min through the whole stack vs the same diffusers pipeline called in-process
(DESIGN.md, "Performance targets": whole stack >= 0.95x in-process).

The stack is a private redis-server, one `velesio broker` and one `velesio sd-worker`, each its own
process, driven from here over gRPC (Inference/GenerateImage, read to the done event). The peer, measured
in the same run with the same model, size, steps, sampler, seeds and torch threads, is the pipeline that
`velesio sd-worker` loads, called in this process (txt2img, decoded to PIL images). The two phases take
turns, so each has the machine to itself. On CUDA both run in float16 with SDPA attention.

    python -m bench.image_throughput --images 6 --steps 20 --size 64 --threads 1
    python -m bench.image_throughput --model sd15-random --device cuda --size 512 --steps 20 --images 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench.mesh_overhead import Rig, wait_worker_registered
from mesh.ports import free_port
from velesio.v1 import common_pb2, inference_pb2, inference_pb2_grpc

TARGET_RATIO = 0.95
WORKER_ID = "bench-sd"
PROMPT = "a lighthouse on a cliff at dusk"
READY_TIMEOUT_S = 180.0


class ImageRig(Rig):
    """redis-server + one broker + one sd-worker, each its own process."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(workdir, slots=args.worker_slots, log_level=args.log_level)
        self.args = args

    def __enter__(self) -> ImageRig:
        super().__enter__()
        return self

    def start(self) -> None:
        common = self.start_broker()
        worker: dict[str, object] = dict(
            common, port=free_port(), worker_id=WORKER_ID, model=self.args.model,
            torch_threads=self.args.threads, device=self.args.device, max_steps=max(150, self.args.steps),
            slots=self.args.worker_slots, cache_dir=self.workdir / "worker-cache",
        )  # fmt: skip
        if self.args.checkpoint_config:
            worker["checkpoint_config"] = self.args.checkpoint_config
        self._spawn("worker", "sd-worker", **worker)


def params(args: argparse.Namespace, seed: int) -> common_pb2.ImageParams:
    return common_pb2.ImageParams(
        prompt=PROMPT,
        sampler=args.sampler,
        steps=args.steps,
        width=args.size,
        height=args.size,
        seed=seed,
    )


async def wait_ready(rig: ImageRig) -> None:
    await wait_worker_registered(rig, WORKER_ID, "the sd worker")


async def stack_phase(rig: ImageRig, args: argparse.Namespace, first_seed: int) -> float:
    """Seconds for `args.images` images through the broker, `args.concurrency` callers at once."""
    seeds = iter(range(first_seed, first_seed + args.images))
    made = 0

    async def caller(stub: inference_pb2_grpc.InferenceAsyncStub) -> None:
        nonlocal made
        for seed in seeds:
            call = stub.GenerateImage(inference_pb2.GenerateImageRequest(params=params(args, seed)))
            async for response in call:
                event = response.event
                if event.HasField("error"):
                    raise RuntimeError(f"job failed: {event.error.message}")
                if event.HasField("image"):
                    made += 1

    async with grpc.aio.insecure_channel(rig.broker_address) as channel:
        stub: inference_pb2_grpc.InferenceAsyncStub = inference_pb2_grpc.InferenceStub(channel)
        started = time.perf_counter()
        await asyncio.gather(*(caller(stub) for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
    if made != args.images:
        raise RuntimeError(f"the stack made {made} images, not {args.images}")
    return elapsed


def load_peer(args: argparse.Namespace, cache_dir: Path) -> Any:
    """The pipeline `velesio sd-worker` would load for these options (same device, dtype, attention)."""
    import torch

    from sd_worker.loading import LoadOptions, load_model, pick_device
    from sd_worker.models import HashCache, find_models, make_card

    torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.device)
    spec, _ = find_models(args.model, "", None)
    card = make_card(spec, HashCache(cache_dir / "model-hashes.json"), device)
    config = Path(args.checkpoint_config) if args.checkpoint_config else None
    model = load_model(spec, card, LoadOptions(device, dtype, cache_dir, checkpoint_config=config))
    return model.base, model.scheduler_config


def peer_phase(pipe: Any, scheduler_config: Any, args: argparse.Namespace, first_seed: int) -> float:
    """Seconds for `args.images` images from the pipeline called here, one at a time."""
    import torch

    from sd_worker.samplers import make_scheduler

    started = time.perf_counter()
    for seed in range(first_seed, first_seed + args.images):
        pipe.scheduler = make_scheduler(args.sampler, "Automatic", scheduler_config)
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe(
            PROMPT, num_inference_steps=args.steps, width=args.size, height=args.size, generator=generator
        ).images[0].load()
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="velesio-bench-img-"))
    pipe, scheduler_config = load_peer(args, workdir / "peer-cache")
    peer_phase(pipe, scheduler_config, argparse.Namespace(**{**vars(args), "images": 1}), 0)  # warm-up
    stack_s: list[float] = []
    peer_s: list[float] = []
    with ImageRig(workdir, args) as rig:
        await wait_ready(rig)
        warm = argparse.Namespace(**{**vars(args), "images": 1, "concurrency": 1})
        await stack_phase(rig, warm, 0)
        for repeat in range(args.repeats):
            first_seed = 1000 * (repeat + 1)
            stack_s.append(await stack_phase(rig, args, first_seed))
            peer_s.append(peer_phase(pipe, scheduler_config, args, first_seed))
    stack_per_min = args.images * 60 / statistics.median(stack_s)
    peer_per_min = args.images * 60 / statistics.median(peer_s)
    return {
        "model": args.model,
        "size": f"{args.size}x{args.size}",
        "steps": args.steps,
        "sampler": args.sampler,
        "threads": args.threads,
        "device": args.device,
        "worker_slots": args.worker_slots,
        "images_per_repeat": args.images,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "stack_seconds": [round(s, 3) for s in stack_s],
        "peer_seconds": [round(s, 3) for s in peer_s],
        "stack_images_per_min": round(stack_per_min, 2),
        "peer_images_per_min": round(peer_per_min, 2),
        "ratio": round(stack_per_min / peer_per_min, 3),
        "target_ratio": TARGET_RATIO,
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--model",
        default="tiny",
        help="sd-worker --model: a preset ('tiny'; 'sd15-random' is SD 1.5 sized, for a GPU), a diffusers "
        "folder or a single-file checkpoint (with --checkpoint-config)",
    )
    parser.add_argument("--checkpoint-config", default="", help="config folder for a single-file --model")
    parser.add_argument("--images", type=int, default=6, help="images per phase")
    parser.add_argument("--repeats", type=int, default=2, help="stack/peer phase pairs; medians reported")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="width and height in pixels")
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, worker and peer alike")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--concurrency", type=int, default=2, help="callers through the stack at once")
    parser.add_argument(
        "--worker-slots",
        type=int,
        default=2,
        help="sd-worker --slots: jobs it holds at once (they run one after another; with 2 the next job "
        "starts on the GPU while the last one's PNGs are written)",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    verdict = "meets" if result["ratio"] >= TARGET_RATIO else "misses"
    stack, peer = result["stack_images_per_min"], result["peer_images_per_min"]
    print(
        f"stack {stack:.1f} images/min vs in-process {peer:.1f}: "
        f"ratio {result['ratio']:.3f} ({verdict} the {TARGET_RATIO} target)"
    )


if __name__ == "__main__":
    main()
