"""Scheduling: take a campaign's jobs from pending to done, within limits, surviving anything.

One anyio task group per run. At most ``concurrency`` jobs are alive at once (a job holds
its slot from submit to downloaded file), so 100,000 pending jobs are 100,000 rows, not
100,000 coroutines. Generate requests share one :class:`Pacer` (requests per second, and an
account-wide cool-down when any request gets a 429). Status polls are few: the first one is
timed from the durations learned per model from finished jobs, later ones follow the job's
age geometrically, through a bounded number of poll connections. Finished files are put in
place by one :class:`~batchrunner.download.Finisher` thread, many at a time.

Every transition is committed before the network call that depends on it; the generate
POST and the write of its task id are shielded from cancellation, so Ctrl-C never strands a
paid task — for at most ``stop_grace_s``: a stop (:class:`Interrupt`) gives requests in flight
that long to be answered, a second stop none; a POST cut short is counted as ambiguous. A hard
kill inside that window also leaves a job ambiguous; resume resubmits it and counts it.

Every wait is bounded and visible: a rate-limit pause longer than ``max_pause_s`` stops the
run ("rate-limited until …"), an API that cannot be reached stops it once (not job by job),
an answer that is neither documented state fails the job after ``max_unrecognised`` of them,
and a ``tick`` event says once a second what the run is waiting for.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from .callbacks import CallbackSettings, Hub, Receiver, check_plan, listening
from .catalog import model_fields
from .client import Client, Failed, Processing, Unrecognised, endpoint_problems
from .download import Finisher, Limits, save
from .dryrun import Preview, RunTally, check, started, tally
from .errors import (
    AmbiguousSubmit,
    AuthError,
    BatchRunnerError,
    FatalApiError,
    ManifestError,
    OutputUnwritable,
    PermanentApiError,
    Problem,
    RateLimited,
    ResultWriteError,
    StateError,
    StorageError,
    StorageUnavailable,
    TransientApiError,
    UnknownTask,
    Unreachable,
)
from .expand import JobSpec, Plan, Specs, paused_gc
from .inputs import CONTENT_TYPES, TOKEN_PREFIX, InputFile, Inputs, LoopbackStorage, resolve, tokens
from .pipeline import Flow, local_result_url, result_ids, result_token
from .pipeline import resolve as resolve_results
from .storage import SIDECAR, Storage, complete, open_storage
from .store import NOT_RETRYABLE, REPOLL, RESUBMIT, SYNCED_META, Job, JobState, Store

FLUSH_S = 0.2  # transitions no submit waits for (finished jobs) are committed at least this often
DEFAULT_EXPECTED_S = {"image": 10.0, "video": 90.0, "audio": 20.0, "unknown": 30.0}
EventHandler = Callable[[str, Job | None, str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """How a run behaves. Times in seconds. ``expected_s`` seeds the poll schedule per modality."""

    out_dir: Path
    concurrency: int = 4
    rate_per_s: float | None = None
    max_credits: float | None = None
    retries: int = 5
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    expected_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EXPECTED_S))
    poll_cap_s: float = 60.0
    poll_connections: int = 32
    job_deadline_s: float = 6 * 3600.0
    download_deadline_s: float = 600.0  # one result download, start to end
    download_min_rate_bps: float = 1024.0  # averaged over each download_rate_window_s; 0: no minimum
    download_rate_window_s: float = 30.0
    max_ambiguous: int = 3
    max_pause_s: float = 900.0  # a rate-limit pause (Retry-After, or 429 after 429) longer than this stops the run
    unreachable_s: float = 30.0  # how long the API may stay unreachable mid-run before the run stops
    max_unrecognised: int = 10  # answers that are neither documented state before the job fails
    stop_grace_s: float = 5.0  # how long a stop waits for generate requests in flight to be answered
    feed_first: int = 10_000  # a new campaign's jobs put in the state before its first request (see Feed)…
    feed_page: int = 1_000  # …and then this many at a time, as the run reaches them
    tick_s: float = 1.0  # how often the ``tick`` event reports what the run is waiting for
    storage_url: str | None = None  # s3://bucket/prefix (gs://, az://): inputs uploaded there, results kept there too
    storage_endpoint: str | None = None  # an S3-compatible service's URL (default: $AWS_ENDPOINT_URL)
    url_lifetime_s: float = 3600.0  # how long a presigned input URL stays valid
    keep_local: bool = True  # False: results live only in the bucket; no storage_url on the sandbox: inputs served on loopback
    force: bool = False
    retry_failed: bool = False
    backend: str = "api"  # "sandbox" for the embedded sandbox: a folder's results are never mixed across the two
    callbacks: CallbackSettings | None = None  # a callback receiver: polls wake when the API calls back


@dataclass(slots=True)
class RunResult:
    """How a run ended: ``outcome`` is complete | failed | stopped | interrupted; ``counts`` per state of every job."""

    outcome: str
    counts: dict[str, int]
    summary: dict[str, Any]
    error: str | None = None
    start: Preview | None = None  # where the run started (what it found done, in flight, to submit)
    tally: RunTally | None = None  # what this run did: ran, skipped, failed, possibly paid twice


def backoff(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Capped full-jitter exponential backoff: uniform in [0, min(cap, base·2^attempt)]."""
    return rng.uniform(0.0, min(cap_s, base_s * 2.0**attempt))


def poll_delay(polls: int, *, first_s: float, elapsed_s: float, cap_s: float, rng: random.Random, ratio: float = 1.15) -> float:
    """Seconds until the next status call of a job submitted ``elapsed_s`` ago.

    The first call lands at ``first_s`` (see :meth:`Durations.first_poll`). After that the
    calls follow a geometric schedule, each at most ``ratio`` times the job's age, so a
    result is noticed at most ``ratio - 1`` of its duration late whatever the duration, in
    few calls; jittered over the step's top fifth so jobs submitted together spread out.
    """
    if polls == 0 and elapsed_s < first_s:
        return first_s - elapsed_s
    step = min(cap_s, max(0.02 * first_s, (ratio - 1.0) * elapsed_s))
    return rng.uniform(0.8 * step, step)


class Durations:
    """Typical submit-to-result durations per model, learned from finished jobs; they time the first poll.

    A job's duration is known only between its last "processing" answer and its first
    "done" one: the estimate is their midpoint. A job already done at its first poll
    finished before it, most likely just before it (the first poll aims early): its
    estimate is the midpoint of the wait's last fifth — low enough that a first poll that
    comes too late moves earlier, not so low that a campaign re-run many times in the same
    directory drifts towards ever earlier polls.
    """

    def __init__(self, defaults: dict[str, float], history: Any = (), quantile: float = 0.3) -> None:
        self.defaults = defaults
        self.quantile = quantile
        self.samples: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=256))
        self._cache: dict[str, float] = {}
        for model, seconds in history:
            self.samples[model].append(seconds)

    @staticmethod
    def estimate(processing_at: float | None, done_at: float) -> float:
        """A finished job's duration from its last "processing" answer (None: there was none) and its first "done" one."""
        return ((processing_at if processing_at is not None else 0.8 * done_at) + done_at) / 2

    def observe(self, model: str, seconds: float) -> None:
        self.samples[model].append(seconds)
        self._cache.pop(model, None)

    def first_poll(self, model: str, modality: str) -> float:
        """Seconds after submitting to ask first: the ``quantile`` of the model's recent durations.

        Until a model has been seen three times its modality's default is only a guess: the
        first call comes at half of it, and the geometric schedule finds the finish from
        there rather than oversleeping it.
        """
        hit = self._cache.get(model)
        if hit is None:
            seen = self.samples.get(model)
            if seen and len(seen) >= 3:
                ordered = sorted(seen)
                hit = ordered[int(self.quantile * (len(ordered) - 1))]
            else:
                hit = 0.5 * self.defaults.get(modality, self.defaults["unknown"])
            self._cache[model] = hit
        return hit


class Pacer:
    """Shared by the whole run: generate requests per second, and the cool-down after a 429."""

    def __init__(self, rate_per_s: float | None, clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]) -> None:
        self.interval = 1.0 / rate_per_s if rate_per_s else 0.0
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self.cool_until = 0.0

    async def cooldown(self) -> None:
        while (wait := self.cool_until - self.clock()) > 0:
            await self.sleep(wait)

    async def generate_slot(self) -> None:
        await self.cooldown()
        if self.interval:
            now = self.clock()
            at = max(now, self._next)
            self._next = at + self.interval
            if at > now:
                await self.sleep(at - now)

    def rate_limited(self, retry_after_s: float | None, fallback_s: float) -> float:
        """Pause every generate request until the API's Retry-After (or ``fallback_s``) has passed; return when."""
        self.cool_until = max(self.cool_until, self.clock() + (retry_after_s if retry_after_s is not None else fallback_s))
        return self.cool_until


class Interrupt:
    """A caller's way to stop a run from outside (the CLI's signal handler, a GUI's button).

    The first :meth:`request` stops the run gracefully: nothing new is sent, polls stop, and
    generate requests in flight get ``stop_grace_s`` to be answered and recorded. A second
    request stops at once; what is still in flight is counted as ambiguous (it may have
    created a task), so the next run resubmits it and says so.
    """

    def __init__(self) -> None:
        self.requests = 0
        self._runner: Runner | None = None

    def request(self) -> None:
        self.requests += 1
        if self._runner is not None:
            self._runner.interrupt(force=self.requests > 1)


def clock_text(at: float) -> str:
    """A wall-clock time for messages: ``14:03:07``, with the date when it is not today."""
    fmt = "%H:%M:%S" if time.strftime("%Y-%m-%d", time.localtime(at)) == time.strftime("%Y-%m-%d") else "%Y-%m-%d %H:%M:%S"
    return time.strftime(fmt, time.localtime(at))


class Runner:
    """Works a list of jobs to the end. Library code: reports through ``on_event``, never prints."""

    def __init__(
        self,
        config: RunConfig,
        store: Store,
        client: Client,
        *,
        on_event: EventHandler | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        inputs: Inputs | None = None,
        results: Storage | None = None,
        callbacks: Hub | None = None,
    ) -> None:
        self.config, self.store, self.client = config, store, client
        self.inputs, self.results = inputs, results
        self.on_event = on_event or (lambda kind, job, detail: None)
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()
        self.pacer = Pacer(config.rate_per_s, clock, sleep)
        self.durations = Durations(config.expected_s, store.durations())
        self.spent = store.totals()["credits_spent"]
        self.stop_reason: str | None = None
        self.fatal: FatalApiError | None = None
        self.interrupted = False
        self._slots = anyio.Semaphore(config.concurrency)
        self._polls = anyio.CapacityLimiter(config.poll_connections)
        self._scope: anyio.CancelScope | None = None
        self._shields: set[anyio.CancelScope] = set()  # generate requests in flight, each under its own shield
        self._collecting = 0  # jobs waiting for their result
        self._reached = False  # the API answered something during this run
        self._unreachable: tuple[float, int] | None = None  # (since, failures) of an unbroken run of unreachable errors
        self._limited_since: float | None = None  # start of an unbroken run of 429 answers
        self._limits = Limits(
            deadline_s=config.download_deadline_s, min_rate_bps=config.download_min_rate_bps, window_s=config.download_rate_window_s
        )
        self.callbacks = callbacks
        self.flow = Flow(store, self.on_event)  # pipelines: jobs released when their inputs are done

    async def run(self, jobs: Iterable[Job]) -> None:
        self._finisher = Finisher(self.config.out_dir)
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._flusher)
                outer.start_soon(self._ticker)
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    async for job in self.flow.feed(jobs, self._slots):  # a slot is held for each job
                        if self.stop_reason is not None:
                            self._slots.release()
                            break
                        self.flow.started()
                        tg.start_soon(self._job, job)
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # a job's own error (the state file cannot be written…): plainly, not as a group
            first = _first_error(group)
            if isinstance(first, BatchRunnerError):
                raise first from None
            raise
        finally:
            self._finisher.close()

    async def _flusher(self) -> None:
        """Commit the transitions that no submit waits for (finished jobs) every :data:`FLUSH_S`, even when the run goes quiet."""
        while True:
            await anyio.sleep(FLUSH_S)
            self.store.flush()

    async def _ticker(self) -> None:
        """Say what the run is waiting for, once a :attr:`RunConfig.tick_s`, also when nothing else happens."""
        while True:
            await anyio.sleep(self.config.tick_s)
            self.on_event("tick", None, self.waiting())

    def waiting(self) -> str:
        """What the run is waiting for right now, in words."""
        parts = []
        if self._shields:
            parts.append(f"{len(self._shields)} generate request(s) to be answered")
        if self._collecting:
            parts.append(f"{self._collecting} result(s)")
        if self.pacer.cool_until > self.clock():
            parts.append(f"the rate limit to lift at {clock_text(self.pacer.cool_until)}")
        text = "waiting for " + ", ".join(parts) if parts else "idle"
        return f"stopping ({self.stop_reason}): {text}" if self.stop_reason else text

    def interrupt(self, *, force: bool = False) -> None:
        """Stop: see :class:`Interrupt`. Must be called from the run's event loop."""
        self.interrupted = True
        self._stop("interrupted")
        if self._scope is not None:
            self._scope.cancel()
        deadline = -math.inf if force else anyio.current_time() + self.config.stop_grace_s
        for shield in self._shields:
            shield.deadline = min(shield.deadline, deadline)
        if self._shields:
            n = len(self._shields)
            self.on_event(
                "stopping",
                None,
                f"stopping at once: {n} generate request(s) cut short, counted as ambiguous"
                if force
                else f"stopping: waiting up to {self.config.stop_grace_s:g} s for {n} generate request(s) in flight to be answered "
                "(stop again to stop at once)",
            )
        else:
            self.on_event("stopping", None, "stopping: nothing in flight")

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def _answered(self) -> None:
        """The API answered (anything but a 429): an unreachable or rate-limited spell is over."""
        self._reached = True
        self._unreachable = None
        self._limited_since = None

    def _check_unreachable(self, exc: Unreachable) -> None:
        """Raise :class:`FatalApiError` once the API has been unreachable for too long: one stop, not a failure per job.

        Never reached during this run: three refusals over a second stop it (a wrong URL, no
        network). Reached before: a spell longer than ``unreachable_s`` does. Jobs keep their
        state (pending ones were never sent), so running the command again continues.
        """
        now = self.clock()
        since, failures = self._unreachable or (now, 0)
        self._unreachable = (since, failures + 1)
        if (not self._reached and failures + 1 >= 3 and now - since >= 1.0) or now - since > self.config.unreachable_s:
            raise FatalApiError(
                f"{exc.message} — check CLIPRISE_BASE_URL and the network, then run the same command again (nothing is lost)"
            )

    def _rate_limited(self, exc: RateLimited, fallback_s: float) -> None:
        """Pause the whole run for a 429; raise :class:`FatalApiError` when the pause would pass ``max_pause_s``."""
        now = self.clock()
        self._reached = True
        if self._limited_since is None:
            self._limited_since = now
        until = self.pacer.rate_limited(exc.retry_after_s, fallback_s)
        if until - now > self.config.max_pause_s or until - self._limited_since > self.config.max_pause_s:
            raise FatalApiError(
                f"rate-limited until {clock_text(until)} ({exc.message}; longer than the {self.config.max_pause_s:g} s this run waits) "
                "— run the same command again after that"
            )
        self.on_event("paused", None, f"rate-limited until {clock_text(until)} (HTTP 429)")

    async def _job(self, job: Job) -> None:
        try:
            if job.state == JobState.PENDING and not await self._submit(job):
                return
            await self._collect(job)
        except (FatalApiError, OutputUnwritable, StorageUnavailable) as exc:  # no other request or write can succeed: stop, state saved
            self.fatal = exc if isinstance(exc, FatalApiError) else self.fatal
            self._stop(exc.message)
            if self._scope is not None:
                self._scope.cancel()
        except ResultWriteError as exc:
            self._fail(job, exc.message, REPOLL)
        except StorageError as exc:  # a bucket refused one object: this job fails; the next run tries again
            # before its submit (an input not stored) a job remade keeps its old take's task id: not that task, a new one
            self._fail(job, exc.message, REPOLL if job.task_id and job.state != JobState.PENDING else RESUBMIT)
        except UnknownTask as exc:
            self._fail(job, f"{exc.message}: it is resubmitted on the next run (and paid again)", RESUBMIT, repaid=1)
        except PermanentApiError as exc:
            self._fail(job, exc.message, NOT_RETRYABLE)
        except TransientApiError as exc:
            self._fail(job, f"gave up after {self.config.retries} retries: {exc.message}", REPOLL if job.task_id else RESUBMIT)
        finally:
            self._slots.release()
            self.flow.finished()

    def _fail(self, job: Job, reason: str, retryable: int, **counters: int) -> None:
        self.store.transition(job, JobState.FAILED, event=reason, error=reason, retryable=retryable, finished_at=self.clock(), **counters)
        self.on_event("failed", job, reason)
        self.flow.failed(job)

    async def _submit(self, job: Job) -> bool:
        """Pending → submitted. False when the run stops before this job could be sent."""
        attempt = ambiguous = 0
        while True:
            cost = job.credits or 0.0
            if self.config.max_credits is not None and self.spent + cost > self.config.max_credits:
                self._stop(f"max_credits {self.config.max_credits:g} reached ({self.spent:g} spent)")
            if self.stop_reason is not None:
                return False
            await self.pacer.generate_slot()
            body, signed = await self._body(job)  # signed again at every submit: never a stale URL
            self.store.transition(job, JobState.SUBMITTING, sends=1)  # counted before the POST, committed with it
            try:
                await self.store.durable()  # on disk before the POST: a kill after it is known to be ambiguous
            except anyio.get_cancelled_exc_class():
                self.store.transition(job, JobState.PENDING, sends=-1)  # stopped before sending: not ambiguous, not sent
                raise
            delay = 0.0
            # a sent POST's task id is always recorded — unless a stop cuts the wait short (see Interrupt)
            with anyio.CancelScope(shield=True) as shield:
                self._shields.add(shield)
                try:
                    task_id = await self._generate(body if self.callbacks is None else self.callbacks.body(job.id, body), signed)
                except RateLimited as exc:
                    self.store.transition(job, JobState.PENDING, event=exc.message)
                    self.on_event("rate_limited", job, exc.message)
                    self._rate_limited(exc, backoff(attempt, base_s=1.0, cap_s=self.config.backoff_cap_s, rng=self.rng))
                    continue
                except Unreachable as exc:  # nothing was sent: the job waits, the run decides whether to go on
                    self.store.transition(job, JobState.PENDING, event=exc.message, sends=-1)
                    self._check_unreachable(exc)
                    self.on_event("retry", job, exc.message)
                    delay = backoff(1, base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng)
                except TransientApiError as exc:
                    self._answered()
                    self.store.transition(job, JobState.PENDING, event=exc.message, attempts=1)
                    attempt += 1
                    if attempt > self.config.retries:
                        raise
                    self.on_event("retry", job, exc.message)
                    delay = backoff(attempt, base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng)
                except AmbiguousSubmit as exc:
                    ambiguous += 1
                    self.store.transition(job, JobState.PENDING, event=f"ambiguous: {exc.message}", ambiguous=1)
                    self.on_event("ambiguous", job, exc.message)
                    if ambiguous > self.config.max_ambiguous:
                        self._fail(
                            job,
                            f"{ambiguous} submits went unanswered; not sending again — check the API, then `batchrunner retry`",
                            NOT_RETRYABLE,
                        )
                        return False
                    delay = backoff(ambiguous, base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng)
                except FatalApiError:
                    self.store.transition(job, JobState.PENDING)  # refused with an answer: not created
                    raise
                except PermanentApiError as exc:
                    self._answered()
                    self._fail(job, exc.message, NOT_RETRYABLE)
                    return False
                else:
                    self._answered()
                    now = self.clock()
                    self.spent += cost
                    self.store.transition(job, JobState.SUBMITTED, task_id=task_id, submitted_at=now, submits=1, credits_spent=cost)
                    job.task_id, job.submitted_at = task_id, now
                    self.on_event("submitted", job, task_id)
                    await self.store.durable()
                    return True
                finally:
                    self._shields.discard(shield)
            if job.state == JobState.SUBMITTING:  # a stop cut the wait for the answer short: the task may exist
                self.store.transition(job, JobState.PENDING, event="ambiguous: stopped before the API answered", ambiguous=1)
                self.on_event("ambiguous", job, "stopped before the API answered")
                return False
            if shield.cancelled_caught:
                return job.state == JobState.SUBMITTED
            await self.sleep(delay)

    async def _generate(self, body: dict[str, Any], signed: dict[str, str]) -> str:
        """``client.generate``; an error that quotes a presigned URL quotes its token instead (never a signature in the state)."""
        try:
            return await self.client.generate(body)
        except BatchRunnerError as exc:
            text = exc.message
            for name, url in signed.items():
                text = re.sub(re.escape(url.split("?", 1)[0]) + r"(\?[^\s\"'<>]*)?", name, text)
            exc.args = (text,)
            raise

    async def _body(self, job: Job) -> tuple[dict[str, Any], dict[str, str]]:
        """The body to send, each local input's token replaced by a freshly presigned URL (the state keeps the tokens); the URLs."""
        names = tokens(job.body)
        upstream = result_ids(job.body)
        if not names and not upstream:
            return job.body, {}
        if self.inputs is None and (names or self.results is None):
            raise StorageError(
                "this job sends local files (file: inputs) or other jobs' results but no storage is configured — pass --storage s3://bucket/prefix"
            )
        urls = {}
        if names:
            assert self.inputs is not None
            urls = {name: await self.inputs.storage.presign(self._input_key(name), self.inputs.lifetime_s) for name in names}
        body = dict(resolve(job.body, urls)) if urls else job.body
        if upstream:
            used: dict[str, str] = {}
            results = {uid: await self._result_url(uid, used) for uid in upstream}
            body = dict(resolve_results(body, results))
            urls |= {result_token(uid): url for uid, url in results.items()}
            self.store.record_inputs(job, used)  # what it is made from, committed with the submit
        return body, urls

    async def _result_url(self, job_id: str, used: dict[str, str]) -> str:
        """A freshly presigned URL to our own stored copy of an upstream job's result (never the API's fileURL: it carries the key).

        In the bucket when results are kept there; otherwise the local result is put once
        (content-addressed) in the input store — with --sandbox the loopback one — and signed.
        """
        found = self.store.result_of(job_id)
        if found is None:
            raise StorageError(f"input {job_id} is not done (its result was deleted or rejected since) — run again to remake it first")
        rel, sha256, size = found
        used[job_id] = sha256
        if self.results is not None:
            return await self.results.presign(rel, self.config.url_lifetime_s)
        assert self.inputs is not None
        ext = rel.rsplit(".", 1)[-1].lower()
        if ext not in CONTENT_TYPES:
            raise StorageError(f"input {rel} is not a media file the API can take ({ext})")
        return await local_result_url(self.inputs, InputFile(self.config.out_dir / rel, sha256, size, ext), rel)

    def _input_key(self, name: str) -> str:
        assert self.inputs is not None
        bare = name[len(TOKEN_PREFIX) :]
        return f"{self.inputs.prefix}/{bare}" if self.inputs.prefix else bare

    async def _keep(self, rel: str, sha256: str, size: int) -> None:
        """Put a verified local result and its sidecar into the bucket (whole or not at all); without local copies, move them there."""
        assert self.results is not None
        src = self.config.out_dir / rel
        sidecar = await anyio.to_thread.run_sync(lambda: (self.config.out_dir / (rel + SIDECAR)).read_text("utf-8"))
        await self.results.put_result(rel, src, sidecar, sha256=sha256, size=size, take=not self.config.keep_local)
        if not self.config.keep_local:
            await anyio.to_thread.run_sync(lambda: (self.config.out_dir / (rel + SIDECAR)).unlink(missing_ok=True))

    async def _collect(self, job: Job) -> None:
        """Poll a submitted job with ``download=true`` until its file is saved or it fails.

        One request both asks and, once the job is finished, fetches; a cut download is
        simply asked for again. Raises once the deadline passes or errors pile up.
        """
        assert job.task_id is not None
        self._collecting += 1
        try:
            await self._poll(job)
        finally:
            self._collecting -= 1

    async def _poll(self, job: Job) -> None:
        assert job.task_id is not None
        submitted = job.submitted_at or self.clock()
        first = self.durations.first_poll(job.model, job.modality)
        polls = errors = unrecognised = 0
        processing_at: float | None = None
        said: str | None = None
        while True:
            elapsed = self.clock() - submitted
            if elapsed > self.config.job_deadline_s:
                raise TransientApiError(f"no result {elapsed:.0f} s after submitting (deadline {self.config.job_deadline_s:g} s)")
            delay = poll_delay(polls, first_s=first, elapsed_s=elapsed, cap_s=self.config.poll_cap_s, rng=self.rng)
            await (self.sleep(delay) if self.callbacks is None else self.callbacks.wait(job.id, delay))  # a callback wakes it early
            await self.pacer.cooldown()
            try:
                async with self._polls:
                    asked = self.clock() - submitted  # the job's age when asked (not answered: the round trip is ours, not its)
                    async with self.client.download(job.task_id) as answer:
                        polls += 1
                        self._answered()
                        if isinstance(answer, Processing):
                            processing_at = asked
                            if answer.status != "processing" and answer.status != said:
                                said = answer.status
                                self.on_event("status", job, f"the API says {answer.status!r} (HTTP 300: still processing)")
                            continue
                        if isinstance(answer, Unrecognised):
                            unrecognised += 1
                            self.on_event(
                                "unrecognised",
                                job,
                                f"answer {unrecognised} of {self.config.max_unrecognised} without a result: {answer.text}",
                            )
                            if unrecognised >= self.config.max_unrecognised:
                                self._fail(job, f"the API answered {unrecognised} times without a result URL: {answer.text}", REPOLL)
                                return
                            continue
                        ahead = self.callbacks.finished(job.id) if self.callbacks is not None else None
                        if self.callbacks is not None and (alarm := self.callbacks.alarm()):
                            self.on_event("callbacks", None, alarm)
                        if job.duration_s is None:  # learn when jobs of this model finish (as the poll a callback replaced would have)
                            job.duration_s = Durations.estimate(processing_at, asked + (ahead or 0.0))
                            self.durations.observe(job.model, job.duration_s)
                        if isinstance(answer, Failed):
                            self._fail(job, f"the API failed the task: {answer.reason}", NOT_RETRYABLE)
                            return
                        sidecar = {
                            "job_id": job.id, "model": job.model, "prompt": str(model_fields(job.body).get("prompt", "")),
                            "request": job.body, "vars": job.vars, "variant": job.variant, "modality": job.modality,
                            "credits": job.credits, "path_template": job.path, "task_id": job.task_id,
                            "submitted_at": submitted, "finished_at": self.clock(), "duration_s": job.duration_s,
                        }  # fmt: skip
                        fetched = await save(
                            answer, self.config.out_dir, job.path, sidecar, self._finisher, modality=job.modality, limits=self._limits
                        )
            except RateLimited as exc:
                self._rate_limited(exc, 1.0)
                continue
            except Unreachable as exc:
                self._check_unreachable(exc)
                self.on_event("retry", job, exc.message)
                await self.sleep(backoff(1, base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng))
                continue
            except TransientApiError as exc:
                errors += 1
                if errors > self.config.retries:
                    raise
                self.on_event("retry", job, exc.message)
                await self.sleep(backoff(errors, base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng))
                continue
            break
        stored: dict[str, Any] = {}
        if self.results is not None:
            await self._keep(fetched.path, fetched.sha256, fetched.bytes)
            stored["stored_at"] = self.clock()
        now = self.clock()
        self.store.transition(
            job,
            JobState.DONE,
            path=fetched.path,
            sha256=fetched.sha256,
            bytes=fetched.bytes,
            finished_at=now,
            duration_s=job.duration_s,
            **stored,
        )
        self.on_event("done", job, fetched.path)
        self.flow.done(job)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


async def run_campaign(
    plan: Plan | None,
    config: RunConfig,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    host_header: str | None = None,
    client: Client | None = None,
    on_start: Callable[[Preview], None] | None = None,
    on_event: EventHandler | None = None,
    rng: random.Random | None = None,
    interrupt: Interrupt | None = None,
) -> RunResult:
    """Run or resume ``plan`` into ``config.out_dir``: the library's whole ``run`` command.

    With ``config.callbacks`` the callback receiver is bound before anything else (a run that
    cannot listen refuses to start: :class:`ManifestError`) and serves for the whole run.
    The rest: see :func:`_campaign`.
    """
    kw: dict[str, Any] = {
        "api_key": api_key, "base_url": base_url, "host_header": host_header, "client": client,
        "on_start": on_start, "on_event": on_event, "rng": rng, "interrupt": interrupt,
    }  # fmt: skip
    if config.callbacks is None:
        return await _campaign(plan, config, None, **kw)
    if plan is not None:
        check_plan(plan, config.callbacks)
    async with listening(config.callbacks) as receiver:
        result = await _campaign(plan, config, receiver, **kw)
        result.summary["callbacks"] = receiver.summary()
        return result


async def _campaign(
    plan: Plan | None,
    config: RunConfig,
    receiver: Receiver | None,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    host_header: str | None = None,
    client: Client | None = None,
    on_start: Callable[[Preview], None] | None = None,
    on_event: EventHandler | None = None,
    rng: random.Random | None = None,
    interrupt: Interrupt | None = None,
) -> RunResult:
    """Run or resume ``plan`` into ``config.out_dir`` (with ``receiver``'s callbacks waking polls).

    With ``plan=None`` the directory's stored jobs are run as they are (``retry``). First it
    refuses what ``plan`` refuses (:func:`~batchrunner.dryrun.check`), before anything is
    written or sent. ``on_start`` hears where the run starts (done, in flight, to submit)
    before its first request. ``client``, an open :class:`Client` (or a subclass: tests use
    one to produce answers the sandbox cannot), replaces the one made from ``api_key``,
    ``base_url`` and ``host_header``; the caller keeps it open and closes it. An
    ``interrupt`` lets the caller stop the run (outcome ``interrupted``, state saved).
    """
    from contextlib import AsyncExitStack

    from .client import API_HOST, DEFAULT_BASE_URL
    from .report import write_reports

    if client is None and not api_key:
        raise AuthError("no API key: pass api_key (the CLI reads CLIPRISE_API_KEY), or an open client")
    if client is None and (bad := endpoint_problems(api_key, base_url)):
        raise ManifestError([Problem("environment", None, text) for text in bad])
    check(plan, config)
    store = Store.open(config.out_dir, create=plan is not None)
    resuming = plan is None
    feed: Feed | None = None
    try:
        if plan is not None:
            store.claim(plan.manifest.name, force=config.force)
            store.set_meta("group_var", plan.group_var or "")
        store.claim_backend(config.backend, force=config.force)
        # a pipeline's jobs go in whole, with what each needs (store.sync): its waiting jobs are settled from that
        synced = plan.record() if plan is not None and plan.fingerprint and plan.reference_at is None else None
        if plan is not None and not plan.inputs and plan.reference_at is None and store.is_empty():
            # a new campaign: its first page in the state now, the rest as the run reaches it
            feed = Feed(store, plan.specs, config.feed_first, config.feed_page)
            store.set_meta(SYNCED_META, synced or "")
        elif plan is not None and synced is not None and _holds(store.meta(SYNCED_META), plan):
            # the state holds this very plan's jobs, or the first of them (a new campaign's feed, stopped): no sync,
            # and the rest go in as the run reaches them — a resume of a big campaign starts at once
            resuming, held = True, sum(store.counts().values())
            if held < len(plan.specs):
                rest = plan.specs.tail(held) if isinstance(plan.specs, Specs) else plan.specs[held:]
                feed = Feed(store, rest, 0, config.feed_page)
                feed.left = len(plan.specs) - held
        elif plan is not None:
            with paused_gc():
                resuming = bool(store.sync(plan.specs).known)
            store.set_meta(SYNCED_META, synced or "")  # a plan without a fingerprint leaves no record: the next run syncs
        config = _storage_settings(config, store, rerun=plan is None)
    except StateError:
        store.close()
        raise
    hub = receiver.arm(store) if receiver is not None else None
    started_at = time.time()
    outcome, error = "interrupted", None
    failing: BatchRunnerError | None = None
    links: dict[str, str] = {}
    links_expire_at: float | None = None
    try:
        before = store.totals()
        store.start_run()
        async with AsyncExitStack() as stack:
            inputs, results, remote = await _storages(plan, config, store, stack)
            found = store.recover(remote)
            store.reset_failed(retryable_only=not config.retry_failed)
            store.settle()  # pipelines: jobs whose inputs are not done wait; those whose input failed fail
            if inputs is not None and plan is not None and plan.inputs:  # before the first submit: every pending job's files, once
                wanted = {t for job in store.work() if job.state == JobState.PENDING for t in tokens(job.body)}
                uploaded = await inputs.prepare([plan.inputs[t] for t in sorted(wanted) if t in plan.inputs])
                if on_event is not None and wanted:
                    on_event("inputs", None, f"{uploaded} input file(s) uploaded, {len(wanted) - uploaded} already stored")
            if results is not None and remote is not None:
                await _store_unstored(store, results, remote, config)
            start = started(
                config.out_dir, store.counts(), found,
                spent=before["credits_spent"], ambiguous_before=int(before["ambiguous_resubmitted"]), resuming=resuming,
            )  # fmt: skip
            if feed is not None:  # the jobs not in the state yet are to submit too
                start = replace(start, jobs=start.jobs + feed.left, to_submit=start.to_submit + feed.left)
            if on_start is not None:
                on_start(start)
            if client is None:
                client = await stack.enter_async_context(
                    Client(
                        api_key=api_key or "",
                        base_url=base_url or DEFAULT_BASE_URL,
                        host_header=host_header or API_HOST,
                        connections=config.concurrency + config.poll_connections,
                    )
                )
            runner = Runner(config, store, client, on_event=on_event, rng=rng, inputs=inputs, results=results, callbacks=hub)
            if interrupt is not None:
                interrupt._runner = runner
                if interrupt.requests:
                    runner.interrupted = True
            if not runner.interrupted:
                await runner.run(store.work() if feed is None else itertools.chain(store.work() if resuming else (), feed))
            if results is not None and not config.keep_local:
                links, links_expire_at = await _links(store, results), time.time() + LINK_LIFETIME_S
        counts = store.counts()
        if runner.interrupted:
            outcome = "interrupted"
        elif runner.stop_reason is not None:
            outcome, error = "stopped", runner.stop_reason
        elif counts.get("waiting"):  # a safety net: the plan's check refuses every known way for an input never to be made
            n = counts["waiting"]
            outcome, error = (
                "stopped",
                f"{n} job(s) still wait for inputs no job made — see `batchrunner status`; the manifest's references need a look",
            )
        else:
            outcome = "failed" if counts.get("failed") else "complete"
    except BatchRunnerError as exc:
        outcome, error, failing = "stopped", exc.message, exc
        raise
    finally:
        try:
            summary = write_reports(
                store, wall_s=time.time() - started_at, outcome=outcome, error=error, links=links, links_expire_at=links_expire_at
            )
            store.end_run(outcome, summary)
        except BatchRunnerError as report_exc:  # the reports (disk full…): never hide why the run itself stopped
            if failing is None:
                raise
            failing.args = (f"{failing.message} (and the reports could not be written: {report_exc.message})",)
        finally:
            store.close()
    counts = dict(summary["counts"])
    if feed is not None and feed.left:  # stopped before the whole campaign was in the state: the rest is still to do
        counts["pending"] = counts.get("pending", 0) + feed.left
    return RunResult(outcome, counts, summary, error, start=start, tally=tally(start, counts, summary["ambiguous_resubmitted"]))


def _holds(record: str | None, plan: Plan) -> bool:
    """Whether a state's record (store.SYNCED_META) is of this very plan: its jobs are exactly the plan's."""
    try:
        data = json.loads(record or "")
        return bool(data["fingerprint"] == plan.fingerprint and data["jobs"] == len(plan.specs))
    except (ValueError, TypeError, KeyError):
        return False


class Feed:
    """A new campaign's jobs for the runner: put into the state a page at a time, just before the run reaches them.

    The first page is in the state before the first request, so a run of a million jobs starts
    as soon as its plan is checked, not after a million inserts; memory holds one page. A run
    stopped early leaves the rest out of the state: the next run of the same plan feeds them on
    (the state's record, ``store.SYNCED_META``, says whose jobs these are); another plan syncs.
    Campaigns up to ``RunConfig.feed_first`` jobs are wholly in the state before the run starts. A page
    holds the event loop for a few milliseconds per 100 jobs (made from the manifest, inserted).
    """

    def __init__(self, store: Store, specs: Iterable[JobSpec], first: int, page: int) -> None:
        self.store, self.page = store, page
        self.left = len(specs) if isinstance(specs, Sized) else 0
        self._specs = iter(specs)
        self._next = self._fill(first)

    def _fill(self, n: int) -> list[Job]:
        with paused_gc():
            jobs = self.store.add_new(itertools.islice(self._specs, n)) if n else []
        self.left = max(0, self.left - len(jobs))
        return jobs

    def __iter__(self) -> Iterator[Job]:
        jobs, self._next = self._next, []
        while True:
            yield from jobs
            jobs = self._fill(self.page)
            if not jobs:
                return


STORAGE_META = "storage"  # the storage a run used, so `retry DIR` (no manifest) keeps its results where they are


def _storage_settings(config: RunConfig, store: Store, *, rerun: bool) -> RunConfig:
    """Remember the run's storage in the state; a rerun without a manifest or --storage uses the one remembered."""
    if config.storage_url is not None:
        kept = {"url": config.storage_url, "endpoint": config.storage_endpoint, "keep_local": config.keep_local}
        store.set_meta(STORAGE_META, json.dumps(kept | {"url_lifetime_s": config.url_lifetime_s}))
        return config
    remembered = store.meta(STORAGE_META) if rerun else None
    if not remembered:
        return config
    kept = json.loads(remembered)
    return replace(
        config,
        storage_url=kept["url"],
        storage_endpoint=kept["endpoint"],
        keep_local=kept["keep_local"],
        url_lifetime_s=kept["url_lifetime_s"],
    )


INPUTS_PREFIX = ".batchrunner/inputs"  # where file: inputs go in the bucket (a hidden name: never a result's path)


async def _storages(
    plan: Plan | None, config: RunConfig, store: Store, stack: Any
) -> tuple[Inputs | None, Storage | None, set[str] | None]:
    """The run's input store, result store, and the results already whole in the bucket (one listing)."""
    if config.storage_url:
        storage = await stack.enter_async_context(open_storage(config.storage_url, endpoint=config.storage_endpoint))
        await storage.check()
        listing = await storage.list("")
        return Inputs(storage, lifetime_s=config.url_lifetime_s, prefix=INPUTS_PREFIX), storage, complete(listing)
    # no cloud: inputs (pipelines: upstream results too) served from the output folder on loopback
    if config.backend == "sandbox" and (plan is None or plan.inputs or plan.reference_at):
        loopback = await stack.enter_async_context(LoopbackStorage(config.out_dir / ".batchrunner" / "inputs"))
        return Inputs(loopback, lifetime_s=config.url_lifetime_s, prefix=""), None, None
    return None, None, None


LINK_LIFETIME_S = 7 * 24 * 3600.0  # the gallery's links to results kept only in the bucket (S3's longest)


async def _links(store: Store, results: Storage) -> dict[str, str]:
    """Presigned links to the done results the gallery shows (its first page), for results kept only in the bucket."""
    from .report import GALLERY_LIMIT

    paths = [job["path"] for job in store.rows(states=["done"]) if job["path"]][:GALLERY_LIMIT]
    return {path: await results.presign(path, LINK_LIFETIME_S) for path in paths}


async def _store_unstored(store: Store, results: Storage, remote: set[str], config: RunConfig) -> None:
    """Resume: mark the done results the bucket's listing holds; store the others from their local copies."""
    now = time.time()
    for job_id, rel, sha256, size in store.unstored():
        if rel in remote:
            store.mark_stored(job_id, now)
            continue
        src = config.out_dir / rel
        if not src.is_file():
            continue
        sidecar = (config.out_dir / (rel + SIDECAR)).read_text("utf-8")
        try:
            await results.put_result(rel, src, sidecar, sha256=sha256, size=size, take=not config.keep_local)
        except StorageUnavailable:
            raise
        except StorageError:
            continue  # tried again on the next run; the local copy stays
        if not config.keep_local:
            (config.out_dir / (rel + SIDECAR)).unlink(missing_ok=True)
        store.mark_stored(job_id, time.time())


def scale_expected(scale: float) -> dict[str, float]:
    """The default expected durations times ``scale`` (the embedded sandbox runs faster than real time)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"must be a positive number such as 0.01, not {scale:g}")
    return {k: max(0.001, v * scale) for k, v in DEFAULT_EXPECTED_S.items()}
