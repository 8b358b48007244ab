"""Streaming a finished task's file to its final path, atomically, and verifying it.

The bytes go to a hidden temp file beside the destination, with the sha256 computed on
the way; the size is checked against Content-Length, the type is sniffed from the first
bytes (the extension comes from what the file *is*), then fsync and ``os.replace``. A file
at its final path is therefore always whole; a cut download raises :class:`DownloadError`
and leaves nothing behind. A sidecar ``<file>.json`` records where the file came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import anyio

from .client import Download
from .errors import DownloadError, redact

EXT_FROM_TYPE = {
    "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif",
    "video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov",
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/mpeg": "mp3", "audio/ogg": "ogg", "audio/flac": "flac",
}  # fmt: skip


def sniff(head: bytes) -> str | None:
    """The extension of a media file from its first bytes, or None if unrecognised."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[4:8] == b"ftyp":
        return "mov" if head[8:10] == b"qt" else "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "webm"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "mp3"
    return None


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified file at its final place (``path`` relative to the output folder)."""

    path: str
    sha256: str
    bytes: int


SMALL = 1 << 20  # results up to this size are buffered and written by the Finisher in one go


# The bytes of a new file, and its size, reach the disk before it is renamed into place
# (fdatasync: the same guarantee as fsync for that, without flushing timestamps).
_datasync = getattr(os, "fdatasync", os.fsync)
BATCH = 64  # files finished per wake-up of the Finisher's thread (each holds a descriptor until its fsync)


def _finish_batch(items: list[tuple[Path, bytes | None, Path, str]]) -> list[Exception | None]:
    """Put finished results in place: write every buffered temp file, fsync each, then rename each and write its sidecar.

    Writing the whole batch before the first fsync lets the file system commit the batch's
    new files together instead of one journal commit per file, and asking for all of their
    writeback at once (``POSIX_FADV_DONTNEED``, as databases do) makes the disk work on
    them together. An item that fails leaves no temp file and does not stop the others.
    """
    errors: list[Exception | None] = [None] * len(items)
    fds: dict[int, int] = {}
    for i, (tmp, data, _, _) in enumerate(items):
        if data is not None:  # streamed results arrive written and fsynced
            try:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                fds[i] = fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                errors[i] = exc
    if hasattr(os, "posix_fadvise"):  # start every file's writeback now, so the fdatasyncs below overlap instead of queueing
        for fd in fds.values():
            with contextlib.suppress(OSError):  # only a hint
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for i, fd in fds.items():
        try:
            if errors[i] is None:
                _datasync(fd)
        except OSError as exc:
            errors[i] = exc
        finally:
            os.close(fd)
    for i, (tmp, _, final, sidecar) in enumerate(items):
        try:
            if errors[i] is None:
                os.replace(tmp, final)
                write_sidecar(final, sidecar)
        except OSError as exc:
            errors[i] = exc
        if errors[i] is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return errors


class Finisher:
    """One worker thread that puts finished results in place, many per wake-up.

    A pool thread per file costs more than the file: every hand-over wakes a thread and
    the event loop, and threads fight for the GIL. Here jobs queue their files; the thread
    takes everything queued, finishes each file in turn, and wakes the event loop once for
    the whole batch. (aiohttp ties batchrunner to asyncio, so this uses asyncio futures.)
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[tuple[tuple[Path, bytes | None, Path, str], asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="batchrunner-files", daemon=True)
        self._thread.start()

    async def finish(self, tmp: Path, data: bytes | None, final: Path, sidecar: str) -> None:
        """Have the thread put the file in place (:func:`_finish_batch`). If the caller is cancelled it still is (harmless)."""
        future = self._loop.create_future()
        self._queue.put(((tmp, data, final, sidecar), future))
        await future

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        done = False
        while not done:
            batch = [self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get())
            if None in batch:
                done = True
            items = [item for item in batch if item is not None]
            if items:
                try:
                    errors = _finish_batch([work for work, _ in items])
                except Exception as exc:  # a bug here must fail the jobs, not leave them waiting forever
                    errors = [exc] * len(items)
                self._loop.call_soon_threadsafe(_settle, [(future, error) for (_, future), error in zip(items, errors, strict=True)])


def _settle(results: list[tuple[asyncio.Future[None], Exception | None]]) -> None:
    for future, error in results:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


async def save(dl: Download, out_dir: Path, rel_template: str, sidecar: dict[str, Any], finisher: Finisher) -> Fetched:
    """Write an open result download to ``out_dir / rel_template`` (``{ext}`` from the real type), with its sidecar.

    Small results (most images) are read whole, then written, fsynced, renamed and given
    their sidecar by the ``finisher``'s thread; larger ones stream through aiofiles chunk
    by chunk first. Both hash on the way and pass the same checks before the atomic rename.
    """
    draft = out_dir / rel_template.replace("{ext}", "part")
    # one temp name per job (only one run works on a directory, and a job downloads once at a
    # time), so a temp file left by a hard kill is overwritten and renamed by the retry
    tmp = draft.with_name(f".{draft.name}.tmp")
    digest, size, head = hashlib.sha256(), 0, b""
    data: bytes | None = None
    try:
        if dl.content_length is not None and dl.content_length <= SMALL:
            data = b"".join([chunk async for chunk in dl.chunks()])
            digest.update(data)
            size, head = len(data), data[:16]
        else:
            await anyio.to_thread.run_sync(lambda: draft.parent.mkdir(parents=True, exist_ok=True))
            async with aiofiles.open(tmp, "wb") as f:
                async for chunk in dl.chunks():
                    if len(head) < 16:
                        head += chunk[:16]
                    digest.update(chunk)
                    size += len(chunk)
                    await f.write(chunk)
                await f.flush()
                await anyio.to_thread.run_sync(_datasync, f.fileno())
        if dl.content_length is not None and size != dl.content_length:
            raise DownloadError(f"download cut short: {size} of {dl.content_length} bytes")
        if size == 0:
            raise DownloadError("download was empty")
        rel = rel_template.replace("{ext}", sniff(head) or EXT_FROM_TYPE.get(dl.content_type, "bin"))
        fetched = Fetched(rel, digest.hexdigest(), size)
        record = {**sidecar, "path": rel, "sha256": fetched.sha256, "bytes": size}
        await finisher.finish(tmp, data, out_dir / rel, sidecar_text(record))
    finally:
        if data is None:
            tmp.unlink(missing_ok=True)
    return fetched


def sidecar_text(record: dict[str, Any]) -> str:
    """The sidecar's JSON (one line, key redacted): encoded on the event loop by the C encoder, not in a worker thread."""
    return redact(json.dumps(record, ensure_ascii=False, default=str)) + "\n"


def write_sidecar(path: Path, text: str) -> None:
    """``<file>.json`` beside a result: model, prompt, parameters, task id, timings.

    Written in place, not via a temp file: it is written before the job is recorded as
    done, so a run killed mid-write re-downloads the job and writes the sidecar again.
    """
    with open(path.with_name(path.name + ".json"), "w", encoding="utf-8") as f:
        f.write(text)
