"""The public face of batchrunner, re-exported by the package: load, preview, run, and read what a run made.

The CLI is a thin layer over these same functions, so a library caller gets exactly what
``batchrunner run`` does, settings included. Settings resolve here, once, for both:

==============  =======================  ===========  ==========================  ======================
setting         keyword (CLI flag)       manifest     environment                 default
==============  =======================  ===========  ==========================  ======================
output folder   ``out`` (--out)          output       —                           out/<name> beside it
concurrency     ``concurrency``          concurrency  BATCHRUNNER_CONCURRENCY     4
rate            ``rate_per_s`` (--rate)  rate         BATCHRUNNER_RATE            no limit
credit cap      ``max_credits``          max_credits  BATCHRUNNER_MAX_CREDITS     no cap
storage         ``storage`` (--storage)  storage.url  BATCHRUNNER_STORAGE         none (``--sandbox``: loopback)
catalog         ``catalog``              —            BATCHRUNNER_CATALOG         the shipped one
API key         ``api_key``              —            CLIPRISE_API_KEY            — (required)
base URL        ``base_url``             —            CLIPRISE_BASE_URL           the real host
==============  =======================  ===========  ==========================  ======================

A keyword left at None falls through to the next source. Bad values from the environment
are :class:`ManifestError` problems (bad input); bad keyword values are ``ValueError``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .callbacks import resolve as resolve_callbacks
from .catalog import Catalog, load_catalog
from .client import DEFAULT_BASE_URL, Client
from .dryrun import Preview
from .dryrun import preview as _preview
from .errors import AuthError, ManifestError, Problem
from .expand import Plan, expand
from .manifest import load
from .report import requests
from .runner import EventHandler, Interrupt, RunConfig, RunResult, run_campaign, scale_expected
from .store import SYNCED_META, Store, peek_meta

if TYPE_CHECKING:
    from .sandbox import SandboxConfig

DEFAULT_CONCURRENCY = 4
SANDBOX_TIME_SCALE = 0.02  # the embedded sandbox runs 50× faster than the real API
SANDBOX_KEY = "sandbox-key"  # the embedded sandbox's throwaway key (a restarted sandbox must accept it again)
ENV_CATALOG = "BATCHRUNNER_CATALOG"
ENV_CONCURRENCY = "BATCHRUNNER_CONCURRENCY"
ENV_RATE = "BATCHRUNNER_RATE"
ENV_MAX_CREDITS = "BATCHRUNNER_MAX_CREDITS"
ENV_STORAGE = "BATCHRUNNER_STORAGE"
ENV_API_KEY = "CLIPRISE_API_KEY"
ENV_BASE_URL = "CLIPRISE_BASE_URL"
StartHandler = Callable[[Preview], None]


# -- settings ---------------------------------------------------------------------------------
def _env_value(env: Mapping[str, str], name: str, kind: type[int] | type[float], what: str, ok: Any) -> Any:
    raw = env.get(name, "")
    if raw == "":
        return None
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ManifestError([Problem(f"${name}", None, f"{raw!r} is not {what} — fix or unset it")])
    return value


def _keyword(name: str, value: Any, ok: Any, what: str) -> Any:
    if value is not None and (isinstance(value, bool) or not ok(value)):
        raise ValueError(f"{name} must be {what}, not {value!r}")
    return value


def resolve_catalog(catalog: str | Path | Catalog | None = None, *, env: Mapping[str, str] | None = None) -> Catalog:
    """The model catalog: ``catalog`` (a CSV extending the shipped one, or a :class:`Catalog`) > $BATCHRUNNER_CATALOG > shipped."""
    if isinstance(catalog, Catalog):
        return catalog
    path = catalog or (os.environ if env is None else env).get(ENV_CATALOG) or None
    loaded, problems = load_catalog(Path(path) if path else None)
    if problems:
        raise ManifestError(problems)
    return loaded


def resolve_config(
    plan: Plan | None,
    *,
    out: str | Path | None = None,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    max_credits: float | None = None,
    poll_scale: float | None = None,
    force: bool = False,
    retry_failed: bool = False,
    storage: str | None = None,
    callback_listen: str | None = None,
    callback_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> RunConfig:
    """The frozen :class:`RunConfig` of a run: each setting from the keyword, else the manifest, else the environment, else the default.

    ``plan=None`` (re-running the stored jobs, as ``retry`` does) needs ``out``.
    ``poll_scale`` scales the expected job durations that time the first poll.
    """
    env = os.environ if env is None else env
    manifest = plan.manifest if plan is not None else None
    if out is None and manifest is None:
        raise ValueError("out is required when there is no plan (which folder's jobs to run?)")

    def pick(given: Any, from_manifest: Any, from_env: Any, default: Any) -> Any:
        for value in (given, from_manifest, from_env):
            if value is not None:
                return value
        return default

    at_least_one = "a whole number ≥ 1"
    config = RunConfig(
        out_dir=Path(out) if out is not None else manifest.output,  # type: ignore[union-attr]
        concurrency=pick(
            _keyword("concurrency", concurrency, lambda v: isinstance(v, int) and v >= 1, at_least_one),
            manifest and manifest.concurrency,
            _env_value(env, ENV_CONCURRENCY, int, at_least_one, lambda v: v >= 1),
            DEFAULT_CONCURRENCY,
        ),
        rate_per_s=pick(
            _keyword("rate_per_s", rate_per_s, lambda v: v > 0, "a number > 0"),
            manifest and manifest.rate,
            _env_value(env, ENV_RATE, float, "a number of requests per second > 0", lambda v: v > 0),
            None,
        ),
        max_credits=pick(
            _keyword("max_credits", max_credits, lambda v: v >= 0, "a number ≥ 0"),
            manifest and manifest.max_credits,
            _env_value(env, ENV_MAX_CREDITS, float, "a number ≥ 0", lambda v: v >= 0),
            None,
        ),
        force=force,
        retry_failed=retry_failed,
    )
    kept = manifest.storage if manifest is not None else None
    config = replace(
        config,
        storage_url=pick(storage or None, kept and kept.url, env.get(ENV_STORAGE) or None, None),
        storage_endpoint=kept.endpoint if kept else None,
        callbacks=resolve_callbacks(manifest, listen=callback_listen, url=callback_url),
        url_lifetime_s=kept.url_lifetime_s if kept and kept.url_lifetime_s else config.url_lifetime_s,
        keep_local=kept.keep_local if kept and kept.keep_local is not None else True,
    )
    if poll_scale is not None:
        try:
            config = replace(config, expected_s=scale_expected(poll_scale))
        except ValueError as exc:
            raise ValueError(f"poll_scale {exc}") from None
    return config


# -- before a run -----------------------------------------------------------------------------
def load_plan(
    manifest: str | Path,
    *,
    catalog: str | Path | Catalog | None = None,
    strict: bool = False,
    env: Mapping[str, str] | None = None,
    out: str | Path | None = None,
) -> Plan:
    """Read a YAML or CSV manifest and expand it into every job, checked against the catalog. Sends nothing.

    Raises :class:`ManifestError` listing every problem (each with file and line). An
    unknown model is a warning in ``plan.warnings`` (an error with ``strict``). ``out`` (default:
    the manifest's ``output``) is where the plan will run: when its state already holds this very
    plan, checked, the jobs are not checked again (a resume of a million jobs starts in seconds).
    """
    loaded = load(manifest)
    checked = peek_meta(Path(out) if out is not None else loaded.output, SYNCED_META)
    return expand(loaded, resolve_catalog(catalog, env=env), strict=strict, checked=checked)


def preview(
    plan: Plan | None,
    *,
    out: str | Path | None = None,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    max_credits: float | None = None,
    force: bool = False,
    retry_failed: bool = False,
    storage: str | None = None,
    callback_listen: str | None = None,
    callback_url: str | None = None,
    env: Mapping[str, str] | None = None,
    sandbox: bool = False,
) -> Preview:
    """What :func:`run` with the same arguments would do — jobs skipped, polled, submitted, their credits — or what it would refuse.

    An exact dry run: it raises the :class:`ManifestError` (budget) or :class:`StateError`
    (output folder) that :func:`run` would raise, with the same message. Reads only.
    """
    config = resolve_config(
        plan, out=out, concurrency=concurrency, rate_per_s=rate_per_s, max_credits=max_credits,
        force=force, retry_failed=retry_failed, storage=storage, callback_listen=callback_listen, callback_url=callback_url, env=env,
    )  # fmt: skip
    return _preview(plan, replace(config, backend="sandbox") if sandbox else config)


# -- the run ----------------------------------------------------------------------------------
async def run_async(
    plan: Plan | None,
    *,
    out: str | Path | None = None,
    sandbox: bool | SandboxConfig = False,
    api_key: str | None = None,
    base_url: str | None = None,
    client: Client | None = None,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    max_credits: float | None = None,
    poll_scale: float | None = None,
    force: bool = False,
    retry_failed: bool = False,
    storage: str | None = None,
    callback_listen: str | None = None,
    callback_url: str | None = None,
    on_start: StartHandler | None = None,
    on_event: EventHandler | None = None,
    env: Mapping[str, str] | None = None,
    interrupt: Interrupt | None = None,
) -> RunResult:
    """Run or resume ``plan`` into ``out``; the async form of :func:`run`, which documents the arguments.

    ``interrupt`` (a :class:`~batchrunner.runner.Interrupt`) lets the caller stop the run from
    outside: once gracefully, twice at once.
    """
    env = os.environ if env is None else env
    sb: SandboxConfig | None = None
    if sandbox:
        from .sandbox import SandboxConfig

        sb = sandbox if isinstance(sandbox, SandboxConfig) else SandboxConfig(api_key=SANDBOX_KEY, time_scale=SANDBOX_TIME_SCALE)
        if poll_scale is None:  # poll as fast as the sandbox runs
            poll_scale = sb.time_scale
    config = resolve_config(
        plan, out=out, concurrency=concurrency, rate_per_s=rate_per_s, max_credits=max_credits,
        poll_scale=poll_scale, force=force, retry_failed=retry_failed, storage=storage,
        callback_listen=callback_listen, callback_url=callback_url, env=env,
    )  # fmt: skip
    if sb is not None:
        config = replace(config, backend="sandbox")
        from .sandbox import serve

        if sb.tasks_file is None:  # the sandbox keeps its tasks beside the state, so a resumed run finds the tasks it submitted
            sb = replace(sb, tasks_file=config.out_dir / ".batchrunner" / "sandbox-tasks.jsonl")
        async with serve(sb) as (_, url):
            return await run_campaign(
                plan, config, api_key=sb.api_key, base_url=url, on_start=on_start, on_event=on_event, interrupt=interrupt
            )
    if client is None:
        api_key = api_key or env.get(ENV_API_KEY)
        if not api_key:
            raise AuthError(f"no API key: pass api_key=, set {ENV_API_KEY}, or try the sandbox with sandbox=True")
        base_url = base_url or env.get(ENV_BASE_URL) or DEFAULT_BASE_URL
    return await run_campaign(
        plan, config, api_key=api_key, base_url=base_url, client=client, on_start=on_start, on_event=on_event, interrupt=interrupt
    )


def run(
    plan: Plan | None,
    *,
    out: str | Path | None = None,
    sandbox: bool | SandboxConfig = False,
    api_key: str | None = None,
    base_url: str | None = None,
    client: Client | None = None,
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    max_credits: float | None = None,
    poll_scale: float | None = None,
    force: bool = False,
    retry_failed: bool = False,
    storage: str | None = None,
    callback_listen: str | None = None,
    callback_url: str | None = None,
    on_start: StartHandler | None = None,
    on_event: EventHandler | None = None,
    env: Mapping[str, str] | None = None,
) -> RunResult:
    """Run or resume ``plan`` into ``out`` (default: the manifest's output folder) and return how it ended.

    ``plan=None`` re-runs the jobs stored in ``out``; with ``retry_failed`` also those the
    API failed (they cost again), as ``batchrunner retry`` does. ``sandbox=True`` (or a
    :class:`~batchrunner.sandbox.SandboxConfig`) runs against the embedded simulator:
    no key, nothing charged. Otherwise ``api_key`` (default $CLIPRISE_API_KEY) and
    ``base_url`` (default $CLIPRISE_BASE_URL, else the real host) say where to send, or
    ``client`` is an open :class:`Client` to use. ``on_start(preview)`` hears where the run
    starts (done, in flight, to submit) before its first request; ``on_event(kind, job,
    detail)`` every job event (``submitted``, ``done``, ``failed``, ``retry``, ``rate_limited``,
    ``paused``, ``tick``, …).
    Settings resolve as the module docstring says. A blocking call: from async code, await
    :func:`run_async`.

    Raises :class:`ManifestError` or :class:`StateError` before anything is sent when the
    run cannot start (exactly what :func:`preview` raises), :class:`AuthError` without a
    key. The result's ``outcome`` is complete, failed, or stopped (a refused key, no
    credits, the credit cap; ``error`` says why); ``tally`` says what this run did.
    """
    return anyio.run(
        partial(
            run_async, plan, out=out, sandbox=sandbox, api_key=api_key, base_url=base_url, client=client, concurrency=concurrency,
            rate_per_s=rate_per_s, max_credits=max_credits, poll_scale=poll_scale, force=force, retry_failed=retry_failed,
            storage=storage, callback_listen=callback_listen, callback_url=callback_url, on_start=on_start, on_event=on_event, env=env,
        )
    )  # fmt: skip


# -- after a run ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Failure:
    """A failed job: its id, model, where its file would go (``*`` for the type not yet known) and why it failed."""

    id: str
    model: str
    path: str
    error: str


@dataclass(frozen=True, slots=True)
class Status:
    """Where the campaign in an output folder stands: jobs per state, credits, failures."""

    out_dir: Path
    campaign: str | None
    counts: dict[str, int]
    credits_spent: float
    ambiguous_resubmitted: int
    submits: int
    runs: int
    failures: list[Failure] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # what was paid for: see report.json's summary.requests

    @property
    def jobs(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Result:
    """A finished job's file: its absolute ``path``, ``sha256`` and size as verified when written, and what made it."""

    id: str
    path: Path
    sha256: str
    bytes: int
    model: str
    variant: int | None
    vars: dict[str, Any]


def status(out: str | Path) -> Status:
    """Read where the campaign in ``out`` stands. Raises :class:`StateError` when ``out`` holds no state."""
    out = Path(out)
    store = Store.open(out, lock=False, create=False)
    try:
        failures = [
            Failure(r["id"], r["model"], str(json.loads(r["spec"])["path"]).replace("{ext}", "*"), r["error"] or "")
            for r in store.rows(states=["failed"])
        ]
        totals = store.totals()
        return Status(
            out_dir=out,
            campaign=store.meta("campaign"),
            counts=store.counts(),
            credits_spent=float(totals["credits_spent"]),
            ambiguous_resubmitted=int(totals["ambiguous_resubmitted"]),
            submits=int(totals["submits"]),
            runs=len(store.runs()),
            failures=failures,
            requests=requests(totals),
        )
    finally:
        store.close()


def results(out: str | Path) -> Iterator[Result]:
    """Every finished file of the campaign in ``out``, in manifest order, read from the state a page at a time.

    Raises :class:`StateError` when ``out`` holds no state.
    """
    out = Path(out)
    return _results(Store.open(out, lock=False, create=False), out)  # opened now: a folder without state raises here


def _results(store: Store, out: Path) -> Iterator[Result]:
    try:
        for r in store.rows(states=["done"]):
            spec = json.loads(r["spec"])
            yield Result(r["id"], out / r["path"], r["sha256"], int(r["bytes"] or 0), r["model"], spec.get("variant"), spec.get("vars", {}))
    finally:
        store.close()
