"""The results of earlier runs, found and checked on disk, so that a lost or damaged state is rebuilt rather than paid again.

Every result has a sidecar ``<file>.json`` beside it, written before its job is recorded as
done (:func:`batchrunner.download.write_sidecar`): the job id, the request that was sent, the
task id and the file's sha256 — enough to rebuild the job's finished state. A sidecar counts
only when all of it checks out against what is on disk: the file beside it is a regular file
whose bytes hash to the recorded sha256, and the request hashes to the job id (the job-id
contract of :mod:`batchrunner.expand`). Anything else is listed with its reason and not
recovered: that job runs again, paid again, rather than being trusted.

This module reads files only; :func:`batchrunner.store.rebuild` writes what it finds into the state.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .expand import REJECTED_DIR, job_id

STATE_DIR = ".batchrunner"
REPORT_NAMES = ("report.json", "report.csv", "report.html")
MAX_SIDECAR_BYTES = 64 << 20
MAX_VARIANT_SEARCH = 1000  # sidecars written before they recorded their variant: the variants tried to match the job id
_MODALITY = {
    "png": "image", "jpg": "image", "jpeg": "image", "webp": "image", "gif": "image",
    "mp4": "video", "webm": "video", "mov": "video",
    "wav": "audio", "mp3": "audio", "ogg": "audio", "flac": "audio", "m4a": "audio",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class FinishedJob:
    """A finished job read back from its verified sidecar: what the state records of a done job."""

    id: str
    model: str
    modality: str
    body: dict[str, Any]
    path_template: str
    variant: int
    vars: dict[str, Any]
    path: str
    sha256: str
    bytes: int
    task_id: str | None
    submitted_at: float | None
    finished_at: float | None
    duration_s: float | None
    credits: float | None
    index: int | None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A sidecar that was not recovered, and why (its job runs again)."""

    sidecar: str
    job_id: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.sidecar}: {self.reason}"


def sidecars(out_dir: Path) -> Iterator[Path]:
    """Every ``*.json`` under ``out_dir`` that may be a sidecar of this campaign's results.

    Not the reports, nothing under ``.batchrunner/``, nothing under ``rejected/`` (results
    rejected in review are not deliverables), no symlinked folders, and nothing in a folder
    that holds another campaign's state (a ``.batchrunner/`` of its own).
    """
    for folder, dirs, files in os.walk(out_dir):
        top = folder == str(out_dir)
        dirs[:] = [
            d for d in dirs if not (top and d in (STATE_DIR, REJECTED_DIR)) and not os.path.isdir(os.path.join(folder, d, STATE_DIR))
        ]
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".json") and not (folder == str(out_dir) and name in REPORT_NAMES):
                yield Path(folder, name)


def _record(sidecar: Path) -> dict[str, Any] | None:
    """The sidecar's record if it is one of ours (a JSON object naming a job id and a sha256), else None."""
    try:
        info = sidecar.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SIDECAR_BYTES:
            return None
        record = json.loads(sidecar.read_bytes())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and isinstance(record.get("job_id"), str) and isinstance(record.get("sha256"), str):
        return record
    return None


def earlier_results(out_dir: Path) -> Path | None:
    """A file showing that runs have finished jobs in ``out_dir`` (a report or a sidecar of ours), or None. Stops at the first."""
    report = out_dir / "report.json"
    if report.is_file():
        return report
    for sidecar in sidecars(out_dir):
        if _record(sidecar) is not None:
            return sidecar
    return None


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_matches(out_dir: Path, path: object, sha256: object) -> bool:
    """Whether ``out_dir / path`` is a regular file whose bytes hash to ``sha256``."""
    if not isinstance(path, str) or not isinstance(sha256, str):
        return False
    file = out_dir / path
    try:
        return stat.S_ISREG(file.lstat().st_mode) and _sha256(file)[0] == sha256
    except OSError:
        return False


def _variant(record: dict[str, Any], body: dict[str, Any]) -> int | None:
    """The variant whose job id the request hashes to (the recorded one, or found by trying), or None: the request was altered."""
    recorded = record.get("variant")
    candidates = [recorded] if isinstance(recorded, int) else range(1, MAX_VARIANT_SEARCH + 1)
    for variant in candidates:
        if job_id(body, variant) == record["job_id"]:
            return variant
    return None


def check(out_dir: Path, sidecar: Path) -> FinishedJob | Rejected | None:
    """The finished job a sidecar proves, a :class:`Rejected` saying why it proves nothing, or None if it is not one of ours."""
    record = _record(sidecar)
    if record is None:
        return None
    rel_sidecar = sidecar.relative_to(out_dir).as_posix()
    jid = record["job_id"]
    file = sidecar.with_name(sidecar.name.removesuffix(".json"))
    path = file.relative_to(out_dir).as_posix()

    def rejected(reason: str) -> Rejected:
        return Rejected(rel_sidecar, jid, reason)

    body, task_id = record.get("request"), record.get("task_id")
    if not isinstance(body, dict) or not isinstance(task_id, str | None):
        return rejected("the sidecar lacks the request or the task id")
    try:
        info = file.lstat()
    except FileNotFoundError:
        return rejected(f"{path} is missing")
    except OSError as exc:
        return rejected(f"{path} cannot be read ({exc.strerror})")
    if not stat.S_ISREG(info.st_mode):
        return rejected(f"{path} is not a regular file")
    try:
        sha256, size = _sha256(file)
    except OSError as exc:
        return rejected(f"{path} cannot be read ({exc.strerror})")
    if sha256 != record["sha256"] or (isinstance(record.get("bytes"), int) and size != record["bytes"]):
        return rejected(f"{path} does not match the sha256 its sidecar recorded (altered or damaged since)")
    variant = _variant(record, body)
    if variant is None:
        return rejected(f"the sidecar's request does not hash to job id {jid} (altered)")
    ext = file.suffix.lstrip(".")
    template = record.get("path_template")
    if not isinstance(template, str):
        template = path[: -len(ext)] + "{ext}" if ext else path

    def number(key: str) -> float | None:
        value = record.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    index = record.get("index")
    modality = record.get("modality")
    return FinishedJob(
        id=jid, model=str(record.get("model") or body.get("model") or "unknown"),
        modality=modality if isinstance(modality, str) else _MODALITY.get(ext.lower(), "unknown"),
        body=body, path_template=template, variant=variant,
        vars=record["vars"] if isinstance(record.get("vars"), dict) else {},
        path=path, sha256=sha256, bytes=size, task_id=task_id,
        submitted_at=number("submitted_at"), finished_at=number("finished_at"), duration_s=number("duration_s"),
        credits=number("credits"), index=index if isinstance(index, int) and not isinstance(index, bool) else None,
    )  # fmt: skip


def finished_jobs(out_dir: Path) -> tuple[list[FinishedJob], list[Rejected]]:
    """Every finished job the sidecars under ``out_dir`` prove, and every sidecar of ours that proves nothing (with why).

    Two sidecars for one job (a file copied by hand) keep the first found; the second is listed.
    """
    found: dict[str, FinishedJob] = {}
    rejected: list[Rejected] = []
    for sidecar in sidecars(out_dir):
        result = check(out_dir, sidecar)
        if isinstance(result, FinishedJob):
            if result.id in found:
                where = sidecar.relative_to(out_dir).as_posix()
                rejected.append(Rejected(where, result.id, f"job {result.id} is already at {found[result.id].path}"))
            else:
                found[result.id] = result
        elif isinstance(result, Rejected):
            rejected.append(result)
    return list(found.values()), rejected
