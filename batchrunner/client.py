"""The Cliprise Business API over HTTP: generate, status, download. Nothing else in batchrunner knows HTTP.

Every documented quirk is handled here and turned into plain values or one exception
class from :mod:`batchrunner.errors`: answers as a one-element array or a bare object,
HTTP 200 carrying ``code: 400``, an empty 200 body, 300 for "processing", 400 for a
failed task, the Host gate. What the docs leave open follows ``shared/cliprise-api.md``:
429/5xx are transient, and a generate POST that was sent but not answered is
:class:`AmbiguousSubmit`, because retrying it could pay for the same job twice.

The key is sent as a Bearer header (generate) or an ``apiKey`` query (status), and never
kept in anything this module returns: result URLs are redacted on the way in.
"""

from __future__ import annotations

import email.utils
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from .errors import (
    AmbiguousSubmit,
    ApiError,
    AuthError,
    DownloadError,
    FatalApiError,
    OutOfCredits,
    PermanentApiError,
    RateLimited,
    TransientApiError,
    UnknownTask,
    Unreachable,
    redact,
    register_secret,
)

API_HOST = "business.api.cliprise.app"
DEFAULT_BASE_URL = f"https://{API_HOST}"
GENERATE_PATH = "/app/cliprise/generate"
STATUS_PATH = "/app/cliprise/status"


@dataclass(frozen=True, slots=True)
class Processing:
    """The task is still running: poll again later."""

    status: str = "processing"


@dataclass(frozen=True, slots=True)
class Succeeded:
    """The task finished; ``file_url`` is the API's result URL with the key redacted."""

    file_url: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The task failed; ``reason`` is the API's ``failMsg`` (redacted)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Unrecognised:
    """An answer that is neither documented state: a success without a result URL, or a status word never seen before.

    ``status`` is the word the API used (may be empty); ``text`` its answer, redacted and
    shortened. The runner counts these and fails the job after a bounded number of them.
    """

    status: str
    text: str


TaskStatus = Processing | Succeeded | Failed | Unrecognised
# Status words that can only mean the task is over without a result: they fail the job at once.
FAILURE_WORDS = frozenset(
    {"failed", "fail", "failure", "error", "errored", "cancelled", "canceled", "rejected", "expired", "aborted", "timeout", "timed_out"}
)


@dataclass(slots=True)
class Download:
    """An open result download: its declared type and size, and its body as chunks."""

    content_type: str
    content_length: int | None
    _response: aiohttp.ClientResponse

    async def chunks(self, size: int = 1 << 16) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(size):
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"download interrupted: {type(exc).__name__}: {exc}") from exc


def retry_after_seconds(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Parse a Retry-After header: delta seconds or an HTTP date. None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def _first(payload: Any) -> Any:
    """The API answers with ``[{...}]`` or ``{...}``: return the object either way."""
    if isinstance(payload, list):
        return payload[0] if payload else None
    return payload


def _decode(raw: bytes) -> Any:
    """Decoded JSON object, or None for an empty or non-JSON body."""
    if not raw.strip():
        return None
    try:
        return _first(json.loads(raw))
    except (ValueError, UnicodeDecodeError):
        return None


def _message(obj: Any, raw: bytes) -> str:
    if isinstance(obj, dict):
        for key in ("failMsg", "msg", "message"):
            if isinstance(obj.get(key), str) and obj[key]:
                return str(obj[key])
        err = obj.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err.get("code") or err)
        return json.dumps(obj)[:300]
    text = raw.decode("utf-8", "replace").strip()
    return (text[:200] + "…") if len(text) > 200 else text or "(empty body)"


def _common_errors(http: int, obj: Any, raw: bytes, headers: Any) -> ApiError | None:
    """Errors that mean the same on every endpoint: 401, 402, 429, 5xx."""
    if http == 429:
        return RateLimited(f"rate limited (HTTP 429): {_message(obj, raw)}", retry_after_s=retry_after_seconds(headers.get("Retry-After")))
    if http == 401:
        return AuthError(f"the API key was refused (HTTP 401): {_message(obj, raw)}", status=401)
    if http == 402:
        return OutOfCredits(f"no API credits left (HTTP 402): {_message(obj, raw)}", status=402)
    if http >= 500:
        return TransientApiError(f"server error (HTTP {http}): {_message(obj, raw)}", status=http)
    return None


def endpoint_problems(api_key: str | None, base_url: str | None) -> list[str]:
    """What is wrong with a key and base URL before anything is sent (a malformed one would fail every request, or worse,
    fail after the request's state was recorded): empty when both are usable. Never quotes the key."""
    problems = []
    if api_key is not None and (not api_key.isprintable() or api_key != api_key.strip() or " " in api_key):
        problems.append(
            "CLIPRISE_API_KEY contains a space or a control character (a trailing newline or \\r from a file saved on Windows?) "
            "— set it to the key alone"
        )
    if base_url is not None:
        try:
            parts = urllib.parse.urlsplit(base_url)
            parts.port  # noqa: B018 — raises ValueError for a port out of range
        except ValueError as exc:
            problems.append(f"CLIPRISE_BASE_URL {base_url!r} is not a URL ({exc}) — set it to http(s)://host[:port]")
        else:
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problems.append(f"CLIPRISE_BASE_URL {base_url!r} is not an http(s) URL with a host — set it to http(s)://host[:port]")
    return problems


class Client:
    """An async client of the Cliprise Business API. Use as ``async with Client(api_key=...) as c``.

    ``base_url`` is where to connect (the real host, a proxy, the sandbox); the ``Host`` header
    is always ``host_header``, because the API refuses any other. ``connections`` bounds open
    sockets; ``timeout_s`` bounds each read.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        host_header: str = API_HOST,
        connections: int = 64,
        connect_timeout_s: float = 10.0,
        timeout_s: float = 60.0,
    ) -> None:
        register_secret(api_key)
        self._key = api_key
        self._base = base_url.rstrip("/")
        self._host = host_header
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"Client(base_url={self._base!r}, host_header={self._host!r})"

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=self._connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, headers={"Host": self._host})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Client used outside 'async with'")
        return self._session

    async def generate(self, body: dict[str, Any]) -> str:
        """POST one job; return its task id. Raises :class:`AmbiguousSubmit` when the POST may have landed."""
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"}
        try:
            async with self.session.post(self._base + GENERATE_PATH, data=data, headers=headers) as resp:
                raw = await resp.read()
                http, resp_headers = resp.status, resp.headers
        except aiohttp.ClientConnectorError as exc:  # refused, DNS: nothing reached the API
            raise self._unreachable(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AmbiguousSubmit(f"generate sent but not answered ({type(exc).__name__}): the task may exist") from exc
        obj = _decode(raw)
        common = _common_errors(http, obj, raw, resp_headers)
        if common is not None:
            raise common
        if http == 400 and not raw.strip():
            raise FatalApiError(f"the API refused the request's Host (HTTP 400, empty body): it must be {self._host}", status=400)
        if http != 200:
            raise PermanentApiError(f"generate refused (HTTP {http}): {_message(obj, raw)}", status=http)
        if obj is None:
            if raw.strip():  # a 200 that is not JSON: something answered, perhaps after creating the task
                raise AmbiguousSubmit(f"generate answered HTTP 200 with a non-JSON body: {_message(None, raw)}")
            raise PermanentApiError("the API refused the request with an empty body (a validation error; no credits used)", status=200)
        code = obj.get("code", 200) if isinstance(obj, dict) else None
        if code in (401, 402, 429) or (isinstance(code, int) and code >= 500):
            err = _common_errors(code, obj, raw, {})
            assert err is not None
            raise err
        task_id = obj.get("taskId") if isinstance(obj, dict) else None
        if code == 200 and isinstance(task_id, str) and task_id:
            return task_id
        raise PermanentApiError(f"generate refused (code {code}): {_message(obj, raw)}", status=200)

    def _unreachable(self, exc: aiohttp.ClientConnectorError) -> Unreachable:
        return Unreachable(f"cannot reach the API at {self._base}: {exc.os_error or exc}")

    def _status_params(self, task_id: str, download: bool) -> dict[str, str]:
        params = {"apiKey": self._key, "taskId": task_id}
        if download:
            params["download"] = "true"
        return params

    def _status_error(self, http: int, obj: Any, raw: bytes, headers: Any) -> ApiError | Failed:
        common = _common_errors(http, obj, raw, headers)
        if common is not None:
            return common
        msg = obj.get("msg") if isinstance(obj, dict) else None
        if msg == "invalid_api_key":
            return AuthError("the API key was refused (invalid_api_key)", status=http)
        if msg == "method_not_allowed":
            return FatalApiError(f"the API refused the request's Host (method_not_allowed): it must be {self._host}", status=http)
        if msg == "invalid_taskId":
            return UnknownTask("the API does not know this task (invalid_taskId)", status=http)
        if http == 400:
            return Failed(reason=redact(_message(obj, raw)))
        return TransientApiError(f"unexpected status answer (HTTP {http}): {_message(obj, raw)}", status=http)

    def _interpret(self, http: int, raw: bytes, headers: Any) -> TaskStatus:
        """A status answer as a state; errors raised.

        HTTP 300 is documented as "processing" whatever word it carries (kept in
        ``Processing.status``). A 200 with a failure word (failed, cancelled, rejected…) is a
        failure; a 200 with a result URL a success; any other 200 — no ``fileURL``, or a word
        never seen before — is :class:`Unrecognised`, for the runner to count and bound.
        """
        obj = _decode(raw)
        state = str(obj.get("status", "")).strip().lower() if isinstance(obj, dict) else ""
        if http == 300:
            return Processing(state or "processing")
        if http == 200 and isinstance(obj, dict):
            if state in FAILURE_WORDS:
                said = any(key in obj for key in ("failMsg", "msg", "message"))
                return Failed(reason=redact(_message(obj, raw) if said else f"the API answered status {state!r}"))
            url = obj.get("fileURL")
            if isinstance(url, str) and url:
                return Succeeded(file_url=redact(url))
            return Unrecognised(state, redact(_message(obj, raw))[:300])
        if http == 200:
            raise TransientApiError(f"status answered HTTP 200 without JSON: {_message(obj, raw)}", status=200)
        result = self._status_error(http, obj, raw, headers)
        if isinstance(result, Failed):
            return result
        raise result

    async def status(self, task_id: str) -> TaskStatus:
        """GET a task's state."""
        try:
            async with self.session.get(self._base + STATUS_PATH, params=self._status_params(task_id, False)) as resp:
                raw = await resp.read()
                http, headers = resp.status, resp.headers
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientApiError(f"status request failed ({type(exc).__name__}): {exc}") from exc
        return self._interpret(http, raw, headers)

    @asynccontextmanager
    async def download(self, task_id: str) -> AsyncIterator[Download | Processing | Failed | Unrecognised]:
        """Ask for a task's file (``status?download=true``): the open file once it is finished, else its state.

        While a task runs or after it failed the API answers this as it answers a status call
        (300, 400 + failMsg), so one request both polls and fetches: a finished job costs one
        call fewer than status-then-download.
        """
        try:
            async with self.session.get(self._base + STATUS_PATH, params=self._status_params(task_id, True)) as resp:
                if resp.status == 200 and resp.content_type not in ("application/json", "text/html"):
                    yield Download(content_type=resp.content_type, content_length=resp.content_length, _response=resp)
                    return
                raw = await resp.read()
                http, headers = resp.status, resp.headers
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownloadError(f"download failed ({type(exc).__name__}): {exc}") from exc
        answer = self._interpret(http, raw, headers)
        if isinstance(answer, Succeeded):
            raise DownloadError(f"download answered JSON instead of the file: {_message(_decode(raw), raw)}", status=http)
        yield answer
