"""The one exception tree of batchrunner, and the redaction every message passes through.

    BatchRunnerError
    ├── ManifestError            bad input: a list of file:line problems (exit 2)
    ├── StateError               the output directory cannot be used (locked, another campaign)
    └── ApiError                 anything the Cliprise API (or the way to it) said
        ├── TransientApiError    5xx, HTML 502, dropped connection, timeout on a safe request: retry
        │   ├── RateLimited      429; ``.retry_after_s`` slows the whole run
        │   └── DownloadError    a truncated or broken download: fetch again
        ├── PermanentApiError    the API refused this request (validation, failed task): fail the job
        │   └── UnknownTask      the API does not know a task id we hold (invalid_taskId)
        ├── FatalApiError        the run cannot go on: stop cleanly, state saved
        │   ├── AuthError        401 / invalid_api_key
        │   └── OutOfCredits     402
        └── AmbiguousSubmit      a generate POST may have reached the API: never retried blindly

The runner decides by class, never by message text. Every message is passed through
:func:`redact` when the exception is made, so an API key cannot leak through ``str()``,
``repr()``, a log line or the state file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# API keys in a query or a header, and callback capability tokens (batchrunner.callbacks: .../cb/<job id>/<token>)
_KEY_SHAPES = re.compile(r"(apiKey=)[^&\s\"'<>]*|(Bearer\s+)[^\s\"',]+|(/cb/[^/\s\"'<>]+/)[0-9a-f]{32}", re.IGNORECASE)
_secrets: set[str] = set()


def register_secret(secret: str) -> None:
    """Remember a secret so that :func:`redact` removes it wherever it appears, not only after ``apiKey=``."""
    if len(secret) >= 4:
        _secrets.add(secret)


def redact(text: str) -> str:
    """Return ``text`` with every API key removed: ``apiKey=`` query values, Bearer tokens and known secrets."""
    if _KEY_SHAPES.search(text):
        text = _KEY_SHAPES.sub(lambda m: (m[1] or m[2] or m[3]) + "REDACTED", text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "REDACTED")
    return text


class BatchRunnerError(Exception):
    """Root of every error batchrunner raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the input, at a place the user can open."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class ManifestError(BatchRunnerError):
    """The manifest cannot run; ``problems`` lists every reason, each with file and line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class StateError(BatchRunnerError):
    """The output directory's state cannot be used as asked (locked by another run, another campaign)."""


class ApiError(BatchRunnerError):
    """Something the API, or the network on the way to it, answered. ``status`` is the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransientApiError(ApiError):
    """Worth retrying after a pause: the request did not take effect, or repeating it is safe."""


class RateLimited(TransientApiError):
    """HTTP 429. ``retry_after_s`` is the API's Retry-After in seconds (None when it gave none)."""

    def __init__(self, message: str, *, retry_after_s: float | None, status: int | None = 429) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class DownloadError(TransientApiError):
    """A result download was cut short or unreadable; the task's result can be fetched again."""


class PermanentApiError(ApiError):
    """The API refused this request for good (validation error, unknown task, failed job)."""


class UnknownTask(PermanentApiError):
    """The status endpoint answered ``invalid_taskId`` for a task we submitted: the task is lost."""


class FatalApiError(ApiError):
    """No further request can succeed (bad key, no credits): the run stops, state saved."""


class AuthError(FatalApiError):
    """The API key is missing or invalid."""


class OutOfCredits(FatalApiError):
    """The account has no API credits left (HTTP 402)."""


class AmbiguousSubmit(ApiError):
    """A generate POST was sent but no answer came back: the API may have created (and charged) a task."""
