"""A faithful local simulator of the Cliprise Business API (aiohttp.web).

It answers as ``shared/cliprise-api.md`` says the API does — Host gate, Bearer and
query auth, validation errors as HTTP 200 ``code: 400`` (or an empty body), 300 while
processing, 400 + ``failMsg`` on failure, ``download=true`` returning real media — and
never as our client would like. Tasks finish lazily: a task's outcome and duration are
drawn (seeded) when it is created and read off the clock when it is asked about, so a
100,000-task sandbox needs no timers.

Faults are drawn per request from the same seeded generator (each knob of
:class:`SandboxConfig` is off by default, and one that is off draws nothing):

- every request: 429 with Retry-After (seconds, HTTP date or none; ``retry_after_s`` may be
  huge, e.g. 86400), JSON 503, an HTML 502 page, a dropped connection (on generate,
  sometimes after the task was created: the ambiguous case); ``revoke_key_after`` N
  requests, the key is refused as the docs show for a bad key (generate: 401
  ``invalid_api_key``; status: 400 ``{"msg":"invalid_api_key"}``).
- status answers: ``p_status_word`` answers ``{"status": status_word}`` with HTTP
  ``status_word_http`` instead of the task's state (a word never seen before such as
  ``queued_for_review``, or a failure word such as ``cancelled``, ``error``, ``rejected``);
  ``p_no_file`` answers a finished task's success without a file (``{"status":"success"}``
  without ``fileURL``, and the same JSON with HTTP 200 for ``download=true``).
- result bodies (``download=true`` of a finished task): ``p_truncate`` cuts the body after
  its Content-Length was sent; ``p_truncate_chunked`` cuts a chunked body (no
  Content-Length); ``p_truncate_eof`` sends half the body with neither Content-Length nor
  chunking, then closes the connection (the cut looks like the end); ``p_random_body``
  sends random bytes declared as the real type (``image/png``…); ``p_denied_page`` sends an
  XML "Access denied" page as ``application/octet-stream``; ``p_slow_body`` sends the body
  one byte every ``slow_body_interval_s`` real seconds (slow loris).
- ``fault_prompt``: when set, the status and result faults touch only tasks whose prompt
  contains it, so one run can mix broken and healthy jobs deterministically.
- ``forget_tasks``: a restart loses every task (``tasks_file`` is not read back), so the API
  answers ``invalid_taskId`` for each task submitted before it.

Source media are checked as the API must (``shared/cliprise-api.md``, "Source media"): every
``*_url``/``*Url`` field at the root or under ``input``, and each URL in the stringified
``imageURLList``/``videoURLList``, is fetched before a task is created; a URL that is not
http(s), cannot be fetched, answers non-2xx or an HTML page, or is not media is a validation
error. The sandbox fetches loopback addresses only. Results derive from their inputs (see
``media.py``), and images follow the requested aspect ratio.

``/_sandbox/stats`` and ``/_sandbox/tasks`` (not part of the API) expose what tests assert on.
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
import ipaddress
import json
import math
import random
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web

from ..callbacks import is_loopback
from ..catalog import STRINGIFIED, Catalog, load_catalog
from ..inputs import KINDS, media_type
from . import media

API_HOST = "business.api.cliprise.app"
DEFAULT_DURATIONS_S = {"image": (8.0, 0.35), "video": (60.0, 0.35), "audio": (15.0, 0.35)}
DENIED_PAGE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied</Message>'
    b"<RequestId>4442587FB7D0A2F9</RequestId></Error>\n"
)
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
    fail_prompts: tuple[str, ...] = ()  # a task whose prompt contains one of these texts fails (tests pick which job fails)
    p_429: float = 0.0
    retry_after: str = "seconds"  # seconds | date | none
    retry_after_s: float = 1.0
    p_5xx: float = 0.0
    p_html502: float = 0.0
    p_drop: float = 0.0
    p_truncate: float = 0.0
    p_truncate_chunked: float = 0.0  # a chunked body (no Content-Length) cut mid-stream
    p_truncate_eof: float = 0.0  # half the body, no Content-Length nor chunking, then the connection closes
    p_random_body: float = 0.0  # random bytes declared as the result's type
    p_denied_page: float = 0.0  # an XML "Access denied" page as application/octet-stream
    p_slow_body: float = 0.0  # the body one byte every slow_body_interval_s (real seconds)
    slow_body_interval_s: float = 5.0
    p_no_file: float = 0.0  # success without a file: no fileURL; download=true answered with JSON
    p_status_word: float = 0.0  # {"status": status_word} with HTTP status_word_http instead of the task's state
    status_word: str = "queued_for_review"
    status_word_http: int = 200
    fault_prompt: str | None = None  # status and result faults only for tasks whose prompt contains this
    revoke_key_after: int | None = None  # requests (generate + status) after which the key is refused
    forget_tasks: bool = False  # a restart loses every task: tasks_file is not read back
    rate_limit_per_s: float | None = None
    shape: str = "array"  # array | object | mixed
    empty_validation: float = 0.0  # share of validation errors answered with an empty body
    credits: float | None = None  # account balance; None = unlimited
    price: float = 1.0  # credits per task
    image_size: int = 96
    catalog_file: Path | None = None
    tasks_file: Path | None = None  # remember tasks across restarts, as the real API does (embedded use)
    input_timeout_s: float = 10.0  # fetching one source media URL
    input_max_bytes: int = 64 << 20  # a sandbox limit (the API's is not public)
    video_min_bytes: int = 0  # video results padded to at least this size (> 1 MiB exercises streamed downloads)
    chunked_media: bool = False  # results sent without Content-Length (chunked), as some CDNs do
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
    inputs: tuple[tuple[str, str], ...] = ()  # (field, sha256) of each source media fetched
    aspect_ratio: str | None = None
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
    inputs_fetched: int = 0  # source media URLs fetched and accepted
    inputs_refused: int = 0  # generate requests refused for a source media URL
    inputs_by_sha: Counter[str] = field(default_factory=Counter)  # fetches per content
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
            "inputs_fetched": self.inputs_fetched,
            "inputs_refused": self.inputs_refused,
            "inputs_by_sha": dict(self.inputs_by_sha),
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
        # Each task's duration and outcome come from a stream of their own, drawn in creation order: how a client
        # polls or downloads (which draws from ``rng``) never changes how long the n-th task takes, so two clients
        # can be compared on the same campaign.
        self._task_rng = random.Random(f"{config.seed}-tasks")
        self.catalog: Catalog = load_catalog(config.catalog_file)[0]
        self.tasks: dict[str, Task] = {}
        self.stats = Stats()
        self.credits = config.credits
        self._window: deque[float] = deque()
        self._session: aiohttp.ClientSession | None = None  # fetches source media
        self._pictures: OrderedDict[str, media.Picture] = OrderedDict()  # source images by sha256, most recent last
        self._requests = 0
        if config.tasks_file is not None and not config.forget_tasks:
            self._load_tasks(config.tasks_file)
        self.app = web.Application()
        self.app.router.add_post("/app/cliprise/generate", self.generate)
        self.app.router.add_get("/app/cliprise/status", self.status)
        self.app.router.add_get("/_sandbox/stats", self.stats_view)
        self.app.router.add_get("/_sandbox/tasks", self.tasks_view)
        self.app.on_cleanup.append(self._close_session)
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
                self.tasks[t["id"]] = Task(
                    t["model"], t["modality"], t["prompt"], t["created"] + offset, t["finish"] + offset, t["fail"],
                    inputs=tuple(t.get("inputs", {}).items()), aspect_ratio=t.get("aspect"),
                )  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill

    def _save_task(self, task_id: str, task: Task) -> None:
        assert self.config.tasks_file is not None
        offset = time.time() - self.clock()
        record = {"id": task_id, "model": task.model, "modality": task.modality, "prompt": task.prompt,
                  "created": task.created + offset, "finish": task.finish_at + offset, "fail": task.fail_reason,
                  "inputs": dict(task.inputs), "aspect": task.aspect_ratio}  # fmt: skip
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
        c = self.config
        self._requests += 1
        if c.revoke_key_after is not None and self._requests > c.revoke_key_after:
            self.stats.faults["revoked"] += 1
            if generate:
                return self._json({"code": 401, "error": {"code": "invalid_api_key", "message": "Missing or invalid API key."}}, 401)
            return self._json({"msg": "invalid_api_key"}, 400)
        r = self.rng.random()
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
        error, inputs = await self._fetch_sources(body)
        if error:
            self.stats.inputs_refused += 1
            return self._validation(error)
        if self.credits is not None:
            if self.credits < self.config.price:
                return self._json({"code": 402, "msg": "Insufficient credits"}, 402)
            self.credits -= self.config.price
        task_id = f"{self.rng.getrandbits(112):028x}"
        median, sigma = self.config.durations_s.get(modality, (10.0, 0.3))
        duration = self._task_rng.lognormvariate(math.log(median), sigma) * self.config.time_scale
        failed = self._task_rng.random() < self.config.failure_rate or any(text in prompt for text in self.config.fail_prompts)
        fail = "content policy violation: the prompt was rejected" if failed else None
        now = self.clock()
        task = self.tasks[task_id] = Task(
            str(body["model"]), modality, prompt, now, now + duration, fail, inputs=inputs, aspect_ratio=_aspect(body)
        )
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
        q, c = request.query, self.config
        if q.get("apiKey") != self.config.api_key:
            return self._json({"msg": "invalid_api_key"}, 400)
        task_id = q.get("taskId", "")
        task = self.tasks.get(task_id)
        if task is None:
            return self._json({"msg": "invalid_taskId"}, 400)
        self.stats.status_by_task[task_id] += 1
        if self._drawn("status_word", c.p_status_word, task):
            return self._json(self._shape({"status": c.status_word}), c.status_word_http)
        if self.clock() < task.finish_at:
            return self._json({"status": "processing"}, 300)
        if not task.terminal_seen:
            task.terminal_seen, task.seen_at = True, self.clock()
            self.stats.in_flight -= 1
        if task.fail_reason:
            return self._json({"status": "failed", "failMsg": task.fail_reason}, 400)
        if self._drawn("no_file", c.p_no_file, task):
            return self._json(self._shape({"status": "success"}))
        if q.get("download") == "true":
            return await self._download(request, task_id, task)
        url = f"https://{API_HOST}/app/cliprise/status?apiKey={self.config.api_key}&taskId={task_id}&download=true"
        return self._json(self._shape({"status": "success", "fileURL": url}))

    def _drawn(self, name: str, p: float, task: Task) -> bool:
        """Whether a task-scoped fault happens to this request (no draw when it is off or not aimed at this task)."""
        target = self.config.fault_prompt
        if not p or (target is not None and target not in task.prompt) or self.rng.random() >= p:
            return False
        self.stats.faults[name] += 1
        return True

    async def _download(self, request: web.Request, task_id: str, task: Task) -> web.StreamResponse:
        self.stats.downloads += 1
        c = self.config
        data, ctype = self._media(task, task_id)
        cut = self.rng.random() < c.p_truncate  # drawn even when off, as it always was: seeded runs keep their sequences
        if cut and (c.fault_prompt is None or c.fault_prompt in task.prompt):
            self.stats.faults["truncate"] += 1
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype, "Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            return self._drop(request)
        if self._drawn("random_body", c.p_random_body, task):
            return web.Response(status=200, body=self.rng.randbytes(len(data)), content_type=ctype)
        if self._drawn("denied_page", c.p_denied_page, task):
            return web.Response(status=200, body=DENIED_PAGE, content_type="application/octet-stream")
        if self._drawn("truncate_chunked", c.p_truncate_chunked, task):
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            return self._drop(request)
        if self._drawn("truncate_eof", c.p_truncate_eof, task):
            assert request.transport is not None  # HTTP/1.0-style: the body ends where the connection does
            head = f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nConnection: close\r\n\r\n".encode()
            request.transport.write(head + data[: len(data) // 2])
            request.transport.close()
            raise web.HTTPException()  # never sent: the answer is already on its way
        if self._drawn("slow_body", c.p_slow_body, task):
            resp = web.StreamResponse(status=200, headers={"Content-Type": ctype, "Content-Length": str(len(data))})
            await resp.prepare(request)
            try:
                for i in range(len(data)):
                    await resp.write(data[i : i + 1])
                    await asyncio.sleep(c.slow_body_interval_s)
            except ConnectionError:  # the client gave up
                return resp
            await resp.write_eof()
            return resp
        return await self._send(request, data, ctype)

    async def _send(self, request: web.Request, data: bytes, ctype: str) -> web.StreamResponse:
        if not self.config.chunked_media:
            return web.Response(status=200, body=data, content_type=ctype)
        resp = web.StreamResponse(status=200, headers={"Content-Type": ctype})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(data), 64 << 10):
            await resp.write(data[i : i + (64 << 10)])
        await resp.write_eof()
        return resp

    def _media(self, task: Task, task_id: str) -> tuple[bytes, str]:
        """The task's result: derived from its first source image when there is one (and it is still known)."""
        source = next((self._pictures[sha] for _, sha in task.inputs if sha in self._pictures), None)
        size = self.config.image_size
        wanted = task.aspect_ratio or (f"{source.width}:{source.height}" if source else None)
        if task.modality == "image":
            if source is None:
                return media.png(task.prompt, task_id, size, task.aspect_ratio), media.CONTENT_TYPES["image"]
            if any(word in task.model for word in CUT_OUT_MODELS):
                return media.cut_out(source, task_id), media.CONTENT_TYPES["image"]
            return media.edited(source, task.prompt, task_id, media.size_for(wanted, size)), media.CONTENT_TYPES["image"]
        if task.modality == "video":
            data = media.video_of(source, task_id, media.size_for(wanted, size)) if source else media.mp4(task.prompt, task_id)
            return media.padded(data, self.config.video_min_bytes), media.CONTENT_TYPES["video"]
        return media.render(task.modality, task.prompt, task_id)

    # -- source media ----------------------------------------------------------------------
    async def _fetch_sources(self, body: dict[str, Any]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
        """Fetch every source media URL the body names: (the first problem as a validation message, or None; (field, sha256)s)."""
        fetched = []
        for name, url in source_urls(body):
            error, sha = await self._fetch_source(name, url)
            if error:
                return error, ()
            assert sha is not None
            fetched.append((name, sha))
        return None, tuple(fetched)

    async def _fetch_source(self, name: str, url: Any) -> tuple[str | None, str | None]:
        if _host(url) is None:
            return f"{name}: must be a direct http(s) URL of a file, not {_shown(url)}", None
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=self.config.input_timeout_s))
        for _ in range(MAX_REDIRECTS + 1):
            host = _host(url) or ""
            if not _loopback(host):
                return f"{name}: the sandbox only fetches loopback addresses (127.0.0.1, ::1, localhost), not {host}", None
            try:
                async with self._session.get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    if not 200 <= resp.status < 300:
                        return f"{name}: {_shown(url)} answered HTTP {resp.status}; the API needs a public, direct file URL", None
                    data = bytearray()
                    async for chunk in resp.content.iter_chunked(1 << 16):
                        data += chunk
                        if len(data) > self.config.input_max_bytes:
                            return f"{name}: {_shown(url)} is larger than the sandbox's {self.config.input_max_bytes} bytes", None
                    html = resp.content_type == "text/html"
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                return f"{name}: {_shown(url)} could not be fetched ({type(exc).__name__})", None
            head = bytes(data[:64])
            if html or head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
                return f"{name}: {_shown(url)} is an HTML page, not a media file (a share page? link the file itself)", None
            ext = media_type(head)
            if ext is None:
                return f"{name}: {_shown(url)} is not an image, video or audio file", None
            sha = hashlib.sha256(data).hexdigest()
            self.stats.inputs_fetched += 1
            self.stats.inputs_by_sha[sha] += 1
            if KINDS[ext] == "image" and sha not in self._pictures:
                self._pictures[sha] = await asyncio.to_thread(media.picture_of, bytes(data))
                while len(self._pictures) > PICTURES_KEPT:
                    self._pictures.popitem(last=False)
            if sha in self._pictures:
                self._pictures.move_to_end(sha)
            return None, sha
        return f"{name}: {_shown(url)} redirects more than {MAX_REDIRECTS} times", None

    async def _close_session(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def stats_view(self, request: web.Request) -> web.Response:
        return self._json(self.stats.as_json())

    async def tasks_view(self, request: web.Request) -> web.Response:
        """Each task's model, aspect ratio and the sha256 of every source media the sandbox fetched for it."""
        return self._json({tid: {"model": t.model, "modality": t.modality, "aspect_ratio": t.aspect_ratio, "inputs": dict(t.inputs)}
                           for tid, t in self.tasks.items()})  # fmt: skip

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


MAX_REDIRECTS = 5
_RATIO = re.compile(r"\d+\s*[:xX]\s*\d+")
PICTURES_KEPT = 64
CUT_OUT_MODELS = ("remove-bg", "removebg", "background-remov", "cutout", "cut-out")
NOT_SOURCES = ("callBackUrl",)  # ends in Url, but is where the API calls back, not media


def source_urls(body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(field, URL) of every source media a generate body names: ``*_url``/``*Url`` fields at the root or
    under ``input`` (each item of a list value), and each URL in the stringified imageURLList/videoURLList."""
    found: list[tuple[str, Any]] = []
    nested = body.get("input")
    for where, fields in (("", body), ("input.", nested if isinstance(nested, dict) else {})):
        for key, value in fields.items():
            if key in NOT_SOURCES or not (key.endswith("_url") or key.endswith("Url")):
                continue
            if isinstance(value, list):
                found.extend((f"{where}{key}[{i}]", v) for i, v in enumerate(value))
            else:
                found.append((where + key, value))
    for key in ("imageURLList", "videoURLList"):
        if isinstance(body.get(key), str):
            urls = json.loads(body[key])  # _validate checked it is a JSON array of strings
            found.extend((f"{key}[{i}]", u) for i, u in enumerate(urls))
    return found


def _aspect(body: dict[str, Any]) -> str | None:
    """The requested aspect ratio (``aspect_ratio``, or a ``size`` of WxH), in ``input``, at the root, or in ``options``."""
    places: list[Any] = [body.get("input"), body]
    if isinstance(body.get("options"), str):
        places.append(json.loads(body["options"]))
    for fields in places:
        if isinstance(fields, dict):
            for key in ("aspect_ratio", "size"):
                if isinstance(fields.get(key), str) and _RATIO.fullmatch(fields[key]):
                    return str(fields[key])
    return None


def _host(url: Any) -> str | None:
    """The host of an http(s) URL, or None if ``url`` is not one."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        return parts.hostname if parts is not None and parts.scheme in ("http", "https") else None
    except ValueError:
        return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _shown(url: Any) -> str:
    """A URL as messages show it: without its query (a presigned URL's signature stays out of logs)."""
    if not isinstance(url, str):
        return repr(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return repr(url[:80])
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme and parts.netloc else repr(url[:80])

    # -- callbacks (a timer per task: tasks otherwise finish lazily) ------------------------------


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
async def serve(
    config: SandboxConfig, *, host: str = "127.0.0.1", port: int = 0, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[tuple[Sandbox, str]]:
    """Run a sandbox on ``host:port`` (0: a free port) for the duration of the block; yields (sandbox, base URL).

    ``clock`` is the simulated time tasks finish by (tests pass one they advance by hand).
    """
    sandbox = Sandbox(config, clock=clock)
    runner = web.AppRunner(sandbox.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    try:
        bound = runner.addresses[0][1]
        yield sandbox, f"http://{host}:{bound}"
    finally:
        await runner.cleanup()
