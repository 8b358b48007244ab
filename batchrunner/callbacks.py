"""Callbacks: the API's ``callBackUrl`` notices turned into "ask the status endpoint now".

The API docs call a callback optional insurance that may never arrive, and do not document
its payload. So a callback is a *hint about one job*, never a state change: the job's
poller wakes and asks the status endpoint, which stays the only truth, and polling stays on
as the safety net. Which job a callback is about comes from its URL, never from its body:
each job gets a capability URL, ``<url>/cb/<job id>/<token>`` with ``token`` = HMAC-SHA256
of the job id under a per-campaign secret (128 bits kept). The secret is made once per
output directory and kept only in the state file; the token is sent in the request body
and nowhere else (not in the stored spec, a report, a sidecar, an event or a log line).

:class:`Receiver` is a small aiohttp server bound before a run starts. A valid token gets
200 at once (the body is read up to a size and time cap, stored redacted for diagnosis,
and otherwise ignored); anything else gets 404 and is only counted. :class:`Hub` is the
runner's side: per-job wake-ups, and how far polling may be stretched — it learns the share
of recent finishes that a callback announced, and how late the first poll can come
without overtaking the callbacks, and stretches the poll schedule only while callbacks are
arriving reliably. A lost callback therefore costs lateness, never a job.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import ipaddress
import json
import math
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
from aiohttp import web

from .errors import BatchRunnerError, ManifestError, Problem, redact, register_secret

if TYPE_CHECKING:
    from .expand import Plan
    from .manifest import Manifest
    from .store import Store

TOKEN_HEX = 32  # 128 bits of the HMAC
MAX_BODY_BYTES = 64 * 1024  # a callback body is read up to this much; the rest is not read
KEEP_BYTES = 4096  # of which this much is kept (redacted) in the state file, for diagnosis
KEEP_PER_JOB = 3  # callbacks kept per job (duplicates are counted, not all kept)
READ_TIMEOUT_S = 5.0  # a body still arriving after this is cut: a slow client holds only itself
STRETCH_MAX = 4.0  # polls never come later than this many times their normal delay
RATIO_Q = 0.97  # the first poll aims past this share of the finishes callbacks announced
TRUST_FULL, TRUST_NONE = 0.04, 0.15  # miss rates at which the stretch is full / off
SILENCE_WARN = 20  # this many finishes in a row without any callback make the run say that callbacks stopped coming
CARRIED = 30  # finishes' worth of the last run's reliability a new run starts from
_INF = float("inf")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1); names are never resolved."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """The public base URL that reaches the receiver, without a trailing slash; ValueError says what is wrong."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and is_loopback(host))):
        raise ValueError(
            f"{url!r} must be an https:// URL that reaches the receiver (a reverse proxy or a tunnel); "
            "http:// is accepted only to a loopback address such as http://127.0.0.1:8787, for local testing"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{url!r} must be a plain base URL (no user:password@, ?query or #fragment): /cb/<job>/<token> is appended")
    return url.rstrip("/")


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8787`` for IPv6; port 0 picks a free one) → (host, port); ValueError says what is wrong."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r} must be host:port, such as 127.0.0.1:8787")
    return host, int(port)


def token(secret: str, job_id: str) -> str:
    """The capability token of one job: HMAC-SHA256(secret, job id), first 128 bits in hex."""
    return hmac.new(secret.encode(), job_id.encode(), hashlib.sha256).hexdigest()[:TOKEN_HEX]


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackSettings:
    """Where the receiver listens and the public base URL the API is given (None: the receiver's own address).

    ``origin`` is where the settings were written (file and line, or a flag), for messages.
    """

    host: str
    port: int
    url: str | None = None
    origin: tuple[str, int | None] = ("--callback-listen", None)
    max_body_bytes: int = MAX_BODY_BYTES
    read_timeout_s: float = READ_TIMEOUT_S

    @classmethod
    def parse(
        cls, listen: Any, url: Any, *, listen_at: tuple[str, int | None], url_at: tuple[str, int | None] | None = None
    ) -> CallbackSettings:
        """Settings from the raw ``listen`` and ``url`` values; :class:`ManifestError` names where each came from."""
        problems = []
        host, port = "", 0
        try:
            host, port = parse_listen(str(listen))
        except ValueError as exc:
            problems.append(Problem(*listen_at, f"callbacks.listen: {exc}"))
        base = None
        if url is not None:
            try:
                base = check_url(str(url))
            except ValueError as exc:
                problems.append(Problem(*(url_at or listen_at), f"callbacks.url: {exc}"))
        if problems:
            raise ManifestError(problems)
        return cls(host=host, port=port, url=base, origin=listen_at)


def resolve(manifest: Manifest | None, *, listen: str | None = None, url: str | None = None) -> CallbackSettings | None:
    """The receiver's settings: ``listen`` / ``url`` (the flags) > the manifest's ``callbacks:``; None when neither sets listen.

    Raises :class:`ManifestError` naming the flag, or the manifest's file and line, of a bad value.
    """
    block = manifest.callbacks if manifest is not None else {}
    listen_at: tuple[str, int | None] = ("--callback-listen", None)
    url_at: tuple[str, int | None] = ("--callback-url", None)
    if listen is None and manifest is not None and "listen" in block:
        listen, listen_at = block["listen"], (manifest.file, manifest.callbacks.line_of("listen"))
    if url is None and manifest is not None and "url" in block:
        url, url_at = block["url"], (manifest.file, manifest.callbacks.line_of("url"))
    if listen is None:
        if url is not None:
            raise ManifestError([Problem(*url_at, "a callback URL needs a receiver: add --callback-listen HOST:PORT")])
        return None
    return CallbackSettings.parse(listen, url, listen_at=listen_at, url_at=url_at)


def check_plan(plan: Plan, settings: CallbackSettings) -> None:
    """Refuse a plan whose jobs already carry a ``callback_url``: the API takes one callBackUrl per job."""
    if plan.sends_callbacks():
        m = plan.manifest
        raise ManifestError(
            [
                Problem(
                    m.file,
                    m.line_of("callback_url") or m.line_of("callbacks"),
                    "callback_url is set and batchrunner's callback receiver is on (callbacks:, --callback-listen): the API takes "
                    "one callBackUrl per job — remove callback_url to let batchrunner receive them, or turn the receiver off",
                )
            ]
        )


def stretch_factor(ratios: Iterable[float], announced: Iterable[bool]) -> float:
    """How many times its normal delay a poll may wait, given what callbacks did lately (pure).

    ``announced`` holds, for recent finishes, whether a callback announced them; ``ratios``
    holds, for recent first waits, when the callback came as a multiple of the wait (inf:
    the wait ran out and the job was still running). With no evidence, or when more than
    :data:`TRUST_NONE` of finishes went unannounced, nothing is stretched. When nearly all
    are announced, the first poll is put past :data:`RATIO_Q` of the announced finishes
    (at most :data:`STRETCH_MAX` times later), so it rarely costs a call a callback would
    have made unnecessary; a lost callback is then noticed that much later.
    """
    flags = list(announced)
    miss = (flags.count(False) + 1) / (len(flags) + 2)  # Laplace: no evidence is no trust
    trust = min(1.0, max(0.0, (TRUST_NONE - miss) / (TRUST_NONE - TRUST_FULL)))
    seen = sorted(ratios)
    if trust == 0.0 or len(seen) < 5:
        return 1.0
    q = seen[int(RATIO_Q * (len(seen) - 1))]
    learned = STRETCH_MAX if math.isinf(q) else min(STRETCH_MAX, max(1.0, 1.1 * q))
    return 1.0 + (learned - 1.0) * trust


class Hub:
    """The runner's side of callbacks: capability URLs, per-job wake-ups, and the poll stretch.

    The runner calls :meth:`body` when it submits a job, :meth:`wait` instead of sleeping
    until a poll, and :meth:`finished` when a poll finds the job finished (done or failed).
    The receiver calls :meth:`hint`. A hint for a job that is not waiting (still being
    submitted, being polled right now) is kept and makes its next wait return at once; a
    hint for a finished or unknown job changes nothing.
    """

    def __init__(self, base_url: str, secret: str, store: Store | None = None) -> None:
        self.base_url = base_url
        self._secret = secret
        self._store = store
        self.counts: Counter[str] = Counter()
        self._waiting: dict[str, anyio.Event] = {}
        self._hints: OrderedDict[str, None] = OrderedDict()  # hints for jobs not waiting, oldest first (bounded)
        self._hinted: set[str] = set()  # jobs whose last wait a hint ended
        self._seen: set[str] = set()  # jobs that have waited at least once
        self._expired: set[str] = set()  # jobs whose first wait ran out; the next answer tells whether they were running
        self._unannounced: OrderedDict[str, list[bool]] = OrderedDict()  # finished with no callback yet (a late one counts)
        self._due: dict[str, float] = {}  # when a hinted job's wait would have ended had no callback come
        self._maturing: list[tuple[float, int, list[bool]]] = []  # announced finishes not yet counted (heap by due time)
        self._kept: Counter[str] = Counter()
        self.ratios: deque[float] = deque(maxlen=200)
        self.announced: deque[list[bool]] = deque(maxlen=100)
        self._stretch: float | None = None
        self._silent = 0  # finishes since the last callback of any job
        self._alarmed = False
        if store is not None:
            self._load(store.meta("callback_learning"))

    # -- capability URLs ---------------------------------------------------------------------
    def url(self, job_id: str) -> str:
        return f"{self.base_url}/cb/{job_id}/{token(self._secret, job_id)}"

    def body(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request body to send: the job's own, with its capability URL as ``callBackUrl`` (never stored)."""
        return {**body, "callBackUrl": self.url(job_id)}

    def valid(self, job_id: str, given: str) -> bool:
        return len(given) == TOKEN_HEX and hmac.compare_digest(token(self._secret, job_id), given)

    # -- wake-ups ------------------------------------------------------------------------------
    def hint(self, job_id: str) -> None:
        """A valid callback for ``job_id`` arrived: wake its poller (or remember it for its next wait)."""
        self._silent, self._alarmed = 0, False
        record = self._unannounced.pop(job_id, None)
        if record is not None:  # finished already (found by a poll): the callback came, late
            record[0] = True
            self.counts["late"] += 1
            self._stretch = None
            return
        event = self._waiting.get(job_id)
        if event is not None:
            event.set()
            return
        self._hints[job_id] = None
        self._hints.move_to_end(job_id)
        if len(self._hints) > 10_000:
            self._hints.popitem(last=False)

    async def wait(self, job_id: str, delay_s: float) -> None:
        """Sleep until the job's next poll: ``delay_s`` (the poll schedule's) times the current stretch, or a hint.

        The stretch is looked at again every ``delay_s``, so a stretch that shrinks (callbacks
        stopped arriving) brings the poll back to its normal time.
        """
        if job_id in self._expired:  # the first wait ran out and the poll said "not yet": censored
            self._expired.discard(job_id)
            self._learn(_INF)
        first = job_id not in self._seen
        self._seen.add(job_id)
        if job_id in self._hints:  # arrived while it was being submitted or polled
            del self._hints[job_id]
            self._hinted.add(job_id)
            return
        self._hinted.discard(job_id)  # an earlier hint was premature: the poll it caused said "not yet"
        event = self._waiting[job_id] = anyio.Event()
        start = anyio.current_time()
        try:
            while not event.is_set():
                left = start + delay_s * self.stretch() - anyio.current_time()
                if left <= 0:
                    break
                with anyio.move_on_after(min(left, delay_s)):
                    await event.wait()
        finally:
            del self._waiting[job_id]
        if event.is_set():
            self._hinted.add(job_id)
            self._due[job_id] = start + delay_s
            if first and delay_s > 0:
                self._learn((anyio.current_time() - start) / delay_s)
        elif first:
            self._expired.add(job_id)

    def finished(self, job_id: str) -> float | None:
        """A poll found the job finished: learn whether a callback announced it.

        Returns None when none did, else how many seconds before the poll it replaced this poll
        came (0 when that is not known): the runner learns the job's duration as that poll would
        have found it, so that callbacks change when jobs are asked, not what the schedule learns.
        """
        announced = job_id in self._hinted or job_id in self._hints
        due = self._due.pop(job_id, 0.0)
        self._hinted.discard(job_id)
        self._hints.pop(job_id, None)
        self._expired.discard(job_id)
        self._seen.discard(job_id)
        record = [announced]
        self.counts["finished"] += 1
        if announced:
            self.counts["announced"] += 1
            # Counted only once the poll a callback replaced would have come: a lost callback shows only at a poll, so
            # counting announced finishes sooner would overrate callbacks early on — and the stretch that follows
            # would delay the very polls that find the lost ones (a run losing 30 % would stretch itself).
            now = anyio.current_time()
            if due > now:
                heapq.heappush(self._maturing, (due, self.counts["finished"], record))
            else:
                self.announced.append(record)
            ahead: float | None = max(0.0, due - now)
        else:
            ahead = None
            self._silent += 1
            self.announced.append(record)
            self._unannounced[job_id] = record
            if len(self._unannounced) > 1000:
                self._unannounced.popitem(last=False)
        self._stretch = None
        if self.counts["finished"] % 10 == 0:
            self.save()
        return ahead

    def alarm(self) -> str | None:
        """Once per silence: what to tell the user when :data:`SILENCE_WARN` finishes in a row came with no callback."""
        if self._silent < SILENCE_WARN or self._alarmed:
            return None
        self._alarmed = True
        return (
            f"no callback has come for the last {self._silent} finished jobs: check that {self.base_url} reaches this "
            "run's receiver (the reverse proxy or tunnel in front of it); polling goes on, so no job is lost, only noticed later"
        )

    def stretch(self) -> float:
        now = anyio.current_time()
        while self._maturing and self._maturing[0][0] <= now:
            self.announced.append(heapq.heappop(self._maturing)[2])
            self._stretch = None
        if self._stretch is None:
            self._stretch = stretch_factor(self.ratios, (r[0] for r in self.announced))
        return self._stretch

    def _learn(self, ratio: float) -> None:
        self.ratios.append(ratio)
        self._stretch = None

    # -- diagnosis and memory ----------------------------------------------------------------
    def keep(self, job_id: str, detail: dict[str, Any]) -> None:
        """Store a received callback (redacted, bounded) as an event of its job, for diagnosis."""
        self._kept[job_id] += 1
        if self._store is None or self._kept[job_id] > KEEP_PER_JOB:
            return
        # the state file may be closed (the run has ended) or broken (the runner says so): the record is only for diagnosis
        with contextlib.suppress(BatchRunnerError):  # the store turns any SQLite error into one of ours
            self._store.record_event(job_id, "callback", json.dumps(detail, ensure_ascii=False))

    def save(self) -> None:
        """Keep what was learned in the state file, so the next run in this directory starts from it."""
        if self._store is None or not self.announced:
            return
        share = sum(r[0] for r in self.announced) / len(self.announced)
        data = {"ratios": [r if r != _INF else -1 for r in self.ratios], "announced_share": share}
        self._store.set_meta("callback_learning", json.dumps(data))

    def _load(self, raw: str | None) -> None:
        # The share announced over the last window is carried over as CARRIED finishes: enough that a run after a
        # reliable one starts stretched, and one after a run that lost 30 % does not (a lucky few would); few enough
        # that a tunnel that died in between is found out after a handful of unannounced finishes.
        try:
            data = json.loads(raw or "{}")
            self.ratios.extend(_INF if r == -1 else float(r) for r in data.get("ratios", []))
            share = min(1.0, max(0.0, float(data["announced_share"])))
        except (ValueError, TypeError, AttributeError, KeyError):
            return
        hits = round(share * CARRIED)
        self.announced.extend([i < hits] for i in range(CARRIED))

    def summary(self) -> dict[str, Any]:
        return {
            "finished": self.counts["finished"],
            "announced": self.counts["announced"],
            "announced_late": self.counts["late"],
            "stretch": round(self.stretch(), 3),
        }


class Receiver:
    """The aiohttp server that receives callbacks. Bind it with :func:`listening`, then :meth:`arm` it with the run's state."""

    def __init__(self, settings: CallbackSettings) -> None:
        self.settings = settings
        self.hub: Hub | None = None
        self.counts: Counter[str] = Counter()
        self.address = ""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def _start(self) -> None:
        s = self.settings
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, s.host, s.port, reuse_address=True).start()
        except OSError as exc:
            await self._runner.cleanup()
            reason = exc.strerror or str(exc)
            raise ManifestError(
                [
                    Problem(
                        *s.origin,
                        f"callbacks.listen: cannot listen on {s.host}:{s.port} ({reason}) — choose a free port and an address "
                        "of this machine; nothing was sent",
                    )
                ]
            ) from None
        host, port = self._runner.addresses[0][:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        self.hub = None  # first, before any await: the state file may be closed already
        await self._runner.cleanup()

    def arm(self, store: Store) -> Hub:
        """Take (or make, once per output directory) the campaign's secret and start accepting callbacks."""
        secret = store.meta("callback_secret")
        if secret is None:
            secret = secrets.token_hex(32)
            store.set_meta("callback_secret", secret)
        register_secret(secret)
        self.hub = Hub(self.settings.url or f"http://{self.address}", secret, store)
        return self.hub

    def summary(self) -> dict[str, Any]:
        """Counters of this run's callbacks (accepted, refused, …) and what the hub learned."""
        out: dict[str, Any] = {"received": self.counts["accepted"], "refused": self.counts["refused"]}
        out.update({k: v for k, v in self.counts.items() if k not in ("accepted", "refused")})
        if self.hub is not None:
            out.update(self.hub.summary())
        return out

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.rstrip("/").split("/")
        hub = self.hub
        if hub is None or request.method != "POST" or len(parts) < 4 or parts[-3] != "cb" or not hub.valid(parts[-2], parts[-1]):
            self.counts["refused"] += 1
            refused = web.Response(status=404, text="not found\n")
            if request.can_read_body:
                refused.force_close()  # its body is never read
            return refused
        job_id = parts[-2]
        self.counts["accepted"] += 1
        hub.hint(job_id)  # the poller asks now; reading the body is only for the record
        data, whole = await self._read(request)
        if not whole:
            self.counts["cut"] += 1
        hub.keep(
            job_id,
            {
                "at": round(time.time(), 3),
                "content_type": request.headers.get("Content-Type", ""),
                "bytes": len(data),
                "whole": whole,
                "body": redact(data[:KEEP_BYTES].decode("utf-8", "replace")),
            },
        )
        answer = web.Response(status=200, text="ok\n")
        if not whole:
            answer.force_close()
        return answer

    async def _read(self, request: web.Request) -> tuple[bytes, bool]:
        """The body up to the size cap, within the time cap; ``whole`` is False when either cut it."""
        cap = self.settings.max_body_bytes
        data = bytearray()
        with anyio.move_on_after(self.settings.read_timeout_s):
            while len(data) <= cap:
                chunk = await request.content.read(cap + 1 - len(data))
                if not chunk:
                    return bytes(data), True
                data += chunk
        return bytes(data[:cap]), False


@asynccontextmanager
async def listening(settings: CallbackSettings) -> AsyncIterator[Receiver]:
    """A bound receiver for the duration of the block; :class:`ManifestError` when it cannot bind."""
    receiver = Receiver(settings)
    await receiver._start()
    try:
        yield receiver
    finally:
        with anyio.CancelScope(shield=True):
            await receiver.close()
