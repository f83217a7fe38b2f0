"""The image worker's models: single-file checkpoints loaded offline, a models folder served by name with a
bounded cache, a VAE override, inpainting UNets, A1111's inpainting fills and the SD 1.5-sized preset."""

from __future__ import annotations

import hashlib
import io
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mesh.errors import FailedPrecondition, InvalidArgument
from mesh.server import Service
from sd_worker.engine import ImageEngine
from sd_worker.infotext import parse_infotext
from sd_worker.loading import ModelLoadError
from sd_worker.models import find_models
from sd_worker.pipelines import FillInpaintPipeline
from sd_worker.presets import PRESETS, build_sd15_random
from sd_worker.server import ImageWorkerServicer
from sd_worker.settings import ImageWorkerSettings
from sd_worker.tiny import build_tiny
from sd_worker.types import ImageJob, ImageOut
from tests.conftest import EdgeFactory, ServeFactory, StartFactory
from tests.helpers import collect, inference
from tests.ldm_checkpoint import to_ldm, vae_to_ldm
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

if TYPE_CHECKING:
    from velesio.v1.workers_pb2_grpc import ImageWorkerAsyncStub


pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Files:
    cache: Path
    config: Path  # the tiny pipeline's configs, no weights
    models: Path  # tiny-file.safetensors (tiny's weights), variant.ckpt, Inpaint-Folder/, inpaint-file...
    vae_file: Path  # another VAE, A1111 key names
    vae_folder: Path  # the same VAE as a diffusers folder


def _perturbed(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sd-models")
    cache, config, models = root / "cache", root / "config", root / "models"
    models.mkdir()
    pipe = build_tiny(cache)
    pipe.save_pretrained(str(config))
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    save_file(to_ldm(pipe), str(models / "tiny-file.safetensors"))
    variant = build_tiny(cache)
    _perturbed(variant.unet, 1)
    torch.save(to_ldm(variant), str(models / "variant.ckpt"))
    inpaint = build_tiny(cache, in_channels=9)
    inpaint.save_pretrained(str(models / "Inpaint-Folder"))
    save_file(to_ldm(inpaint), str(models / "inpaint-file.safetensors"))
    other_vae = build_tiny(cache).vae
    _perturbed(other_vae, 2)
    vae_file, vae_folder = root / "other-vae.safetensors", root / "other-vae"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other_vae).items()}, str(vae_file))
    other_vae.save_pretrained(str(vae_folder))
    return Files(cache, config, models, vae_file, vae_folder)


@pytest.fixture
async def engines(files: Files) -> Any:
    """`await engines(**ImageWorkerSettings overrides)`: engines closed at the end of the test."""
    started: list[ImageEngine] = []

    async def start(**overrides: Any) -> ImageEngine:
        options: dict[str, Any] = {"torch_threads": 1, "cache_dir": files.cache, "max_size": 256}
        engine = await ImageEngine.start(ImageWorkerSettings(**(options | overrides)))
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.close()


def params(**overrides: Any) -> common_pb2.ImageParams:
    options: dict[str, Any] = {"prompt": "a red cat", "steps": 3, "width": 64, "height": 64, "seed": 7}
    return common_pb2.ImageParams(**(options | overrides))


def request(model: str = "", **overrides: Any) -> workers_pb2.ImageWorkerGenerateRequest:
    return workers_pb2.ImageWorkerGenerateRequest(job_id="job", model=model, params=params(**overrides))


async def make(engine: ImageEngine, model: str = "", **overrides: Any) -> list[ImageOut]:
    job = ImageJob.from_pb(request(model, **overrides), engine.limits)
    engine.check(job)
    return [event async for event in engine.generate(job) if isinstance(event, ImageOut)]


def pixels(image: ImageOut) -> bytes:
    return Image.open(io.BytesIO(image.png)).convert("RGB").tobytes()


def png(color: tuple[int, ...] | int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def left_half_mask() -> bytes:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def short_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network at all: a lookup on a hub fails the test instead of going unnoticed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network use: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


async def test_single_file_checkpoints_load_offline_as_the_pipeline_they_hold(
    files: Files, engines: Any, offline: None
) -> None:
    assert not list(files.config.rglob("*.safetensors"))  # weights come from the checkpoints only
    tiny = await engines()
    path = files.models / "tiny-file.safetensors"
    single = await engines(model=str(path), checkpoint_config=files.config)
    card = single.card
    assert (card.id, card.filename, card.test_only) == ("tiny-file", str(path), False)
    assert card.hash == short_hash(path)  # A1111's short hash: sha256 of the file, 10 hex digits
    assert pixels((await make(single))[0]) == pixels((await make(tiny))[0])
    ckpt = await engines(model=str(files.models / "variant.ckpt"), checkpoint_config=files.config)
    made = (await make(ckpt))[0]
    assert pixels(made) != pixels((await make(tiny))[0])
    assert parse_infotext(made.infotext)[2]["Model"] == "variant"


async def test_a_single_file_needs_a_config_folder(files: Files) -> None:
    settings = ImageWorkerSettings(model=str(files.models / "tiny-file.safetensors"), cache_dir=files.cache)
    with pytest.raises(ModelLoadError, match="--checkpoint-config"):
        await ImageEngine.start(settings)


async def test_a_broken_checkpoint_is_one_readable_error(files: Files, engines: Any, tmp_path: Path) -> None:
    for name in ("broken.safetensors", "broken.ckpt"):
        (tmp_path / name).write_bytes(b"not a checkpoint" * 10)
        settings = ImageWorkerSettings(
            model=str(tmp_path / name), checkpoint_config=files.config, cache_dir=files.cache
        )
        with pytest.raises(ModelLoadError, match=name):
            await ImageEngine.start(settings)
    engine = await engines(model="tiny", models_dir=tmp_path, checkpoint_config=files.config)
    with pytest.raises(FailedPrecondition, match="model 'broken' does not load"):
        await make(engine, "broken")
    assert len(await make(engine)) == 1  # the worker goes on with the models that load


async def test_models_dir_serves_every_model_by_name_and_lists_them(
    files: Files, engines: Any, serve: ServeFactory
) -> None:
    engine = await engines(model="tiny-file", models_dir=files.models, checkpoint_config=files.config)
    servicer = ImageWorkerServicer(engine, "image-test")
    name = workers_pb2.DESCRIPTOR.services_by_name["ImageWorker"].full_name
    served = await serve(
        [Service(name, lambda s: workers_pb2_grpc.add_ImageWorkerServicer_to_server(servicer, s))]
    )
    stub: ImageWorkerAsyncStub = workers_pb2_grpc.ImageWorkerStub(served.channel)
    info = await stub.Info(workers_pb2.ImageWorkerInfoRequest())
    listed = {m.id: (m.filename, m.hash) for m in info.models}
    assert info.models[0].id == "tiny-file"
    assert sorted(listed) == ["inpaint-file", "inpaint-folder", "tiny-file", "variant"]
    assert listed["variant"] == (
        str(files.models / "variant.ckpt"),
        short_hash(files.models / "variant.ckpt"),
    )
    unet = files.models / "Inpaint-Folder" / "unet" / "diffusion_pytorch_model.safetensors"
    assert listed["inpaint-folder"] == (str(files.models / "Inpaint-Folder"), short_hash(unet))

    async def infotext(model: str) -> dict[str, str]:
        responses = [r async for r in stub.Generate(request(model))]
        return parse_infotext(next(r.image for r in responses if r.HasField("image")).infotext)[2]

    assert (await infotext(""))["Model"] == "tiny-file"
    found = await infotext("variant")
    assert (found["Model"], found["Model hash"]) == ("variant", listed["variant"][1])
    assert engine.models.loaded() == ["variant"]  # --model-cache-mb 0: only the model in use stays
    assert (await infotext("inpaint-folder"))["Model"] == "inpaint-folder"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(request("nope")).read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in str(caught.value.details()) and "variant" in str(caught.value.details())


async def test_model_cache_keeps_the_recently_used_models_within_its_bound(
    files: Files, engines: Any
) -> None:
    # Each tiny model holds about 4.9 MiB of weights: 12 MiB keep two of them.
    engine = await engines(models_dir=files.models, checkpoint_config=files.config, model="tiny",
                           model_cache_mb=12)  # fmt: skip
    first = (await make(engine))[0]
    await make(engine, "variant")
    assert engine.models.loaded() == ["tiny", "variant"]
    again = (await make(engine, "tiny"))[0]
    assert pixels(again) == pixels(first)
    assert engine.models.loads == 2 and engine.models.loaded() == ["variant", "tiny"]
    await make(engine, "tiny-file")
    assert engine.models.loaded() == ["tiny", "tiny-file"]  # the least recently used went
    assert engine.models.loads == 3


def test_default_model_of_a_models_dir(files: Files) -> None:
    default, specs = find_models(None, "", files.models)
    assert default.id == "inpaint-folder" and len(specs) == 4  # the first by file name
    default, specs = find_models(None, "", None)
    assert (default.id, default.kind) == ("tiny", "preset")
    default, specs = find_models("variant", "my-name", files.models)
    assert (default.id, default.location) == ("my-name", str(files.models / "variant.ckpt"))
    assert "variant" not in [spec.id for spec in specs]
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        find_models("missing", "", files.models)


async def test_vae_override_from_a_file_or_a_folder(files: Files, engines: Any) -> None:
    own = (await make(await engines()))[0]
    by_file = await engines(vae=files.vae_file)
    replaced = (await make(by_file))[0]
    assert pixels(replaced) != pixels(own)
    found = parse_infotext(replaced.infotext)[2]
    assert (found["VAE"], found["VAE hash"]) == ("other-vae.safetensors", short_hash(files.vae_file))
    assert pixels((await make(by_file, vae="Automatic"))[0]) == pixels(replaced)
    by_folder = await engines(vae=files.vae_folder)
    assert pixels((await make(by_folder))[0]) == pixels(replaced)
    job = ImageJob.from_pb(request(vae="nope.safetensors"), by_file.limits)
    with pytest.raises(InvalidArgument) as caught:
        by_file.check(job)
    assert (
        caught.value.message == "vae: unknown VAE 'nope.safetensors'; valid: Automatic, other-vae.safetensors"
    )


async def test_an_inpainting_unet_runs_every_mode(files: Files, engines: Any) -> None:
    for model in (str(files.models / "Inpaint-Folder"), str(files.models / "inpaint-file.safetensors")):
        engine = await engines(model=model, checkpoint_config=files.config)
        loaded = engine.loaded()
        assert loaded.inpainting and isinstance(loaded.pipes["txt2img"], FillInpaintPipeline)
        assert loaded.base.unet.config.in_channels == 9
        red = png((220, 20, 20))
        txt2img = (await make(engine))[0]
        img2img = (await make(engine, init_images=[red], denoising_strength=0.5))[0]
        inpaint = (await make(engine, init_images=[red], mask=left_half_mask(), mask_blur=0))[0]
        assert len({pixels(txt2img), pixels(img2img), pixels(inpaint)}) == 3
        painted = Image.open(io.BytesIO(inpaint.png)).convert("RGB")
        assert painted.getpixel((60, 32)) == (220, 20, 20)  # unmasked: the init image, pasted back
        assert painted.getpixel((4, 32)) != (220, 20, 20)


async def test_inpainting_fills_start_from_different_pictures(files: Files, engines: Any) -> None:
    engine = await engines()
    striped = Image.new("RGB", (64, 64), (220, 20, 20))
    striped.paste((20, 20, 220), (0, 0, 16, 64))
    out = io.BytesIO()
    striped.save(out, format="PNG")
    made: dict[int, bytes] = {}
    for fill in common_pb2.InpaintingFill.values():
        inputs: dict[str, Any] = {"init_images": [out.getvalue()], "mask": left_half_mask(), "mask_blur": 1}
        image = (await make(engine, **inputs, inpainting_fill=fill))[0]
        result = Image.open(io.BytesIO(image.png)).convert("RGB")
        assert result.getpixel((60, 32)) == (220, 20, 20)
        made[fill] = pixels(image)
    assert made[common_pb2.INPAINTING_FILL_UNSPECIFIED] == made[common_pb2.INPAINTING_FILL_ORIGINAL]
    assert len(set(made.values())) == 4  # fill, original, latent noise, latent nothing


def test_sd15_random_has_the_sizes_of_stable_diffusion_1_5(tmp_path: Path) -> None:
    pipe = build_sd15_random(tmp_path, torch.device("meta"), torch.float32)  # shapes only, no memory

    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)

    assert (millions(pipe.unet), millions(pipe.text_encoder), millions(pipe.vae)) == (859.5, 123.1, 83.7)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.text_encoder.config.num_hidden_layers == 12
    assert "random weights" in PRESETS["sd15-random"].description


async def test_the_broker_and_the_a1111_bridge_list_and_pick_every_model(
    files: Files,
    start_broker: StartFactory,
    start_sd_worker: StartFactory,
    edge_client: EdgeFactory,
) -> None:
    broker = await start_broker()
    await start_sd_worker(models_dir=files.models, checkpoint_config=files.config, model="tiny-file")
    channel, stub = inference(broker.address)
    async with channel:
        listed = await stub.ListModels(inference_pb2.ListModelsRequest(kind=common_pb2.JOB_KIND_IMAGE))
        image_request = inference_pb2.GenerateImageRequest(model="variant", params=params(steps=2))
        events = await collect(stub.GenerateImage(image_request))
    assert sorted(m.id for m in listed.models) == ["inpaint-file", "inpaint-folder", "tiny-file", "variant"]
    assert all(len(m.hash) == 10 and m.filename for m in listed.models)
    assert parse_infotext(events[-2].image.infotext)[2]["Model"] == "variant"
    edge = await edge_client(broker.address)
    models = {m["model_name"]: m for m in (await edge.get("/sdapi/v1/sd-models")).json()}
    assert sorted(models) == ["inpaint-file", "inpaint-folder", "tiny-file", "variant"]
    variant_hash = short_hash(files.models / "variant.ckpt")
    assert models["variant"]["title"] == f"variant [{variant_hash}]"
    body = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": f"variant.ckpt [{variant_hash}]"}}  # fmt: skip
    reply = await edge.post("/sdapi/v1/txt2img", json=body)
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.json()["info"])["sd_model_name"] == "variant"
