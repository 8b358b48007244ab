"""SQLite state of one output directory: runs, jobs, events, and every job state transition.

One file per output directory (``DIR/.batchrunner/state.sqlite``), WAL mode with
``synchronous=NORMAL``: a committed transition survives the process being killed at any
moment (the OS holds it), at a fraction of a full fsync's cost. Migrations are ordered
and counted in ``PRAGMA user_version``. A second runner on the same directory is refused
by an ``flock`` that the OS drops when the holder dies, so a SIGKILLed run never leaves a
stale lock behind. The :class:`Store` owns every SQL statement: nothing else sees the connection.

The allowed transitions live in :data:`TRANSITIONS` and nowhere else; a transition is one
``UPDATE … WHERE state IN (allowed sources)``, so a racing or illegal change is refused
rather than silently applied.

Group commit: transitions are written into an open transaction and committed together — by
:meth:`Store.durable`, which a caller awaits before a network call that depends on its
transition (one commit serves every job that asks within :data:`GROUP_S`), and by
:meth:`Store.flush`, which the runner calls every fraction of a second and
:meth:`Store.close` calls at the end. Losing an uncommitted batch to a hard kill is safe
by construction: only transitions nothing paid depends on wait for a later commit (a
finished download not yet marked done is fetched again, free).

The state is what stops a campaign being paid twice, so losing it is never silent. A
missing or empty state file beside results of earlier runs is refused (:class:`StateLost`),
a damaged one is found by ``PRAGMA quick_check`` when opened (0.1 s per 100,000 jobs) and
refused (:class:`StateDamaged`); both name :func:`rebuild` (``batchrunner recover DIR``),
which rebuilds the state from the results' sidecars and whatever the damaged file still
holds. A disk that fills up mid-run is met with a reserve file (:data:`RESERVE_BYTES`, kept
beside the state): the failed batch of transitions is replayed into the space it frees,
so the task ids already received land, then the store refuses further work
(:class:`StateWriteError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio

from .errors import StateDamaged, StateError, StateLost, StateWriteError, redact
from .expand import REJECTED_DIR, JobSpec
from .recovery import STATE_DIR, FinishedJob, Rejected, earlier_results, file_matches, finished_jobs

STATE_FILE = "state.sqlite"
RESERVE_FILE = "reserve"
RESERVE_BYTES = 4 << 20  # freed when the disk fills, so the last batch of task ids can still be committed
GROUP_S = 0.001  # how long the first job asking for a commit waits for others to share it
NOT_RETRYABLE, RESUBMIT, REPOLL = 0, 1, 2
REVIEW_DECISIONS = ("approved", "rejected", None)

__all__ = ["STATE_DIR", "JobState", "Rebuilt", "Store", "peek", "rebuild"]


class JobState(StrEnum):
    PENDING = "pending"
    WAITING = "waiting"  # pipelines: its inputs (other jobs' results) are not all done yet
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"
    DONE = "done"
    FAILED = "failed"


S = JobState
# target state -> the states it may be entered from
TRANSITIONS: dict[JobState, tuple[JobState, ...]] = {
    S.SUBMITTING: (S.PENDING,),
    S.SUBMITTED: (S.SUBMITTING, S.FAILED),  # a retry that re-polls its task
    S.DONE: (S.SUBMITTED,),  # the result file is in place (a download cut short leaves the job submitted)
    S.PENDING: (S.SUBMITTING, S.SUBMITTED, S.FAILED, S.DONE, S.WAITING),  # not sent / task lost / retry / file gone / inputs ready
    S.FAILED: (S.PENDING, S.SUBMITTING, S.SUBMITTED, S.WAITING),  # … / an input failed
    S.WAITING: (S.PENDING, S.FAILED, S.DONE),  # an input not done (yet, or again: remade)
}

MIGRATIONS = (
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL, outcome TEXT, summary TEXT
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, idx INTEGER NOT NULL, model TEXT NOT NULL, modality TEXT NOT NULL,
        spec TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending', in_manifest INTEGER NOT NULL DEFAULT 1,
        task_id TEXT, submits INTEGER NOT NULL DEFAULT 0, ambiguous INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0, retryable INTEGER NOT NULL DEFAULT 0,
        credits REAL, credits_spent REAL NOT NULL DEFAULT 0,
        created_at REAL NOT NULL, submitted_at REAL, finished_at REAL, updated_at REAL NOT NULL,
        path TEXT, sha256 TEXT, bytes INTEGER, error TEXT, duration_s REAL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, run_id INTEGER, job_id TEXT, at REAL NOT NULL, kind TEXT NOT NULL, detail TEXT
    );
    """,
    # 2: the work list and the reports read jobs in manifest order, a page at a time; the
    # 'downloading' state is gone (a job caught mid-download was always polled again)
    "CREATE INDEX jobs_by_idx ON jobs (idx); UPDATE jobs SET state = 'submitted' WHERE state = 'downloading';",
    # 3: what was paid for, per job: generate requests sent, and tasks created again because the
    # API forgot an earlier one. Sends before this version were not counted: at least the
    # answered and the ambiguous ones were sent.
    """
    ALTER TABLE jobs ADD COLUMN sends INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN repaid INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET sends = submits + ambiguous WHERE submits + ambiguous > 0;
    """,
    # 4: review — a decision per finished job, and takes: a rejected job is made again as its
    # next take under a new id, ``origin`` keeping the id the manifest knows it by (NULL on a first take)
    "ALTER TABLE jobs ADD COLUMN review TEXT; ALTER TABLE jobs ADD COLUMN reviewed_at REAL; "
    "ALTER TABLE jobs ADD COLUMN take INTEGER NOT NULL DEFAULT 1; ALTER TABLE jobs ADD COLUMN origin TEXT; "
    "CREATE UNIQUE INDEX jobs_by_origin ON jobs (origin) WHERE origin IS NOT NULL; "
    "CREATE INDEX jobs_by_review ON jobs (review) WHERE review IS NOT NULL;",
    # 5: object storage — when a done job's result and sidecar were stored whole in the bucket (storage.url)
    "ALTER TABLE jobs ADD COLUMN stored_at REAL;",
    # 6: pipelines — which jobs' results a job uses, both by the id the manifest knows them by
    # (a retaken job keeps it in ``origin``), and the sha256 of the result it was last sent; see batchrunner/pipeline.py
    "CREATE TABLE needs (job TEXT NOT NULL, upstream TEXT NOT NULL, sha256 TEXT, PRIMARY KEY (job, upstream)) WITHOUT ROWID; "
    "CREATE INDEX needs_by_upstream ON needs (upstream);",
)

# fields whose new value is added to the old one rather than replacing it: ``transition(job, to, sends=1)`` counts one more
_SET_EXPR = {
    "submits": "submits + ?", "attempts": "attempts + ?", "credits_spent": "credits_spent + ?", "ambiguous": "ambiguous + ?",
    "sends": "sends + ?", "repaid": "repaid + ?",
}  # fmt: skip
_EVENT = "INSERT INTO events (run_id, job_id, at, kind, detail) VALUES (?, ?, ?, ?, ?)"


@dataclass(slots=True)
class Job:
    """A job as the runner works on it: its spec and its current place in the state machine."""

    id: str
    model: str
    modality: str
    body: dict[str, Any]
    path: str
    vars: dict[str, Any]
    state: JobState
    task_id: str | None
    credits: float | None
    submitted_at: float | None
    duration_s: float | None = None
    variant: int | None = None


# The plan whose jobs the state holds exactly (expand.Plan.record: its fingerprint, job count, counts and
# warnings): a run of that plan again skips its check and sync. Set by the runner after a sync or a
# whole Feed; a rebuild drops it.
SYNCED_META = "synced_plan"


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What ``sync`` found: jobs new to the store, and jobs already known by state."""

    new: int
    known: dict[str, int]
    dropped: int


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What :func:`rebuild` did.

    ``problem`` is what was wrong with the state file (None: it was sound, and only jobs it
    did not record as done were added); ``set_aside`` the old files, renamed, never deleted;
    ``recovered`` finished jobs recorded from verified sidecars; ``already_done`` finished
    jobs the state held already; ``kept`` job rows read back from a damaged file, of which
    ``kept_submitted`` are paid tasks that will be fetched, not paid again; ``rejected`` the
    results that proved nothing (their jobs run again).
    """

    problem: str | None
    set_aside: list[Path]
    recovered: int
    already_done: int
    kept: int
    kept_submitted: int
    rejected: list[Rejected] = field(default_factory=list)


class Store:
    """The state of one output directory: ``with Store.open(out_dir) as store: …``."""

    def __init__(self, out_dir: Path, conn: sqlite3.Connection, lock_fd: int | None, clock: Callable[[], float]) -> None:
        self.out_dir = out_dir
        self._conn = conn
        self._lock_fd = lock_fd
        self.clock = clock
        self.run_id: int | None = None
        self.commits = 0  # batches committed by flush (tests and benchmarks count them)
        self._committing: anyio.Event | None = None
        self._broken: StateWriteError | None = None
        self._batch: list[tuple[str, tuple[Any, ...]]] = []  # the open batch's statements, replayed if its commit fails
        self._linked = False  # pipelines: some job uses another's result (known once settle() has run)

    @classmethod
    def open(
        cls, out_dir: Path, *, lock: bool = True, create: bool = True, write: bool = False, clock: Callable[[], float] = time.time
    ) -> Store:
        """Open the store of ``out_dir``, checked whole; ``create`` makes a new one if there is none.

        ``lock`` takes the directory for this process (a run, a retry). Without it the store is
        a reader (``status``, ``report``, ``plan``): opened read-only, it writes nothing and
        also works in a read-only folder — unless ``write``: review decisions, which a run beside
        them never writes (SQLite serialises the two writers). A missing or empty state file
        beside results of earlier runs raises :class:`StateLost`, a damaged one :class:`StateDamaged`.
        """
        db = out_dir / STATE_DIR / STATE_FILE
        _refuse_lost(out_dir, db, create=create)
        if not lock:
            return cls(out_dir, _connect(out_dir, db) if write else _connect_reader(out_dir, db), None, clock)
        lock_fd = _lock(out_dir)
        try:
            _reserve(out_dir)
            conn = _connect(out_dir, db)
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(out_dir, conn, lock_fd, clock)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit what is pending (unless a write already failed), close, and release the directory."""
        try:
            if self._broken is None:
                self.flush()
        finally:
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """The connection, with any SQLite error turned into batchrunner's (see :meth:`_error`)."""
        try:
            yield self._conn
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _error(self, exc: sqlite3.Error) -> StateError:
        """Before a run: the plain reason (damaged, unreadable, full). During a run: the store breaks for good."""
        return self._write_failed(exc) if self.run_id is not None else _translate(self.out_dir, exc)

    # -- campaign and runs ----------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        with self._sql() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.flush()
        with self._sql() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def claim(self, campaign: str, *, force: bool = False) -> None:
        """Bind this directory to a campaign; refuse another campaign's directory unless ``force``."""
        current = self.meta("campaign")
        if current is not None and current != campaign and not force:
            raise StateError(
                f"{self.out_dir} holds the state of campaign {current!r}, not {campaign!r} — "
                "choose another --out, or pass --force to adopt it (its finished jobs are kept)"
            )
        self.set_meta("campaign", campaign)

    def claim_backend(self, backend: str, *, force: bool = False) -> None:
        """Bind this directory to where its jobs run ("api" or "sandbox"); refuse the other unless ``force``.

        The embedded sandbox's results are placeholders and its task ids mean nothing to the
        real API: a real run must not keep them as finished work, nor poll them.
        """
        current = self.meta("backend")
        if current is not None and current != backend and not force:
            raise StateError(backend_mismatch(self.out_dir, current, backend))
        if current != backend:
            self.set_meta("backend", backend)

    def start_run(self) -> int:
        self.flush()
        with self._sql() as conn:
            cur = conn.execute("INSERT INTO runs (started_at) VALUES (?)", (self.clock(),))
        self.run_id = int(cur.lastrowid or 0)
        return self.run_id

    def end_run(self, outcome: str, summary: dict[str, Any]) -> None:
        if self._broken is not None:
            return  # nothing more can be written; the error that broke the store says why
        self.flush()
        if self.run_id is not None:
            with self._sql() as conn:
                conn.execute(
                    "UPDATE runs SET ended_at = ?, outcome = ?, summary = ? WHERE id = ?",
                    (self.clock(), outcome, json.dumps(summary), self.run_id),
                )

    def runs(self) -> list[sqlite3.Row]:
        with self._sql() as conn:
            return conn.execute("SELECT * FROM runs ORDER BY id").fetchall()

    # -- jobs -------------------------------------------------------------------------------
    def sync(self, specs: Iterable[JobSpec]) -> SyncResult:
        """Insert new jobs; known jobs keep their state (and their finished file, moved if the path template changed).

        The manifest's jobs go into a temporary table and are matched in SQL, so a resume of
        100,000 jobs neither loads the stored ones nor decodes their specs.
        """
        self.flush()
        now = self.clock()
        with self._sql() as conn, conn:
            conn.execute("BEGIN")
            conn.execute("CREATE TEMP TABLE incoming (id TEXT, idx INTEGER, model TEXT, modality TEXT, spec TEXT, credits REAL)")
            linked: list[bool] = []  # pipelines: whether any job uses another's result

            def rows() -> Iterator[tuple[Any, ...]]:
                for s in specs:
                    if s.after and not linked:
                        linked.append(True)
                    yield (s.id, s.index, s.model, s.modality, _spec_json(s), s.credits)

            conn.executemany("INSERT INTO incoming VALUES (?,?,?,?,?,?)", rows())
            if linked:
                conn.execute(
                    "INSERT OR IGNORE INTO needs (job, upstream) SELECT i.id, a.value FROM incoming i, json_each(i.spec, '$.after') a "
                    "WHERE json_type(i.spec, '$.after') = 'array'"
                )
            if conn.execute("SELECT 1 FROM jobs WHERE origin IS NOT NULL LIMIT 1").fetchone():  # retaken jobs: see retake_rejected
                conn.execute("UPDATE incoming SET id = j.id FROM jobs j WHERE j.origin = incoming.id")
            known: dict[str, int] = {}
            respec = replace = 0
            for state, n, spec_differs, place_differs in conn.execute(
                "SELECT j.state, count(*), sum(i.spec IS NOT j.spec), sum((j.in_manifest, j.idx, j.credits) IS NOT (1, i.idx, i.credits)) "
                "FROM incoming i JOIN jobs j USING (id) GROUP BY j.state"
            ).fetchall():
                known[state], respec, replace = n, respec + spec_differs, replace + place_differs
            stored, incoming = (conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("jobs", "incoming"))
            new, dropped = incoming - sum(known.values()), stored - sum(known.values())
            # the common resume changes nothing: each statement below runs only when it has work
            changed = []
            if respec:
                changed = conn.execute(
                    "SELECT i.id, i.spec, j.state, j.path FROM jobs j JOIN incoming i USING (id) WHERE i.spec != j.spec"
                ).fetchall()
            if new:
                conn.execute(
                    "INSERT INTO jobs (id, idx, model, modality, spec, credits, created_at, updated_at) "
                    "SELECT id, idx, model, modality, spec, credits, ?, ? FROM incoming WHERE id NOT IN (SELECT id FROM jobs)",
                    (now, now),
                )
            if dropped:
                conn.execute("UPDATE jobs SET in_manifest = 0 WHERE in_manifest = 1 AND id NOT IN (SELECT id FROM incoming)")
            if replace:
                conn.execute(
                    "UPDATE jobs SET in_manifest = 1, idx = i.idx, credits = i.credits FROM incoming i "
                    "WHERE jobs.id = i.id AND (jobs.in_manifest, jobs.idx, jobs.credits) IS NOT (1, i.idx, i.credits)"
                )
            for job_id, spec, state, old_final in changed:
                self._move(job_id, spec, state, old_final)
            conn.execute("DROP TABLE incoming")
        return SyncResult(new=new, known={str(k): v for k, v in known.items() if v}, dropped=dropped)

    def is_empty(self) -> bool:
        """No job in the state yet: a new campaign."""
        with self._sql() as conn:
            return conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchone() is None

    def add_new(self, specs: Iterable[JobSpec]) -> list[Job]:
        """Insert jobs new to the state (a new campaign's, a page at a time), in one commit; they come back pending.

        Unlike :meth:`sync` nothing is matched: the caller knows the state holds none of them
        (:meth:`is_empty`, then each page once).
        """
        self.flush()
        now = self.clock()
        jobs, rows = [], []
        for s in specs:
            jobs.append(Job(s.id, s.model, s.modality, s.body, s.path, s.vars, S.PENDING, None, s.credits, None, None, s.variant))
            rows.append((s.id, s.index, s.model, s.modality, _spec_json(s), s.credits, now, now))
        with self._sql() as conn, conn:
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO jobs (id, idx, model, modality, spec, credits, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)", rows
            )
        return jobs

    def _move(self, job_id: str, spec: str, state: str, old_final: str | None) -> None:
        """A known job's spec changed (its path template, or vars): follow it, moving a finished file instead of paying again."""
        new_final = None
        if state == S.DONE and old_final:
            ext = Path(old_final).suffix.lstrip(".")
            new_final = str(json.loads(spec)["path"]).replace("{ext}", ext)
            src, dst = self.out_dir / old_final, self.out_dir / new_final
            if src.exists() and src != dst:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                sidecar = src.with_name(src.name + ".json")
                if sidecar.exists():
                    os.replace(sidecar, dst.with_name(dst.name + ".json"))
        self._conn.execute("UPDATE jobs SET spec = ?, path = coalesce(?, path) WHERE id = ?", (spec, new_final, job_id))

    def recover(self, remote: set[str] | None = None) -> dict[str, int]:
        """After a crash: a job caught mid-submit is ambiguous (resubmitted, counted); a done job whose file is gone runs again.

        (A job caught mid-download is still ``submitted``: it is simply polled and fetched again.)
        Then every job rejected in review becomes its next take (:meth:`retake_rejected`).
        """
        self.flush()
        now = self.clock()
        with self._sql() as conn, conn:
            conn.execute("BEGIN")
            ids = [r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'submitting'")]
            conn.execute("UPDATE jobs SET state = 'pending', ambiguous = ambiguous + 1, updated_at = ? WHERE state = 'submitting'", (now,))
            why = "a submit was in progress when the last run stopped; resubmitting"
            conn.executemany(_EVENT, ((self.run_id, i, now, "ambiguous", why) for i in ids))
            files: dict[str, set[str]] = {}  # folder -> the files in it: one directory read per folder, not a stat per job
            missing = []
            kept = "" if remote is not None else " AND stored_at IS NULL"  # a result stored in the bucket is never paid for again
            for job_id, path in conn.execute(f"SELECT id, path FROM jobs WHERE state = 'done' AND in_manifest = 1{kept}"):
                folder, _, name = path.rpartition("/")
                if folder not in files:
                    try:
                        with os.scandir(self.out_dir / folder) as entries:
                            files[folder] = {e.name for e in entries if e.is_file()}
                    except OSError:
                        files[folder] = set()
                if name not in files[folder] and (remote is None or path not in remote):
                    missing.append(job_id)
            conn.executemany(
                "UPDATE jobs SET state = 'pending', path = NULL, sha256 = NULL, stored_at = NULL WHERE id = ?", ((i,) for i in missing)
            )
            if remote is not None:  # what the bucket's listing does not hold was not stored whole: stored again from the local copy
                unstored = [
                    (i,)
                    for i, path in conn.execute("SELECT id, path FROM jobs WHERE state = 'done' AND stored_at IS NOT NULL")
                    if path not in remote
                ]
                conn.executemany("UPDATE jobs SET stored_at = NULL WHERE id = ?", unstored)
        return {"ambiguous": len(ids), "files_missing": len(missing), "retaken": len(self.retake_rejected())}

    def reset_failed(self, *, retryable_only: bool) -> int:
        """Failed jobs back to work: the retryable ones on every run, all of them on ``retry``.

        ``retryable`` is :data:`NOT_RETRYABLE` (the API failed the task: resubmitting costs
        credits, so only ``retry`` does it), :data:`RESUBMIT` (never accepted: free to send
        again) or :data:`REPOLL` (the task exists: poll and download it again, never resubmit).
        """
        self.flush()
        where = "state = 'failed' AND in_manifest = 1" + (" AND retryable > 0" if retryable_only else "")
        with self._sql() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = CASE WHEN retryable = ? AND task_id IS NOT NULL THEN 'submitted' ELSE 'pending' END, "
                f"error = NULL, retryable = 0, updated_at = ? WHERE {where}",
                (REPOLL, self.clock()),
            )
        return cur.rowcount

    def work(self, page: int = 1000) -> Iterator[Job]:
        """Jobs to work on, already-submitted first (their results are waiting), then pending ones, in manifest order.

        Read ``page`` rows at a time, so a campaign's jobs are never all in memory at once.
        """
        for state in (S.SUBMITTED, S.PENDING):
            after = -1
            while True:
                with self._sql() as conn:
                    rows = conn.execute(
                        "SELECT id, model, modality, spec, state, task_id, credits, submitted_at, idx FROM jobs "
                        "WHERE in_manifest = 1 AND state = ? AND idx > ? ORDER BY idx LIMIT ?",
                        (str(state), after, page),
                    ).fetchall()
                if not rows:
                    break
                yield from map(_job_of, rows)
                after = rows[-1][8]

    # -- pipelines: jobs that wait for other jobs' results (see batchrunner/pipeline.py) -------
    def settle(self) -> dict[str, int]:
        """Before a run: each job whose inputs are not all done waits (a done one is remade), a waiting job whose inputs
        are done is pending, and one whose input failed fails ("input <path> failed": not sent, not paid)."""
        self.flush()
        with self._sql() as conn:
            self._linked = conn.execute("SELECT 1 FROM needs LIMIT 1").fetchone() is not None
        if not self._linked:
            return {}
        now, found = self.clock(), {"waiting": 0, "remade": 0, "failed": 0}
        with self._sql() as conn, conn:
            conn.execute("BEGIN")
            while True:  # a remade job's own dependents are remade too
                n = conn.execute(
                    f"UPDATE jobs SET state = 'waiting', path = NULL, sha256 = NULL, bytes = NULL, stored_at = NULL, updated_at = ? "
                    f"WHERE state = 'done' AND in_manifest = 1 AND ({_UNREADY} OR {_STALE})",
                    (now,),
                ).rowcount
                found["remade"] += n
                if not n:
                    break
            found["waiting"] = conn.execute(
                f"UPDATE jobs SET state = 'waiting', updated_at = ? WHERE state = 'pending' AND in_manifest = 1 AND {_UNREADY}", (now,)
            ).rowcount
            conn.execute(f"UPDATE jobs SET state = 'pending', updated_at = ? WHERE state = 'waiting' AND NOT {_UNREADY}", (now,))
        for r in self._conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs u WHERE state = 'failed' AND {_HAS_WAITING}").fetchall():
            found["failed"] += len(self.fail_dependents(_job_of(r)))
        self.flush()
        return found

    def release(self, job: Job) -> list[Job]:
        """``job`` is done: its waiting dependents whose inputs are now all done become pending (in the open batch); returns them."""
        if not self._linked:
            return []
        ready = [_job_of(r) for r in self._dependents(job, f"AND NOT {_UNREADY}")]
        for dependent in ready:
            self.transition(dependent, S.PENDING)
        return ready

    def fail_dependents(self, job: Job) -> list[tuple[Job, str]]:
        """``job`` failed: every job waiting for it, directly or not, fails too (in the open batch), unsent and unpaid."""
        failed, todo = [], [job]
        while todo:
            upstream = todo.pop()
            reason = f"input {upstream.path.replace('.{ext}', '')} failed"
            for r in self._dependents(upstream) if self._linked else []:
                dependent = _job_of(r)
                self.transition(dependent, S.FAILED, event=reason, error=reason, retryable=RESUBMIT, finished_at=self.clock())
                failed.append((dependent, reason))
                todo.append(dependent)
        return failed

    def _dependents(self, job: Job, condition: str = "") -> list[Any]:
        """The waiting jobs that use ``job``'s result (through the indexes: never a scan of every job)."""
        found = self._conn.execute("SELECT coalesce(origin, id) FROM jobs WHERE id = ?", (job.id,)).fetchone()
        if found is None:
            return []
        wanted = "(SELECT n.job FROM needs n WHERE n.upstream = ?)"
        return self._conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE (id IN {wanted} OR origin IN {wanted}) AND state = 'waiting' {condition} ORDER BY idx",
            (found[0], found[0]),
        ).fetchall()

    def record_inputs(self, job: Job, used: dict[str, str]) -> None:
        """Record (in the open batch, committed with the submit) the sha256 of each upstream result ``job`` is sent:
        {upstream id: sha256}. A job made from a result that has since been made again is remade (:meth:`settle`)."""
        if self._broken is not None:
            raise self._broken
        sql = "UPDATE needs SET sha256 = ? WHERE upstream = ? AND job = (SELECT coalesce(origin, id) FROM jobs WHERE id = ?)"
        try:
            if not self._conn.in_transaction:
                self._batch.clear()
                self._conn.execute("BEGIN")
            for upstream, sha256 in used.items():
                self._batch.append((sql, (sha256, upstream, job.id)))
                self._conn.execute(sql, (sha256, upstream, job.id))
        except sqlite3.Error as exc:
            raise self._write_failed(exc) from exc

    def result_of(self, job_id: str) -> tuple[str, str, int] | None:
        """(path, sha256, bytes) of the finished result of the job the manifest knows as ``job_id``; None when it is not done."""
        with self._sql() as conn:
            row = conn.execute(
                "SELECT path, sha256, bytes FROM jobs WHERE (id = ? OR origin = ?) AND state = 'done' AND path IS NOT NULL",
                (job_id, job_id),
            ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), int(row[2]))

    def job_of(self, job_id: str) -> tuple[str, str | None, str] | None:
        """(state, path, spec JSON) of the job the manifest knows as ``job_id`` (a retaken job by its origin), or None."""
        with self._sql() as conn:
            row = conn.execute("SELECT state, path, spec FROM jobs WHERE id = ? OR origin = ?", (job_id, job_id)).fetchone()
        return None if row is None else (str(row[0]), row[1], str(row[2]))

    def transition(self, job: Job, to: JobState, *, event: str | None = None, **fields: Any) -> None:
        """Move ``job`` to ``to`` (setting ``fields``) in the open batch; refuses a move :data:`TRANSITIONS` does not allow.

        Counters (``sends``, ``submits``, ``ambiguous``, ``repaid``, ``attempts``, ``credits_spent``)
        are added to, not replaced. Committed with its batch: await :meth:`durable` before
        anything that depends on it.
        """
        now = self.clock()
        sets = ["state = ?", "updated_at = ?"] + [f"{name} = {_SET_EXPR.get(name, '?')}" for name in fields]
        values: list[Any] = [str(to), now, *(redact(v) if isinstance(v, str) else v for v in fields.values())]
        allowed = TRANSITIONS[to]
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({','.join('?' * len(allowed))})"
        if self._broken is not None:
            raise self._broken
        params = (*values, job.id, *map(str, allowed))
        try:
            if not self._conn.in_transaction:
                self._batch.clear()
                self._conn.execute("BEGIN")
            self._batch.append((sql, params))
            changed = self._conn.execute(sql, params).rowcount
            if changed == 1 and event is not None:
                logged = (self.run_id, job.id, now, str(to), redact(event))
                self._batch.append((_EVENT, logged))
                self._conn.execute(_EVENT, logged)
        except sqlite3.Error as exc:
            raise self._write_failed(exc) from exc
        if changed != 1:
            raise StateError(f"job {job.id}: {job.state} → {to} is not allowed (or the job changed under us)")
        job.state = to

    def record_event(self, job_id: str, kind: str, detail: str) -> None:
        """Add an event to a job's history (a callback received, …) in the open batch; ``detail`` is redacted."""
        if self._broken is not None:
            raise self._broken
        try:
            if not self._conn.in_transaction:
                self._batch.clear()
                self._conn.execute("BEGIN")
            logged = (self.run_id, job_id, self.clock(), kind, redact(detail))
            self._batch.append((_EVENT, logged))
            self._conn.execute(_EVENT, logged)
        except sqlite3.Error as exc:
            raise self._write_failed(exc) from exc

    def flush(self) -> None:
        """Commit the open batch of transitions, if any. A failed commit breaks the store for good."""
        if self._broken is not None:
            raise self._broken
        if self._conn.in_transaction:
            try:
                self._conn.commit()
            except sqlite3.Error as exc:
                raise self._write_failed(exc) from exc
            self.commits += 1
        self._batch.clear()

    def _write_failed(self, exc: sqlite3.Error) -> StateWriteError:
        """The state file failed mid-work (disk full, I/O error, damage): refuse all further work.

        When the disk is full, the reserve file is deleted and the open batch replayed into
        the space it frees, so the task ids already received are committed before the run stops.
        """
        if self._broken is not None:
            return self._broken
        code = _code(exc)
        state_dir = self.out_dir / STATE_DIR
        if code in (_CORRUPT, _NOTADB):
            message = _damaged_text(self.out_dir, str(exc))
        elif code in (_FULL, _IOERR):
            saved = ""
            if self._batch and _release_reserve(self.out_dir) and self._replay():
                saved = "; what the run had received so far (task ids, finished files) was saved in the space kept in reserve"
            cause = "the disk is full" if code == _FULL else f"the disk failed ({exc})"
            message = (
                f"cannot write the state file in {state_dir}: {cause}{saved} — free disk space or fix the disk, then run the same "
                "command again (finished jobs are kept; a request that was in flight is counted as ambiguous)"
            )
        else:
            message = f"cannot write the state file in {state_dir} ({exc}) — fix the cause, then run the same command again"
        self._broken = StateWriteError(message)
        return self._broken

    def _replay(self) -> bool:
        """Write the open batch again in a fresh transaction and commit it; False if that fails too."""
        try:
            if self._conn.in_transaction:
                self._conn.rollback()
            self._conn.execute("BEGIN")
            for sql, params in self._batch:
                self._conn.execute(sql, params)
            self._conn.commit()
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                if self._conn.in_transaction:
                    self._conn.rollback()
            return False
        self._batch.clear()
        self.commits += 1
        return True

    async def durable(self) -> None:
        """Return once every transition written so far is committed.

        The first caller waits :data:`GROUP_S` so that other jobs add theirs, then commits
        for all of them; the others wait for that commit. A millisecond is nothing next to
        an API call, and one commit instead of dozens is most of the store's cost.
        """
        while self._conn.in_transaction or self._broken is not None:
            if self._committing is not None:
                await self._committing.wait()
                continue
            self._committing = done = anyio.Event()
            try:
                await anyio.sleep(GROUP_S)
            finally:
                self._committing = None
                done.set()
                self.flush()  # raises (disk full…) in this caller; the others try again

    # -- reading ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._sql() as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs WHERE in_manifest = 1 GROUP BY state").fetchall()
        return {str(state): int(n) for state, n in rows}

    def totals(self) -> dict[str, float]:
        """What the campaign cost, over every job the directory ever held.

        ``sends`` generate requests sent; ``submits`` of them answered with a task id;
        ``ambiguous`` sent without an answer (each may have created a task we hold no id for);
        ``repaid`` tasks created again because the API forgot an earlier one;
        ``possibly_paid_twice`` = ambiguous + repaid; ``credits_spent``. (``ambiguous_resubmitted``
        is ``ambiguous`` under its older name.)
        """
        with self._sql() as conn:
            ambiguous, spent, submits, sends, repaid = conn.execute(
                "SELECT coalesce(sum(ambiguous), 0), coalesce(sum(credits_spent), 0), coalesce(sum(submits), 0), "
                "coalesce(sum(sends), 0), coalesce(sum(repaid), 0) FROM jobs"
            ).fetchone()
        return {
            "credits_spent": float(spent), "sends": int(sends), "submits": int(submits), "ambiguous": int(ambiguous),
            "repaid": int(repaid), "possibly_paid_twice": int(ambiguous) + int(repaid), "ambiguous_resubmitted": int(ambiguous),
        }  # fmt: skip

    def planned_credits(self) -> float | None:
        """The credits the campaign's jobs cost at their prices, or None when a price is unknown."""
        with self._sql() as conn:
            unpriced, planned = conn.execute("SELECT count(*) - count(credits), sum(credits) FROM jobs WHERE in_manifest = 1").fetchone()
        return None if unpriced else float(planned or 0)

    def models(self) -> list[str]:
        """The models the campaign uses, sorted."""
        with self._sql() as conn:
            return [str(r[0]) for r in conn.execute("SELECT DISTINCT model FROM jobs WHERE in_manifest = 1 ORDER BY model")]

    def unstored(self) -> list[tuple[str, str, str, int]]:
        """Done jobs whose result is not (known to be) in the bucket: (id, path, sha256, bytes)."""
        self.flush()
        with self._sql() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    "SELECT id, path, sha256, bytes FROM jobs WHERE state = 'done' AND stored_at IS NULL AND in_manifest = 1"
                )
            ]

    def mark_stored(self, job_id: str, at: float) -> None:
        """Record that a done job's result and sidecar are whole in the bucket."""
        self.flush()
        with self._sql() as conn, conn:
            conn.execute("UPDATE jobs SET stored_at = ? WHERE id = ?", (at, job_id))

    def done_ids(self) -> set[str]:
        """Ids of every finished job the directory holds (in the manifest or not)."""
        with self._sql() as conn:
            return {r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'done'")}

    def durations(self) -> list[tuple[str, float]]:
        """(model, seconds from submit to result) of finished jobs, to learn when to poll."""
        with self._sql() as conn:
            rows = conn.execute(
                "SELECT model, duration_s FROM jobs WHERE state = 'done' AND duration_s > 0 ORDER BY finished_at DESC LIMIT 5000"
            ).fetchall()
        return [(str(model), float(seconds)) for model, seconds in rows]

    def rows(self, *, states: Iterable[str] | None = None) -> Iterator[sqlite3.Row]:
        """The campaign's job rows in manifest order, streamed from SQLite."""
        sql = "SELECT * FROM jobs WHERE in_manifest = 1"
        params: tuple[str, ...] = ()
        if states is not None:
            params = tuple(states)
            sql += f" AND state IN ({','.join('?' * len(params))})"
        with self._sql() as conn:
            yield from conn.execute(sql + " ORDER BY idx", params)

    def rows_digest(self) -> str:
        """A digest of every row :meth:`rows` yields: equal digests, equal reports (the reports skip a rewrite then)."""
        digest = hashlib.blake2b(digest_size=16)
        with self._sql() as conn:
            cur = conn.cursor()
            cur.row_factory = None  # plain tuples: their repr is their content
            cur.execute("SELECT * FROM jobs WHERE in_manifest = 1 ORDER BY idx")
            while rows := cur.fetchmany(1000):
                digest.update(repr(rows).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    # -- rebuilding -------------------------------------------------------------------------
    def _adopt(self, salvaged: _Salvage, finished: list[FinishedJob]) -> tuple[int, int, int, int, list[Rejected]]:
        """Write what a rebuild found: rows read back from a damaged file, then every job a verified sidecar proves done.

        Returns (recovered, already done, kept, kept submitted, rejected). A kept row that
        says done but whose file no longer matches is put back to pending.
        """
        now = self.clock()
        proven = {f.id for f in finished}
        rejected: list[Rejected] = []
        recovered = already = 0
        with self._sql() as conn, conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", salvaged.meta.items())
            conn.execute("DELETE FROM meta WHERE key = ?", (SYNCED_META,))  # the rebuilt jobs may not be the synced plan's
            columns = [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
            kept = kept_submitted = 0
            for row in salvaged.jobs:
                names = [c for c in columns if c in row]
                inserted = conn.execute(
                    f"INSERT OR IGNORE INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", [row[c] for c in names]
                ).rowcount
                if not inserted:
                    continue
                kept += 1
                if row["state"] in (S.SUBMITTED, S.SUBMITTING):
                    kept_submitted += 1
                if row["state"] == S.DONE and row["id"] not in proven and not file_matches(self.out_dir, row["path"], row["sha256"]):
                    conn.execute("UPDATE jobs SET state = 'pending', path = NULL, sha256 = NULL, bytes = NULL WHERE id = ?", (row["id"],))
                    rejected.append(Rejected(str(row["path"]), row["id"], "its file is missing or no longer matches the recorded sha256"))
            for f in finished:
                spec = _COMPACT({"body": f.body, "path": f.path_template, "variant": f.variant, "vars": f.vars})
                state = conn.execute("SELECT state FROM jobs WHERE id = ?", (f.id,)).fetchone()
                if state is not None and state[0] == S.DONE:
                    already += 1
                    continue
                recovered += 1
                done = (f.task_id, f.submitted_at, f.finished_at, f.duration_s, f.path, f.sha256, f.bytes, now)
                if state is None:
                    conn.execute(
                        "INSERT INTO jobs (task_id, submitted_at, finished_at, duration_s, path, sha256, bytes, updated_at, "
                        "id, idx, model, modality, spec, state, sends, submits, credits, credits_spent, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'done', 1, 1, ?, ?, ?)",
                        (*done, f.id, -1 if f.index is None else f.index, f.model, f.modality, spec, f.credits, f.credits or 0.0, now),
                    )
                else:
                    conn.execute(
                        "UPDATE jobs SET task_id = coalesce(?, task_id), submitted_at = coalesce(?, submitted_at), finished_at = ?, "
                        "duration_s = ?, path = ?, sha256 = ?, bytes = ?, updated_at = ?, state = 'done', error = NULL, retryable = 0, "
                        "sends = max(sends, 1), submits = max(submits, 1) WHERE id = ?",
                        (*done, f.id),
                    )
                conn.execute(_EVENT, (None, f.id, now, "recovered", "finished job rebuilt from its verified sidecar"))
        return recovered, already, kept, kept_submitted, rejected

    # -- review: decisions and takes --------------------------------------------------------
    def finished_at(self, paths: Iterable[str]) -> dict[str, str]:
        """{path: job id} of the finished jobs at ``paths`` (relative to the output folder, as in report.csv); unknown ones left out."""
        wanted, found = list(dict.fromkeys(paths)), {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows = self._conn.execute(
                f"SELECT path, id FROM jobs WHERE in_manifest = 1 AND state = 'done' AND path IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update({str(path): str(job_id) for path, job_id in rows})
        return found

    def decide(self, job_ids: Iterable[str], decision: str | None) -> list[str]:
        """Record a review decision (``approved``, ``rejected``, or None to clear it) on finished jobs, committed at once.

        Returns the ids it applied to: an id that is not a finished job of the campaign (a
        job retaken since the page was loaded, say) is left out. Safe beside a running run:
        the run never writes these columns, and SQLite serialises the two writers.
        """
        if decision not in REVIEW_DECISIONS:
            raise ValueError(f"a review decision is one of {', '.join(map(str, REVIEW_DECISIONS))}, not {decision!r}")
        self.flush()
        now, changed = self.clock(), []
        try:
            with self._conn:
                self._conn.execute("BEGIN IMMEDIATE")
                for job_id in job_ids:
                    cur = self._conn.execute(
                        "UPDATE jobs SET review = ?, reviewed_at = ? WHERE id = ? AND state = 'done' AND in_manifest = 1",
                        (decision, now if decision else None, job_id),
                    )
                    if cur.rowcount:
                        changed.append(job_id)
                        self._conn.execute(
                            "INSERT INTO events (run_id, job_id, at, kind, detail) VALUES (?, ?, ?, 'review', ?)",
                            (self.run_id, job_id, now, decision or "decision cleared"),
                        )
        except sqlite3.Error as exc:
            raise StateError(f"cannot record the decision in {self.out_dir / STATE_DIR}: {exc} — try again") from exc
        return changed

    def reviewed(self, decision: str) -> Iterator[sqlite3.Row]:
        """The finished jobs that carry ``decision``, in manifest order."""
        return iter(
            self._conn.execute("SELECT * FROM jobs WHERE in_manifest = 1 AND state = 'done' AND review = ? ORDER BY idx", (decision,))
        )

    def retake_rejected(self) -> list[str]:
        """Every job rejected in review becomes its next take, pending under a new id; returns the new ids.

        Its file and sidecar are moved aside to ``rejected/<folder>/<name>.take<n>.<ext>``
        (never deleted), and the row goes back to ``pending`` under :func:`retake_id`, keeping
        its place, what it cost so far, and in ``origin`` the id the manifest knows it by. The
        runner just sees a pending job; the new result lands at the original path. How this
        meets :meth:`sync`: sync maps the manifest's ids through ``origin`` first, so an
        unchanged spec keeps finding its job (a changed spec has a new id: a new job, as ever;
        the rejected one, dropped, is still set aside, so the new job never overwrites it).
        Files first, then one transaction: after a crash in between, the job's file is gone,
        so :meth:`recover` sets it pending and this retakes it with no file left to move. A
        file that cannot be moved aside (permissions) keeps its job rejected and done, with
        an event saying why, rather than being overwritten.
        """
        self.flush()
        rows = self._conn.execute(
            "SELECT id, origin, take, state, path FROM jobs WHERE review = 'rejected' AND state IN ('done', 'pending')"
        ).fetchall()  # also jobs dropped from the manifest since: their file is set aside before a new job may take its path
        if not rows:
            return []
        now, retaken, failed = self.clock(), [], []
        for job_id, origin, take, state, path in rows:
            try:
                aside = self._set_aside(path, take) if state == S.DONE and path else None
            except OSError as exc:
                failed.append((job_id, f"the rejected file could not be moved aside ({exc.strerror}); fix it, then run again"))
                continue
            kept = f"take {take} rejected in review, kept at {aside}" if aside else f"take {take} rejected in review (its file was gone)"
            retaken.append((retake_id(origin or job_id, take + 1), origin or job_id, now, job_id, kept))
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany(
                "UPDATE jobs SET id = ?, origin = ?, take = take + 1, state = 'pending', review = NULL, reviewed_at = NULL, "
                "task_id = NULL, path = NULL, sha256 = NULL, bytes = NULL, error = NULL, retryable = 0, submitted_at = NULL, "
                "finished_at = NULL, duration_s = NULL, updated_at = ? WHERE id = ?",
                (r[:4] for r in retaken),
            )
            events = [(self.run_id, r[0], now, "retake", r[4]) for r in retaken]
            events += [(self.run_id, job_id, now, "retake failed", why) for job_id, why in failed]
            self._conn.executemany("INSERT INTO events (run_id, job_id, at, kind, detail) VALUES (?, ?, ?, ?, ?)", events)
        return [r[0] for r in retaken]

    def _set_aside(self, path: str, take: int) -> str | None:
        """Move a rejected result and its sidecar to a free name under ``rejected/``; None when it is already gone."""
        folder, _, name = path.rpartition("/")
        stem, dot, ext = name.rpartition(".")
        if not dot:
            stem, ext = name, ""
        base = f"{REJECTED_DIR}/{folder + '/' if folder else ''}{stem}.take{take}"
        aside, n = f"{base}{dot}{ext}", 1
        while os.path.lexists(self.out_dir / aside) or os.path.lexists(self.out_dir / f"{aside}.json"):
            n += 1
            aside = f"{base}-{n}{dot}{ext}"
        src, dst = self.out_dir / path, self.out_dir / aside
        if not os.path.lexists(src):
            return None
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)  # a symlink planted at the path is moved as a link, never followed
        with contextlib.suppress(FileNotFoundError):
            os.rename(src.with_name(src.name + ".json"), dst.with_name(dst.name + ".json"))
        return aside


# -- opening -----------------------------------------------------------------------------------
_PERM, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 10, 11, 13, 14, 26  # SQLite's primary result codes
_READONLY, _BUSY, _LOCKED = 8, 5, 6


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def _damaged_text(out_dir: Path, detail: str) -> str:
    return (
        f"the state file {out_dir / STATE_DIR / STATE_FILE} is damaged ({detail}) — run `batchrunner recover {out_dir}` "
        "to rebuild it from the results' sidecars; your results are untouched"
    )


def _translate(out_dir: Path, exc: sqlite3.Error) -> StateError:
    """An SQLite error met outside a run, as batchrunner's error: what is wrong and what to do."""
    code, db = _code(exc), out_dir / STATE_DIR / STATE_FILE
    if code in (_FULL, _IOERR):
        return StateWriteError(f"cannot write the state file {db} ({exc}) — free disk space or fix the disk, then run the command again")
    if code in (_PERM, _READONLY, _CANTOPEN):
        return StateError(
            f"cannot open the state file {db} ({exc}) — {db.parent} and the files in it must be readable and writable by you "
            "(is the folder read-only?); your results are untouched"
        )
    if code in (_BUSY, _LOCKED):
        return StateError(f"the state file {db} is busy ({exc}) — another program is writing it; try again once it is done")
    return StateDamaged(_damaged_text(out_dir, str(exc)))


def _size(db: Path) -> int | None:
    try:
        return db.stat().st_size
    except FileNotFoundError:
        return None


def _refuse_lost(out_dir: Path, db: Path, *, create: bool) -> None:
    """Refuse a missing or empty state file beside results of earlier runs; without ``create``, refuse a directory with no state."""
    try:
        size = _size(db)
    except OSError as exc:
        raise StateLost(
            f"cannot read the state file {db} ({exc.strerror}) — make it readable, or run `batchrunner recover {out_dir}` "
            "to rebuild it from the results' sidecars; your results are untouched"
        ) from exc
    if size:
        return
    evidence = earlier_results(out_dir)
    if evidence is not None:
        raise StateLost(
            f"the state file {db} is {'missing' if size is None else 'empty (0 bytes)'}, but {out_dir} holds results of earlier runs "
            f"({evidence.relative_to(out_dir)}) — run `batchrunner recover {out_dir}` to rebuild the state from the results' "
            "sidecars (nothing is sent); a run without it would pay for every finished job again"
        )
    if not create:
        raise StateError(f"{out_dir} holds no batchrunner state — run `batchrunner run MANIFEST --out {out_dir}` first")


def _lock(out_dir: Path) -> int:
    """Take the directory for this process (an ``flock`` the OS drops when the holder dies); returns the lock's descriptor."""
    state_dir = out_dir / STATE_DIR
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise StateError(f"cannot use {state_dir} ({exc.strerror}) — it must be a folder you can write to (is it read-only?)") from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(lock_fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(lock_fd)
        raise StateError(f"another batchrunner run (pid {holder}) is using {out_dir} — wait for it to finish, or stop it") from None
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
    return lock_fd


def _reserve(out_dir: Path) -> None:
    """Keep :data:`RESERVE_BYTES` allocated beside the state (made again when missing): refuse to start without that room."""
    path = out_dir / STATE_DIR / RESERVE_FILE
    with contextlib.suppress(FileNotFoundError):
        if path.lstat().st_size >= RESERVE_BYTES:
            return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zeros = bytes(1 << 20)  # a file system without fallocate: real blocks, written
                for offset in range(0, RESERVE_BYTES, len(zeros)):
                    os.pwrite(fd, zeros, offset)
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StateError(
                f"the disk holding {path.parent} has less than {RESERVE_BYTES >> 20} MiB free, the room kept to save the task ids "
                "of a run if the disk fills up — free some space, then run again (nothing was sent)"
            ) from exc
        raise StateError(f"cannot write {path} ({exc.strerror}) — {path.parent} must be a folder you can write to") from exc


def _release_reserve(out_dir: Path) -> bool:
    try:
        (out_dir / STATE_DIR / RESERVE_FILE).unlink()
    except OSError:
        return False
    return True


def _check(conn: sqlite3.Connection, out_dir: Path) -> None:
    """Refuse a state file that is not whole (``quick_check``: every page of every table and index) or not ours."""
    problem = str(conn.execute("PRAGMA quick_check(1)").fetchone()[0])
    if problem != "ok":
        raise StateDamaged(_damaged_text(out_dir, problem))
    conn.execute("SELECT id, state, spec, sends FROM jobs LIMIT 0")  # "no such table" in an SQLite file that is not ours


def _migrate(conn: sqlite3.Connection, out_dir: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StateError(f"{out_dir} was written by a newer batchrunner (state version {version}) — upgrade batchrunner")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")


def _connect(out_dir: Path, db: Path) -> sqlite3.Connection:
    """The state file opened for writing (created if missing), migrated and checked. The caller holds the lock."""
    try:
        conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise _translate(out_dir, exc) from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        _migrate(conn, out_dir)
        _check(conn, out_dir)
    except sqlite3.Error as exc:
        conn.close()
        raise _translate(out_dir, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def peek_meta(out_dir: Path, key: str) -> str | None:
    """One meta value of ``out_dir``'s state, read-only and best effort: None when there is no state or it cannot be read
    (whatever is wrong with it, the run or ``plan`` that opens it says so)."""
    db = out_dir / STATE_DIR / STATE_FILE
    try:
        if not db.is_file() or not _size(db):
            return None
        conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    except (OSError, ValueError, sqlite3.Error):
        return None
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _connect_reader(out_dir: Path, db: Path) -> sqlite3.Connection:
    """The state file opened read-only: by SQLite's own read-only mode, or, in a read-only folder with nothing left in the
    write-ahead log, as an immutable file. A state written by an older batchrunner is upgraded first (briefly locked)."""
    uri = db.absolute().as_uri()
    conn: sqlite3.Connection | None = None
    try:
        try:
            conn = sqlite3.connect(uri + "?mode=ro", uri=True, check_same_thread=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            if _code(exc) not in (_CANTOPEN, _READONLY, _PERM):
                raise
            wal = db.with_name(db.name + "-wal")
            if (_size(wal) or 0) > 0:
                raise StateError(
                    f"{db.parent} is read-only and the state's latest changes are still in {wal.name}, which only a writer can "
                    f"merge — make {db.parent} writable (nothing in it is lost), then try again"
                ) from exc
            conn = sqlite3.connect(uri + "?immutable=1", uri=True, check_same_thread=False)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < len(MIGRATIONS):
            conn.close()
            conn = None
            lock_fd = _lock(out_dir)  # a run holding the lock would have upgraded it already
            try:
                _connect(out_dir, db).close()
            finally:
                os.close(lock_fd)
            return _connect_reader(out_dir, db)
        conn.row_factory = sqlite3.Row
        _migrate(conn, out_dir)  # refuses a newer version
        _check(conn, out_dir)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise _translate(out_dir, exc) from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    return conn


def backend_mismatch(out_dir: Path, current: str, wanted: str) -> str:
    """Why a run on ``wanted`` refuses a folder made on ``current`` (the words run and plan both say)."""
    names = {"sandbox": "the embedded sandbox (--sandbox)", "api": "the real API"}
    return (
        f"{out_dir} holds the results of runs on {names.get(current, current)}, not on {names.get(wanted, wanted)} — "
        "choose another --out (or pass --force to adopt them as they are)"
    )


def retake_id(origin: str, take: int) -> str:
    """The id of a job's ``take``-th take (2, 3, …) from its first id, the manifest's (a contract: see the README)."""
    return hashlib.sha256(f"batchrunner-retake-v1\0{origin}\0{take}".encode()).hexdigest()[:20]


def peek_rejected(out_dir: Path) -> set[str]:
    """Manifest ids of the jobs rejected in review, which the next run or retry makes again; read-only."""
    snap = snapshot(out_dir)
    return set(snap.rejected) if snap is not None else set()


def peek(out_dir: Path) -> tuple[set[str], float]:
    """(manifest ids of the finished jobs a re-run keeps, credits spent) of ``out_dir`` without locking or creating anything.

    Jobs rejected in review are not kept: the next run makes them again (:func:`peek_rejected`).
    """
    snap = snapshot(out_dir)
    if snap is None:
        return set(), 0.0
    return {job_id for job_id, row in snap.jobs.items() if row[1] == "done"}, snap.spent


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What an output directory's state holds, read without locking, creating or migrating anything.

    ``jobs`` maps the manifest's id (a retaken job's first id) to the row (that id, state, path,
    retryable, has a task id (0/1), credits, in the manifest (0/1)); a finished job rejected in
    review is ``pending`` there, as the next run makes it again. ``rejected`` holds the
    manifest ids of jobs rejected in review and not yet made again. ``locked_by`` is the pid of
    a run holding the directory, if any.
    """

    campaign: str | None
    jobs: dict[str, tuple[str, str, str | None, int, int, float | None, int]]
    spent: float
    ambiguous: int
    locked_by: str | None
    rejected: frozenset[str] = frozenset()
    backend: str | None = None


def snapshot(out_dir: Path, *, jobs: bool = True) -> Snapshot | None:
    """The state of ``out_dir`` as :mod:`batchrunner.dryrun` needs it (without ``jobs``: campaign and lock only); None if it has none.

    Raises the :class:`StateError` that :meth:`Store.open` would raise for a state it cannot use.
    """
    state_dir = out_dir / STATE_DIR
    db = state_dir / STATE_FILE
    _refuse_lost(out_dir, db, create=True)  # results beside a lost state: refused as run refuses it
    if not _size(db):
        return None
    locked_by = None
    try:
        fd = os.open(state_dir / "lock", os.O_RDONLY)
    except OSError:
        pass
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            locked_by = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)  # releases the shared lock
    conn = _connect_reader(out_dir, db)  # refuses a damaged, unreadable or newer state, as Store.open does
    try:
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'campaign'").fetchone()
            made_on = conn.execute("SELECT value FROM meta WHERE key = 'backend'").fetchone()
            rows: dict[str, Any] = {}
            spent, ambiguous, rejected = 0.0, 0, frozenset[str]()
            if jobs:
                redo = "state = 'done' AND review IS 'rejected'"  # made again by the next run
                sql = (
                    f"SELECT coalesce(origin, id), CASE WHEN {redo} THEN 'pending' ELSE state END, path, retryable, "
                    f"task_id IS NOT NULL, credits, in_manifest, {redo} FROM jobs"
                )
                all_rows = [tuple(r) for r in conn.execute(sql)]
                rows = {r[0]: r[:7] for r in all_rows}
                rejected = frozenset(r[0] for r in all_rows if r[7] and r[6])
                spent, ambiguous = conn.execute("SELECT coalesce(sum(credits_spent), 0), coalesce(sum(ambiguous), 0) FROM jobs").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _translate(out_dir, exc) from exc
    return Snapshot(
        campaign=None if row is None else str(row[0]),
        jobs=rows,
        spent=float(spent),
        ambiguous=int(ambiguous),
        locked_by=locked_by,
        rejected=rejected,
        backend=None if made_on is None else str(made_on[0]),
    )


# -- rebuilding ----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Salvage:
    """What could still be read from a damaged state file."""

    meta: dict[str, str] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _readable_rows(conn: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    """Every row of ``table`` that can still be read: rowid ranges, halved around the pages that fail."""
    try:
        columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    except sqlite3.Error:
        return []
    try:
        top = int(conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0] or 0)
    except sqlite3.Error:
        top = 1 << 22
    rows: list[dict[str, Any]] = []
    ranges = [(1, top)] if columns else []
    while ranges:
        low, high = ranges.pop()
        try:
            got = conn.execute(f"SELECT * FROM {table} WHERE rowid BETWEEN ? AND ?", (low, high)).fetchall()
        except sqlite3.Error:
            if low < high:
                middle = (low + high) // 2
                ranges += [(middle + 1, high), (low, middle)]
            continue
        rows.extend(dict(zip(columns, r, strict=True)) for r in got)
    return rows


def _salvage(db: Path) -> _Salvage:
    """The meta and job rows still readable in a damaged state file; job rows that do not make sense are dropped."""
    salvage = _Salvage()
    try:
        conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error:
        return salvage
    try:
        for row in _readable_rows(conn, "meta"):
            if isinstance(row.get("key"), str) and isinstance(row.get("value"), str):
                salvage.meta[row["key"]] = row["value"]
        for row in _readable_rows(conn, "jobs"):
            if row.get("state") == "downloading":  # a state file from before migration 2
                row["state"] = str(S.SUBMITTED)
            try:
                spec = json.loads(row["spec"])
                sound = isinstance(row["id"], str) and JobState(row["state"]) and isinstance(spec["body"], dict)
                sound = sound and isinstance(row["idx"], int) and isinstance(row["model"], str) and isinstance(row["modality"], str)
                if row["state"] in (S.SUBMITTED, S.DONE):
                    sound = sound and isinstance(row["task_id"], str)
                if row["state"] == S.DONE:
                    sound = sound and isinstance(row["path"], str) and isinstance(row["sha256"], str)
            except (KeyError, TypeError, ValueError):
                sound = False
            if sound:
                salvage.jobs.append(row)
    finally:
        conn.close()
    return salvage


def _set_aside(db: Path, label: str, stamp: str) -> list[Path]:
    """Rename the state file and its WAL companions out of the way (never deleted): ``state.sqlite.<label>-<stamp>``."""
    moved = []
    base = db.with_name(f"{db.name}.{label}-{stamp}")
    n = 1
    while base.exists():
        n += 1
        base = db.with_name(f"{db.name}.{label}-{stamp}-{n}")
    for suffix in ("", "-wal", "-shm"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            dst = base.with_name(base.name + suffix)
            try:
                os.replace(src, dst)
            except OSError as exc:
                raise StateError(
                    f"cannot rename {src} out of the way ({exc.strerror}) — {db.parent} must be a folder you can write to"
                ) from exc
            moved.append(dst)
    return moved


def rebuild(out_dir: Path, *, clock: Callable[[], float] = time.time) -> Rebuilt:
    """``batchrunner recover DIR``: make the state of ``out_dir`` whole again from what is on disk; nothing is sent.

    A missing, empty or damaged state file is set aside (renamed, never deleted), what a damaged
    file still holds is read back (so a paid task still running keeps its id), and every job
    whose sidecar checks out against its file (:mod:`batchrunner.recovery`) is recorded as
    done, as ``run`` records it. A sound state is kept and only gains the finished jobs it did
    not record. A following ``run`` pays only for jobs with no verified result.
    """
    db = out_dir / STATE_DIR / STATE_FILE
    if not out_dir.is_dir():
        raise StateError(f"{out_dir} is not a folder — give the output folder of a campaign (its --out)")
    if not _size(db) and not (out_dir / STATE_DIR).is_dir() and earlier_results(out_dir) is None:
        raise StateError(f"{out_dir} holds no batchrunner state and no results to recover from")
    lock_fd: int | None = _lock(out_dir)
    assert lock_fd is not None
    try:
        problem, salvaged, set_aside = None, _Salvage(), []
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(clock()))
        size = _size(db)
        if not size:
            problem = "missing" if size is None else "empty (0 bytes)"
            set_aside = _set_aside(db, "lost", stamp)
        else:
            try:
                _connect(out_dir, db).close()
            except StateDamaged:
                problem = "damaged"
                set_aside = _set_aside(db, "damaged", stamp)
                salvaged = _salvage(set_aside[0])
        _reserve(out_dir)
        store = Store(out_dir, _connect(out_dir, db), lock_fd, clock)
        lock_fd = None  # the store holds it now
        with store:
            finished, rejected = finished_jobs(out_dir)
            recovered, already, kept, kept_submitted, lost = store._adopt(salvaged, finished)
            if problem is not None:
                store.set_meta("recovered", json.dumps({"at": clock(), "problem": problem, "jobs": recovered + kept}))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    return Rebuilt(problem, set_aside, recovered, already, kept, kept_submitted, rejected + lost)


_COMPACT = json.JSONEncoder(separators=(",", ":"), default=str).encode
_JOB_COLUMNS = "id, model, modality, spec, state, task_id, credits, submitted_at, idx"
# a job (``jobs``) with an input that is not done
_UNREADY = (
    "EXISTS (SELECT 1 FROM needs n WHERE n.job = coalesce(jobs.origin, jobs.id) AND NOT EXISTS "
    "(SELECT 1 FROM jobs u WHERE (u.id = n.upstream OR u.origin = n.upstream) AND u.state = 'done'))"
)
# a job (``jobs``) made from an upstream result that has been made again since (its sha256 differs)
_STALE = (
    "EXISTS (SELECT 1 FROM needs n, jobs u WHERE n.job = coalesce(jobs.origin, jobs.id) AND n.sha256 IS NOT NULL "
    "AND (u.id = n.upstream OR u.origin = n.upstream) AND u.state = 'done' AND u.sha256 IS NOT n.sha256)"
)
# a job (``u``) that a waiting job uses
_HAS_WAITING = (
    "EXISTS (SELECT 1 FROM needs n, jobs d WHERE n.upstream = coalesce(u.origin, u.id) AND d.state = 'waiting' "
    "AND (d.id = n.job OR d.origin = n.job))"
)


def _job_of(r: Any) -> Job:
    spec = json.loads(r[3])
    return Job(r[0], r[1], r[2], spec["body"], spec["path"], spec["vars"], S(r[4]), r[5], r[6], r[7], None, spec.get("variant"))


def _spec_json(spec: JobSpec) -> str:
    kept: dict[str, Any] = {"body": spec.body, "path": spec.path, "variant": spec.variant, "vars": spec.vars}
    if spec.step is not None:
        kept["step"] = spec.step
    if spec.after:
        kept["after"] = list(spec.after)
    return _COMPACT(kept)
