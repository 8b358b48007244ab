"""The real client against the real sandbox: every row of the response table, every fault."""

from __future__ import annotations

import socket

import anyio
import pytest

from batchrunner.client import Client, Failed, Processing, Succeeded, retry_after_seconds
from batchrunner.errors import (
    AmbiguousSubmit,
    AuthError,
    DownloadError,
    FatalApiError,
    OutOfCredits,
    PermanentApiError,
    RateLimited,
    TransientApiError,
    redact,
)
from batchrunner.sandbox import SandboxConfig, serve

KEY = "sk-live-0123456789abcdef"
BODY = {"model": "flux-2", "input": {"prompt": "a red bottle"}}


def config(**kw: object) -> SandboxConfig:
    return SandboxConfig(api_key=KEY, time_scale=0.0005, **kw)  # type: ignore[arg-type]


async def finish(client: Client, task_id: str) -> Succeeded | Failed:
    for _ in range(200):
        status = await client.status(task_id)
        if not isinstance(status, Processing):
            return status
        await anyio.sleep(0.01)
    raise AssertionError("task never finished")


@pytest.mark.parametrize("shape", ["array", "object", "mixed"])
async def test_generate_status_download_in_every_shape(shape: str) -> None:
    async with serve(config(shape=shape)) as (sandbox, url), Client(api_key=KEY, base_url=url) as client:
        for i in range(4):
            task_id = await client.generate({**BODY, "input": {"prompt": f"bottle {i}"}})
            result = await finish(client, task_id)
            assert isinstance(result, Succeeded)
            assert KEY not in result.file_url and "apiKey=REDACTED" in result.file_url
            async with client.download(task_id) as dl:
                data = b"".join([c async for c in dl.chunks()])
            assert dl.content_type == "image/png" and len(data) == dl.content_length and data.startswith(b"\x89PNG")
        assert sandbox.stats.tasks_created == 4


async def test_validation_error_in_a_200_is_permanent() -> None:
    async with serve(config()) as (_, url), Client(api_key=KEY, base_url=url) as client:
        with pytest.raises(PermanentApiError, match="input: This field is required"):
            await client.generate({"model": "flux-2"})


async def test_empty_200_is_permanent() -> None:
    async with serve(config(empty_validation=1.0)) as (_, url), Client(api_key=KEY, base_url=url) as client:
        with pytest.raises(PermanentApiError, match="empty body"):
            await client.generate({"model": "flux-2"})


async def test_bad_key_everywhere() -> None:
    async with serve(config()) as (_, url):
        async with Client(api_key=KEY, base_url=url) as good:
            task_id = await good.generate(BODY)
        async with Client(api_key="wrong-key-123", base_url=url) as bad:
            with pytest.raises(AuthError, match="401"):
                await bad.generate(BODY)
            with pytest.raises(AuthError, match="invalid_api_key"):
                await bad.status(task_id)


async def test_unknown_task_and_failed_task() -> None:
    async with serve(config(failure_rate=1.0)) as (_, url), Client(api_key=KEY, base_url=url) as client:
        with pytest.raises(PermanentApiError, match="invalid_taskId"):
            await client.status("0" * 28)
        result = await finish(client, await client.generate(BODY))
        assert isinstance(result, Failed) and "content policy" in result.reason


async def test_no_credits_is_fatal() -> None:
    async with serve(config(credits=0)) as (_, url), Client(api_key=KEY, base_url=url) as client:
        with pytest.raises(OutOfCredits):
            await client.generate(BODY)


async def test_wrong_host_header_is_fatal() -> None:
    async with serve(config()) as (_, url), Client(api_key=KEY, base_url=url, host_header="example.com") as client:
        with pytest.raises(FatalApiError, match="Host"):
            await client.generate(BODY)
        with pytest.raises(FatalApiError, match="Host"):
            await client.status("abc")


@pytest.mark.parametrize("style", ["seconds", "date"])
async def test_429_carries_retry_after(style: str) -> None:
    async with serve(config(p_429=1.0, retry_after=style, retry_after_s=3)) as (_, url), Client(api_key=KEY, base_url=url) as client:
        with pytest.raises(RateLimited) as caught:
            await client.generate(BODY)
        assert caught.value.retry_after_s is not None and 1.5 <= caught.value.retry_after_s <= 3.0
        with pytest.raises(RateLimited):
            await client.status("abc")


async def test_5xx_and_html_502_are_transient() -> None:
    for fault in ("p_5xx", "p_html502"):
        async with serve(config(**{fault: 1.0})) as (sandbox, url), Client(api_key=KEY, base_url=url) as client:
            with pytest.raises(TransientApiError) as caught:
                await client.generate(BODY)
            assert caught.value.status in (502, 503) and not isinstance(caught.value, AmbiguousSubmit)
            with pytest.raises(TransientApiError):
                await client.status("abc")
            assert sandbox.stats.tasks_created == 0


async def test_dropped_connection_on_generate_is_ambiguous() -> None:
    async with serve(config(p_drop=1.0, seed=1)) as (sandbox, url), Client(api_key=KEY, base_url=url) as client:
        for _ in range(6):
            with pytest.raises(AmbiguousSubmit):
                await client.generate(BODY)
        # some of those POSTs did create (and would have charged) a task: that is why it is ambiguous
        assert 0 < sandbox.stats.tasks_created < 6
        with pytest.raises(TransientApiError):
            await client.status("abc")


async def test_connection_refused_is_transient_not_ambiguous() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with Client(api_key=KEY, base_url=f"http://127.0.0.1:{port}") as client:
        with pytest.raises(TransientApiError) as caught:
            await client.generate(BODY)
        assert not isinstance(caught.value, AmbiguousSubmit)


async def test_truncated_download_is_a_download_error() -> None:
    async with serve(config(p_truncate=1.0)) as (_, url), Client(api_key=KEY, base_url=url) as client:
        task_id = await client.generate(BODY)
        assert isinstance(await finish(client, task_id), Succeeded)
        with pytest.raises(DownloadError):
            async with client.download(task_id) as dl:
                async for _ in dl.chunks():
                    pass


async def test_key_never_in_messages_or_repr() -> None:
    async with serve(config(p_5xx=1.0)) as (_, url), Client(api_key=KEY, base_url=url) as client:
        assert KEY not in repr(client)
        try:
            await client.status("abc")
        except TransientApiError as exc:
            assert KEY not in str(exc) and KEY not in repr(exc)
    text = f"GET https://x/status?apiKey={KEY}&taskId=1 Authorization: Bearer {KEY}"
    assert KEY not in redact(text)


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
