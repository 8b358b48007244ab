"""Result storage and input files against real services: SeaweedFS's S3 gateway, the loopback input store, the sandbox.

The S3 server checks signatures, so these tests prove that the URLs batchrunner hands out
really work — and that tampered or expired ones really do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import tracemalloc
from datetime import timedelta
from pathlib import Path

import aiohttp
import anyio
import obstore
import pytest

from batchrunner.errors import InputError, StorageError, StorageUnavailable
from batchrunner.inputs import Inputs, LoopbackStorage, inspect, resolve, token, tokens
from batchrunner.sandbox import SandboxConfig, serve
from batchrunner.storage import PART_BYTES, LocalStorage, ObjectStorage, Stored, complete, open_storage

from .conftest import S3Server, free_port, make_png, red_square

HOST = {"Host": "business.api.cliprise.app"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def prefix(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name}-{os.urandom(4).hex()}"


# -- object storage ----------------------------------------------------------------------------


async def test_results_and_sidecars_are_stored_whole_and_found_by_one_listing(
    s3: S3Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = ObjectStorage(s3.url(prefix(request)))
    image = make_png(30, 20, red_square)
    big = os.urandom(PART_BYTES + (3 << 20))  # > 8 MiB: sent in parts
    for key, data in (("spring/perfume-1.png", image), ("spring/watch-1.mp4", big)):
        src = write(tmp_path / key, data)
        sidecar = json.dumps({"model": "x", "sha256": sha(data)})
        stored = await store.put_result(key, src, sidecar, sha256=sha(data), size=len(data), content_type="image/png")
        assert stored.bytes == len(data) and src.exists()  # the local copy is kept unless handed over
    listing = await store.list("spring")
    assert complete(listing) == {"spring/perfume-1.png", "spring/watch-1.mp4"}
    assert listing["spring/watch-1.mp4"].bytes == len(big)
    meta = obstore.head(store.store, "spring/watch-1.mp4")
    assert meta["e_tag"] is not None and meta["e_tag"].rstrip('"').endswith("-2")  # a two-part multipart upload
    for key, data in (("spring/perfume-1.png", image), ("spring/watch-1.mp4", big)):
        status, body = await fetch(await store.presign(key, 60))
        assert status == 200 and sha(body) == sha(data)
    assert store.puts == 4
    await store.move("spring/perfume-1.png", "summer/perfume-1.png")
    assert complete(await store.list("")) == {"summer/perfume-1.png", "spring/watch-1.mp4"}


async def test_a_file_that_is_not_what_was_vouched_for_never_appears(s3: S3Server, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = ObjectStorage(s3.url(prefix(request)))
    for name, size in (("small.bin", 1000), ("large.bin", PART_BYTES + 1000)):
        data = os.urandom(size)
        src = write(tmp_path / name, data)
        with pytest.raises(StorageError, match="changed while being stored"):
            await store.put_file(name, src, sha256=sha(data[:-1] + b"!"), size=size)
        assert await store.head(name) is None
    assert await store.list("") == {}


async def test_a_large_upload_streams_from_the_file(s3: S3Server, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    part = 5 << 20
    store = ObjectStorage(s3.url(prefix(request)), part_bytes=part, part_concurrency=2)
    src, digest = tmp_path / "long.mp4", hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(8):
            chunk = os.urandom(part)
            digest.update(chunk)
            f.write(chunk)
    tracemalloc.start()
    try:
        await store.put_file("long.mp4", src, sha256=digest.hexdigest(), size=8 * part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * part  # the parts in flight pass through memory; the 40 MiB file never does
    assert await store.head("long.mp4") == Stored("long.mp4", 8 * part)


async def test_presigned_urls_tampered_or_expired_are_refused_by_the_server(
    s3: S3Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = ObjectStorage(s3.url(prefix(request)))
    data = make_png(4, 4, red_square)
    await store.put_file("a.png", write(tmp_path / "a.png", data), sha256=sha(data), size=len(data))
    url = await store.presign("a.png", 600)
    assert await fetch(url) == (200, data)
    signature = url.rsplit("X-Amz-Signature=", 1)[1][:64]
    tampered = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert (await fetch(tampered))[0] == 403
    assert (await fetch(url.split("?", 1)[0]))[0] == 403  # anonymous
    assert (await fetch(url.replace("a.png", "b.png")))[0] == 403  # another key under the same signature
    short = await store.presign("a.png", 1)
    with anyio.fail_after(15):
        while (await fetch(short))[0] == 200:  # valid until its second has passed; wait for the server to say so
            await anyio.sleep(0.2)
    assert (await fetch(short))[0] == 403


async def test_unreachable_or_refusing_storage_is_one_clear_error_without_secrets(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "wrong-secret-" + os.urandom(6).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    refused = ObjectStorage(s3.url("p"))
    with pytest.raises(StorageUnavailable) as info:
        await refused.check()
    text = str(info.value) + repr(info.value)
    assert "SignatureDoesNotMatch" in text and s3.url("p") in text
    assert wrong not in text and s3.secret_key not in text
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    dead = ObjectStorage(s3.url("p"), endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable, match=r"(?i)connection refused"):
        await dead.check()
    with pytest.raises(StorageError, match="s3://, gs:// or az://"):
        open_storage("ftp://bucket/prefix")


# -- inputs ------------------------------------------------------------------------------------


async def test_inputs_are_uploaded_once_and_the_sandbox_fetches_them_through_presigned_urls(
    s3: S3Server, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = s3.url(prefix(request))
    photo, other = make_png(60, 40, red_square), make_png(8, 8, lambda x, y: (0, 0, 200))
    files = [inspect(write(tmp_path / n, d)) for n, d in (("a.png", photo), ("b.png", other), ("copy-of-a.png", photo))]
    inputs = Inputs(ObjectStorage(url), lifetime_s=600)
    assert await inputs.prepare(files) == 2 and inputs.uploads == 2
    assert await inputs.prepare(files) == 0  # known now: nothing sent
    rerun = Inputs(ObjectStorage(url), lifetime_s=600)  # as a new run would: one listing, no upload
    assert await rerun.prepare(files) == 0
    assert isinstance(rerun.storage, ObjectStorage) and rerun.storage.puts == 0
    assert set(await rerun.storage.list("inputs")) == {f"inputs/{sha(photo)}.png", f"inputs/{sha(other)}.png"}
    async with serve(SandboxConfig(time_scale=0.0001)) as (sandbox, api):
        body = {"model": "kling-video-turbo", "input": {"prompt": "turn", "image_url": await rerun.url(files[0])}}
        headers = {**HOST, "Authorization": "Bearer sandbox-key"}
        async with aiohttp.ClientSession() as s, s.post(api + "/app/cliprise/generate", json=body, headers=headers) as r:
            answer = await r.json()
        assert answer[0]["code"] == 200, answer
        assert sandbox.stats.inputs_by_sha == {sha(photo): 1}
        assert dict(sandbox.tasks[answer[0]["taskId"]].inputs) == {"input.image_url": sha(photo)}
    assert rerun.storage.puts == 0


async def test_refused_bucket_is_reported_before_any_upload(s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all")
    storage = ObjectStorage(s3.url("never"))
    inputs = Inputs(storage)
    photo = inspect(write(tmp_path / "a.png", make_png(4, 4, red_square)))
    with pytest.raises(StorageUnavailable, match="SignatureDoesNotMatch"):
        await inputs.prepare([photo])
    assert storage.puts == 0 and inputs.uploads == 0


def test_bad_input_files_are_refused_with_what_to_do(tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.png": "no such file",
        write(tmp_path / "folder" / "x.png", b"\x89PNG\r\n\x1a\n").parent: "is a folder",
        write(tmp_path / "empty.png", b""): "is empty",
        write(tmp_path / "notes.png", b"hello, these are words"): "not an image, video or audio file",
        write(tmp_path / "page.jpg", b"<!doctype html><html></html>"): "not an image, video or audio file",
        tmp_path / "empty.png" / "below": "cannot be read",
    }
    for path, words in cases.items():
        with pytest.raises(InputError, match=words) as info:
            inspect(path)
        assert info.value.path == str(path)
    if os.geteuid() != 0:  # root reads any file
        locked = write(tmp_path / "locked.png", make_png(2, 2, red_square))
        locked.chmod(0)
        with pytest.raises(InputError, match="permission denied"):
            inspect(locked)
    good = inspect(write(tmp_path / "clip.mp4", b"\x00\x00\x00\x18ftypisom" + bytes(100)))
    assert (good.kind, good.ext, good.bytes) == ("video", "mp4", 112)
    assert inspect(write(tmp_path / "voice.m4a", b"\x00\x00\x00\x18ftypM4A " + bytes(10))).kind == "audio"


# -- the loopback input store (no cloud) -----------------------------------------------------------


async def test_loopback_input_store_signs_and_expires_its_urls(tmp_path: Path) -> None:
    now = [1_000_000.0]
    photo = inspect(write(tmp_path / "in" / "a.png", make_png(60, 40, red_square)))
    async with LoopbackStorage(tmp_path / "served", clock=lambda: now[0]) as store:
        inputs = Inputs(store, lifetime_s=60)
        assert await inputs.prepare([photo, photo]) == 1
        url = await inputs.url(photo)
        assert url.startswith("http://127.0.0.1:") and await fetch(url) == (200, photo.path.read_bytes())
        sig = url.rsplit("sig=", 1)[1]
        assert (await fetch(url.replace(sig, sig[::-1])))[0] == 403  # tampered signature
        assert (await fetch(url.replace("expires=", "expires=9")))[0] == 403  # a later expiry, same signature
        assert (await fetch(url.split("?")[0]))[0] == 403  # unsigned
        assert (await fetch(url.replace(photo.name, "x" + photo.name)))[0] == 403  # another key
        async with serve(SandboxConfig(time_scale=0.0001)) as (sandbox, api):
            body = {"model": "recraft-remove-bg", "input": {"image_url": url}}
            headers = {**HOST, "Authorization": "Bearer sandbox-key"}
            async with aiohttp.ClientSession() as s, s.post(api + "/app/cliprise/generate", json=body, headers=headers) as r:
                assert (await r.json())[0]["code"] == 200
            assert sandbox.stats.inputs_by_sha == {photo.sha256: 1}
            now[0] += 61
            async with aiohttp.ClientSession() as s, s.post(api + "/app/cliprise/generate", json=body, headers=headers) as r:
                answer = await r.json()
            assert answer["code"] == 400 and "HTTP 403" in answer["msg"] and sandbox.stats.tasks_created == 1
        assert (await fetch(url))[0] == 403  # expired
        assert (await fetch(await inputs.url(photo)))[0] == 200  # signed afresh: good again
        assert store.served == 3


# -- the local folder --------------------------------------------------------------------------


async def test_local_storage_puts_whole_files_and_lists_them(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "out")
    await store.check()
    data = make_png(6, 6, red_square)
    tmp = write(tmp_path / "out" / "spring" / ".a.png.tmp", data)
    await store.put_result("spring/a.png", tmp, '{"sha256": "x"}\n', sha256=sha(data), size=len(data), take=True)
    assert not tmp.exists() and (tmp_path / "out" / "spring" / "a.png").read_bytes() == data
    copy = write(tmp_path / "elsewhere" / "b.png", data)
    await store.put_file("spring/b.png", copy, sha256=sha(data), size=len(data))
    with pytest.raises(StorageError, match="changed while being stored"):
        await store.put_file("spring/c.png", copy, sha256=sha(b"other"), size=len(data))
    write(tmp_path / "out" / "spring" / ".d.png.tmp", b"half")  # left by a kill: not an object
    listing = await store.list("spring")
    assert set(listing) == {"spring/a.png", "spring/a.png.json", "spring/b.png"} and complete(listing) == {"spring/a.png"}
    await store.move("spring/a.png", "summer/a.png")
    assert complete(await store.list("")) == {"summer/a.png"}
    write(tmp_path / "out" / "taken", b"a file")
    with pytest.raises(StorageError, match="where a folder is needed") as info:
        await store.put_file("taken/x.png", copy, sha256=sha(data), size=len(data))
    assert not isinstance(info.value, StorageUnavailable)  # one job fails; the run goes on
    with pytest.raises(StorageError, match="not a storage key"):
        await store.head("../outside.png")
    assert (await store.presign("summer/a.png", 60)).startswith("file:///")


async def test_presign_lifetime_is_bounded(s3: S3Server) -> None:
    store = ObjectStorage(s3.url("p"))
    with pytest.raises(StorageError, match="7 days"):
        await store.presign("a.png", timedelta(days=8).total_seconds())


def test_a_body_holds_tokens_until_sent_so_ids_follow_content_not_urls(tmp_path: Path) -> None:
    a = inspect(write(tmp_path / "a.png", make_png(4, 4, red_square)))
    b = inspect(write(tmp_path / "b.png", make_png(4, 4, lambda x, y: (0, 0, 255))))
    body = {
        "model": "m",
        "input": {"image_url": token(a), "prompt": token(a) + " is not a URL here"},
        "imageURLList": json.dumps([token(b)]),
    }
    assert tokens(body) == {token(a), token(b)}
    urls = {token(a): "http://127.0.0.1:1/a.png?sig=1&x=2", token(b): 'http://127.0.0.1:1/b.png?q="'}
    sent = resolve(body, urls)
    assert sent["input"]["image_url"] == urls[token(a)]
    assert json.loads(sent["imageURLList"]) == [urls[token(b)]]  # still valid JSON inside the string
    assert tokens(sent) == set() and body["input"]["image_url"] == token(a)  # the body itself is unchanged
    write(tmp_path / "a.png", make_png(4, 4, lambda x, y: (1, 2, 3)))  # the photo replaced: a new token
    assert token(inspect(tmp_path / "a.png")) != token(a)
