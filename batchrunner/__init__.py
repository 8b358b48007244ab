"""batchrunner: many Cliprise generation jobs in, finished and verified media files out.

The public API (everything else is internal and may change)::

    import batchrunner

    plan = batchrunner.load_plan("manifests/demo.yaml")        # every job, checked; sends nothing
    print(batchrunner.preview(plan, out="out/demo").to_run)     # what a run would do, or why it would refuse
    result = batchrunner.run(plan, out="out/demo", sandbox=True)  # or api_key=... (default $CLIPRISE_API_KEY)
    print(result.outcome, result.tally)
    for item in batchrunner.results("out/demo"):                # finished files: path, sha256, vars
        print(item.path, item.sha256)

Errors form one tree rooted at :class:`BatchRunnerError` (see :mod:`batchrunner.errors`).
"""

from ._api import Failure, Result, Status, load_plan, preview, results, run, run_async, status
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
from .preview import Preview, RunTally
from .runner import RunResult

__version__ = "0.1.0"

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
