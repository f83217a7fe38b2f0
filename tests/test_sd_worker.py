"""The image worker on the tiny random-weight pipeline: real torch, real gRPC, one broker end to end."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mesh.server import Service
from sd_worker.engine import ImageEngine
from sd_worker.infotext import format_infotext, parse_infotext
from sd_worker.samplers import SAMPLERS, SCHEDULERS
from sd_worker.server import ImageWorkerServicer
from sd_worker.settings import ImageWorkerSettings
from sd_worker.types import ImageJob, ImageOut
from tests.conftest import ServeFactory, StartFactory
from tests.helpers import collect, inference, kinds
from velesio.v1 import common_pb2, inference_pb2, workers_pb2, workers_pb2_grpc

if TYPE_CHECKING:
    from velesio.v1.workers_pb2_grpc import ImageWorkerAsyncStub

pytestmark = pytest.mark.slow

Response = workers_pb2.ImageWorkerGenerateResponse


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageEngine]:
    torch.set_num_threads(1)
    loras = tmp_path_factory.mktemp("loras")
    settings = ImageWorkerSettings(
        torch_threads=1,
        cache_dir=tmp_path_factory.mktemp("sd"),
        lora_dir=loras,
        max_size=256,
        max_steps=60,
        max_batch=4,
    )
    engine = asyncio.run(ImageEngine.start(settings))
    write_loras(engine, loras)
    yield engine
    asyncio.run(engine.close())


def write_loras(engine: ImageEngine, folder: Path) -> None:
    """A kohya-layout LoRA on the UNet's attention and a diffusers-layout one on the text encoder."""
    pipe = engine.loaded().base
    generator = torch.Generator().manual_seed(0)
    kohya: dict[str, torch.Tensor] = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            key = "lora_unet_" + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator)
            kohya[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator)
            kohya[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(kohya, str(folder / "detail.safetensors"))
    peft: dict[str, torch.Tensor] = {}
    for name, module in pipe.text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("q_proj", "v_proj")):
            peft[f"text_encoder.{name}.lora_A.weight"] = torch.randn(
                2, module.in_features, generator=generator
            )
            peft[f"text_encoder.{name}.lora_B.weight"] = torch.randn(
                module.out_features, 2, generator=generator
            )
    save_file(peft, str(folder / "style.safetensors"))


@pytest.fixture
async def stub(engine: ImageEngine, serve: ServeFactory) -> ImageWorkerAsyncStub:
    servicer = ImageWorkerServicer(engine, "image-test")
    name = workers_pb2.DESCRIPTOR.services_by_name["ImageWorker"].full_name
    served = await serve(
        [Service(name, lambda s: workers_pb2_grpc.add_ImageWorkerServicer_to_server(servicer, s))]
    )
    return workers_pb2_grpc.ImageWorkerStub(served.channel)


def params(**overrides: Any) -> common_pb2.ImageParams:
    options: dict[str, Any] = {"prompt": "a red cat", "steps": 3, "width": 64, "height": 64, "seed": 7}
    return common_pb2.ImageParams(**(options | overrides))


def request(job_id: str = "job", **overrides: Any) -> workers_pb2.ImageWorkerGenerateRequest:
    return workers_pb2.ImageWorkerGenerateRequest(job_id=job_id, params=params(**overrides))


async def run(stub: ImageWorkerAsyncStub, **overrides: Any) -> list[Response]:
    return [r async for r in stub.Generate(request(**overrides))]


async def read(call: Any) -> Response | None:
    """The next message of a streaming call, None at its end."""
    response = await call.read()
    if response is grpc.aio.EOF:
        return None
    assert isinstance(response, Response)
    return response


def png(color: tuple[int, ...] | int, mode: str = "RGB", size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def images(responses: list[Response]) -> list[Any]:
    return [r.image for r in responses if r.HasField("image")]


async def test_txt2img_progress_result_and_info(stub: ImageWorkerAsyncStub) -> None:
    responses = await run(stub, negative_prompt="blurry", preview_every=2, batch_size=2, n_iter=2)
    progress = [r.progress for r in responses if r.HasField("progress")]
    assert [(p.iteration, p.step, p.total_steps) for p in progress] == [
        (i, s, 3) for i in range(2) for s in (1, 2, 3)
    ]
    assert {p.total_iterations for p in progress} == {2}
    assert progress[-1].eta_seconds == 0 and progress[0].eta_seconds > 0
    assert [bool(p.preview_png) for p in progress] == [False, True, False] * 2
    assert Image.open(io.BytesIO(progress[1].preview_png)).size == (8, 8)
    results = images(responses)
    assert [(r.index, r.seed, r.width, r.height) for r in results] == [(i, 7 + i, 64, 64) for i in range(4)]
    first = Image.open(io.BytesIO(results[0].png))
    assert first.size == (64, 64)
    assert first.info["parameters"] == results[0].infotext
    done = responses[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP and done.timings.predicted_ms > 0
    info = json.loads(done.info_json)
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert (info["width"], info["height"], info["steps"], info["batch_size"], info["n_iter"]) == (
        64,
        64,
        3,
        2,
        2,
    )
    assert info["sampler_name"] == "Euler a" and info["sd_model_name"] == "tiny" and info["sd_model_hash"]
    assert info["negative_prompt"] == "blurry" and info["infotexts"] == [r.infotext for r in results]


async def test_same_seed_same_pixels_random_seed_reported(stub: ImageWorkerAsyncStub) -> None:
    a, b = images(await run(stub, seed=123)), images(await run(stub, seed=123))
    assert pixels(a[0].png) == pixels(b[0].png)
    assert pixels(images(await run(stub, seed=124))[0].png) != pixels(a[0].png)
    random = images(await run(stub, seed=-1))[0]
    assert random.seed >= 0
    assert pixels(images(await run(stub, seed=random.seed))[0].png) == pixels(random.png)


async def test_img2img_and_inpaint(stub: ImageWorkerAsyncStub) -> None:
    red = png((220, 20, 20))
    img2img = await run(stub, init_images=[red], denoising_strength=0.5, steps=4)
    assert len([r for r in img2img if r.HasField("progress")]) == 2  # strength 0.5 of 4 steps
    assert "Denoising strength: 0.5" in images(img2img)[0].infotext
    # A larger init image is fitted to the requested size.
    fitted = await run(stub, init_images=[png((220, 20, 20), size=(96, 80))], resize_mode=2)
    assert images(fitted)[0].width == 64

    mask = png(0, "L")  # black: repaint nothing
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    out = io.BytesIO()
    half.save(out, format="PNG")
    kept = images(await run(stub, init_images=[red], mask=mask, mask_blur=0))[0]
    repainted = images(await run(stub, init_images=[red], mask=out.getvalue(), mask_blur=2))[0]
    inverted = images(
        await run(stub, init_images=[red], mask=out.getvalue(), mask_blur=2, inpainting_mask_invert=True)
    )[0]
    assert len({pixels(kept.png), pixels(repainted.png), pixels(inverted.png)}) == 3
    assert "Mask blur: 2" in repainted.infotext
    for fill in (common_pb2.INPAINTING_FILL_FILL, common_pb2.INPAINTING_FILL_ORIGINAL):
        only_masked = images(
            await run(
                stub,
                init_images=[red],
                mask=out.getvalue(),
                mask_blur=2,
                inpainting_fill=fill,
                inpaint_full_res=True,
                inpaint_full_res_padding=8,
            )
        )[0]
        result = Image.open(io.BytesIO(only_masked.png)).convert("RGB")
        assert result.getpixel((60, 32)) == (220, 20, 20)  # far from the mask: the init image, pasted back
        assert result.getpixel((4, 32)) != (220, 20, 20)
        assert "Inpaint area: Only masked, Masked area padding: 8" in only_masked.infotext


async def test_every_sampler_runs(stub: ImageWorkerAsyncStub) -> None:
    for sampler in SAMPLERS:
        for scheduler in SCHEDULERS:
            responses = await run(stub, sampler=sampler, scheduler=scheduler, steps=2)
            assert responses[-1].HasField("done"), sampler
            _, _, found = parse_infotext(images(responses)[0].infotext)
            assert found["Sampler"] == sampler
            if sampler in ("Euler a", "DDIM"):  # no sigma schedule to choose in diffusers
                assert found["Schedule type"] == "Automatic"
            elif sampler == "DPM++ 2M Karras":
                assert found["Schedule type"] == "Karras"
            else:
                assert found["Schedule type"] == scheduler
    info = await stub.Info(workers_pb2.ImageWorkerInfoRequest())
    assert list(info.samplers) == list(SAMPLERS) and list(info.schedulers) == list(SCHEDULERS)
    model = info.models[0]
    assert (model.id, model.kind, model.test_only) == ("tiny", common_pb2.JOB_KIND_IMAGE, True)
    assert list(model.capabilities) == ["txt2img", "img2img", "inpaint"] and model.hash
    assert (info.slots_total, info.slots_busy, info.worker_id) == (1, 0, "image-test")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"width": 60}, "width"),
        ({"height": 512}, "height"),
        ({"steps": 61}, "steps"),
        ({"batch_size": 5}, "batch_size"),
        ({"n_iter": 0}, "n_iter"),
        ({"sampler": "Euler b"}, "sampler"),
        ({"scheduler": "Weird"}, "scheduler"),
        ({"init_images": [b"not an image"]}, "init_images"),
        ({"init_images": [png(1, "L")], "mask": b"\x89PNG broken"}, "mask"),
        ({"init_images": [png(1, "L")], "mask": png(1, "L", (32, 32))}, "mask"),
        ({"mask": png(1, "L")}, "mask"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"vae": "other.safetensors"}, "vae"),
        ({"init_images": [png(1, "L")], "mask": png(1, "L"), "inpainting_fill": 9}, "inpainting_fill"),
        ({"init_images": [png(1, "L")], "steps": 2, "denoising_strength": 0.4}, "steps"),
        ({"prompt": "a cat <lora:nothing:0.5>"}, "loras"),
        ({"prompt": "a cat <lora:detail:x>"}, "prompt"),
    ],
)
async def test_bad_input_is_invalid_argument(
    stub: ImageWorkerAsyncStub, overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(stub, **overrides)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith(f"{field}: ")
    if field == "sampler":
        assert "Euler a" in str(caught.value.details()) and "DPM++ 2M Karras" in str(caught.value.details())
    assert (await run(stub, steps=1))[-1].HasField("done")


async def test_cancel_stops_before_decode_and_the_next_job_runs(
    engine: ImageEngine, stub: ImageWorkerAsyncStub
) -> None:
    decodes, steps = engine.vae_decodes, engine.steps_run
    call = stub.Generate(request(steps=60))
    for _ in range(2):
        assert (response := await read(call)) and response.HasField("progress")
    call.cancel()
    responses = await run(stub, steps=2)  # runs once the cancelled job has left the engine thread
    assert responses[-1].HasField("done")
    assert engine.vae_decodes == decodes + 1  # the second job's decode only
    assert engine.steps_run - steps - 2 < 30


async def test_skip_drops_the_current_batch(stub: ImageWorkerAsyncStub) -> None:
    call = stub.Generate(request(job_id="skip-me", steps=20, n_iter=2))
    assert (response := await read(call)) and response.HasField("progress")
    assert (await stub.Skip(workers_pb2.ImageWorkerSkipRequest(job_id="skip-me"))).skipped
    rest: list[Response] = []
    while (next_response := await read(call)) is not None:
        rest.append(next_response)
    assert [(r.seed, r.index) for r in images(rest)] == [(8, 0)]
    assert rest[-1].done.skipped_images == 1
    assert json.loads(rest[-1].done.info_json)["all_seeds"] == [7, 8]
    assert not (await stub.Skip(workers_pb2.ImageWorkerSkipRequest(job_id="skip-me"))).skipped


async def test_lora_changes_the_output_and_weight_0_restores_it(stub: ImageWorkerAsyncStub) -> None:
    base = pixels(images(await run(stub))[0].png)
    with_tag = images(await run(stub, prompt="a red cat <lora:detail:0.8>"))[0]
    assert pixels(with_tag.png) != base
    _, _, found = parse_infotext(with_tag.infotext)
    assert found["Lora hashes"].startswith("detail: ")
    assert with_tag.infotext.startswith("a red cat <lora:detail:0.8>\n")
    by_field = await run(stub, loras=[common_pb2.LoraRef(name="detail", weight=0.8)])
    assert pixels(images(by_field)[0].png) == pixels(with_tag.png)
    style = pixels(images(await run(stub, loras=[common_pb2.LoraRef(name="style")]))[0].png)
    assert style not in (base, pixels(with_tag.png))
    assert pixels(images(await run(stub, prompt="a red cat <lora:detail:0>"))[0].png) == base
    assert pixels(images(await run(stub))[0].png) == base
    info = await stub.Info(workers_pb2.ImageWorkerInfoRequest())
    assert list(info.loras) == ["detail", "style"]


async def test_infotext_round_trips(stub: ImageWorkerAsyncStub) -> None:
    result = images(
        await run(stub, prompt='a "quoted", cat: yes', negative_prompt="ugly\nblurry", cfg_scale=5.5)
    )[0]
    prompt, negative, found = parse_infotext(Image.open(io.BytesIO(result.png)).info["parameters"])
    assert (prompt, negative) == ('a "quoted", cat: yes', "ugly\nblurry")
    assert found["Seed"] == "7" and found["Size"] == "64x64" and found["CFG scale"] == "5.5"
    assert found["Sampler"] == "Euler a" and found["Model"] == "tiny" and found["Steps"] == "3"
    written = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "Seed": 1, "Note": 'a, "b": c', "Size": "512x512"}
    text = format_infotext("line one\nline two", "", written)
    assert parse_infotext(text) == ("line one\nline two", "", {k: str(v) for k, v in written.items()})


async def test_through_the_broker(
    start_broker: StartFactory, start_sd_worker: StartFactory, tmp_path: Path
) -> None:
    broker = await start_broker()
    await start_sd_worker()
    channel, inference_stub = inference(broker.address)
    async with channel:
        image_request = inference_pb2.GenerateImageRequest(params=params(steps=2, seed=3))
        events = await collect(inference_stub.GenerateImage(image_request))
    assert kinds(events)[:2] == ["queued", "started"]
    assert kinds(events)[2:] == ["progress", "progress", "image", "done"]
    result = events[-2].image
    assert result.seed == 3 and Image.open(io.BytesIO(result.png)).size == (64, 64)
    assert json.loads(events[-1].done.info_json)["all_seeds"] == [3]


async def test_a_model_that_does_not_load_stops_the_worker_before_it_registers(
    redis_url: str, tmp_path: Path
) -> None:
    from mesh.keys import Keys
    from sd_worker.loading import ModelLoadError
    from sd_worker.main import serve

    keys = Keys("test-sd-broken")
    settings = ImageWorkerSettings(model=str(tmp_path), redis_url=redis_url, key_prefix=keys.prefix)
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        await serve(settings)


async def test_a_diffusers_folder_serves_like_the_pipeline_it_holds(
    engine: ImageEngine, stub: ImageWorkerAsyncStub, tmp_path: Path
) -> None:
    engine.loaded().base.save_pretrained(str(tmp_path / "tiny-copy"))
    settings = ImageWorkerSettings(model=str(tmp_path / "tiny-copy"), torch_threads=1, max_size=256)
    copy = await ImageEngine.start(settings)
    try:
        assert (copy.card.id, copy.card.test_only) == ("tiny-copy", False)
        assert len(copy.card.hash) == 10
        job = ImageJob.from_pb(request(), copy.limits)
        events = [event async for event in copy.generate(job)]
        made = [event for event in events if isinstance(event, ImageOut)]
        assert pixels(made[0].png) == pixels(images(await run(stub))[0].png)
    finally:
        await copy.close()
