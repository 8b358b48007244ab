"""The sandbox answers the documented requests exactly as the docs' response table says.

Each test sends the request a documented ``curl`` example sends (method, path, headers, body)
with a plain aiohttp session, not our client, and compares the documented answer.
"""

from __future__ import annotations

import json
import re

import aiohttp

from batchrunner.sandbox import SandboxConfig, serve

from .conftest import make_png, serve_files

HOST = {"Host": "business.api.cliprise.app"}
KEY = "sandbox-key"


class Clock:
    """The sandbox's simulated time, moved by the test: a task finishes when the test says so, not when the machine is fast."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def post(url: str, body: object, *, key: str = KEY, host: dict[str, str] = HOST) -> tuple[int, bytes]:
    # curl -X POST https://business.api.cliprise.app/app/cliprise/generate \
    #   -H "Authorization: Bearer $CLIPRISE_API_KEY" -H "Content-Type: application/json" -d '{...}'
    headers = {**host, "Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url + "/app/cliprise/generate", data=json.dumps(body), headers=headers) as r:
        return r.status, await r.read()


async def get(url: str, task_id: str, *, key: str = KEY, download: bool = False, host: dict[str, str] = HOST) -> tuple[int, bytes, str]:
    # curl "https://business.api.cliprise.app/app/cliprise/status?apiKey=$KEY&taskId=$ID[&download=true]"
    params = {"apiKey": key, "taskId": task_id} | ({"download": "true"} if download else {})
    async with aiohttp.ClientSession() as s, s.get(url + "/app/cliprise/status", params=params, headers=host) as r:
        return r.status, await r.read(), r.content_type


async def test_generate_then_poll_then_download_as_documented() -> None:
    clock = Clock()
    async with serve(SandboxConfig(time_scale=0.002), clock=clock) as (sandbox, url):
        status, raw = await post(url, {"model": "flux-2", "input": {"prompt": "a red bottle", "aspect_ratio": "1:1"}})
        assert status == 200
        body = json.loads(raw)
        assert isinstance(body, list) and body[0]["code"] == 200
        task_id = body[0]["taskId"]
        assert re.fullmatch(r"[0-9a-f]{28}", task_id)
        status, raw, _ = await get(url, task_id)
        assert (status, json.loads(raw)) == (300, {"status": "processing"})
        clock.advance(3600)
        status, raw, _ = await get(url, task_id)
        assert status == 200
        done = json.loads(raw)[0]
        assert done == {
            "status": "success",
            "fileURL": f"https://business.api.cliprise.app/app/cliprise/status?apiKey={KEY}&taskId={task_id}&download=true",
        }
        status, raw, ctype = await get(url, task_id, download=True)
        assert (status, ctype) == (200, "image/png") and raw.startswith(b"\x89PNG\r\n\x1a\n")
        assert sandbox.stats.status_by_task[task_id] == 3


async def test_video_and_audio_results_are_real_media() -> None:
    clock = Clock()
    async with serve(SandboxConfig(time_scale=0.0001), clock=clock) as (_, url):
        _, raw = await post(url, {"model": "kling-video-turbo", "input": {"prompt": "a watch", "duration": "5"}})
        task_id = json.loads(raw)[0]["taskId"]
        clock.advance(3600)
        status, data, ctype = await get(url, task_id, download=True)
        assert (status, ctype) == (200, "video/mp4") and data[4:8] == b"ftyp"


async def test_host_gate() -> None:
    async with serve(SandboxConfig()) as (sandbox, url):
        status, raw = await post(url, {"model": "flux-2", "input": {"prompt": "x"}}, host={})
        assert (status, raw) == (400, b"")
        status, raw, _ = await get(url, "whatever", host={"Host": "api.cliprise.app"})
        assert (status, json.loads(raw)) == (400, {"msg": "method_not_allowed"})
        assert sandbox.stats.tasks_created == 0


async def test_auth_errors() -> None:
    async with serve(SandboxConfig()) as (_, url):
        status, raw = await post(url, {"model": "flux-2", "input": {"prompt": "x"}}, key="wrong")
        assert status == 401
        assert json.loads(raw) == {"code": 401, "error": {"code": "invalid_api_key", "message": "Missing or invalid API key."}}
        status, raw, _ = await get(url, "abc", key="wrong")
        assert (status, json.loads(raw)) == (400, {"msg": "invalid_api_key"})
        status, raw, _ = await get(url, "abc")
        assert (status, json.loads(raw)) == (400, {"msg": "invalid_taskId"})


async def test_validation_errors_are_http_200_with_code_400() -> None:
    cases = [
        ({"input": {"prompt": "x"}}, "model"),
        ({"model": "flux-2"}, "input"),
        ({"model": "no-such-model", "input": {"prompt": "x"}}, "model"),
        ({"model": "flux-2", "input": {"prompt": "x"}, "options": {"tier": "pro"}}, "options"),
        ({"model": "flux-2", "input": {"prompt": "x"}, "imageURLList": '{"a": 1}'}, "imageURLList"),
    ]
    async with serve(SandboxConfig()) as (sandbox, url):
        for body, field in cases:
            status, raw = await post(url, body)
            answer = json.loads(raw)
            assert status == 200 and answer["code"] == 400 and answer["data"] is None, body
            assert field in answer["msg"], (body, answer)
        assert sandbox.stats.tasks_created == 0  # no credits used


async def test_stringified_fields_are_accepted() -> None:
    photo = make_png(8, 8, lambda x, y: (x * 30, y * 30, 90))
    async with serve(SandboxConfig(shape="object")) as (_, url), serve_files({"a.png": (200, "image/png", photo)}) as files:
        status, raw = await post(
            url,
            {"model": "flux-2", "input": {"prompt": "x"}, "options": '{"tier":"pro"}', "imageURLList": json.dumps([files + "/a.png"])},
        )
        assert status == 200 and json.loads(raw)["code"] == 200  # the bare-object shape


async def test_empty_body_validation_error_and_402() -> None:
    async with serve(SandboxConfig(empty_validation=1.0, credits=1.0)) as (_, url):
        assert await post(url, {"model": "flux-2"}) == (200, b"")
        status, _ = await post(url, {"model": "flux-2", "input": {"prompt": "x"}})
        assert status == 200
        status, _ = await post(url, {"model": "flux-2", "input": {"prompt": "y"}})
        assert status == 402


async def test_failed_task_answers_400_with_failmsg() -> None:
    clock = Clock()
    async with serve(SandboxConfig(failure_rate=1.0, time_scale=0.0001), clock=clock) as (_, url):
        _, raw = await post(url, {"model": "flux-2", "input": {"prompt": "x"}})
        task_id = json.loads(raw)[0]["taskId"]
        clock.advance(3600)
        status, raw, _ = await get(url, task_id)
        answer = json.loads(raw)
        assert status == 400 and answer["status"] == "failed" and answer["failMsg"]


async def test_rate_limit_answers_429_with_retry_after() -> None:
    async with serve(SandboxConfig(rate_limit_per_s=2)) as (sandbox, url):
        results = [await post(url, {"model": "flux-2", "input": {"prompt": f"p{i}"}}) for i in range(4)]
        assert [s for s, _ in results] == [200, 200, 429, 429]
        assert sandbox.stats.rate_limited == 2 and sandbox.stats.tasks_created == 2
