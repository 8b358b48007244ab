"""Streaming a finished task's file to its final path: verified, atomic, and never through a planted link.

The bytes are hashed as they arrive, within an overall deadline and a minimum rate. A small
result is held in memory; a large one spills to a hidden temp file beside its destination.
Then the file must pass :func:`batchrunner.verify.verify` (whole media of the job's modality,
whatever Content-Length said or did not say): a broken body is a :class:`DownloadError`, so
the runner fetches it again, and nothing is left at the final path nor beside it. The
extension comes from what the file *is*.

Every write goes through descriptors of folders entered one segment at a time without
following links (``O_DIRECTORY | O_NOFOLLOW``): a segment that is a symbolic link, or a file,
is refused with a plain message. Temp files are created exclusively (``O_EXCL | O_NOFOLLOW``,
a stale one unlinked first: unlinking a planted link removes the link, never its target),
fdatasynced, and renamed into place relative to their folder; a planted link at the final
name is replaced by the rename, never written through. The sidecar ``<file>.json`` is
written the same way. An ``OSError`` never leaves this module: it becomes a
:class:`ResultWriteError` (that job fails with the reason), or :class:`OutputUnwritable`
when nothing can be written there (disk full, quota, read-only), which stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import queue
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .client import Download
from .errors import DownloadError, MediaError, OutputUnwritable, ResultWriteError, redact
from .verify import Media, verify

SMALL = 1 << 20  # results up to this size are held in memory and written by the Finisher in one go
SPILL_BATCH = 1 << 20  # a large result's bytes are handed to a worker thread this many at a time
BATCH = 64  # files finished per wake-up of the Finisher's thread (each holds a descriptor until its fsync)

# The bytes of a new file, and its size, reach the disk before it is renamed into place
# (fdatasync: the same guarantee as fsync for that, without flushing timestamps).
_datasync = getattr(os, "fdatasync", os.fsync)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_NEW_FILE = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
_NOTHING_WRITABLE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
_PLAIN = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EISDIR: "a folder is in the way",
    errno.ENOTDIR: "a file is where a folder is needed", errno.ENAMETOOLONG: "the name is too long for the file system",
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "the file system is read-only",
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """How long one result download may take: ``deadline_s`` in all, and at least ``min_rate_bps`` bytes per second
    averaged over every ``window_s`` (``min_rate_bps`` 0: no minimum). A body that trickles fails with the reason."""

    deadline_s: float = 600.0
    min_rate_bps: float = 1024.0
    window_s: float = 30.0


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Fetched:
    """A verified file at its final place (``path`` relative to the output folder)."""

    path: str
    sha256: str
    bytes: int


def write_error(exc: OSError, what: str) -> ResultWriteError:
    """An ``OSError`` met while writing ``what`` as an error of the tree: :class:`OutputUnwritable` when nothing can be written."""
    reason = _PLAIN.get(exc.errno or 0) or exc.strerror or str(exc)
    if exc.errno in _NOTHING_WRITABLE:
        return OutputUnwritable(
            f"cannot write {what}: {reason}; nothing more can be written there — free space (or make it writable), then run again"
        )
    return ResultWriteError(f"cannot write {what}: {reason}")


def _split(rel: str) -> tuple[tuple[str, ...], str]:
    """A relative path as (folder segments, file name)."""
    *folder, name = rel.split("/")
    return tuple(folder), name


def open_folder(root: Path, folder: tuple[str, ...]) -> int:
    """A descriptor of ``root/folder…``: each segment made if missing and entered without following a link.

    ``root`` itself (the output folder the user named) may be a link. A segment that is a
    symbolic link or a file is refused with :class:`ResultWriteError`; the caller closes the fd.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise write_error(exc, f"into {root}") from None
    for depth, part in enumerate(folder, 1):
        rel = "/".join(folder[:depth])
        try:
            if part in ("", ".", ".."):
                raise ResultWriteError(f"cannot write into {'/'.join(folder)!r}: {part!r} is not a folder name")
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=fd)
            inner = os.open(part, _FOLDER, dir_fd=fd)
        except OSError as exc:
            error = _folder_error(exc, fd, part, rel)
            os.close(fd)
            raise error from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        fd = inner
    return fd


def _folder_error(exc: OSError, parent: int, part: str, rel: str) -> ResultWriteError:
    try:
        mode = os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode
    except OSError:
        return write_error(exc, f"into {rel}")
    if stat.S_ISLNK(mode):
        return ResultWriteError(
            f"{rel} is a symbolic link: results are written only into real folders inside the output folder "
            "(replace the link with a folder)"
        )
    if not stat.S_ISDIR(mode):
        return ResultWriteError(f"{rel} is a file where a folder is needed (move it away)")
    return write_error(exc, f"into {rel}")


def create_new(folder: int, name: str) -> int:
    """A new empty file ``name`` in ``folder`` (a descriptor, open to read and write), made exclusively without following links.

    A file already there (a temp left by a kill, or a link planted under our name) is
    unlinked first: the link goes, never its target.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=folder)
    return os.open(name, _NEW_FILE, 0o644, dir_fd=folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True, slots=True)
class _Work:
    """One result for the Finisher: its temp name (written there already when ``data`` is None), final name and sidecar."""

    tmp: str
    data: bytes | None
    final: str
    sidecar: str


class _Folders:
    """Folder descriptors opened during one batch (results of a campaign share few folders); errors are remembered too."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: dict[tuple[str, ...], int | ResultWriteError] = {}

    def get(self, folder: tuple[str, ...]) -> int:
        hit = self._open.get(folder)
        if hit is None:
            try:
                hit = open_folder(self.root, folder)
            except ResultWriteError as exc:
                hit = exc
            self._open[folder] = hit
        if isinstance(hit, ResultWriteError):
            raise type(hit)(hit.message)
        return hit

    def close(self) -> None:
        for fd in self._open.values():
            if isinstance(fd, int):
                os.close(fd)


def _finish_batch(root: Path, items: list[_Work]) -> list[Exception | None]:
    """Put finished results in place: write every buffered temp file, fsync each, then write each sidecar and rename.

    Writing the whole batch before the first fsync lets the file system commit the batch's
    new files together instead of one journal commit per file, and asking for all of their
    writeback at once (``POSIX_FADV_DONTNEED``, as databases do) makes the disk work on
    them together. An item that fails leaves no temp file and does not stop the others;
    its error is a :class:`ResultWriteError`.
    """
    errors: list[Exception | None] = [None] * len(items)
    folders = _Folders(root)
    fds: dict[int, int] = {}
    try:
        for i, work in enumerate(items):
            if work.data is not None:  # large results arrive written and fsynced
                try:
                    folder, name = _split(work.tmp)
                    fds[i] = fd = create_new(folders.get(folder), name)
                    _write_all(fd, work.data)
                except ResultWriteError as exc:
                    errors[i] = exc
                except OSError as exc:
                    errors[i] = write_error(exc, work.final)
        if hasattr(os, "posix_fadvise"):  # start every file's writeback now, so the fdatasyncs below overlap instead of queueing
            for fd in fds.values():
                with contextlib.suppress(OSError):  # only a hint
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        for i, fd in fds.items():
            try:
                if errors[i] is None:
                    _datasync(fd)
            except OSError as exc:
                errors[i] = write_error(exc, items[i].final)
            finally:
                os.close(fd)
        for i, work in enumerate(items):
            if errors[i] is None:
                try:
                    _place(folders, work)
                except ResultWriteError as exc:
                    errors[i] = exc
                except OSError as exc:
                    errors[i] = write_error(exc, work.final)
            if errors[i] is not None:
                _discard(folders, work.tmp)
    finally:
        folders.close()
    return errors


def _place(folders: _Folders, work: _Work) -> None:
    """Write the sidecar's temp, rename the result into place, then the sidecar (both renames replace a planted link)."""
    src, tmp = _split(work.tmp)
    dst, final = _split(work.final)
    src_fd, dst_fd = folders.get(src), folders.get(dst)
    side_tmp, side = f".{final}.json.tmp", f"{final}.json"
    fd = create_new(dst_fd, side_tmp)
    try:
        try:
            _write_all(fd, work.sidecar.encode("utf-8"))
        finally:
            os.close(fd)
        os.rename(tmp, final, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        try:
            os.rename(side_tmp, side, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
        except OSError:
            with contextlib.suppress(OSError):  # no result without its sidecar: the job is fetched again
                os.unlink(final, dir_fd=dst_fd)
            raise
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(side_tmp, dir_fd=dst_fd)
        raise


def _discard(folders: _Folders, rel: str) -> None:
    folder, name = _split(rel)
    with contextlib.suppress(OSError, ResultWriteError):
        os.unlink(name, dir_fd=folders.get(folder))


class Finisher:
    """One worker thread that puts finished results in place under ``root``, many per wake-up.

    A pool thread per file costs more than the file: every hand-over wakes a thread and
    the event loop, and threads fight for the GIL. Here jobs queue their files; the thread
    takes everything queued, finishes each file in turn, and wakes the event loop once for
    the whole batch. (aiohttp ties batchrunner to asyncio, so this uses asyncio futures.)
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[tuple[_Work, asyncio.Future[None]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="batchrunner-files", daemon=True)
        self._thread.start()

    async def finish(self, tmp: str, data: bytes | None, final: str, sidecar: str) -> None:
        """Have the thread put a result in place (paths relative to ``root``; ``data`` None: already written at ``tmp``).

        Raises :class:`ResultWriteError`. If the caller is cancelled the file is still put in place (harmless).
        """
        future = self._loop.create_future()
        self._queue.put((_Work(tmp, data, final, sidecar), future))
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
                    errors = _finish_batch(self.root, [work for work, _ in items])
                except Exception as exc:  # a bug here must fail the jobs, not leave them waiting forever
                    errors = [ResultWriteError(f"cannot write the result: {type(exc).__name__}: {exc}")] * len(items)
                self._loop.call_soon_threadsafe(_settle, [(future, error) for (_, future), error in zip(items, errors, strict=True)])


def _settle(results: list[tuple[asyncio.Future[None], Exception | None]]) -> None:
    for future, error in results:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class _Spill:
    """A result too large to hold: written to its temp file as it arrives, by worker threads (methods run in one)."""

    def __init__(self, root: Path, tmp: str) -> None:
        self.root, self.tmp = root, tmp
        self.fd = -1

    def _guard(self, action: Any, *args: Any) -> Any:
        try:
            return action(*args)
        except OSError as exc:
            raise write_error(exc, self.tmp) from None

    def open(self) -> None:
        folder, name = _split(self.tmp)
        parent = open_folder(self.root, folder)
        try:
            self.fd = self._guard(create_new, parent, name)
        finally:
            os.close(parent)

    def write(self, chunks: list[bytes]) -> None:
        self._guard(_write_all, self.fd, b"".join(chunks))

    def finish(self, modality: str) -> Media:
        """fdatasync, verify by seeking through the file, close."""
        try:
            self._guard(_datasync, self.fd)
            return verify(self.fd, modality)
        finally:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        folder, name = _split(self.tmp)
        with contextlib.suppress(OSError, ResultWriteError):
            parent = open_folder(self.root, folder)
            try:
                os.unlink(name, dir_fd=parent)
            finally:
                os.close(parent)


async def save(
    dl: Download,
    out_dir: Path,
    rel_template: str,
    sidecar: dict[str, Any],
    finisher: Finisher,
    *,
    modality: str = "unknown",
    limits: Limits = DEFAULT_LIMITS,
) -> Fetched:
    """Write an open result download to ``out_dir / rel_template`` (``{ext}`` from the verified type), with its sidecar.

    Raises :class:`DownloadError` (fetch again) for a body that is cut, too slow, late, or
    not whole media of ``modality``; :class:`ResultWriteError` when it cannot be written.
    """
    folder, draft = _split(rel_template.replace("{ext}", "part"))
    # one temp name per job (only one run works on a directory, and a job downloads once at a
    # time), so a temp file left by a hard kill is replaced by the retry instead of lingering
    tmp = "/".join((*folder, f".{draft}.tmp"))
    digest, size = hashlib.sha256(), 0
    held: list[bytes] = []
    held_bytes = 0
    spill: _Spill | None = None
    verified = False
    try:
        start = anyio.current_time()
        end = start + limits.deadline_s
        need = limits.min_rate_bps * limits.window_s  # bytes that must arrive within each window
        mark_at, mark_size = start, 0
        with anyio.CancelScope(deadline=min(end, start + limits.window_s) if need > 0 else end) as scope:
            async for chunk in dl.chunks():
                digest.update(chunk)
                size += len(chunk)
                held.append(chunk)
                held_bytes += len(chunk)
                if spill is None and size > SMALL:
                    spill = _Spill(out_dir, tmp)
                    await anyio.to_thread.run_sync(spill.open)
                if spill is not None and held_bytes >= SPILL_BATCH:
                    await anyio.to_thread.run_sync(spill.write, held)
                    held, held_bytes = [], 0
                if need > 0 and size - mark_size >= need:
                    mark_at, mark_size = anyio.current_time(), size
                    scope.deadline = min(end, mark_at + limits.window_s)
        if scope.cancelled_caught:
            if anyio.current_time() >= end:
                raise DownloadError(f"download not finished within its {limits.deadline_s:g} s deadline ({size} bytes received)")
            raise DownloadError(
                f"download too slow: under {need:.0f} bytes in {limits.window_s:g} s "
                f"(minimum {limits.min_rate_bps:g} bytes/s; {size} bytes received)"
            )
        if dl.content_length is not None and size != dl.content_length:
            raise DownloadError(f"download cut short: {size} of {dl.content_length} bytes")
        data: bytes | None = None
        if spill is None:
            data = b"".join(held)
            media = verify(data, modality)
        else:
            if held:
                await anyio.to_thread.run_sync(spill.write, held)
            media = await anyio.to_thread.run_sync(spill.finish, modality)
        verified = True
    except MediaError as exc:
        raise DownloadError(f"the result is not usable: {exc.message}") from None
    finally:
        if spill is not None and not verified:  # nothing of a failed download is left behind
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(spill.discard)
    rel = rel_template.replace("{ext}", media.kind)
    fetched = Fetched(rel, digest.hexdigest(), size)
    record = {**sidecar, "path": rel, "sha256": fetched.sha256, "bytes": size}
    await finisher.finish(tmp, data, rel, sidecar_text(record))
    return fetched


def sidecar_text(record: dict[str, Any]) -> str:
    """The sidecar's JSON (one line, key redacted): encoded on the event loop by the C encoder, not in a worker thread."""
    return redact(json.dumps(record, ensure_ascii=False, default=str)) + "\n"
