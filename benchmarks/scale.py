"""Scale: a campaign of a million jobs on a small machine.

    python benchmarks/scale.py [--jobs 1000000] [--small 10000] [--run-seconds 60]

Each phase runs in its own process, so its peak RSS is its own:
  plan      — `batchrunner plan MANIFEST --json` on the big campaign (wall time, peak RSS)
  refuse    — `batchrunner plan` on ten times as many jobs (at least past the default limit): refused before expanding
  small     — a whole `--small`-job campaign through the engine against the sandbox (zero duration): jobs/s
  big       — the big campaign, new: time from the process's start to its first request, jobs/s while
              running, peak RSS; stopped after `--run-seconds` (0: to the end) and timed from the stop
              request to the run's return (what Ctrl-C waits for)
  small     — again, after the big one (the machine's load drifts: the big run is compared with the mean)
  no-op     — the finished small campaign run again: wall time, and whether report.csv was rewritten
  resume    — the stopped big campaign again: time to its first request, then stopped after 5 s
jobs/s counts from a run's first request to its last finished job (or the stop). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import sandbox_process, write_manifest

from batchrunner.expand import DEFAULT_MAX_JOBS


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    """One run of the campaign in this process (the CLI's path: load, expand, run), timed from ``args.t0``."""
    from batchrunner import _api
    from batchrunner.runner import Interrupt, RunConfig, run_campaign

    first: list[float] = []
    last_done = [0.0]
    counter = [0]
    stop_asked: list[float] = []
    interrupt = Interrupt()

    def on_event(kind: str, job: object, detail: str) -> None:
        if kind in ("submitted", "done") and not first:
            first.append(time.time())
        if kind == "done":
            last_done[0] = time.time()
            counter[0] += 1

    async def main() -> Any:
        plan = _api.load_plan(args.manifest, out=args.out)
        config = RunConfig(out_dir=Path(args.out), concurrency=64, expected_s=dict.fromkeys(("image", "video", "audio", "unknown"), 0.0))
        async with anyio.create_task_group() as tg:

            async def stopper() -> None:
                while not first:
                    await anyio.sleep(0.01)
                await anyio.sleep(args.run_seconds)
                stop_asked.append(time.time())
                interrupt.request()

            if args.run_seconds:
                tg.start_soon(stopper)
            result = await run_campaign(plan, config, api_key="sandbox-key", base_url=args.url, on_event=on_event, interrupt=interrupt)
            tg.cancel_scope.cancel()
        return result

    result = anyio.run(main)
    end = time.time()
    busy_until = stop_asked[0] if stop_asked else (last_done[0] or end)
    ran = counter[0]
    return {
        "first_request_s": (first[0] - args.t0) if first else None,
        "done": ran,
        "jobs_per_s": ran / max(1e-9, busy_until - first[0]) if first else 0.0,
        "stop_s": (end - stop_asked[0]) if stop_asked else None,
        "outcome": result.outcome,
        "wall_s": end - args.t0,
        "rss_mb": peak_rss_mb(),
    }


def child(*argv: str) -> dict[str, Any]:
    t0 = time.time()
    out = subprocess.run([sys.executable, __file__, *argv, "--t0", repr(t0)], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def cli(*argv: str) -> tuple[int, float, float, str, str]:
    """``batchrunner ARGV`` as a subprocess: exit code, wall seconds, its own peak RSS (MB), stdout, stderr."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "batchrunner.cli", *argv], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, wall, usage.ru_maxrss / 1024, out.read(), err.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000, help="the campaign the big one's jobs/s is compared with")
    parser.add_argument("--run-seconds", type=float, default=60.0, help="stop the big run after this long (0: run it to the end)")
    parser.add_argument("--phase", choices=("run",), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return
    small_jobs = min(args.small, args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        big = str(write_manifest(folder, args.jobs, name="scale"))
        huge = str(write_manifest(folder, max(args.jobs * 10, DEFAULT_MAX_JOBS + 1), name="huge"))
        small = str(write_manifest(folder, small_jobs, name="small"))
        code, plan_s, plan_rss, text, err = cli("plan", big, "--json", "--out", str(folder / "plan-out"))
        assert code == 0, err
        jobs = json.loads(text)["jobs"]
        print(f"plan: {jobs:,} jobs in {plan_s:.2f} s, peak RSS {plan_rss:.0f} MB (goals <= 10 s, <= 300 MB)")
        code, refuse_s, refuse_rss, text, err = cli("plan", huge, "--out", str(folder / "huge-out"))
        assert code == 2 and "max_jobs:" in err and "Traceback" not in err, err
        said = next(line for line in err.splitlines() if "max_jobs:" in line)
        print(f"plan of 10x as many: refused (exit {code}) in {refuse_s:.2f} s, peak RSS {refuse_rss:.0f} MB: {said}")
        with sandbox_process("--time-scale", "0") as url:
            out_small, out_big = str(folder / "small-out"), str(folder / "big-out")
            common = ("--phase", "run", "--url", url)
            s = child(*common, "--manifest", small, "--out", out_small + "-a", "--run-seconds", "0")
            print(f"small run: {small_jobs:,} jobs at {s['jobs_per_s']:.0f} jobs/s, first request {s['first_request_s']:.2f} s")
            b = child(*common, "--manifest", big, "--out", out_big, "--run-seconds", str(args.run_seconds))
            s2 = child(*common, "--manifest", small, "--out", out_small, "--run-seconds", "0")  # the machine's load drifts:
            small_rate = (s["jobs_per_s"] + s2["jobs_per_s"]) / 2  # the big run is compared with small runs before and after it
            print(f"small run again: {s2['jobs_per_s']:.0f} jobs/s (mean of the two: {small_rate:.0f})")
            before = os.stat(Path(out_small) / "report.csv").st_mtime_ns
            noop = child(*common, "--manifest", small, "--out", out_small, "--run-seconds", "0")
            rewritten = os.stat(Path(out_small) / "report.csv").st_mtime_ns != before
            print(f"no-op re-run of the finished small campaign: {noop['wall_s']:.2f} s, report.csv rewritten: {rewritten}")
            ratio = b["jobs_per_s"] / small_rate
            print(
                f"big run: first request {b['first_request_s']:.2f} s (goal <= 5), {b['done']:,} jobs at {b['jobs_per_s']:.0f} jobs/s "
                f"({ratio:.2f} x the small run's; goal >= 0.9), peak RSS {b['rss_mb']:.0f} MB (goal <= 300), "
                f"stopped in {b['stop_s'] or 0:.2f} s (goal <= 2)"
            )
            r = child(*common, "--manifest", big, "--out", out_big, "--run-seconds", "5" if args.run_seconds else "0")
            began = f"none, nothing was left (whole re-run {r['wall_s']:.2f} s)"
            began = began if r["first_request_s"] is None else f"{r['first_request_s']:.2f} s (goal <= 5)"
            print(f"resume: first request {began}, peak RSS {r['rss_mb']:.0f} MB")
    figures = {
        "jobs": jobs, "plan_s": round(plan_s, 2), "plan_rss_mb": round(plan_rss), "refuse_s": round(refuse_s, 2),
        "refuse_rss_mb": round(refuse_rss), "small_jobs_per_s": round(small_rate), "noop_s": round(noop["wall_s"], 2),
        "noop_rewrote_reports": rewritten, "first_request_s": round(b["first_request_s"], 2), "big_done": b["done"],
        "big_jobs_per_s": round(b["jobs_per_s"]), "ratio": round(ratio, 3), "run_rss_mb": round(b["rss_mb"]),
        "stop_s": None if b["stop_s"] is None else round(b["stop_s"], 2),
        "resume_first_request_s": None if r["first_request_s"] is None else round(r["first_request_s"], 2),
        "resume_rss_mb": round(r["rss_mb"]),
    }  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
