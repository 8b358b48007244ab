"""Local files sent as source media: checked, uploaded once (content-addressed), presigned when sent.

The API takes source media only as direct http(s) URLs it fetches itself (presigned URLs
are fine while they live). A ``file:`` value in a manifest names a local file instead:

- :func:`inspect` checks it — it exists, is a file, can be read, is not empty, and its
  first bytes are an image, a video or audio — and hashes it;
- :class:`Inputs` stores it once under ``inputs/<sha256>.<ext>`` in a :class:`Storage`:
  one listing of ``inputs/`` finds what is already there, so a re-run uploads nothing, and
  replacing a photo gives a new key;
- :meth:`Inputs.url` signs a fresh GET URL each time a request is sent (never a stale one);
  until then a job's body holds the file's :func:`token` (its content address), so the job
  id follows the file's content and :func:`resolve` swaps in the URLs at submit time.

With no cloud at all (the demo, ``--sandbox``), :class:`LoopbackStorage` keeps the inputs
in a folder and serves them on 127.0.0.1 with URLs signed by a per-run secret (HMAC-SHA256
over path and expiry): a tampered or expired URL gets 403, as a bucket's would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import anyio
import anyio.to_thread
from aiohttp import web

from .errors import InputError, StorageUnavailable
from .storage import LocalStorage, Storage, check_key
from .verify import sniff

DEFAULT_LIFETIME_S = 3600.0
UPLOADS_AT_ONCE = 4
HEAD_BYTES = 64
KINDS = {
    "png": "image", "jpg": "image", "gif": "image", "webp": "image", "avif": "image", "heic": "image",
    "mp4": "video", "mov": "video", "webm": "video",
    "wav": "audio", "mp3": "audio", "ogg": "audio", "flac": "audio", "m4a": "audio",
}  # fmt: skip
CONTENT_TYPES = {
    "png": "image/png", "jpg": "image/jpeg", "gif": "image/gif", "webp": "image/webp", "avif": "image/avif", "heic": "image/heic",
    "mp4": "video/mp4", "mov": "video/quicktime", "webm": "video/webm",
    "wav": "audio/wav", "mp3": "audio/mpeg", "ogg": "audio/ogg", "flac": "audio/flac", "m4a": "audio/mp4",
}  # fmt: skip


def media_type(head: bytes) -> str | None:
    """The extension of an image, video or audio file from its first bytes (``head``), or None."""
    if head[4:8] == b"ftyp":  # ISO media: the brand says which
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "m4a"
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "heic"
    return sniff(head)


@dataclass(frozen=True, slots=True)
class InputFile:
    """A checked local input: where it is, what it holds, and its content address."""

    path: Path
    sha256: str
    bytes: int
    ext: str

    @property
    def kind(self) -> str:
        """image | video | audio"""
        return KINDS[self.ext]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.ext]

    @property
    def name(self) -> str:
        """Its content address: ``<sha256>.<ext>``."""
        return f"{self.sha256}.{self.ext}"


def inspect(path: Path) -> InputFile:
    """Check and hash a local input file, or raise :class:`InputError` saying what is wrong and what to do.

    Blocking (it reads the whole file to hash it): call it in a worker thread for many files.
    """
    shown = str(path)
    try:
        if path.is_dir():
            raise InputError(f"{shown} is a folder; name a file in it", path=shown)
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if not head:
                raise InputError(f"{shown} is empty", path=shown)
            ext = media_type(head)
            if ext is None:
                raise InputError(
                    f"{shown} is not an image, video or audio file (its first bytes are not PNG, JPEG, GIF, WebP, "
                    "AVIF, HEIC, MP4, MOV, WebM, WAV, MP3, OGG, FLAC or M4A)",
                    path=shown,
                )
            digest, size = hashlib.sha256(head), len(head)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file (paths are relative to the manifest's folder)", path=shown) from None
    except PermissionError:
        raise InputError(f"{shown} cannot be read: permission denied", path=shown) from None
    except IsADirectoryError:
        raise InputError(f"{shown} is a folder; name a file in it", path=shown) from None
    except OSError as exc:
        raise InputError(f"{shown} cannot be read: {exc.strerror or exc}", path=shown) from None
    return InputFile(path, digest.hexdigest(), size, ext)


# In a job's body a local input stands as its token until the request is sent: the job id
# hashes the token (the file's content), never the presigned URL, which changes every time.
TOKEN_PREFIX = "batchrunner-input:"
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[0-9a-f]{64}\.[a-z0-9]+")


def token(file: InputFile) -> str:
    """What a job's body holds in place of ``file`` until it is sent: ``batchrunner-input:<sha256>.<ext>``."""
    return TOKEN_PREFIX + file.name


def tokens(body: Any) -> set[str]:
    """Every input token in a body: as a value, in a list, or inside a stringified field (``imageURLList``)."""
    if isinstance(body, str):
        return set(_TOKEN.findall(body)) if TOKEN_PREFIX in body else set()
    if isinstance(body, dict):
        return set().union(*(tokens(v) for v in body.values()))
    if isinstance(body, list):
        return set().union(*(tokens(v) for v in body))
    return set()


def resolve(body: Any, urls: Mapping[str, str]) -> Any:
    """``body`` with each token replaced by its URL from ``urls`` (inside a stringified field, JSON-escaped)."""
    if isinstance(body, str):
        if body in urls:
            return urls[body]
        if TOKEN_PREFIX not in body:
            return body
        return _TOKEN.sub(lambda m: json.dumps(urls[m[0]])[1:-1], body)
    if isinstance(body, dict):
        return {k: resolve(v, urls) for k, v in body.items()}
    if isinstance(body, list):
        return [resolve(v, urls) for v in body]
    return body


class Inputs:
    """Input files in a storage under ``prefix``: each uploaded once, then signed per request.

    ``uploads`` counts the files this instance put (a re-run of a finished campaign puts
    none). The storage is checked once, before the first upload, so an unreachable or
    refusing bucket is one clear error (StorageUnavailable) before anything is sent.
    """

    def __init__(self, storage: Storage, *, lifetime_s: float = DEFAULT_LIFETIME_S, prefix: str = "inputs") -> None:
        self.storage = storage
        self.lifetime_s = lifetime_s
        self.prefix = prefix.strip("/")
        self.uploads = 0
        self._stored: set[str] | None = None  # keys known to exist
        self._lock = anyio.Lock()

    def key(self, file: InputFile) -> str:
        return f"{self.prefix}/{file.name}" if self.prefix else file.name

    async def prepare(self, files: Iterable[InputFile]) -> int:
        """Make sure every file is stored: one listing, then an upload per distinct missing file. Returns uploads made."""
        async with self._lock:
            stored = await self._listing()
            missing = {self.key(f): f for f in files if self.key(f) not in stored}
            limiter = anyio.CapacityLimiter(UPLOADS_AT_ONCE)

            async def upload(key: str, file: InputFile) -> None:
                async with limiter:
                    await self.storage.put_file(key, file.path, sha256=file.sha256, size=file.bytes, content_type=file.content_type)
                stored.add(key)
                self.uploads += 1

            async with anyio.create_task_group() as tg:
                for key, file in missing.items():
                    tg.start_soon(upload, key, file)
            return len(missing)

    async def url(self, file: InputFile) -> str:
        """A freshly signed GET URL for ``file`` (uploading it first if :meth:`prepare` did not)."""
        key = self.key(file)
        if self._stored is None or key not in self._stored:
            await self.prepare([file])
        return await self.storage.presign(key, self.lifetime_s)

    async def _listing(self) -> set[str]:
        if self._stored is None:
            await self.storage.check()
            self._stored = set(await self.storage.list(self.prefix))
        return self._stored


class LoopbackStorage(LocalStorage):
    """A folder served on 127.0.0.1 with signed, expiring URLs: the input store when no cloud is configured.

    ``async with LoopbackStorage(folder) as store`` starts the server (a free port);
    :meth:`presign` gives ``http://127.0.0.1:PORT/<key>?expires=<unix s>&sig=<hmac>``. The
    secret is new per instance unless given; ``clock`` is injectable for tests. ``served``
    counts files sent.
    """

    def __init__(self, root: Path, *, secret: bytes | None = None, clock: Callable[[], float] = time.time, host: str = "127.0.0.1") -> None:
        super().__init__(root)
        self._secret = secret or secrets.token_bytes(32)
        self._clock = clock
        self._host = host
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.served = 0

    def _signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"GET\n{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    async def presign(self, key: str, lifetime_s: float) -> str:
        if not self.base_url:
            raise StorageUnavailable(f"{self.url}: the input server is not running (use LoopbackStorage as an async context manager)")
        expires = int(self._clock() + lifetime_s)
        return f"{self.base_url}/{quote(check_key(key))}?expires={expires}&sig={self._signature(key, expires)}"

    async def check(self) -> None:
        await super().check()
        if not self.base_url:
            raise StorageUnavailable(f"{self.url}: the input server is not running")

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            return web.Response(status=403, text="missing or malformed signature\n")
        good = self._signature(key, expires)
        if not hmac.compare_digest(good, request.query.get("sig", "")):
            return web.Response(status=403, text="signature does not match\n")
        if self._clock() > expires:
            return web.Response(status=403, text="URL expired\n")
        try:
            path = self.path(key)
        except Exception:
            return web.Response(status=404)
        if not path.is_file():
            return web.Response(status=404, text="no such object\n")
        self.served += 1
        ext = path.suffix.lstrip(".")
        return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES.get(ext, "application/octet-stream")})

    async def __aenter__(self) -> LoopbackStorage:
        await anyio.to_thread.run_sync(lambda: self.root.mkdir(parents=True, exist_ok=True))
        app = web.Application()
        app.router.add_get("/{key:.+}", self._serve)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, 0)
        await site.start()
        self.base_url = f"http://{self._host}:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner, self.base_url = None, ""
