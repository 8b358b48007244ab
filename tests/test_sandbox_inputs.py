"""The sandbox checks source media as the API must, and derives its results from them.

Requests are sent with a plain aiohttp session (not our client) to the real sandbox over
loopback; the source media are served by a real loopback HTTP server.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from batchrunner.sandbox import SandboxConfig, serve
from batchrunner.sandbox.media import decode_png

from .conftest import RED, WHITE, free_port, make_png, red_square, serve_files

HOST = {"Host": "business.api.cliprise.app"}
KEY = "sandbox-key"
PHOTO = make_png(60, 40, red_square)
FILES = {
    "photo.png": (200, "image/png", PHOTO),
    "share.html": (200, "text/html", b"<!DOCTYPE html><html><body>Shared with you</body></html>"),
    "page.bin": (200, "application/octet-stream", b"  <html><head></head></html>"),
    "notes.txt": (200, "text/plain", b"just some words"),
    "private.png": (403, "application/xml", b"<Error><Code>AccessDenied</Code></Error>"),
}


async def post(url: str, body: object) -> tuple[int, Any]:
    headers = {**HOST, "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url + "/app/cliprise/generate", data=json.dumps(body), headers=headers) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if raw else None


async def result(url: str, task_id: str) -> tuple[bytes, aiohttp.typedefs.LooseHeaders]:
    """Poll until the task is done, then download its file; (bytes, response headers)."""
    params = {"apiKey": KEY, "taskId": task_id}
    async with aiohttp.ClientSession() as s:
        with anyio.fail_after(20):
            while True:
                async with s.get(url + "/app/cliprise/status", params=params, headers=HOST) as r:
                    if r.status == 200:
                        break
                    assert r.status == 300, await r.text()
                await anyio.sleep(0.01)
        async with s.get(url + "/app/cliprise/status", params=params | {"download": "true"}, headers=HOST) as r:
            assert r.status == 200
            return await r.read(), r.headers


def task_id(answer: Any) -> str:
    assert isinstance(answer, list) and answer[0]["code"] == 200, answer
    return str(answer[0]["taskId"])


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def root_catalog(folder: Path) -> Path:
    """A catalog with a root-only model (the shipped one names none: the public docs give no root-only id)."""
    path = folder / "catalog.csv"
    path.write_text("id,modality,input_style\nposter-root,image,root\n")
    return path


async def test_every_bad_source_url_is_a_validation_error_and_no_task(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/gone.png"  # nothing listens there
    async with serve(SandboxConfig(catalog_file=root_catalog(tmp_path))) as (sandbox, url), serve_files(FILES) as files:
        cases = [
            ({"model": "kling-video-turbo", "input": {"prompt": "p", "image_url": "ftp://127.0.0.1/a.png"}}, "input.image_url", "http(s)"),
            ({"model": "kling-video-turbo", "input": {"prompt": "p", "image_url": "file:///etc/hosts"}}, "input.image_url", "http(s)"),
            ({"model": "kling-video-turbo", "input": {"prompt": "p", "image_url": dead}}, "input.image_url", "could not be fetched"),
            ({"model": "kling-video-turbo", "input": {"prompt": "p", "image_url": files + "/private.png"}}, "input.image_url", "HTTP 403"),
            ({"model": "kling-video-turbo", "input": {"prompt": "p", "image_url": files + "/missing.png"}}, "input.image_url", "HTTP 404"),
            ({"model": "recraft-remove-bg", "input": {"image_url": files + "/share.html"}}, "input.image_url", "HTML page"),
            ({"model": "recraft-remove-bg", "input": {"image_url": files + "/page.bin"}}, "input.image_url", "HTML page"),
            ({"model": "recraft-remove-bg", "input": {"image_url": files + "/notes.txt"}}, "input.image_url", "not an image, video"),
            ({"model": "runway-aleph", "input": {"prompt": "p", "video_url": "https://example.com/a.mp4"}}, "input.video_url", "loopback"),
            ({"model": "poster-root", "prompt": "p", "imageUrl": files + "/notes.txt"}, "imageUrl", "not an image"),
            (
                {"model": "flux-2", "input": {"prompt": "p"}, "imageURLList": json.dumps([files + "/photo.png", files + "/share.html"])},
                "imageURLList[1]",
                "HTML page",
            ),
        ]
        for body, field, words in cases:
            status, answer = await post(url, body)
            assert status == 200 and answer["code"] == 400 and answer["data"] is None, (body, answer)
            assert answer["msg"].startswith(field + ":") and words in answer["msg"], (body, answer)
        assert sandbox.stats.tasks_created == 0
        assert sandbox.stats.inputs_refused == len(cases)
        assert sandbox.stats.inputs_fetched == 1  # imageURLList[0], fetched before [1] was refused


async def test_accepted_sources_are_fetched_and_recorded_per_task() -> None:
    async with serve(SandboxConfig(time_scale=0.0001)) as (sandbox, url), serve_files(FILES) as files:
        body = {
            "model": "wan-animate-replace",
            "input": {"image_url": files + "/photo.png?X-Amz-Signature=abc", "video_url": files + "/photo.png"},
            "callBackUrl": "https://example.com/hook",  # a callback, not media: never fetched
        }
        _, answer = await post(url, body)
        tid = task_id(answer)
        assert sandbox.stats.inputs_fetched == 2 and sandbox.stats.tasks_created == 1
        async with aiohttp.ClientSession() as s, s.get(url + "/_sandbox/tasks") as r:
            tasks = await r.json()
        sha = hashlib.sha256(PHOTO).hexdigest()
        assert tasks[tid]["inputs"] == {"input.image_url": sha, "input.video_url": sha}
        assert sandbox.stats.as_json()["inputs_by_sha"] == {sha: 2}


async def test_images_follow_the_requested_aspect_ratio(tmp_path: Path) -> None:
    async with serve(SandboxConfig(time_scale=0.0001, catalog_file=root_catalog(tmp_path))) as (_, url):
        for model, fields, ratio in [
            ("flux-2", {"aspect_ratio": "16:9"}, (16, 9)),
            ("flux-2", {"aspect_ratio": "2:3"}, (2, 3)),
            ("flux-2", {}, (1, 1)),
            ("gpt-image-1", {"size": "1024x1536"}, (2, 3)),
        ]:
            _, answer = await post(url, {"model": model, "input": {"prompt": "a bottle", **fields}})
            data, _ = await result(url, task_id(answer))
            width, height = png_size(data)
            assert width * ratio[1] == height * ratio[0], (model, fields, width, height)
        _, answer = await post(url, {"model": "poster-root", "prompt": "a poster", "options": '{"aspect_ratio":"3:4"}'})
        width, height = png_size((await result(url, task_id(answer)))[0])
        assert width * 4 == height * 3


async def test_an_edit_keeps_the_input_colours_at_the_requested_ratio() -> None:
    async with serve(SandboxConfig(time_scale=0.0001)) as (_, url), serve_files(FILES) as files:
        body = {"model": "flux-kontext-pro", "input": {"prompt": "glossy", "image_url": files + "/photo.png", "aspect_ratio": "16:9"}}
        data, _ = await result(url, task_id((await post(url, body))[1]))
        pic = decode_png(data)
        assert pic is not None and pic.width * 9 == pic.height * 16
        centre, corner = pic.pixel(pic.width // 2, pic.height // 2), pic.pixel(1, 1)
        assert centre[0] > 150 and centre[1] < 100 and centre[2] < 100  # the red square, lightly tinted
        assert min(corner[:3]) > 150  # the white background, lightly tinted


async def test_a_cut_out_keeps_the_input_pixels_with_transparency() -> None:
    async with serve(SandboxConfig(time_scale=0.0001)) as (_, url), serve_files(FILES) as files:
        body = {"model": "recraft-remove-bg", "input": {"image_url": files + "/photo.png"}}
        data, _ = await result(url, task_id((await post(url, body))[1]))
        assert data[25] == 6  # PNG colour type 6: RGBA
        pic = decode_png(data)
        assert pic is not None and (pic.width, pic.height) == (60, 40)
        for y in range(40):
            for x in range(60):
                r, g, b, a = pic.pixel(x, y)
                if red_square(x, y) == RED:
                    assert (r, g, b, a) == (*RED, 255)
                else:
                    assert (r, g, b) == WHITE and a == 0


async def test_a_video_from_an_image_carries_its_colours() -> None:
    async with serve(SandboxConfig(time_scale=0.0001)) as (_, url), serve_files(FILES) as files:
        body = {"model": "kling-video-turbo", "input": {"prompt": "turn", "image_url": files + "/photo.png", "aspect_ratio": "16:9"}}
        data, headers = await result(url, task_id((await post(url, body))[1]))
        assert headers["Content-Type"] == "video/mp4" and data[4:8] == b"ftyp" and b"avc1" in data and b"mdat" in data
        # I_PCM macroblocks hold raw BT.601 samples: rows of the red square's and the background's luma
        red_luma, white_luma = 16 + (65738 * 255) // 256000, 16 + (65738 + 129057 + 25064) * 255 // 256000
        assert bytes([red_luma]) * 16 in data and bytes([white_luma]) * 16 in data
        width, height = struct.unpack(">II", data[data.index(b"tkhd") + 80 : data.index(b"tkhd") + 88])
        assert (width >> 16) * 9 == (height >> 16) * 16


async def test_large_chunked_videos_for_the_streaming_download_path() -> None:
    config = SandboxConfig(time_scale=0.0001, video_min_bytes=(1 << 20) + 12345, chunked_media=True)
    async with serve(config) as (_, url):
        _, answer = await post(url, {"model": "kling-video-turbo", "input": {"prompt": "a watch", "duration": "5"}})
        data, headers = await result(url, task_id(answer))
        assert "Content-Length" not in headers and headers.get("Transfer-Encoding") == "chunked"
        assert len(data) >= (1 << 20) + 12345 and data[4:8] == b"ftyp"
        # still one well-formed MP4: top-level boxes end exactly at the end
        pos = 0
        while pos < len(data):
            pos += struct.unpack(">I", data[pos : pos + 4])[0]
        assert pos == len(data)


async def test_inputs_it_cannot_decode_still_shape_the_result() -> None:
    """A JPEG (no decoder without a library) gives colours from a hash of its bytes: the same photo, the same look."""
    jpegs = {name: (200, "image/jpeg", b"\xff\xd8\xff\xe0" + name.encode() * 50) for name in ("a.jpg", "b.jpg")}
    async with serve(SandboxConfig(time_scale=0.0001)) as (_, url), serve_files(jpegs) as files:
        looks = []
        for name in ("a.jpg", "b.jpg", "a.jpg"):
            body = {"model": "flux-kontext-pro", "input": {"prompt": "same prompt", "image_url": f"{files}/{name}", "aspect_ratio": "1:1"}}
            pic = decode_png((await result(url, task_id((await post(url, body))[1])))[0])
            assert pic is not None
            looks.append(pic.rgba)
        assert looks[0] == looks[2] != looks[1]
