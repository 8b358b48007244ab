"""The ``batchrunner`` command: argument parsing, printing and exit codes only.

Exit codes: 0 every job done, 1 some jobs failed or the run was stopped (state saved),
2 bad input (nothing sent), 130 interrupted (state saved; run again to resume).
Settings resolve in the library (flag > manifest > environment > default), shared with the Python API.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import anyio

from . import __version__, _api, pipeline
from .dryrun import Preview
from .errors import BatchRunnerError, ManifestError, StateError, StateWriteError, StorageUnavailable
from .expand import Plan
from .runner import Interrupt, RunResult, scale_expected
from .store import Job, Store

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
PLAIN_EVERY_S = 2.0  # without a terminal, a progress line at least this often (the runner ticks every second)

EPILOG_MAIN = """examples:
  batchrunner run manifests/demo.yaml --sandbox      # the demo, no API key needed
  batchrunner plan manifests/demo.yaml               # count jobs and credits, send nothing
  CLIPRISE_API_KEY=... batchrunner run campaign.yaml --out out/campaign
  batchrunner status out/campaign                    # where a run stands
  batchrunner retry out/campaign --sandbox           # failed jobs again
"""


def _warn(plan: Plan, quiet: bool) -> None:
    if not quiet:
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)


def _load(args: argparse.Namespace) -> Plan:
    return _api.load_plan(args.manifest, catalog=args.catalog, strict=args.strict, out=getattr(args, "out", None))


def _settings(args: argparse.Namespace, retry: bool) -> dict[str, Any]:
    """The run settings given on the command line; the library resolves the rest (manifest > environment > default)."""
    return {
        "out": getattr(args, "out", None) or getattr(args, "dir", None),
        "concurrency": getattr(args, "concurrency", None),
        "rate_per_s": getattr(args, "rate", None),
        "max_credits": args.max_credits,
        "force": getattr(args, "force", False),
        "retry_failed": retry,
        "storage": getattr(args, "storage", None),
        "callback_listen": getattr(args, "callback_listen", None),
        "callback_url": getattr(args, "callback_url", None),
    }


# -- plan ------------------------------------------------------------------------------------
def _rerun_line(start: Preview) -> str:
    """What a re-run does, in one sentence: skipped, run, and why some are run again."""
    why = []
    if start.rejected:
        why.append(f"{start.rejected} rejected in review: made again as new takes")
    if start.files_gone:
        why.append(f"{start.files_gone} because their result file is gone")
    if start.in_flight:
        why.append(f"{start.in_flight} already submitted: fetched, not paid again")
    if start.ambiguous:
        why.append(f"{start.ambiguous} caught mid-submit by a hard kill: resubmitted, possibly paid twice")
    line = f"a re-run skips {start.done} finished jobs and runs {start.to_run}" + (f" ({'; '.join(why)})" if why else "")
    if start.stays_failed:
        line += f"; {start.stays_failed} failed jobs stay failed (`batchrunner retry DIR` runs them)"
    return line


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _load(args)
    _warn(plan, False)
    start = _api.preview(plan, sandbox=args.sandbox, **_settings(args, retry=False))  # refuses exactly what `run` refuses
    if args.json:
        data = {
            "campaign": plan.manifest.name,
            "jobs": len(plan.specs),
            "credits": plan.credits(),
            "credits_to_run": start.credits_to_submit,
            "by_model": plan.by_model(),
            "by_modality": plan.by_modality(),
            "output": str(start.out_dir),
            "already_done": start.done,
            "to_run": start.to_run,
            "to_submit": start.to_submit,
            "in_flight": start.in_flight,
            "files_gone": start.files_gone,
            "rejected_to_redo": start.rejected,
            "ambiguous": start.ambiguous,
            "stays_failed": start.stays_failed,
            "paths": [s.path for s in plan.specs[:10]],
            "warnings": plan.warnings,
        }
        if plan.reference_at is not None and (steps := pipeline.steps(plan.specs)):  # pipelines (a pass over every job)
            data["steps"] = [{"step": s.name, "model": s.model, "jobs": s.jobs, "credits": s.credits, "uses": s.uses} for s in steps]
            data["redo"] = [{"step": step, "why": why, "jobs": n} for step, why, n in start.redo]
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"{plan.manifest.name}: {len(plan.specs)} jobs → {start.out_dir}")
    for model, row in sorted(plan.by_model().items()):
        price = "unknown" if row["credits"] is None else f"{row['credits']:g} credits"
        print(f"  {model:<24} {row['modality']:<7} {row['jobs']:>7} jobs   {price}")
    total = plan.credits()
    print(f"  credits: {'unknown (set prices under credits: in the manifest)' if total is None else f'{total:g}'}")
    _print_steps(plan, start)
    if start.resuming:
        print(f"  {_rerun_line(start).replace('DIR', shlex.quote(str(start.out_dir)))}")
        if start.credits_to_submit is not None and start.to_submit:
            print(f"  credits to run: {start.credits_to_submit:g} ({start.spent:g} already spent)")
    print("  first paths:")
    for spec in plan.specs[:10]:
        print(f"    {spec.path}")
    if args.sandbox:
        out = f" --out {shlex.quote(args.out)}" if args.out else ""
        print(f"  to run it: batchrunner run {shlex.quote(args.manifest)} --sandbox{out}")
    elif not os.environ.get(_api.ENV_API_KEY):
        print(f"  to run it: set {_api.ENV_API_KEY}, or try it on the embedded sandbox with --sandbox")
    return EXIT_OK


def _print_steps(plan: Plan, start: Preview) -> None:
    """A pipeline's steps (jobs, credits, the steps each uses), and why a re-run makes what it makes."""
    steps = pipeline.steps(plan.specs) if plan.reference_at is not None else []  # a pass over every job: pipelines only
    if not steps:
        return
    print("  steps (a job waits for the results it uses; every step shares the concurrency):")
    for s in steps:
        price = "unknown" if s.credits is None else f"{s.credits:g} credits"
        uses = f"   uses {', '.join(s.uses)}" if s.uses else ""
        print(f"    {s.name:<28} {s.model:<22} {s.jobs:>6} jobs   {price}{uses}")
    if start.redo:
        print("  a re-run makes again:")
        for step, why, n in start.redo:
            print(f"    {step:<28} {n:>6} jobs: {why}")


# -- run / retry ------------------------------------------------------------------------------
def _clock_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _has_size(stream: TextIO) -> bool:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return size.columns > 0 and size.lines > 0


class Progress:
    """Where a run stands, on stderr: tqdm on a terminal, a plain line every few seconds otherwise, nothing with --quiet.

    It starts from what the run starts from (:meth:`begin`, the run's ``on_start``: on resume
    the bar begins at the jobs already finished), counts the runner's events, and shows what
    the run waits for: the runner's ``tick`` event (at least once a second, its text saying
    what it waits for) redraws the bar and its clock, ``paused`` (a 429: "rate-limited until
    12:03:04 …") is printed at once, and ``stopping`` (what a stopping run still waits for)
    even with --quiet. Kinds it does not know are ignored (shown with --verbose).
    """

    def __init__(self, *, quiet: bool, verbose: bool, stream: TextIO | None = None, tty: bool | None = None, clock: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet, self.verbose, self.tty = quiet, verbose, tty
        self.clock = clock or time.monotonic
        self.total = self.done_before = self.failed_before = self.in_flight = 0
        self.done = self.failed = self.retries = self.rate_limited = 0
        self.waiting = ""
        self.started = self.last_line = self.clock()
        self.bar: Any = None

    def begin(self, start: Preview) -> None:
        """The run starts (``on_start``): from what it found done, in flight and to submit."""
        self.total = start.jobs
        self.done_before, self.failed_before = start.done, start.stays_failed
        self.in_flight = start.in_flight
        self.started = self.last_line = self.clock()
        if self.quiet:
            return
        if start.resuming:
            line = f"resuming: {start.done} done, {start.in_flight} in flight, {start.to_submit} to submit"
            extra = []
            if start.files_gone:
                extra.append(f"{start.files_gone} of them because their result file is gone")
            if start.ambiguous:
                extra.append(f"{start.ambiguous} of them caught mid-submit: possibly paid twice")
            if start.stays_failed:
                extra.append(f"{start.stays_failed} failed earlier, left alone: `batchrunner retry` runs them")
            print(line + (f" ({'; '.join(extra)})" if extra else ""), file=self.stream, flush=True)
        if self.stream.isatty() if self.tty is None else self.tty:
            from tqdm import tqdm  # type: ignore[import-untyped]

            sized = _has_size(self.stream)  # tqdm hides its bar on a terminal of no size (a bare pty)
            self.bar = tqdm(
                total=self.total, initial=self.finished, unit="job", file=self.stream, smoothing=0.1,
                dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
            )  # fmt: skip

    @property
    def finished(self) -> int:
        return self.done_before + self.failed_before + self.done + self.failed

    def __call__(self, kind: str, job: Job | None, detail: str) -> None:
        if kind == "submitted":
            self.in_flight += 1
        elif kind in ("done", "failed"):
            if kind == "done":
                self.done += 1
            else:
                self.failed += 1
            if job is not None and job.task_id:
                self.in_flight = max(0, self.in_flight - 1)
        elif kind == "retry":
            self.retries += 1
        elif kind == "rate_limited":
            self.rate_limited += 1
        elif kind == "tick":
            self.waiting = detail
        if kind == "stopping":  # said at once, even with --quiet: the user is waiting for the run to end
            self._write(detail)
        if self.quiet:
            return
        if self.verbose and kind != "tick":
            self._echo(f"[{kind}] {job.id if job else ''} {detail}")
        if kind == "paused" and not self.verbose:
            self._write(f"paused: {detail}")
        if kind == "callbacks" and not self.verbose:
            self._write(f"warning: {detail}")
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(), refresh=False)
            if kind in ("done", "failed"):
                self.bar.update(1)
            elif kind in ("tick", "paused"):
                self.bar.refresh()
        elif self.clock() - self.last_line >= PLAIN_EVERY_S:
            self._write(self.line())

    def _postfix(self) -> str:
        parts = [f"{self.in_flight} in flight"]
        if self.failed_before + self.failed:
            parts.append(f"{self.failed_before + self.failed} failed")
        if self.retries:
            parts.append(f"{self.retries} retries")
        if self.rate_limited:
            parts.append(f"{self.rate_limited}× 429")
        if self.waiting:
            parts.append(self.waiting)
        return ", ".join(parts)

    def line(self) -> str:
        """The plain progress line: counts, retries and 429s, what the run waits for, the ETA."""
        text = (
            f"progress: {self.done_before + self.done}/{self.total} done, {self.failed_before + self.failed} failed, "
            f"{self.in_flight} in flight"
        )
        if self.retries:
            text += f", {self.retries} retries"
        if self.rate_limited:
            text += f", {self.rate_limited}× 429"
        if self.waiting:
            text += f"; {self.waiting}"
        elapsed = self.clock() - self.started
        ran = self.done + self.failed
        if ran and elapsed > 0 and self.finished < self.total:
            text += f"; ETA {_clock_time((self.total - self.finished) * elapsed / ran)}"
        return text

    def _write(self, text: str) -> None:
        self.last_line = self.clock()
        self._echo(text)

    def _echo(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _summary(result: RunResult, out: Path) -> str:
    """The last line: what THIS run did."""
    t = result.tally
    assert t is not None
    line = f"{result.outcome}: ran {t.ran} ({t.done} done), skipped {t.skipped} already done, {t.failed} failed"
    if t.left:
        line += f", {t.left} not run yet"
    if t.possibly_paid_twice:
        line += f", {t.possibly_paid_twice} possibly paid twice (submits whose answer was lost were sent again; see report.json)"
    if "reports" in result.summary:  # an interrupted big campaign: the reports were left for later
        return f"{line}; reports {result.summary['reports']}".replace("DIR", shlex.quote(str(out)))
    return f"{line} → {out / 'report.html'}"


async def _run(args: argparse.Namespace, plan: Plan | None, settings: dict[str, Any], progress: Progress) -> RunResult:
    """The run, stopped gracefully by the first SIGINT/SIGTERM and at once by the second."""
    interrupt = Interrupt()
    try:
        async with anyio.create_task_group() as tg:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

                async def watch() -> None:
                    async for _ in signals:
                        interrupt.request()

                tg.start_soon(watch)
                result = await _campaign(args, plan, settings, progress, interrupt)
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the campaign's own error (bad input, state), plainly
        raise group.exceptions[0] from None
    return result


async def _campaign(
    args: argparse.Namespace, plan: Plan | None, settings: dict[str, Any], progress: Progress, interrupt: Interrupt
) -> RunResult:
    """The run itself, through the public API: the flags given; the library resolves the rest."""
    sandbox: Any = False
    if args.sandbox:
        from .sandbox import SandboxConfig

        sandbox = SandboxConfig(
            api_key=_api.SANDBOX_KEY, time_scale=args.sandbox_time_scale, failure_rate=args.sandbox_failure_rate,
            seed=secrets.randbits(32),
        )  # fmt: skip
    return await _api.run_async(
        plan, sandbox=sandbox, poll_scale=args.poll_scale, on_start=progress.begin, on_event=progress, interrupt=interrupt, **settings
    )


def _execute(args: argparse.Namespace, plan: Plan | None, retry: bool) -> int:
    if not args.sandbox and not os.environ.get(_api.ENV_API_KEY):
        print(f"error: No API key: set {_api.ENV_API_KEY}, or try the demo with --sandbox", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = _settings(args, retry)
    out = _api.resolve_config(plan, **settings).out_dir
    progress = Progress(quiet=args.quiet, verbose=args.verbose)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        result: RunResult | None = anyio.run(_run, args, plan, settings, progress)
    except KeyboardInterrupt:
        result = None
    finally:  # the run's signal receiver left the defaults behind: a signal from here on still exits 130 quietly
        for signum, handler in zip((signal.SIGINT, signal.SIGTERM), handlers, strict=True):
            if handler is not None:
                signal.signal(signum, handler)
    progress.close()
    if result is None or result.outcome == "interrupted":
        print(
            f"\ninterrupted: ran {progress.done + progress.failed} ({progress.done} done), {progress.failed} failed; "
            f"state saved in {out}; run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(_summary(result, out))
    failed = result.counts.get("failed", 0)
    if failed:
        where = shlex.quote(str(out))
        retry_cmd = f"batchrunner retry {where}" + (" --sandbox" if args.sandbox else "")
        jobs = "1 job" if failed == 1 else f"{failed} jobs"
        print(f"{jobs} failed: `batchrunner status {where}` shows why; `{retry_cmd}` runs them again")
    if "callbacks" in result.summary and not args.quiet:
        cb = result.summary["callbacks"]
        announced = f"{cb['announced']} of {cb['finished']} finishes announced by one"
        print(f"callbacks: {cb['received']} received, {cb['refused']} refused; {announced}")
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    return EXIT_OK if result.outcome == "complete" else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    plan = _load(args)
    _warn(plan, args.quiet)
    return _execute(args, plan, retry=False)


def cmd_retry(args: argparse.Namespace) -> int:
    return _execute(args, None, retry=True)


# -- status / report / models / sandbox ----------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    st = _api.status(args.dir)
    if args.json:
        totals = {"ambiguous_resubmitted": st.ambiguous_resubmitted, "credits_spent": st.credits_spent, "submits": st.submits}
        failed = [{"id": f.id, "path": f.path, "model": f.model, "error": f.error} for f in st.failures]
        print(json.dumps({"campaign": st.campaign, "counts": st.counts, **totals, "requests": st.requests, "failed": failed}, indent=2))
        return EXIT_OK
    print(f"{st.campaign}: {st.jobs} jobs in {args.dir} ({st.runs} runs)")
    for state in ("done", "failed", "submitted", "submitting", "pending", "waiting"):
        if st.counts.get(state):
            print(f"  {state:<12} {st.counts[state]}" + ("  (for other jobs' results: pipelines)" if state == "waiting" else ""))
    r = st.requests
    print(f"  credits spent {st.credits_spent:g}")
    print(
        f"  generate requests sent {r['sent']}, answered with a task id {r['answered_with_task_id']}, possibly created without an "
        f"answer (ambiguous) {r['ambiguous']}, re-paid after the API forgot a task {r['repaid']}"
        f" — possibly paid twice: {r['possibly_paid_twice']}"
    )
    for f in st.failures[:50]:
        print(f"  failed {f.path} (job {f.id}, {f.model}): {f.error}")
    if len(st.failures) > 50:
        print(f"  … and {len(st.failures) - 50} more in report.csv")
    if st.failures:
        print(f"  run them again: batchrunner retry {shlex.quote(args.dir)}")
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


def cmd_recover(args: argparse.Namespace) -> int:
    from .store import rebuild

    out = Path(args.dir)
    done = rebuild(out)
    if done.problem is not None:
        aside = f"; set aside as {', '.join(p.name for p in done.set_aside)} (kept, not deleted)" if done.set_aside else ""
        print(f"the state file was {done.problem}{aside}")
    if done.kept:
        print(f"read back {done.kept} jobs from the damaged file ({done.kept_submitted} paid tasks will be fetched, not paid again)")
    print(f"recovered {done.recovered} finished jobs from their sidecars, each checked against its file's sha256", end="")
    print(f"; {done.already_done} were recorded already" if done.already_done else "")
    for rejected in done.rejected[:50]:
        print(f"  not recovered: {rejected}", file=sys.stderr)
    if len(done.rejected) > 50:
        print(f"  … and {len(done.rejected) - 50} more", file=sys.stderr)
    if done.rejected:
        print(f"warning: {len(done.rejected)} results were not recovered: their jobs run (and are paid) again", file=sys.stderr)
    print(f"next: batchrunner run MANIFEST --out {out} — it runs only the jobs without a verified result")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    catalog = _api.resolve_catalog(args.catalog)
    models = catalog.by_modality(args.modality)
    if not models:
        what = f"no {args.modality} model" if args.modality else "no model"
        print(
            f"{what} is known yet: add one with --catalog FILE (or BATCHRUNNER_CATALOG), a CSV with the columns id, modality, "
            "input_style, credits, alias_of, required, parameters — for instance the official cliprise-api-catalog.csv",
            file=sys.stderr if args.json else sys.stdout,
        )
    if args.json:
        rows = [
            {"id": m.id, "modality": m.modality, "input_style": m.input_style, "credits": m.credits, "alias_of": m.alias_of,
             "required": list(m.required), "parameters": {p: list(m.enums.get(p, ())) for p in m.parameters}}
            for m in models
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if models:
        print(f"{'model':<22} {'type':<6} {'input':<9} {'credits':<14} known parameters (=accepted values)")
    for m in models:
        extra = (
            f"alias of {m.alias_of}"
            if m.alias_of
            else ", ".join(f"{p}={'|'.join(m.enums[p])}" if p in m.enums else p for p in m.parameters)
        )
        price = "—" if m.credits is None else f"{m.credits:g}"
        print(f"{m.id:<22} {m.modality:<6} {m.input_style:<9} {price:<14} {extra}")
    return EXIT_OK


SANDBOX_SHARES = (  # the sandbox's faults drawn per request, task or callback: SandboxConfig field, what it is a share of
    ("p_429", "share of requests answered 429"),
    ("p_5xx", "share of requests answered JSON 503"),
    ("p_html502", "share of requests answered an HTML 502 page"),
    ("p_drop", "share of requests whose connection is dropped"),
    ("p_callback_drop", "share of callbacks never sent"),
    ("p_callback_duplicate", "share of callbacks sent twice"),
    ("p_callback_reorder", "share of callbacks held back behind the next one"),
    ("p_callback_early", "share of tasks also called back when created"),
    ("p_truncate", "share of results cut after their Content-Length"),
    ("p_truncate_chunked", "share of results sent chunked and cut mid-stream"),
    ("p_truncate_eof", "share of results sent without Content-Length or chunking, half of them, then the connection closed"),
    ("p_random_body", "share of results that are random bytes declared image/png…"),
    ("p_denied_page", "share of results that are an XML 'Access denied' page as application/octet-stream"),
    ("p_slow_body", "share of results sent one byte every --slow-body-interval"),
    ("p_no_file", "share of success answers without a file: no fileURL, JSON for download=true"),
    ("p_status_word", 'share of status answers that are {"status": WORD}'),
)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import SandboxConfig, serve

    config = SandboxConfig(
        api_key=args.key, seed=args.seed, time_scale=args.time_scale, failure_rate=args.failure_rate,
        retry_after=args.retry_after, retry_after_s=args.retry_after_s, slow_body_interval_s=args.slow_body_interval,
        status_word=args.status_word, status_word_http=args.status_word_http,
        fault_prompt=args.fault_prompt, revoke_key_after=args.revoke_key_after,
        tasks_file=Path(args.tasks_file) if args.tasks_file else None, forget_tasks=args.forget_tasks,
        rate_limit_per_s=args.rate_limit, shape=args.shape, credits=args.credits,
        video_min_bytes=args.video_min_bytes, chunked_media=args.chunked_media, callback_delay_s=args.callback_delay,
        **{field: getattr(args, field) for field, _ in SANDBOX_SHARES},
    )  # fmt: skip

    async def serve_forever() -> None:
        async with serve(config, host=args.host, port=args.port) as (_, url):
            print(f"sandbox listening on {url} (key: {args.key}); CLIPRISE_BASE_URL={url}", flush=True)
            await _until_signal()

    try:
        anyio.run(serve_forever)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


async def _until_signal() -> None:
    """Serve until SIGINT or SIGTERM, then return, so the server shuts down in order (its cleanup runs, nothing is cut)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


# -- review / approve / reject / export -----------------------------------------------------------
def cmd_review(args: argparse.Namespace) -> int:
    from .review import serve

    async def serve_forever() -> None:
        async with serve(Path(args.dir), port=args.port) as review:
            print(
                f"reviewing {review.campaign} at {review.url} — a approve, r reject, u undecide (decisions are saved at once); "
                "Ctrl-C to stop",
                flush=True,
            )
            await _until_signal()

    try:
        anyio.run(serve_forever)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK


def _decide(args: argparse.Namespace, decision: str) -> int:
    from .review import decide_paths

    paths = decide_paths(Path(args.dir), args.paths, decision)
    print(f"{decision} {len(paths)} in {args.dir}")
    if decision == "rejected":
        print(f"the next `batchrunner run` (or `batchrunner retry {args.dir}`) makes them again; these files move to {args.dir}/rejected/")
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    return _decide(args, "approved")


def cmd_reject(args: argparse.Namespace) -> int:
    return _decide(args, "rejected")


def cmd_export(args: argparse.Namespace) -> int:
    from .review import export_approved

    if not args.approved:
        print("error: say what to export: --approved (the results approved in review; the only choice for now)", file=sys.stderr)
        return EXIT_BAD_INPUT
    store = Store.open(Path(args.dir), lock=False, create=False)
    try:
        result = export_approved(store, args.dest)
    finally:
        store.close()
    for path in result.changed:
        print(f"warning: {path} is no longer the file batchrunner made (edited since?); exported as it is", file=sys.stderr)
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    if not result.files and not result.problems:
        print(f"nothing is approved in {args.dir} yet — approve with `batchrunner review {args.dir}` or `batchrunner approve`")
    print(f"exported {result.files} approved files ({result.bytes:,} bytes) to {args.dest}; listed in {result.listing}")
    return EXIT_FAILED if result.problems else EXIT_OK


# -- parser ----------------------------------------------------------------------------------
def _number(kind: type[int] | type[float], what: str, ok: Any) -> Any:
    """An argparse type: a number that ``ok`` accepts, else a plain error naming the flag (exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
        return value

    return parse


def _time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number such as 0.01, not {text!r}") from None
    try:
        scale_expected(value)  # the one check of a poll time scale
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


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

    positive_int = _number(int, "a whole number ≥ 1", lambda v: v >= 1)
    positive = _number(float, "a number > 0", lambda v: v > 0)
    share = _number(float, "a share between 0 and 1", lambda v: 0 <= v <= 1)
    at_least_zero = _number(float, "a number ≥ 0", lambda v: v >= 0)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--catalog", metavar="FILE",
            help="a catalog CSV extending the shipped one (default: $BATCHRUNNER_CATALOG, else the shipped catalog alone)",
        )  # fmt: skip
        p.add_argument("--strict", action="store_true", help="an unknown model is an error, not a warning (default: off)")

    def budget(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-credits", type=at_least_zero, metavar="N",
            help="refuse to start past this many credits, and stop submitting there "
            "(default: the manifest's max_credits, else $BATCHRUNNER_MAX_CREDITS, else no cap)",
        )  # fmt: skip

    def storage(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--storage", metavar="URL",
            help="object storage for file: inputs and a copy of every result, e.g. s3://bucket/prefix; credentials from AWS_* "
            "variables (default: the manifest's storage.url, else $BATCHRUNNER_STORAGE, else none)",
        )  # fmt: skip

    def running(p: argparse.ArgumentParser) -> None:
        storage(p)
        p.add_argument(
            "--sandbox", action="store_true",
            help="run against the embedded sandbox: no API key, nothing charged (default: off: the real API, key from $CLIPRISE_API_KEY)",
        )  # fmt: skip
        p.add_argument(
            "--concurrency", type=positive_int, metavar="N",
            help="jobs in flight at once (default: the manifest's concurrency, else $BATCHRUNNER_CONCURRENCY, else 4)",
        )  # fmt: skip
        p.add_argument(
            "--rate", type=positive, metavar="N",
            help="generate requests per second at most (default: the manifest's rate, else $BATCHRUNNER_RATE, else no limit)",
        )  # fmt: skip
        budget(p)
        p.add_argument("--quiet", "-q", action="store_true", help="print only errors and the final line (default: off)")
        p.add_argument("--verbose", "-v", action="store_true", help="print every job event (default: off)")
        p.add_argument("--sandbox-time-scale", type=_time_scale, default=_api.SANDBOX_TIME_SCALE, help=argparse.SUPPRESS)
        p.add_argument(
            "--poll-scale", type=_time_scale, metavar="F",
            help="scale the expected job durations that time the first poll, e.g. 0.01 against a fast sandbox "
            "(default: 1, or the sandbox's own time scale with --sandbox)",
        )  # fmt: skip
        p.add_argument(
            "--sandbox-failure-rate",
            type=share,
            default=0.0,
            metavar="P",
            help="with --sandbox: share of tasks it fails (default: 0)",
        )
        p.add_argument(
            "--callback-listen",
            metavar="HOST:PORT",
            help="receive the API's callbacks here; polls wake early (manifest 'callbacks.listen'; default: no receiver)",
        )
        p.add_argument(
            "--callback-url",
            metavar="URL",
            help="the public https:// base URL that reaches --callback-listen (manifest 'callbacks.url'; default: the listen address)",
        )

    out_help = "output directory (default: the manifest's 'output', else out/<name> beside the manifest)"
    p = command(
        "run",
        "run or resume a campaign",
        "batchrunner run manifests/demo.yaml --sandbox",
        "CLIPRISE_API_KEY=... batchrunner run campaign.yaml --out out/campaign --concurrency 16 --rate 5",
    )
    p.add_argument("manifest", help="a YAML or CSV manifest")
    p.add_argument("--out", metavar="DIR", help=out_help)
    p.add_argument(
        "--force", action="store_true", help="adopt an output directory that holds another campaign's state (default: off: refused)"
    )
    common(p)
    running(p)
    p.set_defaults(func=cmd_run)

    p = command(
        "plan",
        "check and count a manifest exactly as run would, refusing what run refuses; sends nothing",
        "batchrunner plan manifests/demo.yaml",
        "batchrunner plan manifests/demo.yaml --out out/demo --json",
    )
    p.add_argument("manifest", help="a YAML or CSV manifest")
    p.add_argument("--out", metavar="DIR", help=out_help + "; its state tells what a re-run skips")
    p.add_argument("--json", action="store_true", help="print one JSON object (jobs, credits, by_model, to_run, …) (default: off: text)")
    p.add_argument(
        "--force", action="store_true", help="as run --force: count an output directory of another campaign as adopted (default: off)"
    )
    p.add_argument("--sandbox", action="store_true", help="as run --sandbox: the dry run of a run on the embedded sandbox (default: off)")
    common(p)
    budget(p)
    storage(p)
    p.set_defaults(func=cmd_plan)

    p = command("status", "counts per state and failures of an output directory", "batchrunner status out/demo")
    p.add_argument("dir", help="an output directory of a run")
    p.add_argument("--json", action="store_true", help="print one JSON object (default: off: text)")
    p.set_defaults(func=cmd_status)

    p = command("retry", "put failed jobs back to work and run them", "batchrunner retry out/demo --sandbox")
    p.add_argument("dir", help="an output directory of a run")
    running(p)
    p.set_defaults(func=cmd_retry)

    p = command("report", "rewrite report.json, report.csv and report.html", "batchrunner report out/demo")
    p.add_argument("dir", help="an output directory of a run")
    p.set_defaults(func=cmd_report)

    p = command(
        "recover",
        "rebuild a lost or damaged state from the results' sidecars; sends nothing",
        "batchrunner recover out/demo",
    )
    p.add_argument("dir", help="the campaign's output folder (its --out)")
    p.set_defaults(func=cmd_recover)

    p = command("models", "list the model catalog", "batchrunner models --modality video", "batchrunner models --json")
    p.add_argument("--modality", choices=("image", "video", "audio"), help="only this modality (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list (default: off: a table)")
    common(p)
    p.set_defaults(func=cmd_models)

    p = command("sandbox", "serve the simulated API for other tools", "batchrunner sandbox --port 8080 --time-scale 0.01 --p-429 0.05")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks a free port (default %(default)s)")
    p.add_argument("--key", default="sandbox-key", help="the API key it accepts (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every drawn duration and fault (default %(default)s)")
    p.add_argument("--time-scale", type=float, default=1.0, help="real seconds per simulated second (default %(default)s)")
    p.add_argument("--failure-rate", type=float, default=0.0, help="share of tasks that fail (default %(default)s)")
    for field, what in SANDBOX_SHARES:
        p.add_argument("--" + field.replace("_", "-"), type=float, default=0.0, help=f"{what} (default %(default)s)")
    p.add_argument(
        "--retry-after", choices=("seconds", "date", "none"), default="seconds", help="how a 429 gives Retry-After (default %(default)s)"
    )
    p.add_argument("--retry-after-s", type=float, default=1.0, help="the Retry-After of a 429, e.g. 86400 (default %(default)s)")
    p.add_argument(
        "--callback-delay", type=float, default=0.0, help="callbacks come up to this many simulated seconds late (default %(default)s)"
    )
    p.add_argument(
        "--slow-body-interval", type=float, default=5.0, help="real seconds between the bytes of a slow body (default %(default)s)"
    )
    p.add_argument("--status-word", default="queued_for_review", help="that WORD, e.g. cancelled, error, rejected (default %(default)s)")
    p.add_argument("--status-word-http", type=int, default=200, help="the HTTP status answered with it (default %(default)s)")
    p.add_argument(
        "--fault-prompt", metavar="TEXT", help="status and result faults only for tasks whose prompt contains TEXT (default: every task)"
    )
    p.add_argument(
        "--revoke-key-after", type=int, metavar="N", help="refuse the key after N requests (generate 401, status 400; default: never)"
    )
    p.add_argument("--tasks-file", metavar="FILE", help="remember tasks in FILE across restarts, as the real API does (default: in memory)")
    p.add_argument(
        "--forget-tasks", action="store_true", help="do not read --tasks-file back: every earlier task is invalid_taskId (default: read it)"
    )
    p.add_argument("--rate-limit", type=float, default=None, help="generate requests per second before 429 (default: no limit)")
    p.add_argument("--shape", choices=("array", "object", "mixed"), default="array", help="answers as [{…}] or {…} (default %(default)s)")
    p.add_argument("--credits", type=float, default=None, help="account balance, 402 when spent (default: unlimited)")
    p.add_argument(
        "--video-min-bytes", type=int, default=0, metavar="N",
        help="pad video results to at least N bytes; > 1 MiB exercises streamed downloads (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--chunked-media", action="store_true", help="send results without Content-Length (chunked), as some CDNs do (default: off)"
    )
    p.set_defaults(func=cmd_sandbox)

    p = command(
        "review",
        "approve or reject results in the gallery, served on 127.0.0.1",
        "batchrunner review out/demo",
        "batchrunner review out/demo --port 8765",
    )
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=0, help="the port on 127.0.0.1 (default: a free one, printed)")
    p.set_defaults(func=cmd_review)

    for name, what, func in (
        ("approve", "approve results by path (as report.csv lists them)", cmd_approve),
        ("reject", "reject results by path: the next run makes them again, keeping these under DIR/rejected/", cmd_reject),
    ):
        p = command(name, what, f"batchrunner {name} out/demo perfume/flux-2-1_1-v1.png watch/flux-2-9_16-v2.png")
        p.add_argument("dir")
        p.add_argument("paths", nargs="+", metavar="PATH", help="a result's path relative to DIR")
        p.set_defaults(func=func)

    p = command(
        "export", "copy the approved results to a folder, with a CSV of what was copied", "batchrunner export out/demo delivery --approved"
    )
    p.add_argument("dir")
    p.add_argument("dest", help="a folder outside DIR (made if missing); files keep their paths")
    p.add_argument("--approved", action="store_true", help="the results approved in review (required, no default: the only choice for now)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a closed pipe is handled below, not at exit
        return code
    except ManifestError as exc:
        for warning in exc.warnings:  # hints found beside the errors (an unknown model, a misspelt field)
            print(f"warning: {warning}", file=sys.stderr)
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); nothing was sent.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StorageUnavailable as exc:  # checked before anything is sent: the bucket cannot be reached or refuses us
        print(f"error: {exc.message}; nothing was sent", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StateWriteError as exc:  # the state failed during a run: not bad input, requests may have been sent
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except StateError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BatchRunnerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `batchrunner plan … | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's own flush finds no closed pipe
        return EXIT_OK


if __name__ == "__main__":
    from .__main__ import trap_signals

    trap_signals()
    sys.exit(main())
