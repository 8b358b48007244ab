"""Polling efficiency: status calls per job, and how late a finished job is noticed.

    python benchmarks/polling.py [--jobs 400] [--concurrency 50] [--time-scale 0.25] [--sigma 0.35]

Jobs get lognormal durations per modality (sandbox defaults: image median 8 s, video 60 s,
on the given time scale), ``concurrency`` at a time. The runner starts from the real API's
default expectations (scaled the same way) and learns per model as jobs finish. Reports
status calls per job (every call to the status endpoint, downloads included) and the delay
between a job's finish and its first "done" answer, relative to its duration. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import mean, quantiles

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plan_for

from batchrunner.runner import RunConfig, run_campaign, scale_expected
from batchrunner.sandbox import SandboxConfig, serve


async def campaign(jobs: int, concurrency: int, scale: float, sigma: float, folder: Path, seed: int, tag: str) -> dict[str, float]:
    """Run ``jobs`` jobs (3/4 images, 1/4 videos) all at once into ``folder/out``; measure them."""
    images, videos = jobs * 3 // 4, jobs - jobs * 3 // 4
    manifest = folder / "poll.yaml"
    manifest.write_text(
        f"name: poll\nmatrix: {{i: [{','.join(map(str, range(max(images, videos))))}]}}\njobs:\n"
        f"  - {{model: flux-2, prompt: '{tag} image {{i}}'}}\n  - {{model: kling-video-turbo, prompt: '{tag} video {{i}}'}}\n"
    )
    plan = plan_for(manifest)
    plan.specs = [
        s
        for s in plan.specs
        if (s.modality == "image" and int(s.vars["i"]) < images) or (s.modality == "video" and int(s.vars["i"]) < videos)
    ]
    durations = {"image": (8.0, sigma), "video": (60.0, sigma), "audio": (15.0, sigma)}
    async with serve(SandboxConfig(time_scale=scale, durations_s=durations, seed=seed)) as (sandbox, url):
        config = RunConfig(out_dir=folder / "out", concurrency=concurrency, expected_s=scale_expected(scale))
        result = await run_campaign(plan, config, api_key="sandbox-key", base_url=url)
        assert result.counts.get("done") == len(plan.specs), result.counts
        late = [(t.seen_at - t.finish_at) / (t.finish_at - t.created) for t in sandbox.tasks.values() if t.seen_at is not None]
        calls = [sandbox.stats.status_by_task[task_id] for task_id in sandbox.tasks]
    q = quantiles(late, n=100)
    return {"jobs": len(calls), "status_calls_per_job": round(mean(calls), 3), "late_p50": round(q[49], 4), "late_p95": round(q[94], 4)}


async def measure(jobs: int, concurrency: int, scale: float, sigma: float, folder: Path) -> dict[str, object]:
    """A cold campaign (the API's default expectations only), then a warm one that learns from the state file."""
    cold = await campaign(jobs, concurrency, scale, sigma, folder, 11, "cold")
    warm = await campaign(jobs, concurrency, scale, sigma, folder, 12, "warm")
    return {"cold": cold, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--time-scale", type=float, default=0.25, help="real seconds per simulated second")
    parser.add_argument("--sigma", type=float, default=0.35, help="lognormal sigma of the durations")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        figures = anyio.run(measure, args.jobs, args.concurrency, args.time_scale, args.sigma, Path(tmp))
    for name, f in figures.items():
        assert isinstance(f, dict)
        print(
            f"{name}: {f['jobs']} jobs, {f['status_calls_per_job']} status calls per job (goal <= 2.5); finish noticed "
            f"late by {f['late_p50']:.1%} of the job's duration at p50, {f['late_p95']:.1%} at p95 (goal <= 15%)"
        )
    warm = figures["warm"]
    assert isinstance(warm, dict)
    print(json.dumps({**warm, "cold": figures["cold"], "time_scale": args.time_scale, "sigma": args.sigma}))


if __name__ == "__main__":
    main()
