"""The Automatic1111 dialect of the edge against a real broker and a real tiny-pipeline image worker: over
ASGI in-process, and with the `webuiapi` client library against a real edge process."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from tests.conftest import EdgeFactory, EdgeProcessFactory, StartFactory

pytestmark = pytest.mark.slow
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 7}


def png_b64(size: tuple[int, int], color: int) -> str:
    buffer = io.BytesIO()
    Image.new("L" if color in (0, 255) else "RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
async def stack(start_broker: StartFactory, start_sd_worker: StartFactory) -> str:
    broker = await start_broker(api_tokens="painter:pw-1")
    await start_sd_worker()
    return broker.address


@pytest.fixture
async def edge(stack: str, edge_client: EdgeFactory) -> httpx.AsyncClient:
    client = await edge_client(stack)
    # A1111 clients send HTTP Basic; the password is the token.
    client.headers["authorization"] = "Basic " + base64.b64encode(b"painter:pw-1").decode()
    return client


async def test_txt2img_returns_pngs_with_infotext(edge: httpx.AsyncClient) -> None:
    reply = await edge.post(
        "/sdapi/v1/txt2img", json={"prompt": "a red cube", "sampler_name": "Euler", "batch_size": 2, **SMALL}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["images"]) == 2
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64)
    assert "a red cube" in image.info["parameters"] and "Sampler: Euler" in image.info["parameters"]
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8] and info["sampler_name"] == "Euler"
    assert body["parameters"]["prompt"] == "a red cube"
    again = await edge.post(
        "/sdapi/v1/txt2img", json={"prompt": "a red cube", "sampler_name": "Euler", "batch_size": 2, **SMALL}
    )
    assert again.json()["images"] == body["images"]  # same seed, same pixels


async def test_img2img_and_inpaint(edge: httpx.AsyncClient) -> None:
    init = png_b64((64, 64), 128)
    reply = await edge.post(
        "/sdapi/v1/img2img", json={"prompt": "x", "init_images": [init], "denoising_strength": 0.5, **SMALL}
    )
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["images"]) == 1
    mask = png_b64((64, 64), 255)
    reply = await edge.post(
        "/sdapi/v1/img2img",
        json={"prompt": "x", "init_images": ["data:image/png;base64," + init], "mask": mask, **SMALL},
    )
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 65, "height": 64, "steps": 2}, "width"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope", **SMALL}, "sampler"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": "many"}, "steps"),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"], **SMALL}, "init_images[0]"),
        (
            "/sdapi/v1/img2img",
            {"prompt": "x", "init_images": [base64.b64encode(b"not an image").decode()], **SMALL},
            "init_images",
        ),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, "init_images"),
    ],
)
async def test_bad_input_is_an_a1111_error(
    edge: httpx.AsyncClient, path: str, payload: dict[str, Any], field: str
) -> None:
    reply = await edge.post(path, json=payload)
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert field in body["detail"]


async def test_lists_options_and_auth(edge: httpx.AsyncClient) -> None:
    models = (await edge.get("/sdapi/v1/sd-models")).json()
    assert [m["model_name"] for m in models] == ["tiny"]
    samplers = {s["name"] for s in (await edge.get("/sdapi/v1/samplers")).json()}
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= samplers
    assert {s["label"] for s in (await edge.get("/sdapi/v1/schedulers")).json()} >= {"Automatic", "Karras"}
    assert (await edge.get("/sdapi/v1/loras")).json() == []
    assert (await edge.get("/sdapi/v1/options")).json()["sd_model_checkpoint"] == "tiny"
    missing = await edge.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"})
    assert missing.status_code == 404 and "tiny" in missing.json()["detail"]
    unauthorized = await edge.get(
        "/sdapi/v1/sd-models", headers={"authorization": "Basic " + base64.b64encode(b"x:bad").decode()}
    )
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"] == "UNAUTHENTICATED"


async def test_the_chosen_checkpoint_is_the_tenants_on_every_replica(
    edge: httpx.AsyncClient, stack: str, start_broker: StartFactory, edge_client: EdgeFactory
) -> None:
    """sd_model_checkpoint set through one edge and broker is what the caller's tenant has on another pair
    (the broker keeps it in Redis); the edge itself keeps nothing."""
    other = await edge_client((await start_broker(api_tokens="painter:pw-1")).address)
    other.headers["authorization"] = "Bearer pw-1"
    image = {"kind": "JOB_KIND_IMAGE"}
    before = (await other.get("/v1/cluster/default-models", params=image)).json()["defaults"]
    assert before == [{"kind": "JOB_KIND_IMAGE", "model": "tiny"}]  # the cluster's default, no choice
    chose = await edge.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny.safetensors [abc]"})
    assert chose.status_code == 200 and chose.json() == {}
    after = (await other.get("/v1/cluster/default-models", params=image)).json()["defaults"]
    assert after == [{"kind": "JOB_KIND_IMAGE", "model": "tiny", "tenant_choice": True}]
    assert (await other.get("/sdapi/v1/options")).json()["sd_model_checkpoint"] == "tiny"
    made = await other.post("/sdapi/v1/txt2img", json={"prompt": "a cube", **SMALL})
    assert made.status_code == 200 and json.loads(made.json()["info"])["sd_model_name"] == "tiny"
    cleared = await other.post("/sdapi/v1/options", json={"sd_model_checkpoint": ""})
    assert cleared.status_code == 200
    assert (await edge.get("/v1/cluster/default-models", params=image)).json()["defaults"] == before


async def test_progress_and_interrupt_follow_the_callers_newest_job(edge: httpx.AsyncClient) -> None:
    idle = (await edge.get("/sdapi/v1/progress")).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    long = {"prompt": "slow", "width": 64, "height": 64, "steps": 150, "seed": 1}
    generating = asyncio.create_task(edge.post("/sdapi/v1/txt2img", json=long))
    seen: dict[str, Any] = {}
    for _ in range(400):
        seen = (await edge.get("/sdapi/v1/progress")).json()
        if seen["state"]["sampling_step"] >= 2:
            break
        await asyncio.sleep(0.02)
    assert 0 < seen["progress"] < 1
    assert seen["state"]["sampling_steps"] == 150
    assert seen["state"]["job"].startswith("task(")
    assert (await edge.post("/sdapi/v1/interrupt")).json() == {}
    reply = await asyncio.wait_for(generating, 30)
    assert reply.status_code == 499  # the job was cancelled: no images
    after = (await edge.get("/sdapi/v1/progress")).json()
    assert after["state"]["interrupted"] is True


@pytest.fixture
async def edge_process(stack: str, start_edge_process: EdgeProcessFactory) -> str:
    """The port of a real `velesio edge` process in front of the stack's broker."""
    base = await start_edge_process(stack)
    return base.rsplit(":", 1)[1]


async def test_webuiapi_client(edge_process: str) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(edge_process))
    api.set_auth("painter", "pw-1")
    result = await asyncio.to_thread(api.txt2img, prompt="a cube", sampler_name="Euler a", **SMALL)
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [7]
    init = Image.new("RGB", (64, 64), (200, 10, 10))
    result = await asyncio.to_thread(
        api.img2img, images=[init], prompt="a cube", denoising_strength=0.6, **SMALL
    )
    assert result.image.size == (64, 64)
    mask = Image.new("L", (64, 64), 255)
    result = await asyncio.to_thread(api.img2img, images=[init], mask_image=mask, prompt="inpaint", **SMALL)
    assert result.image.size == (64, 64)
    progress = await asyncio.to_thread(api.get_progress)
    assert progress["progress"] == 0
    assert [m["model_name"] for m in await asyncio.to_thread(api.get_sd_models)] == ["tiny"]
