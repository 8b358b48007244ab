"""SQLite state of one output directory: runs, jobs, events, and every job state transition.

One file per output directory (``DIR/.batchrunner/state.sqlite``), WAL mode with
``synchronous=NORMAL``: a committed transition survives the process being killed at any
moment (the OS holds it), at a fraction of a full fsync's cost. Migrations are ordered
and counted in ``PRAGMA user_version``. A second runner on the same directory is refused
by an ``flock`` that the OS drops when the holder dies, so a SIGKILLed run never leaves a
stale lock behind.

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
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio

from .errors import StateError, redact
from .expand import JobSpec

STATE_DIR = ".batchrunner"
GROUP_S = 0.001  # how long the first job asking for a commit waits for others to share it
NOT_RETRYABLE, RESUBMIT, REPOLL = 0, 1, 2


class JobState(StrEnum):
    PENDING = "pending"
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
    S.PENDING: (S.SUBMITTING, S.SUBMITTED, S.FAILED, S.DONE),  # not sent / task lost / retry / file gone
    S.FAILED: (S.PENDING, S.SUBMITTING, S.SUBMITTED),
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
)


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


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What ``sync`` found: jobs new to the store, and jobs already known by state."""

    new: int
    known: dict[str, int]
    dropped: int


class Store:
    """The state of one output directory. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, out_dir: Path, conn: sqlite3.Connection, lock_fd: int | None, clock: Callable[[], float]) -> None:
        self.out_dir = out_dir
        self.conn = conn
        self._lock_fd = lock_fd
        self.clock = clock
        self.run_id: int | None = None
        self._committing: anyio.Event | None = None
        self._broken: StateError | None = None

    @classmethod
    def open(cls, out_dir: Path, *, lock: bool = True, create: bool = True, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating with ``create``) the store of ``out_dir``; ``lock`` takes the directory for this process."""
        state_dir = out_dir / STATE_DIR
        db = state_dir / "state.sqlite"
        if not create and not db.exists():
            raise StateError(f"{out_dir} holds no batchrunner state — run `batchrunner run MANIFEST --out {out_dir}` first")
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create {state_dir}: {exc.strerror}") from exc
        lock_fd = None
        if lock:
            lock_fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(lock_fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(lock_fd)
                raise StateError(f"another batchrunner run (pid {holder}) is using {out_dir} — wait for it to finish, or stop it") from None
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
        try:
            conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            store = cls(out_dir, conn, lock_fd, clock)
            store._migrate()
        except sqlite3.DatabaseError as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            raise StateError(f"{db} is not a usable batchrunner state file ({exc}) — move it away to start afresh") from exc
        return store

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StateError(f"{self.out_dir} was written by a newer batchrunner (state version {version}) — upgrade batchrunner")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self.conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")

    # -- campaign and runs ----------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.flush()
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def claim(self, campaign: str, *, force: bool = False) -> None:
        """Bind this directory to a campaign; refuse another campaign's directory unless ``force``."""
        current = self.meta("campaign")
        if current is not None and current != campaign and not force:
            raise StateError(
                f"{self.out_dir} holds the state of campaign {current!r}, not {campaign!r} — "
                "choose another --out, or pass --force to adopt it (its finished jobs are kept)"
            )
        self.set_meta("campaign", campaign)

    def start_run(self) -> int:
        self.flush()
        cur = self.conn.execute("INSERT INTO runs (started_at) VALUES (?)", (self.clock(),))
        self.run_id = int(cur.lastrowid or 0)
        return self.run_id

    def end_run(self, outcome: str, summary: dict[str, Any]) -> None:
        self.flush()
        if self.run_id is not None:
            self.conn.execute(
                "UPDATE runs SET ended_at = ?, outcome = ?, summary = ? WHERE id = ?",
                (self.clock(), outcome, json.dumps(summary), self.run_id),
            )

    def runs(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM runs ORDER BY id").fetchall()

    # -- jobs -------------------------------------------------------------------------------
    def sync(self, specs: Iterable[JobSpec]) -> SyncResult:
        """Insert new jobs; known jobs keep their state (and their finished file, moved if the path template changed).

        The manifest's jobs go into a temporary table and are matched in SQL, so a resume of
        100,000 jobs neither loads the stored ones nor decodes their specs.
        """
        self.flush()
        now = self.clock()
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("CREATE TEMP TABLE incoming (id TEXT, idx INTEGER, model TEXT, modality TEXT, spec TEXT, credits REAL)")
            self.conn.executemany(
                "INSERT INTO incoming VALUES (?,?,?,?,?,?)", ((s.id, s.index, s.model, s.modality, _spec_json(s), s.credits) for s in specs)
            )
            known: dict[str, int] = {}
            respec = replace = 0
            for state, n, spec_differs, place_differs in self.conn.execute(
                "SELECT j.state, count(*), sum(i.spec IS NOT j.spec), sum((j.in_manifest, j.idx, j.credits) IS NOT (1, i.idx, i.credits)) "
                "FROM incoming i JOIN jobs j USING (id) GROUP BY j.state"
            ).fetchall():
                known[state], respec, replace = n, respec + spec_differs, replace + place_differs
            stored, incoming = (self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("jobs", "incoming"))
            new, dropped = incoming - sum(known.values()), stored - sum(known.values())
            # the common resume changes nothing: each statement below runs only when it has work
            changed = []
            if respec:
                changed = self.conn.execute(
                    "SELECT i.id, i.spec, j.state, j.path FROM jobs j JOIN incoming i USING (id) WHERE i.spec != j.spec"
                ).fetchall()
            if new:
                self.conn.execute(
                    "INSERT INTO jobs (id, idx, model, modality, spec, credits, created_at, updated_at) "
                    "SELECT id, idx, model, modality, spec, credits, ?, ? FROM incoming WHERE id NOT IN (SELECT id FROM jobs)",
                    (now, now),
                )
            if dropped:
                self.conn.execute("UPDATE jobs SET in_manifest = 0 WHERE in_manifest = 1 AND id NOT IN (SELECT id FROM incoming)")
            if replace:
                self.conn.execute(
                    "UPDATE jobs SET in_manifest = 1, idx = i.idx, credits = i.credits FROM incoming i "
                    "WHERE jobs.id = i.id AND (jobs.in_manifest, jobs.idx, jobs.credits) IS NOT (1, i.idx, i.credits)"
                )
            for job_id, spec, state, old_final in changed:
                self._move(job_id, spec, state, old_final)
            self.conn.execute("DROP TABLE incoming")
        return SyncResult(new=new, known={str(k): v for k, v in known.items() if v}, dropped=dropped)

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
        self.conn.execute("UPDATE jobs SET spec = ?, path = coalesce(?, path) WHERE id = ?", (spec, new_final, job_id))

    def recover(self) -> dict[str, int]:
        """After a crash: a job caught mid-submit is ambiguous (resubmitted, counted); a done job whose file is gone runs again.

        (A job caught mid-download is still ``submitted``: it is simply polled and fetched again.)
        """
        self.flush()
        now = self.clock()
        with self.conn:
            self.conn.execute("BEGIN")
            ids = [r[0] for r in self.conn.execute("SELECT id FROM jobs WHERE state = 'submitting'")]
            self.conn.execute(
                "UPDATE jobs SET state = 'pending', ambiguous = ambiguous + 1, updated_at = ? WHERE state = 'submitting'", (now,)
            )
            self.conn.executemany(
                "INSERT INTO events (run_id, job_id, at, kind, detail) VALUES (?, ?, ?, 'ambiguous', ?)",
                ((self.run_id, i, now, "a submit was in progress when the last run stopped; resubmitting") for i in ids),
            )
            files: dict[str, set[str]] = {}  # folder -> the files in it: one directory read per folder, not a stat per job
            missing = []
            for job_id, path in self.conn.execute("SELECT id, path FROM jobs WHERE state = 'done' AND in_manifest = 1"):
                folder, _, name = path.rpartition("/")
                if folder not in files:
                    try:
                        with os.scandir(self.out_dir / folder) as entries:
                            files[folder] = {e.name for e in entries if e.is_file()}
                    except OSError:
                        files[folder] = set()
                if name not in files[folder]:
                    missing.append(job_id)
            self.conn.executemany("UPDATE jobs SET state = 'pending', path = NULL, sha256 = NULL WHERE id = ?", ((i,) for i in missing))
        return {"ambiguous": len(ids), "files_missing": len(missing)}

    def reset_failed(self, *, retryable_only: bool) -> int:
        """Failed jobs back to work: the retryable ones on every run, all of them on ``retry``.

        ``retryable`` is :data:`NOT_RETRYABLE` (the API failed the task: resubmitting costs
        credits, so only ``retry`` does it), :data:`RESUBMIT` (never accepted: free to send
        again) or :data:`REPOLL` (the task exists: poll and download it again, never resubmit).
        """
        self.flush()
        where = "state = 'failed' AND in_manifest = 1" + (" AND retryable > 0" if retryable_only else "")
        cur = self.conn.execute(
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
            while rows := self.conn.execute(
                "SELECT id, model, modality, spec, state, task_id, credits, submitted_at, idx FROM jobs "
                "WHERE in_manifest = 1 AND state = ? AND idx > ? ORDER BY idx LIMIT ?",
                (str(state), after, page),
            ).fetchall():
                for r in rows:
                    spec = json.loads(r[3])
                    yield Job(r[0], r[1], r[2], spec["body"], spec["path"], spec["vars"], S(r[4]), r[5], r[6], r[7])
                after = rows[-1][8]

    def transition(self, job: Job, to: JobState, *, event: str | None = None, **fields: Any) -> None:
        """Move ``job`` to ``to`` (setting ``fields``) in the open batch; refuses a move :data:`TRANSITIONS` does not allow.

        Committed with its batch: await :meth:`durable` before anything that depends on it.
        """
        now = self.clock()
        sets = ["state = ?", "updated_at = ?"] + [f"{name} = {_SET_EXPR.get(name, '?')}" for name in fields]
        values: list[Any] = [str(to), now, *(redact(v) if isinstance(v, str) else v for v in fields.values())]
        allowed = TRANSITIONS[to]
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({','.join('?' * len(allowed))})"
        if self._broken is not None:
            raise self._broken
        try:
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN")
            changed = self.conn.execute(sql, (*values, job.id, *map(str, allowed))).rowcount
            if changed == 1 and event is not None:
                self.conn.execute(
                    "INSERT INTO events (run_id, job_id, at, kind, detail) VALUES (?, ?, ?, ?, ?)",
                    (self.run_id, job.id, now, str(to), redact(event)),
                )
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
            if not self.conn.in_transaction:
                self.conn.execute("BEGIN")
            self.conn.execute(
                "INSERT INTO events (run_id, job_id, at, kind, detail) VALUES (?, ?, ?, ?, ?)",
                (self.run_id, job_id, self.clock(), kind, redact(detail)),
            )
        except sqlite3.Error as exc:
            raise self._write_failed(exc) from exc

    def flush(self) -> None:
        """Commit the open batch of transitions, if any. A failed commit breaks the store for good."""
        if self._broken is not None:
            raise self._broken
        if self.conn.in_transaction:
            try:
                self.conn.commit()
            except sqlite3.Error as exc:
                raise self._write_failed(exc) from exc

    def _write_failed(self, exc: sqlite3.Error) -> StateError:
        """A write to the state file failed (disk full, I/O error): refuse all further work, as uncommitted work may be lost."""
        self._broken = StateError(
            f"cannot write the state file in {self.out_dir / STATE_DIR}: {exc} — free disk space or fix the disk, then run "
            "the same command again (finished jobs are kept)"
        )
        return self._broken

    async def durable(self) -> None:
        """Return once every transition written so far is committed.

        The first caller waits :data:`GROUP_S` so that other jobs add theirs, then commits
        for all of them; the others wait for that commit. A millisecond is nothing next to
        an API call, and one commit instead of dozens is most of the store's cost.
        """
        while self.conn.in_transaction or self._broken is not None:
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
        rows = self.conn.execute("SELECT state, count(*) FROM jobs WHERE in_manifest = 1 GROUP BY state")
        return {str(state): int(n) for state, n in rows}

    def totals(self) -> dict[str, float]:
        row = self.conn.execute(
            "SELECT coalesce(sum(ambiguous), 0), coalesce(sum(credits_spent), 0), coalesce(sum(submits), 0) FROM jobs"
        ).fetchone()
        return {"ambiguous_resubmitted": int(row[0]), "credits_spent": float(row[1]), "submits": int(row[2])}

    def durations(self) -> Iterable[tuple[str, float]]:
        """(model, seconds from submit to result) of finished jobs, to learn when to poll."""
        return self.conn.execute(
            "SELECT model, duration_s FROM jobs WHERE state = 'done' AND duration_s > 0 ORDER BY finished_at DESC LIMIT 5000"
        ).fetchall()

    def rows(self, *, states: Iterable[str] | None = None) -> Iterator[sqlite3.Row]:
        """The campaign's job rows in manifest order, streamed from SQLite."""
        sql = "SELECT * FROM jobs WHERE in_manifest = 1"
        params: tuple[str, ...] = ()
        if states is not None:
            params = tuple(states)
            sql += f" AND state IN ({','.join('?' * len(params))})"
        return iter(self.conn.execute(sql + " ORDER BY idx", params))


def peek(out_dir: Path) -> tuple[set[str], float]:
    """(ids of finished jobs, credits spent) of ``out_dir`` without locking or creating anything."""
    db = out_dir / STATE_DIR / "state.sqlite"
    if not db.exists():
        return set(), 0.0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            done = {r[0] for r in conn.execute("SELECT id FROM jobs WHERE state = 'done'")}
            spent = float(conn.execute("SELECT coalesce(sum(credits_spent), 0) FROM jobs").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StateError(f"{db} is not a usable batchrunner state file ({exc}) — move it away to start afresh") from exc
    return done, spent


# fields whose new value is added to the old one rather than replacing it
_SET_EXPR = {"submits": "submits + ?", "attempts": "attempts + ?", "credits_spent": "credits_spent + ?", "ambiguous": "ambiguous + ?"}


_COMPACT = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _spec_json(spec: JobSpec) -> str:
    return _COMPACT({"body": spec.body, "path": spec.path, "variant": spec.variant, "vars": spec.vars})
