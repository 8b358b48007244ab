"""What a run will do, decided before it does anything: the one check behind ``plan`` and ``run``.

:func:`preview` reads the output directory's state (without locking, creating or
migrating anything), matches the plan's jobs against it exactly as a run's ``sync`` and
``recover`` would, and refuses what the run would refuse — a directory it cannot use, a
budget the jobs to submit would pass, a budget that cannot be checked because a price is
unknown. :func:`~batchrunner.runner.run_campaign` calls it first, so ``plan`` and ``run``
refuse the same manifests with the same messages, and ``plan --out DIR`` counts what a
run will really do (a finished job whose file was deleted is made, and paid, again).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from . import pipeline
from .errors import ManifestError, Problem, StateError
from .expand import JobSpec, Plan
from .store import REPOLL, STATE_DIR, Snapshot, backend_mismatch, snapshot

if TYPE_CHECKING:
    from .runner import RunConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Preview:
    """Where a run starts: every job of the campaign in exactly one of these counts.

    ``done``: finished, file in place (skipped). ``in_flight``: submitted before, polled
    and fetched, not paid again. ``to_submit``: sent this run (new, pending, retryable
    failures, ``files_gone`` and ``ambiguous`` included). ``stays_failed``: failed for good,
    left alone (``batchrunner retry DIR`` runs them). ``files_gone``: finished once, but the
    file was deleted: made and paid again. ``ambiguous``: caught mid-submit by a hard kill:
    resubmitted, possibly paid twice. ``rejected``: rejected in review: made again as a new
    take (counted in ``to_submit``). ``credits_to_submit`` is None when a price is unknown.
    """

    out_dir: Path
    jobs: int
    done: int
    in_flight: int
    to_submit: int
    stays_failed: int
    files_gone: int
    ambiguous: int
    credits_to_submit: float | None
    spent: float
    ambiguous_before: int
    resuming: bool
    rejected: int = 0
    redo: tuple[tuple[str, str, int], ...] = ()  # pipelines: (step, why, jobs) a re-run makes (pipeline.reasons)

    @property
    def to_run(self) -> int:
        """Jobs this run works on: submitted ones polled, the rest sent."""
        return self.in_flight + self.to_submit


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTally:
    """What one run did: ``ran`` = ``done`` + ``failed`` jobs it finished; ``skipped`` were done before it;
    ``left`` are still to do (a stopped or interrupted run); ``possibly_paid_twice`` are its ambiguous resubmits."""

    ran: int
    done: int
    failed: int
    skipped: int
    left: int
    possibly_paid_twice: int


def tally(start: Preview, counts: dict[str, int], ambiguous_total: int) -> RunTally:
    """This run's part of the final ``counts`` (per state, of every job), given where it started."""
    done = max(0, counts.get("done", 0) - start.done)
    failed = max(0, counts.get("failed", 0) - start.stays_failed)
    left = sum(n for state, n in counts.items() if state not in ("done", "failed"))
    return RunTally(
        ran=done + failed,
        done=done,
        failed=failed,
        skipped=start.done,
        left=left,
        possibly_paid_twice=max(0, ambiguous_total - start.ambiguous_before),
    )


def preview(plan: Plan | None, config: RunConfig) -> Preview:
    """What running ``plan`` (None: the stored jobs, as ``retry`` does) into ``config.out_dir`` will do.

    Reads only. Raises :class:`StateError` or :class:`ManifestError` exactly when the run
    would refuse to start, with the same message.
    """
    out = config.out_dir
    snap = _usable(plan, config, jobs=True)
    stored = snap.jobs if snap is not None else {}
    if plan is not None and not stored:  # a new campaign: every job is to submit, counted while it was expanded
        summary = plan.summary()
        fresh = Preview(
            out_dir=out, jobs=len(plan.specs), done=0, in_flight=0, to_submit=len(plan.specs), stays_failed=0, files_gone=0,
            ambiguous=0, credits_to_submit=summary.credits, spent=snap.spent if snap is not None else 0.0,
            ambiguous_before=snap.ambiguous if snap is not None else 0, resuming=False,
        )  # fmt: skip
        _check_budget(plan, config.max_credits, fresh, {m for m, row in summary.models.items() if row["credits"] is None})
        return fresh
    jobs: list[tuple[str, str | None, float | None, str]]
    if plan is not None:
        jobs = [(s.id, s.path, s.credits, s.model) for s in plan.specs]
    else:
        jobs = [(row[0], None, row[5], "") for row in stored.values() if row[6]]
    present = _Files(out)
    remade: dict[str, str] = {}  # pipelines: finished jobs made again, as an input of theirs is
    blocked: set[str] = set()  # pipelines: jobs failed unsent, as an input of theirs stays failed
    if plan is not None and plan.reference_at is not None and stored:

        def finished(s: JobSpec) -> bool:
            row = stored.get(s.id)
            return row is not None and row[1] == "done" and (present.has(row[2]) or bool(row[2] and present.has(_moved(s.path, row[2]))))

        def failed(s: JobSpec) -> bool:
            row = stored.get(s.id)
            return row is not None and row[1] == "failed" and not (row[3] or config.retry_failed)

        remade = pipeline.remade(plan.specs, finished)
        blocked = pipeline.blocked(plan.specs, finished, failed)
    done = files_gone = in_flight = ambiguous = stays_failed = to_submit = 0
    gone: set[str] = set()  # finished jobs made again themselves (pipelines: plan says so per step)
    cost: float | None = 0.0
    unknown: set[str] = set()
    for job_id, spec_path, credits, model in jobs:
        if job_id in blocked:
            stays_failed += 1
            continue
        row = stored.get(job_id)
        if row is not None:
            state = row[1]
            if state == "done" and job_id not in remade:
                if present.has(row[2]) or (spec_path is not None and row[2] and present.has(_moved(spec_path, row[2]))):
                    done += 1
                    continue
                files_gone += 1
                gone.add(job_id)
            elif state == "done":
                pass  # remade: an input is made again
            elif state == "submitted":
                in_flight += 1
                continue
            elif state == "submitting":
                ambiguous += 1
            elif state == "failed":
                if not (row[3] or config.retry_failed):
                    stays_failed += 1
                    continue
                if row[3] == REPOLL and row[4]:
                    in_flight += 1
                    continue
        to_submit += 1
        if credits is None:
            unknown.add(model)
            cost = None
        elif cost is not None:
            cost += credits
    result = Preview(
        out_dir=out,
        jobs=len(jobs),
        done=done,
        in_flight=in_flight,
        to_submit=to_submit,
        stays_failed=stays_failed,
        files_gone=files_gone,
        ambiguous=ambiguous,
        credits_to_submit=cost,
        spent=snap.spent if snap is not None else 0.0,
        ambiguous_before=snap.ambiguous if snap is not None else 0,
        resuming=bool(stored),
        rejected=sum(1 for job_id, *_ in jobs if snap is not None and job_id in snap.rejected),
        redo=tuple(pipeline.reasons(plan.specs, stored.__contains__, remade, gone | (snap.rejected if snap is not None else set())))
        if plan is not None and stored and plan.reference_at
        else (),
    )
    if plan is not None:
        _check_budget(plan, config.max_credits, result, unknown)
    return result


def check(plan: Plan | None, config: RunConfig) -> None:
    """Refuse what :func:`preview` refuses, as the run's first step; the full count (a read of every job
    and result folder) only when a budget needs it."""
    if plan is not None and config.max_credits is not None:
        preview(plan, config)
    else:
        _usable(plan, config, jobs=False)


def started(
    out_dir: Path, counts: dict[str, int], found: dict[str, int], *, spent: float, ambiguous_before: int, resuming: bool
) -> Preview:
    """A run's own start, from its store once synced and recovered: ``counts`` per state, ``found`` by ``Store.recover``.

    The same numbers :func:`preview` predicts, counted where they happen, at no extra cost
    (``credits_to_submit`` is not counted: None).
    """
    return Preview(
        out_dir=out_dir,
        jobs=sum(counts.values()),
        done=counts.get("done", 0),
        in_flight=counts.get("submitted", 0),
        to_submit=counts.get("pending", 0) + counts.get("submitting", 0) + counts.get("waiting", 0),
        stays_failed=counts.get("failed", 0),
        files_gone=found.get("files_missing", 0),
        ambiguous=found.get("ambiguous", 0),
        credits_to_submit=None,
        spent=spent,
        ambiguous_before=ambiguous_before,
        resuming=resuming,
    )


def _usable(plan: Plan | None, config: RunConfig, *, jobs: bool) -> Snapshot | None:
    """The output folder's state, or the :class:`StateError` a run stops at: not creatable, nothing to retry, locked, another campaign's."""
    out = config.out_dir
    _check_storage(plan, config)
    _check_creatable(out / STATE_DIR)
    snap = snapshot(out, jobs=jobs)
    if snap is None and plan is None:
        raise StateError(f"{out} holds no batchrunner state — run `batchrunner run MANIFEST --out {out}` first")
    if snap is not None and snap.locked_by is not None:
        raise StateError(f"another batchrunner run (pid {snap.locked_by}) is using {out} — wait for it to finish, or stop it")
    if snap is not None and plan is not None and snap.campaign not in (None, plan.manifest.name) and not config.force:
        raise StateError(
            f"{out} holds the state of campaign {snap.campaign!r}, not {plan.manifest.name!r} — "
            "choose another --out, or pass --force to adopt it (its finished jobs are kept)"
        )
    if snap is not None and snap.backend not in (None, config.backend) and not config.force:
        raise StateError(backend_mismatch(out, snap.backend, config.backend))
    return snap


def _check_storage(plan: Plan | None, config: RunConfig) -> None:
    """Refuse (as bad input) ``file:`` inputs with nowhere to upload them, and no local copies with nowhere else to keep results."""
    if plan is None:
        return
    at = plan.input_at or plan.reference_at  # the first value that must reach the API as a URL to our own copy
    scheme = urlsplit(config.storage_url).scheme if config.storage_url else None
    why = None
    if at is not None and config.storage_url is None and config.backend != "sandbox":
        why = (
            "add 'storage: {url: s3://bucket/prefix}' to the manifest, pass --storage s3://bucket/prefix, or set "
            "BATCHRUNNER_STORAGE (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY); --sandbox serves them itself"
        )
    elif at is not None and scheme is not None and (scheme == "file" or len(scheme) <= 1):
        why = (
            f"the storage {config.storage_url} is a local folder (it would be sent file: URLs naming your disk): use s3://, "
            "gs:// or az:// storage" + ("; --sandbox without storage serves them itself" if config.backend == "sandbox" else "")
        )
    if at is not None and why is not None:
        what = "file: inputs" if plan.input_at else "other jobs' results ({ID.url})"
        raise ManifestError([Problem(at[0], at[1], f"{what} need object storage the API can fetch them from: {why}")])
    if not config.keep_local and config.storage_url is None:
        kept = plan.manifest.storage
        raise ManifestError(
            [
                Problem(
                    plan.manifest.file,
                    kept.line if kept else None,
                    "storage.keep_local: false needs storage.url (or --storage): results must be kept somewhere",
                )
            ]
        )


def _check_budget(plan: Plan, max_credits: float | None, start: Preview, unknown: set[str]) -> None:
    """Refuse (as bad input) a plan whose jobs to submit pass ``max_credits``, or whose cost cannot be known."""
    if max_credits is None:
        return
    line = plan.manifest.line_of("max_credits")
    cost = start.credits_to_submit
    if cost is None:
        raise ManifestError(
            [
                Problem(
                    plan.manifest.file,
                    line,
                    f"max_credits is set but the price of {', '.join(sorted(unknown))} is unknown — "
                    "add them under 'credits:' in the manifest",
                )
            ]
        )
    if start.spent + cost > max_credits:
        raise ManifestError(
            [
                Problem(
                    plan.manifest.file,
                    line,
                    f"the plan costs {cost:g} credits to run ({start.spent:g} already spent), more than max_credits {max_credits:g} — "
                    "raise max_credits or trim the manifest",
                )
            ]
        )


def _check_creatable(state_dir: Path) -> None:
    """Refuse, as :meth:`Store.open` would, a state folder that cannot be made (a file in the way, no permission)."""
    existing = state_dir
    while not existing.exists():
        if existing.parent == existing:
            return
        existing = existing.parent
    if existing == state_dir:
        if not existing.is_dir():
            raise StateError(f"cannot create {state_dir}: {os.strerror(errno.EEXIST)}")  # a file of that name
        return
    if not existing.is_dir():
        raise StateError(f"cannot create {state_dir}: {os.strerror(errno.ENOTDIR)}")  # as mkdir reports it
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StateError(f"cannot create {state_dir}: {os.strerror(errno.EACCES)}")


def _moved(spec_path: str, stored: str) -> str:
    """Where a run's ``sync`` moves a finished file when the job's path template changed."""
    return spec_path.replace("{ext}", Path(stored).suffix.lstrip("."))


class _Files:
    """Which result files exist: one directory read per folder, not a stat per job (as ``Store.recover`` does)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.folders: dict[str, set[str]] = {}

    def has(self, path: str | None) -> bool:
        if not path:
            return False
        folder, _, name = path.rpartition("/")
        names = self.folders.get(folder)
        if names is None:
            names = self.folders[folder] = self._read(folder)
        return name in names

    def _read(self, folder: str) -> set[str]:
        try:
            with os.scandir(self.out / folder) as entries:
                return {e.name for e in entries if e.is_file()}
        except OSError:
            return set()
