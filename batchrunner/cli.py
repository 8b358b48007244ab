"""The ``batchrunner`` command: argument parsing, printing and exit codes only.

Exit codes: 0 every job done, 1 some jobs failed or the run was stopped (state saved),
2 bad input (nothing sent), 130 interrupted (state saved; run again to resume).
Settings resolve once, as flag > manifest > environment > default.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from . import __version__
from .callbacks import resolve as resolve_callbacks
from .catalog import Catalog, load_catalog
from .errors import BatchRunnerError, ManifestError, Problem, StateError
from .expand import Plan, expand
from .manifest import load
from .runner import RunConfig, RunResult, run_campaign, scale_expected
from .store import Job, Store, peek

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
SANDBOX_TIME_SCALE = 0.02  # the embedded sandbox runs 50× faster than the real API

EPILOG_MAIN = """examples:
  batchrunner run manifests/demo.yaml --sandbox      # the demo, no API key needed
  batchrunner plan manifests/demo.yaml               # count jobs and credits, send nothing
  CLIPRISE_API_KEY=... batchrunner run campaign.yaml --out out/campaign
  batchrunner status out/campaign                    # where a run stands
  batchrunner retry out/campaign --sandbox           # failed jobs again
"""


def _env_number(name: str, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ManifestError([Problem(f"${name}", None, f"{raw!r} is not a {kind.__name__} — fix or unset it")]) from None


def _pick(flag: Any, manifest: Any, env_name: str, kind: type, default: Any) -> Any:
    """flag > manifest > environment > default."""
    for value in (flag, manifest, _env_number(env_name, kind)):
        if value is not None:
            return value
    return default


def _catalog(args: argparse.Namespace) -> Catalog:
    path = args.catalog or os.environ.get("BATCHRUNNER_CATALOG") or None
    catalog, problems = load_catalog(Path(path) if path else None)
    if problems:
        raise ManifestError(problems)
    return catalog


def _plan(args: argparse.Namespace) -> Plan:
    manifest = load(args.manifest)
    return expand(manifest, _catalog(args), strict=args.strict)


def _out_dir(args: argparse.Namespace, plan: Plan) -> Path:
    return Path(args.out) if args.out else plan.manifest.output


def _warn(plan: Plan, quiet: bool) -> None:
    if not quiet:
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)


# -- plan ------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    plan = _plan(args)
    out = _out_dir(args, plan)
    done, _ = peek(out)
    skip = sum(1 for s in plan.specs if s.id in done)
    todo = [s for s in plan.specs if s.id not in done]
    data = {
        "campaign": plan.manifest.name,
        "jobs": len(plan.specs),
        "credits": plan.credits(),
        "credits_to_run": plan.credits(todo),
        "by_model": plan.by_model(),
        "by_modality": plan.by_modality(),
        "output": str(out),
        "already_done": skip,
        "to_run": len(todo),
        "paths": [s.path for s in plan.specs[:10]],
        "warnings": plan.warnings,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    _warn(plan, False)
    print(f"{plan.manifest.name}: {len(plan.specs)} jobs → {out}")
    for model, row in sorted(plan.by_model().items()):
        price = "unknown" if row["credits"] is None else f"{row['credits']:g} credits"
        print(f"  {model:<24} {row['modality']:<7} {row['jobs']:>7} jobs   {price}")
    total = data["credits"]
    print(f"  credits: {'unknown (set prices under credits: in the manifest)' if total is None else f'{total:g}'}")
    if done:
        print(f"  a re-run skips {skip} finished jobs and runs {len(todo)}")
    print("  first paths:")
    for spec in plan.specs[:10]:
        print(f"    {spec.path}")
    return EXIT_OK


# -- run / retry ------------------------------------------------------------------------------
class Progress:
    """tqdm on a terminal; a plain line every few seconds otherwise; nothing with --quiet."""

    def __init__(self, total: int, quiet: bool, verbose: bool) -> None:
        self.total, self.quiet, self.verbose = total, quiet, verbose
        self.counts = {"submitted": 0, "done": 0, "failed": 0}
        self.bar: Any = None
        self.last = time.monotonic()  # plain lines every few seconds, the first after a few seconds
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped]

            self.bar = tqdm(total=total, unit="job", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, kind: str, job: Job | None, detail: str) -> None:
        if kind in self.counts:
            self.counts[kind] += 1
        if self.verbose:
            print(f"[{kind}] {job.id if job else ''} {detail}", file=sys.stderr)
        if self.bar is not None:
            if kind in ("done", "failed"):
                self.bar.update(1)
            self.bar.set_postfix(submitted=self.counts["submitted"], failed=self.counts["failed"], refresh=False)
        elif not self.quiet and time.monotonic() - self.last > 5:
            self.last = time.monotonic()
            c = self.counts
            print(f"progress: {c['done']}/{self.total} done, {c['failed']} failed, {c['submitted']} submitted", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _config(args: argparse.Namespace, plan: Plan | None, out: Path, retry: bool) -> RunConfig:
    m = plan.manifest if plan else None
    config = RunConfig(
        out_dir=out,
        concurrency=_pick(args.concurrency, m and m.concurrency, "BATCHRUNNER_CONCURRENCY", int, 4),
        rate_per_s=_pick(args.rate, m and m.rate, "BATCHRUNNER_RATE", float, None),
        max_credits=_pick(args.max_credits, m and m.max_credits, "BATCHRUNNER_MAX_CREDITS", float, None),
        force=getattr(args, "force", False),
        retry_failed=retry,
        callbacks=resolve_callbacks(m, listen=args.callback_listen, url=args.callback_url),
    )
    if config.concurrency < 1:
        raise ManifestError([Problem("--concurrency", None, "must be at least 1")])
    if args.poll_scale is not None:
        flag, scale = "--poll-scale", args.poll_scale
    elif args.sandbox:
        flag, scale = "--sandbox-time-scale", args.sandbox_time_scale
    else:
        return config
    try:
        return replace(config, expected_s=scale_expected(scale))
    except ValueError as exc:
        raise ManifestError([Problem(flag, None, str(exc))]) from None


async def _run(args: argparse.Namespace, plan: Plan | None, config: RunConfig, progress: Progress) -> RunResult:
    if not args.sandbox:
        key = os.environ.get("CLIPRISE_API_KEY", "")
        base = os.environ.get("CLIPRISE_BASE_URL") or "https://business.api.cliprise.app"
        return await run_campaign(plan, config, api_key=key, base_url=base, on_event=progress)
    from .sandbox import SandboxConfig, serve

    key = "sandbox-key"  # the embedded sandbox's throwaway key (a restarted sandbox must accept it again)
    # the embedded sandbox keeps its tasks beside the state, so a resumed demo finds the tasks it submitted
    config.out_dir.joinpath(".batchrunner").mkdir(parents=True, exist_ok=True)
    sandbox = SandboxConfig(
        api_key=key, time_scale=args.sandbox_time_scale, failure_rate=args.sandbox_failure_rate, seed=secrets.randbits(32),
        tasks_file=config.out_dir / ".batchrunner" / "sandbox-tasks.jsonl",
    )  # fmt: skip
    async with serve(sandbox) as (_, url):
        return await run_campaign(plan, config, api_key=key, base_url=url, on_event=progress)


def _execute(args: argparse.Namespace, plan: Plan | None, out: Path, retry: bool) -> int:
    if not args.sandbox and not os.environ.get("CLIPRISE_API_KEY"):
        print("error: No API key: set CLIPRISE_API_KEY, or try the demo with --sandbox", file=sys.stderr)
        return EXIT_BAD_INPUT
    config = _config(args, plan, out, retry)
    total = len(plan.specs) if plan else sum(_stored_counts(out).values())
    progress = Progress(total, args.quiet, args.verbose)
    try:
        result = anyio.run(_run, args, plan, config, progress)
    except KeyboardInterrupt:
        progress.close()
        print(f"\ninterrupted: state saved in {out}; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    progress.close()
    counts = result.counts
    if not args.quiet:
        parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        print(f"{result.outcome}: {parts or 'no jobs'} → {out}/report.html")
        if "callbacks" in result.summary:
            cb = result.summary["callbacks"]
            print(
                f"callbacks: {cb['received']} received, {cb['refused']} refused; "
                f"{cb['announced']} of {cb['finished']} finishes announced by one"
            )
        if result.summary.get("ambiguous_resubmitted"):
            print(f"note: {result.summary['ambiguous_resubmitted']} submits were ambiguous and resubmitted (see report.json)")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    if result.outcome == "complete":
        return EXIT_OK
    return EXIT_FAILED


def _stored_counts(out: Path) -> dict[str, int]:
    store = Store.open(out, lock=False, create=False)
    try:
        return store.counts()
    finally:
        store.close()


def cmd_run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    _warn(plan, args.quiet)
    return _execute(args, plan, _out_dir(args, plan), retry=False)


def cmd_retry(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    _stored_counts(out)  # refuses a directory with no state
    return _execute(args, None, out, retry=True)


# -- status / report / models / sandbox ----------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    store = Store.open(Path(args.dir), lock=False, create=False)
    try:
        counts = store.counts()
        totals = store.totals()
        failures = [(r["id"], r["model"], r["error"]) for r in store.rows(states=["failed"])]
        campaign = store.meta("campaign")
        runs = store.runs()
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "campaign": campaign,
                    "counts": counts,
                    **totals,
                    "failed": [dict(zip(("id", "model", "error"), f, strict=True)) for f in failures],
                },
                indent=2,
            )
        )
        return EXIT_OK
    print(f"{campaign}: {sum(counts.values())} jobs in {args.dir} ({len(runs)} runs)")
    for state in ("done", "failed", "submitted", "submitting", "pending"):
        if counts.get(state):
            print(f"  {state:<12} {counts[state]}")
    print(f"  credits spent {totals['credits_spent']:g}; ambiguous resubmits {totals['ambiguous_resubmitted']}")
    for job_id, model, error in failures[:50]:
        print(f"  failed {job_id} ({model}): {error}")
    if len(failures) > 50:
        print(f"  … and {len(failures) - 50} more in report.csv")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_reports

    store = Store.open(Path(args.dir), lock=False, create=False)
    try:
        summary = write_reports(store)
    finally:
        store.close()
    print(f"wrote {args.dir}/report.json, report.csv, report.html ({summary['jobs']} jobs)")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    models = catalog.by_modality(args.modality)
    if args.json:
        rows = [
            {"id": m.id, "modality": m.modality, "input_style": m.input_style, "credits": m.credits, "alias_of": m.alias_of,
             "required": list(m.required), "parameters": {p: list(m.enums.get(p, ())) for p in m.parameters}}
            for m in models
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for m in models:
        extra = (
            f"alias of {m.alias_of}"
            if m.alias_of
            else ", ".join(f"{p}={'|'.join(m.enums[p])}" if p in m.enums else p for p in m.parameters)
        )
        price = "—" if m.credits is None else f"{m.credits:g}"
        print(f"{m.id:<22} {m.modality:<6} {m.input_style:<9} credits {price:<6} {extra}")
    return EXIT_OK


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import SandboxConfig, serve

    config = SandboxConfig(
        api_key=args.key, seed=args.seed, time_scale=args.time_scale, failure_rate=args.failure_rate,
        p_429=args.p_429, p_5xx=args.p_5xx, p_html502=args.p_html502, p_drop=args.p_drop, p_truncate=args.p_truncate,
        rate_limit_per_s=args.rate_limit, shape=args.shape, credits=args.credits,
    )  # fmt: skip

    async def serve_forever() -> None:
        async with serve(config, host=args.host, port=args.port) as (_, url):
            print(f"sandbox listening on {url} (key: {args.key}); CLIPRISE_BASE_URL={url}", flush=True)
            await anyio.sleep_forever()

    try:
        anyio.run(serve_forever)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="batchrunner",
        description="Turn a manifest of Cliprise generation jobs into finished, verified files.",
        epilog=EPILOG_MAIN,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"batchrunner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, what: str, *examples: str) -> argparse.ArgumentParser:
        """A subcommand whose --help ends with its examples."""
        epilog = ("examples:" if len(examples) > 1 else "example:") + "".join(f"\n  {e}" for e in examples)
        return sub.add_parser(name, help=what, formatter_class=fmt, epilog=epilog)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--catalog", metavar="FILE", help="a catalog CSV extending the shipped one (env BATCHRUNNER_CATALOG)")
        p.add_argument("--strict", action="store_true", help="an unknown model is an error, not a warning")

    def running(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sandbox", action="store_true", help="run against the embedded sandbox (no API key, nothing charged)")
        p.add_argument(
            "--concurrency", type=int, help="jobs in flight at once (manifest 'concurrency', env BATCHRUNNER_CONCURRENCY, default 4)"
        )
        p.add_argument("--rate", type=float, help="generate requests per second at most (manifest 'rate', env BATCHRUNNER_RATE)")
        p.add_argument(
            "--max-credits", type=float, help="refuse or stop past this many credits (manifest 'max_credits', env BATCHRUNNER_MAX_CREDITS)"
        )
        p.add_argument("--quiet", "-q", action="store_true", help="print only errors and the final line")
        p.add_argument("--verbose", "-v", action="store_true", help="print every job event")
        p.add_argument("--sandbox-time-scale", type=float, default=SANDBOX_TIME_SCALE, help=argparse.SUPPRESS)
        p.add_argument(
            "--poll-scale", type=float, help="scale the expected job durations that time the first poll (e.g. 0.01 against a fast sandbox)"
        )
        p.add_argument("--sandbox-failure-rate", type=float, default=0.0, help="with --sandbox: share of tasks the sandbox fails")
        p.add_argument(
            "--callback-listen",
            metavar="HOST:PORT",
            help="receive the API's callbacks here; polls wake early (manifest 'callbacks.listen')",
        )
        p.add_argument(
            "--callback-url",
            metavar="URL",
            help="the public https:// base URL that reaches --callback-listen (manifest 'callbacks.url'; default: the listen address)",
        )

    p = command(
        "run",
        "run or resume a campaign",
        "batchrunner run manifests/demo.yaml --sandbox",
        "CLIPRISE_API_KEY=... batchrunner run campaign.yaml --out out/campaign --concurrency 16 --rate 5",
    )
    p.add_argument("manifest", help="a YAML or CSV manifest")
    p.add_argument("--out", metavar="DIR", help="output directory (default: the manifest's 'output', or out/<name> beside it)")
    p.add_argument("--force", action="store_true", help="adopt an output directory that holds another campaign's state")
    common(p)
    running(p)
    p.set_defaults(func=cmd_run)

    p = command(
        "plan",
        "validate and count a manifest; sends nothing",
        "batchrunner plan manifests/demo.yaml",
        "batchrunner plan manifests/demo.yaml --json",
    )
    p.add_argument("manifest")
    p.add_argument("--out", metavar="DIR", help="output directory whose state tells what a re-run skips")
    p.add_argument("--json", action="store_true", help="print one JSON object (jobs, credits, by_model, …)")
    common(p)
    p.set_defaults(func=cmd_plan)

    p = command("status", "counts per state and failures of an output directory", "batchrunner status out/demo")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = command("retry", "put failed jobs back to work and run them", "batchrunner retry out/demo --sandbox")
    p.add_argument("dir")
    running(p)
    p.set_defaults(func=cmd_retry)

    p = command("report", "rewrite report.json, report.csv and report.html", "batchrunner report out/demo")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    p = command("models", "list the model catalog", "batchrunner models --modality video", "batchrunner models --json")
    p.add_argument("--modality", choices=("image", "video", "audio"))
    p.add_argument("--json", action="store_true")
    common(p)
    p.set_defaults(func=cmd_models)

    p = command("sandbox", "serve the simulated API for other tools", "batchrunner sandbox --port 8080 --time-scale 0.01 --p-429 0.05")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--key", default="sandbox-key", help="the API key it accepts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0, help="real seconds per simulated second")
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--p-429", type=float, default=0.0)
    p.add_argument("--p-5xx", type=float, default=0.0)
    p.add_argument("--p-html502", type=float, default=0.0)
    p.add_argument("--p-drop", type=float, default=0.0)
    p.add_argument("--p-truncate", type=float, default=0.0)
    p.add_argument("--rate-limit", type=float, default=None, help="generate requests per second before 429")
    p.add_argument("--shape", choices=("array", "object", "mixed"), default="array")
    p.add_argument("--credits", type=float, default=None, help="account balance (402 when spent)")
    p.set_defaults(func=cmd_sandbox)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    # `docker stop`, systemd: stop exactly as Ctrl-C does (the event loop's own SIGINT handling), state saved
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        return int(args.func(args))
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing was sent.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StateError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BatchRunnerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
