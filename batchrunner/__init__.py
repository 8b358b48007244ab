"""batchrunner: many Cliprise generation jobs in, finished and verified media files out.

The public API (everything else is internal and may change)::

    import batchrunner

    plan = batchrunner.load_plan("manifests/demo.yaml")        # every job, checked; sends nothing
    print(batchrunner.preview(plan, out="out/demo", sandbox=True).to_run)  # what a run would do, or why it would refuse
    result = batchrunner.run(plan, out="out/demo", sandbox=True)  # or api_key=... (default $CLIPRISE_API_KEY)
    print(result.outcome, result.tally)
    for item in batchrunner.results("out/demo"):                # finished files: path, sha256, vars
        print(item.path, item.sha256)

Errors form one tree rooted at :class:`BatchRunnerError` (see :mod:`batchrunner.errors`).
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

__version__ = "0.1.0"

# Where each public name lives. Imported on first use, so that `import batchrunner` (and the
# `batchrunner` command, which traps signals before importing anything heavy) starts fast.
_HOME = {
    **dict.fromkeys(("Failure", "Result", "Status", "load_plan", "preview", "results", "run", "run_async", "status"), "._api"),
    **dict.fromkeys(("JobSpec", "Plan"), ".expand"),
    **dict.fromkeys(("Preview", "RunTally"), ".dryrun"),
    "RunResult": ".runner",
}

if _TYPE_CHECKING:
    from ._api import Failure, Result, Status, load_plan, preview, results, run, run_async, status
    from .dryrun import Preview, RunTally
    from .errors import (
        AmbiguousSubmit,
        ApiError,
        AuthError,
        BatchRunnerError,
        DownloadError,
        FatalApiError,
        ManifestError,
        OutOfCredits,
        PermanentApiError,
        Problem,
        RateLimited,
        StateError,
        TransientApiError,
        UnknownTask,
    )
    from .expand import JobSpec, Plan
    from .runner import RunResult

__all__ = [
    "AmbiguousSubmit",
    "ApiError",
    "AuthError",
    "BatchRunnerError",
    "DownloadError",
    "Failure",
    "FatalApiError",
    "JobSpec",
    "ManifestError",
    "OutOfCredits",
    "PermanentApiError",
    "Plan",
    "Preview",
    "Problem",
    "RateLimited",
    "Result",
    "RunResult",
    "RunTally",
    "StateError",
    "Status",
    "TransientApiError",
    "UnknownTask",
    "__version__",
    "load_plan",
    "preview",
    "results",
    "run",
    "run_async",
    "status",
]


def __getattr__(name: str) -> _Any:
    home = _HOME.get(name, ".errors" if name in __all__ else None)
    if home is None:
        raise AttributeError(f"module 'batchrunner' has no attribute {name!r}")
    value = getattr(_importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
