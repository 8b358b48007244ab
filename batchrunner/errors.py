"""The one exception tree of batchrunner, and the redaction every message passes through.

    BatchRunnerError
    ├── ManifestError            bad input: a list of file:line problems (exit 2)
    ├── StateError               the output directory's state cannot be used as asked: refused, nothing sent (exit 2)
    │   ├── StateLost            results exist but the state file is missing or empty: `batchrunner recover DIR`
    │   ├── StateDamaged         the state file is damaged or not SQLite: `batchrunner recover DIR`
    │   └── StateWriteError      the state file failed during a run (disk full, I/O error): stopped (exit 1)
    ├── ReportError              report.json/csv/html could not be written (exit 1)
    ├── InputError               a local input file cannot be sent (missing, a folder, empty, not media)
    ├── StorageError             a result or input could not be stored or read: fail that job
    │   └── StorageUnavailable   nothing can be stored at all (unreachable, refused, disk full): stop the run
    ├── MediaError               a file is not whole media (of the modality asked for)
    ├── ResultWriteError         a result cannot be written where it belongs: fail that job
    │   └── OutputUnwritable     nothing can be written (disk full, quota, read-only): stop the run
    └── ApiError                 anything the Cliprise API (or the way to it) said
        ├── TransientApiError    5xx, HTML 502, dropped connection, timeout on a safe request: retry
        │   ├── RateLimited      429; ``.retry_after_s`` slows the whole run
        │   ├── Unreachable      connection refused, DNS: nothing reached the API (the run stops if it lasts)
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
    """The manifest cannot run; ``problems`` lists every reason, each with file and line.

    ``warnings`` carries what was found beside them (an unknown model, a field that looks
    misspelt), so that a refused manifest still shows every hint at once.
    """

    def __init__(self, problems: list[Problem], warnings: list[str] | None = None) -> None:
        self.problems = problems
        self.warnings = list(warnings or ())
        super().__init__("\n".join(str(p) for p in problems))


class StateError(BatchRunnerError):
    """The output directory's state cannot be used as asked (locked by another run, another campaign): nothing was sent."""


class StateLost(StateError):
    """The state file is missing, empty or unreadable beside results of an earlier run: running would pay for them again."""


class StateDamaged(StateError):
    """The state file is damaged (a corrupt page, not an SQLite file): rebuild it with ``batchrunner recover DIR``."""


class StateWriteError(StateError):
    """The state file failed while in use (disk full, I/O error, damage found mid-run). Not bad input: the run may have sent
    requests, so it stops with exit 1; the task ids received before the failure are committed first when space allows."""


class ReportError(BatchRunnerError):
    """A report (report.json, report.csv, report.html) could not be written: disk full, read-only folder."""


class InputError(BatchRunnerError):
    """A local input file cannot be sent; ``path`` is the file. The manifest layer adds the file:line naming it."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class StorageError(BatchRunnerError):
    """One object could not be stored, listed or read (a folder where a file is needed, a refused write)."""


class StorageUnavailable(StorageError):
    """The storage cannot be used at all (unreachable, credentials refused, no such bucket, disk full)."""


class MediaError(BatchRunnerError):
    """A file is not whole media of a known kind, or not of the modality the job asked for (the reason says which)."""


class ResultWriteError(BatchRunnerError):
    """A result (or its sidecar, or a report) cannot be written where it belongs: that job fails with the reason.

    ``fatal`` is True for :class:`OutputUnwritable`: no other write can succeed either.
    """

    fatal = False


class OutputUnwritable(ResultWriteError):
    """Nothing can be written in the output folder (disk full, quota, read-only file system): the run stops, state saved."""

    fatal = True


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


class Unreachable(TransientApiError):
    """The API could not be reached at all (connection refused, DNS): the request provably did not arrive."""


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
