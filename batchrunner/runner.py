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
paid task. Only a hard kill inside that window leaves a job ambiguous; resume resubmits it
and counts it.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .callbacks import CallbackSettings, Hub, Receiver, check_plan, listening
from .catalog import model_fields
from .client import Client, Failed, Processing
from .download import Finisher, save
from .errors import (
    AmbiguousSubmit,
    BatchRunnerError,
    FatalApiError,
    ManifestError,
    PermanentApiError,
    Problem,
    RateLimited,
    StateError,
    TransientApiError,
    UnknownTask,
)
from .expand import Plan
from .store import NOT_RETRYABLE, REPOLL, RESUBMIT, Job, JobState, Store, peek

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
    max_ambiguous: int = 3
    force: bool = False
    retry_failed: bool = False
    callbacks: CallbackSettings | None = None  # a callback receiver: polls wake when the API calls back


@dataclass(slots=True)
class RunResult:
    """How a run ended: ``outcome`` is complete | failed | stopped | interrupted; counts per state."""

    outcome: str
    counts: dict[str, int]
    summary: dict[str, Any]
    error: str | None = None


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

    def rate_limited(self, retry_after_s: float | None, fallback_s: float) -> None:
        self.cool_until = max(self.cool_until, self.clock() + (retry_after_s if retry_after_s is not None else fallback_s))


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
        callbacks: Hub | None = None,
    ) -> None:
        self.config, self.store, self.client = config, store, client
        self.on_event = on_event or (lambda kind, job, detail: None)
        self.clock, self.sleep = clock, sleep
        self.rng = rng or random.Random()
        self.pacer = Pacer(config.rate_per_s, clock, sleep)
        self.durations = Durations(config.expected_s, store.durations())
        self.spent = store.totals()["credits_spent"]
        self.stop_reason: str | None = None
        self.fatal: FatalApiError | None = None
        self._slots = anyio.Semaphore(config.concurrency)
        self._polls = anyio.CapacityLimiter(config.poll_connections)
        self._scope: anyio.CancelScope | None = None
        self.callbacks = callbacks

    async def run(self, jobs: Iterable[Job]) -> None:
        self._finisher = Finisher()
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._flusher)
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    for job in jobs:
                        await self._slots.acquire()
                        if self.stop_reason is not None:
                            self._slots.release()
                            break
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

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    async def _job(self, job: Job) -> None:
        try:
            if job.state == JobState.PENDING and not await self._submit(job):
                return
            await self._collect(job)
        except FatalApiError as exc:
            self.fatal = exc
            self._stop(exc.message)
            if self._scope is not None:
                self._scope.cancel()
        except UnknownTask as exc:
            self._fail(job, f"{exc.message}: it is resubmitted on the next run", RESUBMIT)
        except PermanentApiError as exc:
            self._fail(job, exc.message, NOT_RETRYABLE)
        except TransientApiError as exc:
            self._fail(job, f"gave up after {self.config.retries} retries: {exc.message}", REPOLL if job.task_id else RESUBMIT)
        finally:
            self._slots.release()

    def _fail(self, job: Job, reason: str, retryable: int) -> None:
        self.store.transition(job, JobState.FAILED, event=reason, error=reason, retryable=retryable, finished_at=self.clock())
        self.on_event("failed", job, reason)

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
            self.store.transition(job, JobState.SUBMITTING)
            try:
                await self.store.durable()  # on disk before the POST: a kill after it is known to be ambiguous
            except anyio.get_cancelled_exc_class():
                self.store.transition(job, JobState.PENDING)  # stopped before sending: not ambiguous
                raise
            with anyio.CancelScope(shield=True):  # a sent POST's task id is always recorded
                try:
                    task_id = await self.client.generate(job.body if self.callbacks is None else self.callbacks.body(job.id, job.body))
                except RateLimited as exc:
                    self.store.transition(job, JobState.PENDING, event=exc.message)
                    self.pacer.rate_limited(exc.retry_after_s, backoff(attempt, base_s=1.0, cap_s=self.config.backoff_cap_s, rng=self.rng))
                    self.on_event("rate_limited", job, exc.message)
                    continue
                except TransientApiError as exc:
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
                    self._fail(job, exc.message, NOT_RETRYABLE)
                    return False
                else:
                    now = self.clock()
                    self.spent += cost
                    self.store.transition(job, JobState.SUBMITTED, task_id=task_id, submitted_at=now, submits=1, credits_spent=cost)
                    await self.store.durable()
                    job.task_id, job.submitted_at = task_id, now
                    self.on_event("submitted", job, task_id)
                    return True
            await self.sleep(delay)

    async def _collect(self, job: Job) -> None:
        """Poll a submitted job with ``download=true`` until its file is saved or it fails.

        One request both asks and, once the job is finished, fetches; a cut download is
        simply asked for again. Raises once the deadline passes or errors pile up.
        """
        assert job.task_id is not None
        submitted = job.submitted_at or self.clock()
        first = self.durations.first_poll(job.model, job.modality)
        polls = errors = 0
        processing_at: float | None = None
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
                        if isinstance(answer, Processing):
                            processing_at = asked
                            continue
                        ahead = self.callbacks.finished(job.id) if self.callbacks is not None else None
                        if job.duration_s is None:  # learn when jobs of this model finish (as the poll a callback replaced would have)
                            job.duration_s = Durations.estimate(processing_at, asked + (ahead or 0.0))
                            self.durations.observe(job.model, job.duration_s)
                        if isinstance(answer, Failed):
                            self._fail(job, f"the API failed the task: {answer.reason}", NOT_RETRYABLE)
                            return
                        sidecar = {
                            "job_id": job.id, "model": job.model, "prompt": str(model_fields(job.body).get("prompt", "")),
                            "request": job.body, "vars": job.vars,
                            "task_id": job.task_id, "submitted_at": submitted, "finished_at": self.clock(), "duration_s": job.duration_s,
                        }  # fmt: skip
                        fetched = await save(answer, self.config.out_dir, job.path, sidecar, self._finisher)
            except RateLimited as exc:
                self.pacer.rate_limited(exc.retry_after_s, 1.0)
                continue
            except TransientApiError as exc:
                errors += 1
                if errors > self.config.retries:
                    raise
                self.on_event("retry", job, exc.message)
                await self.sleep(backoff(errors, base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng))
                continue
            break
        now = self.clock()
        self.store.transition(
            job, JobState.DONE, path=fetched.path, sha256=fetched.sha256, bytes=fetched.bytes, finished_at=now, duration_s=job.duration_s
        )
        self.on_event("done", job, fetched.path)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def check_budget(plan: Plan, max_credits: float | None, out_dir: Path) -> None:
    """Refuse (as bad input) a plan whose remaining cost passes ``max_credits``, or cannot be known."""
    if max_credits is None:
        return
    done, spent = peek(out_dir)
    todo = [s for s in plan.specs if s.id not in done]
    cost = plan.credits(todo)
    line = plan.manifest.line_of("max_credits")
    if cost is None:
        unknown = sorted({s.model for s in todo if s.credits is None})
        raise ManifestError(
            [
                Problem(
                    plan.manifest.file,
                    line,
                    f"max_credits is set but the price of {', '.join(unknown)} is unknown — add them under 'credits:' in the manifest",
                )
            ]
        )
    if spent + cost > max_credits:
        raise ManifestError(
            [
                Problem(
                    plan.manifest.file,
                    line,
                    f"the plan costs {cost:g} credits ({spent:g} already spent), more than max_credits {max_credits:g} — "
                    "raise max_credits or trim the manifest",
                )
            ]
        )


async def run_campaign(
    plan: Plan | None,
    config: RunConfig,
    *,
    api_key: str,
    base_url: str,
    host_header: str | None = None,
    on_event: EventHandler | None = None,
    rng: random.Random | None = None,
) -> RunResult:
    """Run or resume ``plan`` into ``config.out_dir``: the library's whole ``run`` command.

    With ``plan=None`` the directory's stored jobs are run as they are (``retry``). With
    ``config.callbacks`` the receiver is bound before anything else: a run that cannot
    listen refuses to start (:class:`ManifestError`).
    """
    args = (plan, config)
    kw: dict[str, Any] = {"api_key": api_key, "base_url": base_url, "host_header": host_header, "on_event": on_event, "rng": rng}
    if config.callbacks is None:
        return await _campaign(*args, None, **kw)
    if plan is not None:
        check_plan(plan, config.callbacks)
    async with listening(config.callbacks) as receiver:
        result = await _campaign(*args, receiver, **kw)
        result.summary["callbacks"] = receiver.summary()
        return result


async def _campaign(
    plan: Plan | None,
    config: RunConfig,
    receiver: Receiver | None,
    *,
    api_key: str,
    base_url: str,
    host_header: str | None = None,
    on_event: EventHandler | None = None,
    rng: random.Random | None = None,
) -> RunResult:
    from .client import API_HOST
    from .report import write_reports

    if plan is not None:
        check_budget(plan, config.max_credits, config.out_dir)
    store = Store.open(config.out_dir, create=plan is not None)
    try:
        if plan is not None:
            store.claim(plan.manifest.name, force=config.force)
            store.set_meta("group_var", plan.group_var or "")
            store.sync(plan.specs)
    except StateError:
        store.close()
        raise
    hub = receiver.arm(store) if receiver is not None else None
    started = time.time()
    outcome, error = "interrupted", None
    try:
        store.start_run()
        store.recover()
        store.reset_failed(retryable_only=not config.retry_failed)
        async with Client(
            api_key=api_key,
            base_url=base_url,
            host_header=host_header or API_HOST,
            connections=config.concurrency + config.poll_connections,
        ) as client:
            runner = Runner(config, store, client, on_event=on_event, rng=rng, callbacks=hub)
            await runner.run(store.work())
        counts = store.counts()
        if runner.stop_reason is not None:
            outcome, error = "stopped", runner.stop_reason
        else:
            outcome = "failed" if counts.get("failed") else "complete"
    except BatchRunnerError as exc:
        outcome, error = "stopped", exc.message
        raise
    finally:
        try:
            summary = write_reports(store, wall_s=time.time() - started, outcome=outcome, error=error)
            store.end_run(outcome, summary)
        finally:
            store.close()
    return RunResult(outcome, dict(summary["counts"]), summary, error)


def scale_expected(scale: float) -> dict[str, float]:
    """The default expected durations times ``scale`` (the embedded sandbox runs faster than real time)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"must be a positive number such as 0.01, not {scale:g}")
    return {k: max(0.001, v * scale) for k, v in DEFAULT_EXPECTED_S.items()}
