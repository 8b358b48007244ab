"""Scale: a 100,000-job campaign on a small machine.

    python benchmarks/scale.py [--jobs 100000]

Three phases, each in its own process so its peak RSS is its own:
  expand  — read the manifest, expand and validate every job, count credits (what `plan` does)
  run     — the whole campaign through batchrunner's engine against the sandbox (zero duration)
  resume  — on the finished state file: everything `run` does before its first request
            (load, expand, open the store, sync, recover, list the work)
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plan_for, sandbox_process, write_manifest


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(args: argparse.Namespace) -> dict[str, float]:
    from batchrunner.runner import RunConfig, run_campaign
    from batchrunner.store import Store

    start = time.perf_counter()
    plan = plan_for(Path(args.manifest))
    if args.phase == "expand":
        plan.credits()
        plan.by_model()
        return {"seconds": time.perf_counter() - start, "jobs": len(plan.specs), "rss_mb": peak_rss_mb()}
    if args.phase == "resume":
        store = Store.open(Path(args.out))
        store.sync(plan.specs)
        store.recover()
        to_run = sum(1 for _ in store.work())  # the whole work list, though a run reads only its first page before starting
        store.close()
        return {"seconds": time.perf_counter() - start, "to_run": to_run, "rss_mb": peak_rss_mb()}
    config = RunConfig(out_dir=Path(args.out), concurrency=64, expected_s=dict.fromkeys(("image", "video", "audio", "unknown"), 0.0))
    result = anyio.run(lambda: run_campaign(plan, config, api_key="sandbox-key", base_url=args.url))
    assert result.counts == {"done": len(plan.specs)}, result.counts
    return {"seconds": time.perf_counter() - start, "rss_mb": peak_rss_mb()}


def child(*argv: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--phase", choices=("expand", "run", "resume"), help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest = str(write_manifest(Path(tmp), args.jobs, name="scale"))
        out = str(Path(tmp) / "out")
        expand = child("--phase", "expand", "--manifest", manifest)
        print(f"expand + plan: {expand['jobs']:.0f} jobs in {expand['seconds']:.2f} s, peak RSS {expand['rss_mb']:.0f} MB")
        with sandbox_process("--time-scale", "0") as url:
            run = child("--phase", "run", "--manifest", manifest, "--out", out, "--url", url)
        rate = expand["jobs"] / run["seconds"]
        print(f"full run: {run['seconds']:.1f} s ({rate:.0f} jobs/s), peak RSS {run['rss_mb']:.0f} MB (goal <= 200)")
        resume = child("--phase", "resume", "--manifest", manifest, "--out", out)
        print(f"resume start on the finished state: {resume['seconds']:.2f} s (goal <= 2), {resume['to_run']:.0f} jobs left")
    figures = {"jobs": int(expand["jobs"]), "expand_s": round(expand["seconds"], 3), "expand_rss_mb": round(expand["rss_mb"])}
    figures |= {"run_s": round(run["seconds"], 1), "run_rss_mb": round(run["rss_mb"]), "resume_s": round(resume["seconds"], 3)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
