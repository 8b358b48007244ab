"""Polling efficiency: status calls per job, and how late a finished job is noticed.

    python benchmarks/polling.py [--jobs 400] [--concurrency 50] [--time-scale 0.25] [--sigma 0.35]
    python benchmarks/polling.py --callbacks [--sigmas 0.1,0.35] [--drop 0.3] [--repeat 3]   # poll-only vs callbacks

Jobs get lognormal durations per modality (sandbox defaults: image median 8 s, video 60 s,
on the given time scale), ``concurrency`` at a time. The runner starts from the real API's
default expectations (scaled the same way) and learns per model as jobs finish. Reports
status calls per job (every call to the status endpoint, downloads included) and the delay
between a job's finish and its first "done" answer, relative to its duration. The last
line is one JSON object.

``--callbacks`` runs, for each sigma, the same campaigns three ways — polling only, with
the callback receiver and every callback delivered, and with ``--drop`` of them dropped by
the sandbox — each cold then warm in its own output directory.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from statistics import mean, quantiles, stdev
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plan_for

from batchrunner.callbacks import CallbackSettings
from batchrunner.runner import RunConfig, run_campaign, scale_expected
from batchrunner.sandbox import SandboxConfig, serve


async def campaign(
    jobs: int, concurrency: int, scale: float, sigma: float, folder: Path, seed: int, tag: str, drop: float | None = None
) -> dict[str, Any]:
    """Run ``jobs`` jobs (3/4 images, 1/4 videos) all at once into ``folder/out``; measure them.

    ``drop``: None polls only; a number turns the callback receiver on, with that share of callbacks dropped.
    """
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
    callbacks = None if drop is None else CallbackSettings(host="127.0.0.1", port=0)
    async with serve(SandboxConfig(time_scale=scale, durations_s=durations, seed=seed, p_callback_drop=drop or 0.0)) as (sandbox, url):
        config = RunConfig(out_dir=folder / "out", concurrency=concurrency, expected_s=scale_expected(scale), callbacks=callbacks)
        # the runner's jitter is seeded too, so that the modes compared are run on the same draws
        result = await run_campaign(plan, config, api_key="sandbox-key", base_url=url, rng=random.Random(seed))
        assert result.counts.get("done") == len(plan.specs), result.counts
        late = [(t.seen_at - t.finish_at) / (t.finish_at - t.created) for t in sandbox.tasks.values() if t.seen_at is not None]
        calls = [sandbox.stats.status_by_task[task_id] for task_id in sandbox.tasks]
    q = quantiles(late, n=100)
    # the first wave (the first ``concurrency`` tasks) is asked before anything about the model or the callbacks is known
    later = calls[concurrency:] or calls
    return {
        "jobs": len(calls),
        "status_calls_per_job": round(mean(calls), 3),
        "after_first_wave": round(mean(later), 3),
        "late_p50": round(q[49], 4),
        "late_p95": round(q[94], 4),
        "calls": calls,  # per task, in creation order: the n-th task has the same duration in every mode (same seed)
    }


async def measure(
    jobs: int, concurrency: int, scale: float, sigma: float, folder: Path, drop: float | None = None, seed: int = 11
) -> dict[str, object]:
    """A cold campaign (the API's default expectations only), then a warm one that learns from the state file."""
    cold = await campaign(jobs, concurrency, scale, sigma, folder, seed, "cold", drop)
    warm = await campaign(jobs, concurrency, scale, sigma, folder, seed + 1, "warm", drop)
    return {"cold": cold, "warm": warm}


async def side_by_side(
    jobs: int, concurrency: int, scale: float, sigmas: list[float], drop: float, repeat: int, folder: Path, only: str = ""
) -> list[dict[str, Any]]:
    """Poll-only, callbacks delivered, callbacks ``drop`` dropped: cold and warm at each sigma, each mode in its own directory.

    Each of ``repeat`` rounds runs the three modes on the same seeds (other seeds each round); figures are means over rounds.
    """
    modes = [("poll-only", None), ("callbacks", 0.0), (f"callbacks, {drop:.0%} dropped", drop)]
    if only:
        modes = [m for key, m in zip(("poll", "callbacks", "dropped"), modes, strict=True) if key in only.split(",")]
    runs: dict[tuple[float, str], list[dict[str, object]]] = {}
    for r in range(repeat):
        for sigma in sigmas:
            for mode, dropped in modes:
                where = folder / f"{r}-{sigma}-{dropped}"
                where.mkdir()
                runs.setdefault((sigma, mode), []).append(await measure(jobs, concurrency, scale, sigma, where, dropped, 11 + 100 * r))
    rows = []
    for (sigma, mode), rounds in runs.items():
        row: dict[str, Any] = {"sigma": sigma, "mode": mode, "rounds": rounds}
        for phase in ("cold", "warm"):
            figures = [f[phase] for f in rounds]
            row[phase] = {k: round(mean(f[k] for f in figures), 4) for k in figures[0] if k != "calls"}  # type: ignore[index, attr-defined]
            base = runs.get((sigma, "poll-only"))
            if base is not None and mode != "poll-only":
                # paired by task: the same task (same duration) asked with callbacks minus asked by polling alone
                pairs = [
                    m - b for f, g in zip(rounds, base, strict=True) for m, b in zip(f[phase]["calls"], g[phase]["calls"], strict=True)
                ]  # type: ignore[index]
                half = 1.96 * stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else 0.0
                row[phase]["vs_poll_only"] = [round(mean(pairs), 3), round(half, 3)]
        rows.append(row)
    for row in rows:
        for r in row["rounds"]:
            for phase in ("cold", "warm"):
                r[phase].pop("calls", None)
    return rows


def _paired(figures: dict[str, Any]) -> str:
    """Mean calls per job minus poll-only's on the same tasks, with a 95 % interval ("" for poll-only itself)."""
    if "vs_poll_only" not in figures:
        return ""
    d, half = figures["vs_poll_only"]
    return f"{d:+.3f} ± {half:.3f}"


def callbacks_main(args: argparse.Namespace) -> None:
    sigmas = [float(s) for s in args.sigmas.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = anyio.run(side_by_side, args.jobs, args.concurrency, args.time_scale, sigmas, args.drop, args.repeat, Path(tmp), args.modes)
    print(
        f"{'sigma':>5}  {'mode':<26} {'warm calls/job':>14} {'warm p95 late':>13} {'cold calls/job':>14} {'cold p95 late':>13} "
        f"{'cold after 1st wave':>19} {'vs poll-only, paired (warm / cold)':>36}"
    )
    for row in rows:
        warm, cold = row["warm"], row["cold"]
        assert isinstance(warm, dict) and isinstance(cold, dict)
        print(
            f"{row['sigma']:>5}  {row['mode']:<26} {warm['status_calls_per_job']:>14.3f} {warm['late_p95']:>13.1%} "
            f"{cold['status_calls_per_job']:>14.3f} {cold['late_p95']:>13.1%} {cold['after_first_wave']:>19.3f} "
            f"{_paired(warm):>17} / {_paired(cold):<17}"
        )
    print(json.dumps({"jobs": rows[0]["warm"]["jobs"], "rows": rows, "time_scale": args.time_scale, "drop": args.drop}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--time-scale", type=float, default=0.25, help="real seconds per simulated second")
    parser.add_argument("--sigma", type=float, default=0.35, help="lognormal sigma of the durations")
    parser.add_argument("--callbacks", action="store_true", help="poll-only vs callbacks (delivered, and --drop dropped), side by side")
    parser.add_argument("--sigmas", default="0.1,0.35", help="with --callbacks: the sigmas to run, comma-separated")
    parser.add_argument("--drop", type=float, default=0.3, help="with --callbacks: the share of callbacks the sandbox drops")
    parser.add_argument("--modes", default="", help="with --callbacks: a subset of poll,callbacks,dropped (default: all three)")
    parser.add_argument("--repeat", type=int, default=1, help="with --callbacks: rounds on other seeds; figures are their means")
    args = parser.parse_args()
    if args.callbacks:
        callbacks_main(args)
        return
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
    for f in figures.values():
        f.pop("calls", None)  # type: ignore[union-attr]
    print(json.dumps({**warm, "cold": figures["cold"], "time_scale": args.time_scale, "sigma": args.sigma}))


if __name__ == "__main__":
    main()
