"""The review loop: a local page to approve or reject a campaign's results, decisions by path, and export of the approved ones.

:func:`serve` runs an aiohttp app on 127.0.0.1 with three routes and nothing else: ``GET /``
(the gallery rendered from the store, approve / reject on every finished item),
``POST /api/decision`` (one decision, committed to the state at once) and ``GET /<path>``
for a result file the store knows — anything else is a 404, and no folder is ever listed.

How it stays safe on a shared machine and against web pages open in the same browser:

- every request must carry the server's own ``Host`` (a DNS-rebinding page carries its own);
- a decision needs the per-session token that only the page holds (a header, which a
  cross-site request cannot set without a CORS preflight this server never grants) and,
  when the browser sends one, the server's own ``Origin``; anything else is a 403;
- a file is served only if the store lists it as a result, and it is opened one path
  component at a time under the output folder with ``O_NOFOLLOW`` (:func:`open_inside`):
  neither ``..``, an absolute or encoded path, nor a symlink planted in the folder reaches
  outside it;
- the page is sent with a Content-Security-Policy that allows its own inline style and
  script (by hash) and nothing from elsewhere, and may not be framed.

:func:`export_approved` copies the approved results to a folder — the seam where object
storage will plug in later is :func:`_put`.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import json
import mimetypes
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web

from .catalog import model_fields
from .errors import StateError, redact
from .report import CSS, SCRIPT, render_gallery
from .store import REVIEW_DECISIONS, Store

TOKEN_HEADER = "X-Batchrunner-Token"
EXPORT_LISTING = "batchrunner-export.csv"
EXPORT_COLUMNS = ("path", "sha256", "bytes", "job_id", "take", "model", "prompt")
_CHUNK = 1 << 20


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (
    f"default-src 'none'; img-src 'self'; media-src 'self'; style-src {_csp_hash(CSS)}; script-src {_csp_hash(SCRIPT)}; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


# -- files, never outside the folder ----------------------------------------------------------
def open_inside(root: Path, rel: str) -> int:
    """A read-only descriptor of the regular file ``rel`` under ``root``; raises OSError for anything else.

    Each folder on the way is opened relative to the one before with ``O_NOFOLLOW``, so a
    symlink anywhere in the path (planted by whoever can write to the folder) is refused
    rather than followed; ``..``, ``.`` and empty segments are refused outright.
    """
    parts = rel.split("/")
    if not rel or any(part in ("", ".", "..") or "\0" in part for part in parts):
        raise FileNotFoundError(rel)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        found = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(found).st_mode):
        os.close(found)
        raise FileNotFoundError(rel)
    return found


def _chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, _CHUNK):
        yield chunk


def _put(root: Path, rel: str, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write ``chunks`` to ``rel`` under ``root``: temp file, fsync, rename; folders made as needed, no symlink followed.

    Returns (sha256, bytes) of what was written. The one place an exported file lands: object
    storage (the storage issue) will put here instead.
    """
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    tmp = f".{parts[-1]}.export-tmp"
    try:
        for part in parts[:-1]:
            with suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        digest, size = hashlib.sha256(), 0
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=fd)
        try:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            os.fsync(out)
        finally:
            os.close(out)
        os.rename(tmp, parts[-1], src_dir_fd=fd, dst_dir_fd=fd)  # replaces a file (or a link) at the name, never writes through it
        return digest.hexdigest(), size
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=fd)
        raise
    finally:
        os.close(fd)


# -- decisions by path ----------------------------------------------------------------------
def decide_paths(out_dir: Path, paths: Iterable[str], decision: str | None) -> list[str]:
    """Record ``decision`` on the finished jobs at ``paths`` (relative to ``out_dir``, as report.csv shows them).

    All or nothing: a path that is not a finished job's raises :class:`StateError` naming
    every such path, and nothing is recorded. Returns the paths decided.
    """
    prefix = out_dir.as_posix().rstrip("/") + "/"
    wanted = []
    for given in paths:
        path = given.replace("\\", "/").removeprefix("./")
        wanted.append(path.removeprefix(prefix) if path.startswith(prefix) else path)
    store = Store.open(out_dir, lock=False, create=False, write=True)
    try:
        found = store.finished_at(wanted)
        unknown = [p for p in dict.fromkeys(wanted) if p not in found]
        if unknown:
            raise StateError(
                f"no finished job at {', '.join(map(repr, unknown))} in {out_dir} — give paths relative to {out_dir} as report.csv "
                "lists them (nothing was recorded)"
            )
        store.decide(dict.fromkeys(found[p] for p in wanted), decision)
    finally:
        store.close()
    return list(dict.fromkeys(wanted))


# -- the server -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Reviewing:
    """A running review server: where to open it, and for which campaign."""

    url: str
    campaign: str
    token: str = field(repr=False)


def _refuse(status: int, why: str) -> web.Response:
    return web.json_response({"error": why}, status=status, headers=_HEADERS)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end) of one ``bytes=a-b`` range within ``size``; None for the whole file; ValueError when it cannot be served."""
    if not header:
        return None
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not match or match.groups() == ("", ""):
        raise ValueError(header)
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if last == "" else min(size, int(last) + 1)
    if start >= end:
        raise ValueError(header)
    return start, end


class _Server:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.token = secrets.token_urlsafe(32)
        self.hosts: set[str] = set()
        self.origins: set[str] = set()
        self.files = {row["path"] for row in store.rows(states=["done"]) if row["path"]}
        self.app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/favicon.ico", self.no_icon)
        self.app.router.add_post("/api/decision", self.decision)
        self.app.router.add_get("/{path:.+}", self.file)

    def bound(self, port: int) -> None:
        self.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        self.origins = {f"http://{host}" for host in self.hosts}

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.host not in self.hosts:
            return _refuse(403, f"this server answers to {sorted(self.hosts)[0]} only")
        response: web.StreamResponse = await handler(request)
        return response

    async def page(self, request: web.Request) -> web.Response:
        number = request.query.get("page", "1")
        text, self.files = render_gallery(self.store, review_token=self.token, page=int(number) if number.isdigit() else 1)
        return web.Response(text=text, content_type="text/html", headers={**_HEADERS, "Content-Security-Policy": CSP})

    async def no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204, headers=_HEADERS)  # the browser asks; a 404 would be a console error

    async def decision(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.origins:
            return _refuse(403, f"a decision from {origin} is refused: only this server's own page may write")
        if request.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
            return _refuse(403, "a cross-site decision is refused")
        if not hmac.compare_digest(request.headers.get(TOKEN_HEADER, "").encode(), self.token.encode()):
            return _refuse(403, "missing or wrong session token — reload the page")
        if request.content_type != "application/json":
            return _refuse(415, "send JSON")
        try:
            body = await request.json()
        except ValueError:
            return _refuse(400, "send JSON: {id, decision}")
        if not isinstance(body, dict) or not isinstance(body.get("id"), str) or body.get("decision") not in REVIEW_DECISIONS:
            return _refuse(400, "send {id: job id, decision: 'approved' | 'rejected' | null}")
        try:
            changed = self.store.decide([body["id"]], body["decision"])
        except StateError as exc:
            return _refuse(503, exc.message)
        if not changed:
            return _refuse(409, f"{body['id']} is not a finished job of this campaign now (retaken or changed?) — reload the page")
        return web.json_response({"id": body["id"], "review": body["decision"]}, headers=_HEADERS)

    async def file(self, request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        if rel not in self.files:  # only results the store knows: no sidecar, no state, no listing
            return _refuse(404, "not a result of this campaign")
        try:
            fd = open_inside(self.store.out_dir, rel)
        except OSError:
            return _refuse(404, "not a regular file inside the output folder")
        try:
            size = os.fstat(fd).st_size
            try:
                span = _byte_range(request.headers.get("Range"), size)
            except ValueError:
                return web.Response(status=416, headers={**_HEADERS, "Content-Range": f"bytes */{size}"})
            start, end = span or (0, size)
            headers = {**_HEADERS, "Accept-Ranges": "bytes", "Content-Length": str(end - start), "Cache-Control": "no-cache"}
            headers["Content-Type"] = mimetypes.guess_type(rel)[0] or "application/octet-stream"
            if span:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            response = web.StreamResponse(status=206 if span else 200, headers=headers)
            await response.prepare(request)
            if request.method != "HEAD":
                while start < end:
                    chunk = await anyio.to_thread.run_sync(os.pread, fd, min(_CHUNK, end - start), start)
                    if not chunk:
                        break
                    await response.write(chunk)
                    start += len(chunk)
            await response.write_eof()
            return response
        finally:
            os.close(fd)


@asynccontextmanager
async def serve(out_dir: Path, *, port: int = 0) -> AsyncIterator[Reviewing]:
    """Serve ``out_dir``'s review page on 127.0.0.1 (``port`` 0: a free one) for the duration of the block."""
    store = Store.open(out_dir, lock=False, create=False, write=True)
    try:
        server = _Server(store)
        runner = web.AppRunner(server.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", port)
            try:
                await site.start()
            except OSError as exc:
                raise StateError(
                    f"cannot listen on 127.0.0.1:{port}: {exc.strerror} — choose another --port, or leave it out for a free one"
                ) from exc
            bound = int(runner.addresses[0][1])
            server.bound(bound)
            yield Reviewing(url=f"http://127.0.0.1:{bound}/", campaign=store.meta("campaign") or str(out_dir), token=server.token)
        finally:
            await runner.cleanup()
    finally:
        store.close()


# -- export ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Exported:
    """What :func:`export_approved` did: files and bytes copied, the listing written, and what went wrong per file."""

    files: int
    bytes: int
    listing: Path
    problems: list[str]  # not exported
    changed: list[str]  # exported, but no longer the bytes batchrunner made (edited by hand since?)


def export_approved(store: Store, dest: str | Path) -> Exported:
    """Copy every approved result of ``store`` to ``dest`` under the same relative path, and list them in :data:`EXPORT_LISTING`.

    Each file is copied atomically (temp, fsync, rename) and read without following a
    symlink; sidecars are not copied (the listing carries job id, take, model, prompt and
    vars). ``dest`` must lie outside the output folder, and the output folder outside it.
    A file that cannot be read is reported and skipped; the others are still exported.
    """
    if isinstance(dest, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", dest):
        raise StateError(f"{dest}: exporting to object storage comes with result storage — export to a folder for now")
    dest = Path(dest)
    out, target = store.out_dir.resolve(), dest.resolve()
    if target == out or out in target.parents:
        raise StateError(f"{dest} is inside the output folder {store.out_dir} — export to a folder outside it")
    if target in out.parents:
        raise StateError(f"the output folder {store.out_dir} is inside {dest} — export to a folder that does not contain it")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create {dest}: {exc.strerror}") from exc
    rows: list[dict[str, Any]] = []
    problems, changed, var_names = [], [], {}
    for job in store.reviewed("approved"):
        path = str(job["path"])
        try:
            fd = open_inside(out, path)
            try:
                sha256, size = _put(target, path, _chunks(fd))
            finally:
                os.close(fd)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc} — not exported")
            continue
        if sha256 != job["sha256"]:
            changed.append(path)
        spec = json.loads(job["spec"])
        variables = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in spec.get("vars", {}).items()}
        var_names.update(dict.fromkeys(variables))
        prompt = str(model_fields(spec["body"]).get("prompt", ""))
        row = {"path": path, "sha256": sha256, "bytes": size, "job_id": job["id"], "take": job["take"], "model": job["model"]}
        rows.append({**row, "prompt": redact(prompt), **{f"var.{k}": v for k, v in variables.items()}})
    listing = io.StringIO()
    writer = csv.DictWriter(listing, fieldnames=[*EXPORT_COLUMNS, *(f"var.{k}" for k in var_names)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _put(target, EXPORT_LISTING, [listing.getvalue().encode()])
    return Exported(len(rows), sum(r["bytes"] for r in rows), target / EXPORT_LISTING, problems, changed)
