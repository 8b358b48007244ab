"""The sandbox's faults really answer as its docstring says (plain aiohttp requests, not our client)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from batchrunner.errors import MediaError
from batchrunner.sandbox import SandboxConfig, media, serve
from batchrunner.verify import verify

HOST = {"Host": "business.api.cliprise.app"}
KEY = "sandbox-key"
FAST = {"time_scale": 0.0, "image_size": 8}


async def submit(url: str, prompt: str = "a red bottle", *, key: str = KEY) -> tuple[int, str]:
    headers = {**HOST, "Authorization": f"Bearer {key}"}
    body = {"model": "flux-2", "input": {"prompt": prompt, "aspect_ratio": "1:1"}}
    async with aiohttp.ClientSession() as s, s.post(url + "/app/cliprise/generate", json=body, headers=headers) as r:
        raw = await r.read()
        answer = json.loads(raw)
        answer = answer[0] if isinstance(answer, list) else answer
        return r.status, answer["taskId"] if r.status == 200 else raw.decode()


async def ask(url: str, task_id: str, *, download: bool = False) -> tuple[int, bytes, aiohttp.ClientResponse]:
    params = {"apiKey": KEY, "taskId": task_id} | ({"download": "true"} if download else {})
    async with aiohttp.ClientSession() as s, s.get(url + "/app/cliprise/status", params=params, headers=HOST) as r:
        return r.status, await r.read(), r


def expected(prompt: str, task_id: str) -> bytes:
    return media.png(prompt, task_id, FAST["image_size"])


async def test_non_media_bodies() -> None:
    async with serve(SandboxConfig(**FAST, p_random_body=1.0)) as (sandbox, url):
        _, task_id = await submit(url)
        status, raw, resp = await ask(url, task_id, download=True)
        assert (status, resp.content_type, len(raw)) == (200, "image/png", len(expected("a red bottle", task_id)))
        with pytest.raises(MediaError, match="not a media file"):
            verify(raw)
        assert sandbox.stats.faults["random_body"] == 1
    async with serve(SandboxConfig(**FAST, p_denied_page=1.0)) as (_, url):
        _, task_id = await submit(url)
        status, raw, resp = await ask(url, task_id, download=True)
        assert (status, resp.content_type) == (200, "application/octet-stream") and raw.startswith(b"<?xml")
        assert b"Access Denied" in raw


async def test_truncation_without_content_length() -> None:
    async with serve(SandboxConfig(**FAST, p_truncate_eof=1.0)) as (_, url):
        _, task_id = await submit(url)
        status, raw, resp = await ask(url, task_id, download=True)  # no error: the cut looks like the end
        whole = expected("a red bottle", task_id)
        assert status == 200 and "Content-Length" not in resp.headers and "Transfer-Encoding" not in resp.headers
        assert raw == whole[: len(whole) // 2]
    async with serve(SandboxConfig(**FAST, p_truncate_chunked=1.0)) as (_, url):
        _, task_id = await submit(url)
        with pytest.raises(aiohttp.ClientPayloadError):
            await ask(url, task_id, download=True)


async def test_slow_loris_body() -> None:
    async with serve(SandboxConfig(**FAST, p_slow_body=1.0, slow_body_interval_s=0.01)) as (_, url):
        _, task_id = await submit(url)
        params = {"apiKey": KEY, "taskId": task_id, "download": "true"}
        async with aiohttp.ClientSession() as s, s.get(url + "/app/cliprise/status", params=params, headers=HOST) as r:
            chunks = [chunk async for chunk in r.content.iter_any()]
        whole = expected("a red bottle", task_id)
        assert b"".join(chunks) == whole and r.headers["Content-Length"] == str(len(whole))
        assert len(chunks) > len(whole) // 8  # it came a byte or so at a time


async def test_success_without_a_file() -> None:
    async with serve(SandboxConfig(**FAST, p_no_file=1.0, shape="object")) as (_, url):
        _, task_id = await submit(url)
        status, raw, _ = await ask(url, task_id)
        assert (status, json.loads(raw)) == (200, {"status": "success"})
        status, raw, resp = await ask(url, task_id, download=True)
        assert (status, resp.content_type, json.loads(raw)) == (200, "application/json", {"status": "success"})


@pytest.mark.parametrize(("word", "http"), [("queued_for_review", 200), ("queued_for_review", 300), ("cancelled", 200), ("error", 400)])
async def test_status_words(word: str, http: int) -> None:
    async with serve(SandboxConfig(**FAST, p_status_word=1.0, status_word=word, status_word_http=http)) as (_, url):
        _, task_id = await submit(url)
        for download in (False, True):
            status, raw, _ = await ask(url, task_id, download=download)
            assert (status, json.loads(raw)) == (http, [{"status": word}])


async def test_huge_retry_after() -> None:
    async with serve(SandboxConfig(p_429=1.0, retry_after_s=86400)) as (_, url):
        status, _, resp = await ask(url, "whatever")
        assert status == 429 and resp.headers["Retry-After"] == "86400"


async def test_key_revoked_after_n_requests() -> None:
    async with serve(SandboxConfig(**FAST, revoke_key_after=2)) as (_, url):
        status, task_id = await submit(url)
        assert status == 200
        assert (await ask(url, task_id))[0] == 200
        status, text = await submit(url)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        status, raw, _ = await ask(url, task_id)
        assert (status, json.loads(raw)) == (400, {"msg": "invalid_api_key"})


async def test_tasks_forgotten_on_restart(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    async with serve(SandboxConfig(**FAST, tasks_file=tasks)) as (_, url):
        _, task_id = await submit(url)
    async with serve(SandboxConfig(**FAST, tasks_file=tasks)) as (_, url):
        assert (await ask(url, task_id))[0] == 200  # remembered, as the real API does
    async with serve(SandboxConfig(**FAST, tasks_file=tasks, forget_tasks=True)) as (_, url):
        status, raw, _ = await ask(url, task_id)
        assert (status, json.loads(raw)) == (400, {"msg": "invalid_taskId"})


async def test_faults_aimed_by_prompt() -> None:
    async with serve(SandboxConfig(**FAST, p_random_body=1.0, fault_prompt="broken")) as (sandbox, url):
        _, healthy = await submit(url, "a red bottle")
        _, broken = await submit(url, "a broken bottle")
        assert verify((await ask(url, healthy, download=True))[1]).kind == "png"
        with pytest.raises(MediaError):
            verify((await ask(url, broken, download=True))[1])
        assert sandbox.stats.faults == {"random_body": 1}
