"""A faithful local simulator of the Cliprise Business API (aiohttp.web).

It answers as ``shared/cliprise-api.md`` says the API does — Host gate, Bearer and
query auth, validation errors as HTTP 200 ``code: 400`` (or an empty body), 300 while
processing, 400 + ``failMsg`` on failure, ``download=true`` returning real media — and
never as our client would like. Tasks finish lazily: a task's outcome and duration are
drawn (seeded) when it is created and read off the clock when it is asked about, so a
100,000-task sandbox needs no timers.

Faults are drawn per request from the same seeded generator: 429 with Retry-After
(seconds or HTTP date), JSON 503, an HTML 502 page, a dropped connection (on generate,
sometimes after the task was created: the ambiguous case), truncated downloads.

``/_sandbox/stats`` (not part of the API) exposes the counters tests assert on.

Callbacks (the API's payload is not publicly documented; this one is the sandbox's own):
when a task that named a ``callBackUrl`` finishes, a timer POSTs ``{"taskId": "…",
"status": "success" | "failed", "fileURL": "…" (success; carries the key, as the API's own
result URLs do) | "failMsg": "…" (failed), "sentAt": unix seconds}`` to it, once, without
retrying. Only loopback addresses are ever called (others are counted and skipped), and
``http://`` is accepted only to a loopback address: a sandbox allowance for local testing
(the API's docs say callBackUrl is an HTTPS URL). Seeded knobs drop, duplicate, delay,
reorder (hold until the next one is sent) a share of them, or send a share of tasks an
extra, premature notice (at creation, before the generate answer, claiming the outcome);
``callbacks`` in the stats counts each.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..callbacks import is_loopback
from ..catalog import STRINGIFIED, Catalog, load_catalog
from . import media

API_HOST = "business.api.cliprise.app"
DEFAULT_DURATIONS_S = {"image": (8.0, 0.35), "video": (60.0, 0.35), "audio": (15.0, 0.35)}
HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center>"
    b"<hr><center>nginx</center></body></html>"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxConfig:
    """How the simulated API behaves. Probabilities are per request; durations are simulated seconds.

    ``time_scale`` is real seconds per simulated second (0.001: a 60 s video takes 60 ms).
    ``durations_s`` maps modality to (median, sigma) of a lognormal duration.
    """

    api_key: str = "sandbox-key"
    seed: int = 0
    time_scale: float = 1.0
    durations_s: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_DURATIONS_S))
    failure_rate: float = 0.0
    p_429: float = 0.0
    retry_after: str = "seconds"  # seconds | date | none
    retry_after_s: float = 1.0
    p_5xx: float = 0.0
    p_html502: float = 0.0
    p_drop: float = 0.0
    p_truncate: float = 0.0
    rate_limit_per_s: float | None = None
    shape: str = "array"  # array | object | mixed
    empty_validation: float = 0.0  # share of validation errors answered with an empty body
    credits: float | None = None  # account balance; None = unlimited
    price: float = 1.0  # credits per task
    image_size: int = 96
    catalog_file: Path | None = None
    tasks_file: Path | None = None  # remember tasks across restarts, as the real API does (embedded use)
    # callbacks: shares of tasks whose notice is dropped, sent twice, held until the next one is sent, preceded by a premature one
    p_callback_drop: float = 0.0
    p_callback_duplicate: float = 0.0
    p_callback_reorder: float = 0.0
    p_callback_early: float = 0.0
    callback_delay_s: float = 0.0  # each notice comes up to this many simulated seconds after the finish


@dataclass(slots=True)
class Task:
    model: str
    modality: str
    prompt: str
    created: float
    finish_at: float
    fail_reason: str | None
    terminal_seen: bool = False
    seen_at: float | None = None  # when a status call first reported the outcome
    callback: str | None = None  # the callBackUrl it was created with (not kept across restarts)


@dataclass(slots=True)
class Stats:
    """Counters the tests assert on."""

    generate_requests: int = 0
    tasks_created: int = 0
    by_body: Counter[str] = field(default_factory=Counter)  # tasks created per canonical body hash
    status_requests: int = 0
    status_by_task: Counter[str] = field(default_factory=Counter)
    downloads: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    rate_limited: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    generate_times: list[float] = field(default_factory=list)
    callbacks: Counter[str] = field(default_factory=Counter)  # scheduled, sent, delivered, refused, failed, dropped, …

    def as_json(self) -> dict[str, Any]:
        return {
            "generate_requests": self.generate_requests,
            "tasks_created": self.tasks_created,
            "by_body": dict(self.by_body),
            "status_requests": self.status_requests,
            "status_by_task": dict(self.status_by_task),
            "downloads": self.downloads,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "rate_limited": self.rate_limited,
            "faults": dict(self.faults),
            "max_generate_per_s": max_per_window(self.generate_times, 1.0),
            "callbacks": dict(self.callbacks),
        }


def max_per_window(times: list[float], window: float) -> int:
    """The most timestamps in any half-open window of ``window`` seconds."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def body_key(body: Any) -> str:
    """The canonical hash of a generate body, as the per-body counter keys it."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class Sandbox:
    """The simulated API: ``app`` is the aiohttp application; ``stats`` its counters."""

    def __init__(self, config: SandboxConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.rng = random.Random(config.seed)
        self.catalog: Catalog = load_catalog(config.catalog_file)[0]
        self.tasks: dict[str, Task] = {}
        self.stats = Stats()
        self.credits = config.credits
        self._window: deque[float] = deque()
        if config.tasks_file is not None:
            self._load_tasks(config.tasks_file)
        self.app = web.Application()
        self.app.router.add_post("/app/cliprise/generate", self.generate)
        self.app.router.add_get("/app/cliprise/status", self.status)
        self.app.router.add_get("/_sandbox/stats", self.stats_view)
        self._cb_rng = random.Random(f"{config.seed}-callbacks")  # its own stream: callbacks leave the API's draws as they were
        self._cb_timers: set[asyncio.TimerHandle] = set()
        self._cb_sends: set[asyncio.Task[None]] = set()
        self._cb_held: list[tuple[str, Task]] = []
        self._cb_session: aiohttp.ClientSession | None = None
        self.app.on_cleanup.append(self._callbacks_stop)

    # -- helpers ---------------------------------------------------------------------------
    def _load_tasks(self, path: Path) -> None:
        if not path.exists():
            return
        offset = self.clock() - time.time()
        for line in path.read_text().splitlines():
            try:
                t = json.loads(line)
                self.tasks[t["id"]] = Task(t["model"], t["modality"], t["prompt"], t["created"] + offset, t["finish"] + offset, t["fail"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill

    def _save_task(self, task_id: str, task: Task) -> None:
        assert self.config.tasks_file is not None
        offset = time.time() - self.clock()
        record = {"id": task_id, "model": task.model, "modality": task.modality, "prompt": task.prompt,
                  "created": task.created + offset, "finish": task.finish_at + offset, "fail": task.fail_reason}  # fmt: skip
        with self.config.tasks_file.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _shape(self, obj: dict[str, Any]) -> Any:
        shape = self.config.shape
        if shape == "mixed":
            shape = self.rng.choice(("array", "object"))
        return [obj] if shape == "array" else obj

    def _json(self, obj: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, body=json.dumps(obj).encode(), content_type="application/json")

    def _fault(self, request: web.Request, *, generate: bool) -> web.StreamResponse | str | None:
        """A drawn fault as a response (or a dropped connection, or "drop-after" on generate), or None."""
        c, r = self.config, self.rng.random()
        for name, p in (("429", c.p_429), ("5xx", c.p_5xx), ("html502", c.p_html502), ("drop", c.p_drop)):
            if r < p:
                self.stats.faults[name] += 1
                if name == "429":
                    return self._too_many(c.retry_after_s)
                if name == "5xx":
                    return self._json({"code": 503, "msg": "service temporarily unavailable"}, 503)
                if name == "html502":
                    return web.Response(status=502, body=HTML_502, content_type="text/html")
                if generate and self.rng.random() < 0.5:
                    return "drop-after"  # the task is created, then the answer is lost: ambiguous
                return self._drop(request)
            r -= p
        return None

    def _too_many(self, seconds: float) -> web.Response:
        headers = {}
        if self.config.retry_after == "seconds":
            # whole seconds as HTTP says; a configured fraction is kept so tests need not wait a second
            whole = seconds >= 1 or self.config.retry_after_s >= 1
            headers["Retry-After"] = str(max(1, math.ceil(seconds))) if whole else f"{max(seconds, 0.01):.2f}"
        elif self.config.retry_after == "date":
            headers["Retry-After"] = email.utils.formatdate(time.time() + max(1.0, seconds), usegmt=True)
        return web.Response(status=429, body=b'{"code":429,"msg":"Too Many Requests"}', content_type="application/json", headers=headers)

    def _drop(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        raise web.HTTPException()  # never sent: the connection is gone

    def _rate_limited(self) -> web.Response | None:
        limit = self.config.rate_limit_per_s
        if not limit:
            return None
        now = self.clock()
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        if len(self._window) >= limit:
            self.stats.rate_limited += 1
            return self._too_many(1.0 - (now - self._window[0]))
        self._window.append(now)
        return None

    def _validation(self, msg: str) -> web.Response:
        if self.rng.random() < self.config.empty_validation:
            return web.Response(status=200, body=b"")
        return self._json({"code": 400, "msg": msg, "data": None})

    def _validate(self, body: Any) -> tuple[str | None, str, str]:
        """(error message or None, modality, prompt) of a generate body."""
        if not isinstance(body, dict):
            return "body must be a JSON object", "", ""
        model_id = body.get("model")
        if not model_id:
            return "model: This field is required", "", ""
        model = self.catalog.get(str(model_id))
        if model is None:
            return f"model: unsupported model {model_id}", "", ""
        for name, kind in STRINGIFIED.items():
            if name in body:
                value = body[name]
                if not isinstance(value, str):
                    return f"{name}: must be a JSON string", "", ""
                try:
                    parsed = json.loads(value)
                except ValueError:
                    return f"{name}: invalid JSON string", "", ""
                if not isinstance(parsed, kind) or (isinstance(parsed, list) and not all(isinstance(u, str) for u in parsed)):
                    return f"{name}: must be a stringified JSON {'object' if kind is dict else 'array of URLs'}", "", ""
        if "callBackUrl" in body and not _callback_url_ok(body["callBackUrl"]):
            return "callBackUrl: must be an HTTPS URL", "", ""
        fields: Any = body
        if model.root_only:
            if "input" in body:
                return f"input: not allowed for {model.id}; send fields at the root", "", ""
        else:
            fields = body.get("input")
            if not isinstance(fields, dict):
                return "input: This field is required", "", ""
        for name in model.required:
            if fields.get(name) in (None, ""):
                return f"{'' if model.root_only else 'input.'}{name}: This field is required", "", ""
        for name, allowed in model.enums.items():
            if name in fields and str(fields[name]) not in allowed:
                return f"{name}: must be one of {', '.join(allowed)}", "", ""
        return None, model.modality, str(fields.get("prompt", ""))

    # -- endpoints -------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.stats.generate_requests += 1
        if request.host != API_HOST:
            return web.Response(status=400, body=b"")
        fault = self._fault(request, generate=True)
        if isinstance(fault, web.StreamResponse):
            return fault
        drop_after = fault == "drop-after"
        limited = self._rate_limited()
        if limited is not None:
            return limited
        if request.headers.get("Authorization") != f"Bearer {self.config.api_key}":
            return self._json({"code": 401, "error": {"code": "invalid_api_key", "message": "Missing or invalid API key."}}, 401)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.Response(status=200, body=b"")
        error, modality, prompt = self._validate(body)
        if error:
            return self._validation(error)
        if self.credits is not None:
            if self.credits < self.config.price:
                return self._json({"code": 402, "msg": "Insufficient credits"}, 402)
            self.credits -= self.config.price
        task_id = f"{self.rng.getrandbits(112):028x}"
        median, sigma = self.config.durations_s.get(modality, (10.0, 0.3))
        duration = self.rng.lognormvariate(math.log(median), sigma) * self.config.time_scale
        fail = "content policy violation: the prompt was rejected" if self.rng.random() < self.config.failure_rate else None
        now = self.clock()
        task = self.tasks[task_id] = Task(str(body["model"]), modality, prompt, now, now + duration, fail)
        if self.config.tasks_file is not None:
            self._save_task(task_id, task)
        if "callBackUrl" in body:
            task.callback = str(body["callBackUrl"])
            await self._callback_created(task_id, task)
        self.stats.tasks_created += 1
        self.stats.by_body[body_key(body)] += 1
        self.stats.generate_times.append(now)
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        if drop_after:
            return self._drop(request)
        return self._json(self._shape({"code": 200, "taskId": task_id}))

    async def status(self, request: web.Request) -> web.StreamResponse:
        self.stats.status_requests += 1
        if request.host != API_HOST:
            return self._json({"msg": "method_not_allowed"}, 400)
        fault = self._fault(request, generate=False)
        if isinstance(fault, web.StreamResponse):
            return fault
        q = request.query
        if q.get("apiKey") != self.config.api_key:
            return self._json({"msg": "invalid_api_key"}, 400)
        task_id = q.get("taskId", "")
        task = self.tasks.get(task_id)
        if task is None:
            return self._json({"msg": "invalid_taskId"}, 400)
        self.stats.status_by_task[task_id] += 1
        if self.clock() < task.finish_at:
            return self._json({"status": "processing"}, 300)
        if not task.terminal_seen:
            task.terminal_seen, task.seen_at = True, self.clock()
            self.stats.in_flight -= 1
        if task.fail_reason:
            return self._json({"status": "failed", "failMsg": task.fail_reason}, 400)
        if q.get("download") == "true":
            return await self._download(request, task_id, task)
        url = f"https://{API_HOST}/app/cliprise/status?apiKey={self.config.api_key}&taskId={task_id}&download=true"
        return self._json(self._shape({"status": "success", "fileURL": url}))

    async def _download(self, request: web.Request, task_id: str, task: Task) -> web.StreamResponse:
        self.stats.downloads += 1
        data, ctype = self._media(task, task_id)
        if self.rng.random() < self.config.p_truncate:
            self.stats.faults["truncate"] += 1
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype, "Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            return self._drop(request)
        return web.Response(status=200, body=data, content_type=ctype)

    def _media(self, task: Task, task_id: str) -> tuple[bytes, str]:
        if task.modality == "image":
            return media.png(task.prompt, task_id, self.config.image_size), media.CONTENT_TYPES["image"]
        return media.render(task.modality, task.prompt, task_id)

    async def stats_view(self, request: web.Request) -> web.Response:
        return self._json(self.stats.as_json())

    # -- callbacks (a timer per task: tasks otherwise finish lazily) ------------------------------
    async def _callback_created(self, task_id: str, task: Task) -> None:
        """Schedule the notice of a new task for its finish, or draw its fate (dropped, early, …)."""
        c, r, counts = self.config, self._cb_rng, self.stats.callbacks
        assert task.callback is not None
        if not _callback_url_ok(task.callback, loopback_only=True):
            counts["not_loopback"] += 1
            return
        counts["scheduled"] += 1
        drop, early, held, twice = (
            r.random() < p for p in (c.p_callback_drop, c.p_callback_early, c.p_callback_reorder, c.p_callback_duplicate)
        )
        extra = r.uniform(0.0, c.callback_delay_s) * c.time_scale
        if early:  # before the generate answer: the client cannot have recorded the task id yet
            counts["early"] += 1
            await self._callback_send(task_id, task)
        if drop:
            counts["dropped"] += 1
            return
        delay = max(0.0, task.finish_at - self.clock())
        if extra:
            counts["delayed"] += 1
        self._callback_at(delay + extra, task_id, task, held)
        if twice:
            counts["duplicated"] += 1
            self._callback_at(delay + extra + r.uniform(0.0, 2.0) * c.time_scale, task_id, task, False)

    def _callback_at(self, delay_s: float, task_id: str, task: Task, held: bool) -> None:
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def due() -> None:
            self._cb_timers.discard(timer)
            if self.clock() < task.finish_at:  # a timer may fire a hair early: a notice never precedes its finish
                self._callback_at(task.finish_at - self.clock(), task_id, task, held)
                return
            if held:  # reordered: goes out right after the next notice (or after a while, if none comes)
                self.stats.callbacks["reordered"] += 1
                self._cb_held.append((task_id, task))
                self._cb_timers.add(loop.call_later(5.0 * self.config.time_scale + 0.05, self._callback_release))
                return
            self._callback_spawn(task_id, task)
            self._callback_release()

        timer = loop.call_later(delay_s, due)
        self._cb_timers.add(timer)

    def _callback_release(self) -> None:
        held_now, self._cb_held = self._cb_held, []
        for task_id, task in held_now:
            self._callback_spawn(task_id, task)

    def _callback_spawn(self, task_id: str, task: Task) -> None:
        send = asyncio.ensure_future(self._callback_send(task_id, task))
        self._cb_sends.add(send)
        send.add_done_callback(self._cb_sends.discard)

    async def _callback_send(self, task_id: str, task: Task) -> None:
        assert task.callback is not None
        notice: dict[str, Any] = {"taskId": task_id, "status": "failed" if task.fail_reason else "success", "sentAt": time.time()}
        if task.fail_reason:
            notice["failMsg"] = task.fail_reason
        else:
            notice["fileURL"] = f"https://{API_HOST}/app/cliprise/status?apiKey={self.config.api_key}&taskId={task_id}&download=true"
        if self._cb_session is None:
            self._cb_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10.0))
        self.stats.callbacks["sent"] += 1
        try:
            async with self._cb_session.post(task.callback, json=notice) as resp:
                await resp.read()
                self.stats.callbacks["delivered" if 200 <= resp.status < 300 else "refused"] += 1
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.stats.callbacks["failed"] += 1

    async def _callbacks_stop(self, app: web.Application) -> None:
        for timer in self._cb_timers:
            timer.cancel()
        self._cb_timers.clear()
        for send in list(self._cb_sends):
            send.cancel()
        await asyncio.gather(*self._cb_sends, return_exceptions=True)
        if self._cb_session is not None:
            await self._cb_session.close()


def _callback_url_ok(url: Any, *, loopback_only: bool = False) -> bool:
    """An https URL (or http to a loopback address: the sandbox's allowance for local testing); ``loopback_only``: and loopback."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
    except ValueError:
        return False
    loopback = bool(host) and is_loopback(host)
    if loopback_only:
        return loopback and parts.scheme in ("http", "https")
    return bool(host) and (parts.scheme == "https" or (parts.scheme == "http" and loopback))


@asynccontextmanager
async def serve(config: SandboxConfig, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[tuple[Sandbox, str]]:
    """Run a sandbox on ``host:port`` (0: a free port) for the duration of the block; yields (sandbox, base URL)."""
    sandbox = Sandbox(config)
    runner = web.AppRunner(sandbox.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    try:
        bound = runner.addresses[0][1]
        yield sandbox, f"http://{host}:{bound}"
    finally:
        await runner.cleanup()
