"""Where results and inputs are kept: one small interface, two implementations.

    Storage            put a verified file (and a result's sidecar), head, list a prefix, presign, move
    ├── LocalStorage   a folder on disk: a temp file beside the destination, fsync, rename
    └── ObjectStorage  s3:// (any S3-compatible service), gs://, az:// through obstore

Keys are relative POSIX paths (``spring/perfume-1_1-1.png``); each implementation maps
them under its root (a folder, or a bucket and prefix). The runner holds one Storage, as
an httpx client holds one transport.

An object appears whole or not at all. A file is hashed while it is sent and checked
against the sha256 and size the caller vouches for; a mismatch raises inside the upload,
which aborts it (a single PUT, or a multipart upload that is never completed, is atomic on
every service obstore speaks to); the stored size is then confirmed with a HEAD. A result's
sidecar (``<key>.json``) is written after the result, so a sidecar in a listing means its
result is whole (:func:`complete`), and resume lists each prefix once instead of asking
once per job.

obstore's async functions hand their results over from tokio threads; one still doing so
while the interpreter exits aborts the process (seen with ``sign_async`` and
``put_async``). So this module calls obstore's blocking functions in worker threads:
nothing inside obstore ever calls back into Python on its own. Uploads read the file in
parts (8 MiB) in that worker thread — never the whole file in memory — and stop at the next
part when the calling task is cancelled.

Credentials come only from each cloud's standard environment variables (never from a
manifest); their secret values are registered with :func:`errors.register_secret`, and
every error is translated into :class:`StorageError` / :class:`StorageUnavailable` with
the service's own message and no secret.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.from_thread
import anyio.to_thread
import obstore
from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import AzureStore, GCSStore, S3Store

from .errors import StorageError, StorageUnavailable, redact, register_secret

PART_BYTES = 8 << 20  # multipart part size, and the size above which a file is sent in parts
PART_CONCURRENCY = 4  # parts in flight per upload: about PART_BYTES × (this + 1) in memory, whatever the file's size
MAX_LIFETIME_S = 7 * 24 * 3600  # S3's longest presigned URL
SIDECAR = ".json"
# Environment variables whose values are secrets, per cloud (the names obstore reads).
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_TOKEN", "AZURE_CLIENT_SECRET",
)  # fmt: skip

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Stored:
    """An object that exists: its key and size in bytes."""

    key: str
    bytes: int


def check_key(key: str) -> str:
    """``key`` if it is a clean relative POSIX path (no ``..``, no leading ``/``, no empty part), else StorageError."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
        raise StorageError(f"{key!r} is not a storage key: a relative path without '..' or empty parts")
    return key


def complete(listing: Mapping[str, Stored]) -> set[str]:
    """The keys of a listing whose sidecar is there too: results that were stored whole."""
    return {key for key in listing if not key.endswith(SIDECAR) and key + SIDECAR in listing}


class Storage(ABC):
    """Where files are kept. Use as an async context manager, or call :meth:`aclose`."""

    url: str  # where it is, for messages (never with credentials)

    @abstractmethod
    async def put_file(self, key: str, src: Path, *, sha256: str, size: int, content_type: str | None = None, take: bool = False) -> Stored:
        """Store the file ``src`` under ``key``, verified against ``sha256`` and ``size``.

        Whole or not at all: if the bytes read differ, nothing appears and StorageError is
        raised. ``take=True`` hands ``src`` over (a temp file the caller no longer needs):
        a folder renames it into place, a bucket deletes it once stored.
        """

    @abstractmethod
    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> Stored:
        """Store small ``data`` (a sidecar) under ``key``, whole or not at all."""

    @abstractmethod
    async def head(self, key: str) -> Stored | None:
        """The object at ``key``, or None if there is none."""

    @abstractmethod
    async def list(self, prefix: str = "") -> dict[str, Stored]:
        """Every object under ``prefix`` (a folder-like key prefix; "" for all), by key, in one listing."""

    @abstractmethod
    async def presign(self, key: str, lifetime_s: float) -> str:
        """A URL that GETs ``key`` without credentials for ``lifetime_s`` seconds."""

    @abstractmethod
    async def move(self, src: str, dst: str) -> None:
        """Move the object at ``src`` (and its sidecar, if any) to ``dst``."""

    @abstractmethod
    async def check(self) -> None:
        """Raise StorageUnavailable, with the service's own message, if nothing can be stored here."""

    async def put_result(
        self, key: str, src: Path, sidecar: str, *, sha256: str, size: int, content_type: str | None = None, take: bool = False
    ) -> Stored:
        """Store a verified result, then its sidecar ``<key>.json`` (so a sidecar vouches for a whole result)."""
        stored = await self.put_file(key, src, sha256=sha256, size=size, content_type=content_type, take=take)
        await self.put_bytes(key + SIDECAR, sidecar.encode(), content_type="application/json")
        return stored

    async def aclose(self) -> None:  # noqa: B027 (most storages hold nothing)
        """Release what the storage holds (nothing, unless an implementation says so)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()


def _read_parts(src: Path, sha256: str, size: int, part_bytes: int) -> Iterator[bytes]:
    """The file in parts, hashed on the way; raises at the end (aborting the upload) if it is not what was vouched for.

    Runs in the uploading worker thread; stops at the next part if the task that started
    the upload is cancelled.
    """
    digest, seen = hashlib.sha256(), 0
    with open(src, "rb") as f:
        while chunk := f.read(part_bytes):
            anyio.from_thread.check_cancelled()
            digest.update(chunk)
            seen += len(chunk)
            yield chunk
    _verify(src, digest.hexdigest(), seen, sha256, size)


def _verify(src: Path, got_sha: str, got_size: int, sha256: str, size: int) -> None:
    if got_size != size or got_sha != sha256:
        got, expected = f"{got_size} bytes, sha256 {got_sha[:12]}…", f"{size} bytes, {sha256[:12]}…"
        raise StorageError(f"{src}: changed while being stored ({got}; expected {expected})")


# -- the local folder ----------------------------------------------------------------------------


class LocalStorage(Storage):
    """A folder: each object is a file at ``root/key``, put in place by temp + fsync + rename.

    Today this is a thin adapter with the semantics the runner needs; download.py's writer
    (being made symlink-safe) does the same job for downloads, and in phase 2 ``put_file``
    with ``take=True`` becomes a call into it, so there is one way a file reaches its place.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def path(self, key: str) -> Path:
        """Where ``key`` lives on disk."""
        return self.root.joinpath(*check_key(key).split("/"))

    async def put_file(self, key: str, src: Path, *, sha256: str, size: int, content_type: str | None = None, take: bool = False) -> Stored:
        final = self.path(key)
        await self._run(self._put_file, final, src, sha256, size, take)
        return Stored(key, size)

    def _put_file(self, final: Path, src: Path, sha256: str, size: int, take: bool) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        if take and os.stat(src).st_dev == os.stat(final.parent).st_dev:
            # the caller hashed these bytes as it wrote them (and fsynced them): check the size, rename
            got = os.stat(src).st_size
            if got != size:
                raise StorageError(f"{src}: {got} bytes, expected {size}")
            os.replace(src, final)
            return
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            digest, seen = hashlib.sha256(), 0
            with open(src, "rb") as f, open(tmp, "wb") as out:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    seen += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            _verify(src, digest.hexdigest(), seen, sha256, size)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        if take:
            src.unlink(missing_ok=True)

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> Stored:
        final = self.path(key)

        def write() -> None:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)

        await self._run(write)
        return Stored(key, len(data))

    async def head(self, key: str) -> Stored | None:
        path = self.path(key)

        def stat() -> Stored | None:
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            return Stored(key, st.st_size) if os.path.isfile(path) else None

        return await self._run(stat)

    async def list(self, prefix: str = "") -> dict[str, Stored]:
        base = self.path(prefix.rstrip("/")) if prefix.strip("/") else self.root

        def walk() -> dict[str, Stored]:
            found: dict[str, Stored] = {}
            stack = [base]
            while stack:
                folder = stack.pop()
                try:
                    entries = list(os.scandir(folder))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        continue  # a write in progress, or left by a kill
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        key = PurePosixPath(Path(entry.path).relative_to(self.root)).as_posix()
                        found[key] = Stored(key, entry.stat(follow_symlinks=False).st_size)
            return found

        return await self._run(walk)

    async def presign(self, key: str, lifetime_s: float) -> str:
        """A ``file:`` URL: a local file needs no signature (the report links it relatively anyway)."""
        return self.path(key).resolve().as_uri()

    async def move(self, src: str, dst: str) -> None:
        a, b = self.path(src), self.path(dst)

        def rename() -> None:
            b.parent.mkdir(parents=True, exist_ok=True)
            os.replace(a, b)
            with contextlib.suppress(FileNotFoundError):
                os.replace(a.with_name(a.name + SIDECAR), b.with_name(b.name + SIDECAR))

        await self._run(rename)

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied", str(self.root))
            if shutil.disk_usage(self.root).free < 1 << 20:
                raise OSError(28, "no space left on device", str(self.root))

        await self._run(probe)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        except OSError as exc:
            raise _os_error(exc) from exc


def _os_error(exc: OSError) -> StorageError:
    """A file-system error as batchrunner's: a full disk or a refused folder stops the run; the rest fails one object."""
    where = exc.filename or ""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageUnavailable(f"{where}: {reason}: nothing can be written there; free space or fix its permissions, then run again")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return StorageError(f"{where}: {reason}: a file stands where a folder is needed (or the reverse)")
    return StorageError(f"{where}: {reason}")


# -- object storage --------------------------------------------------------------------------------

SignableStore = S3Store | GCSStore | AzureStore


class ObjectStorage(Storage):
    """A bucket and prefix (``s3://bucket/prefix``, ``gs://…``, ``az://…``), through obstore.

    ``endpoint`` (or ``AWS_ENDPOINT_URL``) points S3 at any S3-compatible service; a plain
    ``http://`` endpoint is allowed and addressed path-style (``endpoint/bucket/key``), as
    local services need. Everything else — keys, region, session tokens — comes from each
    cloud's own environment variables, as obstore reads them.
    """

    def __init__(
        self, url: str, *, endpoint: str | None = None, part_bytes: int = PART_BYTES, part_concurrency: int = PART_CONCURRENCY
    ) -> None:
        if part_bytes < 5 << 20:
            raise StorageError(f"multipart parts are at least 5 MiB (S3's minimum), not {part_bytes} bytes")
        self.part_bytes, self.part_concurrency = part_bytes, part_concurrency
        env = os.environ
        for name in SECRET_VARIABLES:
            if env.get(name):
                register_secret(env[name])
        scheme = urlsplit(url).scheme
        self.url = url
        client: dict[str, Any] = {"connect_timeout": timedelta(seconds=10), "timeout": timedelta(seconds=300)}
        retry: Any = {"max_retries": 3, "retry_timeout": timedelta(seconds=60)}
        try:
            if scheme in ("s3", "s3a"):
                endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
                config: dict[str, Any] = {}
                if endpoint:
                    config |= {"endpoint": endpoint, "virtual_hosted_style_request": False}
                    client["allow_http"] = endpoint.startswith("http://")
                self.store: SignableStore = S3Store.from_url(url, config=config or None, client_options=client, retry_config=retry)  # type: ignore[arg-type]
            elif scheme == "gs":
                self.store = GCSStore.from_url(url, client_options=client, retry_config=retry)  # type: ignore[arg-type]
            elif scheme in ("az", "azure", "abfs", "abfss", "adl"):
                self.store = AzureStore.from_url(url, client_options=client, retry_config=retry)  # type: ignore[arg-type]
            else:
                raise StorageError(f"{url}: storage URLs start with s3://, gs:// or az:// (a bucket, then an optional prefix)")
        except obstore.exceptions.BaseError as exc:
            raise StorageError(f"{url}: {_service_message(exc)}") from exc
        self.endpoint = endpoint
        self.puts = 0  # objects written by this instance (tests count uploads with it)

    async def put_file(self, key: str, src: Path, *, sha256: str, size: int, content_type: str | None = None, take: bool = False) -> Stored:
        check_key(key)
        attributes: dict[str, str] = {"sha256": sha256}
        if content_type:
            attributes["Content-Type"] = content_type

        def put() -> None:
            if size <= self.part_bytes:  # one PUT; a small file is read whole
                data = src.read_bytes()
                _verify(src, hashlib.sha256(data).hexdigest(), len(data), sha256, size)
                obstore.put(self.store, key, data, attributes=attributes, use_multipart=False)
            else:
                parts = _read_parts(src, sha256, size, self.part_bytes)
                obstore.put(
                    self.store, key, parts, attributes=attributes, chunk_size=self.part_bytes, max_concurrency=self.part_concurrency
                )

        await self._call(f"storing {key}", put)
        self.puts += 1
        stored = await self.head(key)
        if stored is None or stored.bytes != size:
            raise StorageError(f"{self.url}/{key}: stored {stored.bytes if stored else 'nothing'}, expected {size} bytes")
        if take:
            await anyio.to_thread.run_sync(lambda: src.unlink(missing_ok=True))
        return stored

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> Stored:
        check_key(key)
        attributes = {"Content-Type": content_type} if content_type else None
        await self._call(f"storing {key}", lambda: obstore.put(self.store, key, data, attributes=attributes, use_multipart=False))
        self.puts += 1
        return Stored(key, len(data))

    async def head(self, key: str) -> Stored | None:
        check_key(key)

        def head() -> Stored | None:
            try:
                meta = obstore.head(self.store, key)
            except (FileNotFoundError, NotFoundError):
                return None
            return Stored(key, meta["size"])

        return await self._call(f"looking up {key}", head)

    async def list(self, prefix: str = "") -> dict[str, Stored]:
        prefix = prefix.strip("/")

        def listing() -> dict[str, Stored]:
            found: dict[str, Stored] = {}
            for chunk in obstore.list(self.store, prefix or None, chunk_size=1000):
                for meta in chunk:
                    found[meta["path"]] = Stored(meta["path"], meta["size"])
            return found

        return await self._call(f"listing {prefix or '/'}", listing)

    async def presign(self, key: str, lifetime_s: float) -> str:
        check_key(key)
        if not 1 <= lifetime_s <= MAX_LIFETIME_S:
            raise StorageError(f"a presigned URL lives 1 s to 7 days, not {lifetime_s:g} s")
        # the blocking sign: it only computes, unless credentials must be fetched first
        return await self._call(f"signing {key}", lambda: obstore.sign(self.store, "GET", key, timedelta(seconds=lifetime_s)))

    async def move(self, src: str, dst: str) -> None:
        check_key(src)
        check_key(dst)

        def rename() -> None:
            obstore.rename(self.store, src, dst)
            with contextlib.suppress(FileNotFoundError, NotFoundError):
                obstore.rename(self.store, src + SIDECAR, dst + SIDECAR)

        await self._call(f"moving {src} to {dst}", rename)

    async def check(self) -> None:
        """One listing request: it needs the bucket to exist, the credentials to be accepted and the service to answer."""

        def probe() -> None:
            for _ in obstore.list(self.store, None, chunk_size=1):
                break

        try:
            await self._call("checking access", probe)
        except StorageError as exc:
            raise StorageUnavailable(exc.message) from exc.__cause__

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return await anyio.to_thread.run_sync(fn)
        except StorageError:
            raise
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            said = _service_message(exc)
            raise StorageUnavailable(
                f"{self.url}: {what}: access refused ({said}); check the credentials in the environment and the bucket's policy"
            ) from exc
        except (obstore.exceptions.BaseError, OSError) as exc:
            message = _service_message(exc)
            if _UNAVAILABLE.search(str(exc)):
                raise StorageUnavailable(f"{self.url}: {what}: {message}") from exc
            raise StorageError(f"{self.url}: {what}: {message}") from exc


# Answers that mean no request can succeed: wrong credentials, no bucket, no service.
_UNAVAILABLE = re.compile(
    r"\b(401|403)\b|AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId|NoSuchBucket|ExpiredToken"
    r"|kind: Connect|error sending request|dns error",
    re.IGNORECASE,
)


def _service_message(exc: BaseException) -> str:
    """The service's own words from an obstore error, without its debug dump, URLs' queries or secrets."""
    text = str(exc)
    code, message = re.search(r"<Code>([^<]*)</Code>", text), re.search(r"<Message>([^<]*)</Message>", text)
    if code or message:
        said = ": ".join(m[1] for m in (code, message) if m)
    elif (os_error := re.search(r'Os \{\s*code: \d+,\s*kind: \w+,\s*message: "([^"]*)"', text)) is not None:
        said = os_error[1]
    elif (status := re.search(r"Server returned non-2xx status code: ([^:\n]*)", text)) is not None:
        said = "HTTP " + status[1].strip()
    else:
        said = text.split("\n\nDebug source", 1)[0].strip().splitlines()[0] if text.strip() else type(exc).__name__
        said = re.sub(r"(https?://[^\s?]*)\?\S*", r"\1", said)
    return redact(said)


def open_storage(url: str, *, endpoint: str | None = None) -> Storage:
    """The Storage a URL names: ``s3://``, ``gs://``, ``az://`` → ObjectStorage; a path or ``file://`` → LocalStorage."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return LocalStorage(Path(urlsplit(url).path))
    if not scheme or len(scheme) == 1:  # a path (a Windows drive letter is not a scheme)
        return LocalStorage(Path(url))
    return ObjectStorage(url, endpoint=endpoint)
