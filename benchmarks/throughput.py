"""Throughput: batchrunner's real engine against a minimal raw aiohttp loop, on one sandbox.

    python benchmarks/throughput.py [--jobs 10000] [--concurrency 64] [--rounds 3]

The sandbox runs in its own process with zero simulated duration. (a) the baseline submits,
polls and downloads every job with plain aiohttp and writes each file, keeping no state;
(a') the same loop writes each file durably (temp + fsync + rename, in a thread), for
reference; (b) batchrunner runs the same number of jobs with its SQLite store, atomic
fdatasynced files and sidecars. They alternate ``--rounds`` times (the state of the disk
makes single runs noisy); medians are printed, ``ratio`` is (b) / (a), and the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import plan_for, sandbox_process, write_manifest

from batchrunner.runner import RunConfig, run_campaign

KEY = "sandbox-key"
HOST = {"Host": "business.api.cliprise.app"}


def write_durably(path: Path, data: bytes) -> None:
    """What a careful hand-written loop does: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def baseline(url: str, bodies: list[dict[str, object]], concurrency: int, out: Path, durable: bool = False) -> float:
    """Submit → poll → download each job, ``concurrency`` at a time, no state; plain writes, or ``durable`` ones in a thread."""
    queue: asyncio.Queue[tuple[int, dict[str, object]]] = asyncio.Queue()
    for item in enumerate(bodies):
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=HOST) as session:

        async def worker() -> None:
            while not queue.empty():
                index, body = queue.get_nowait()
                async with session.post(f"{url}/app/cliprise/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
                    answer = await r.json()
                task_id = (answer[0] if isinstance(answer, list) else answer)["taskId"]
                params = {"apiKey": KEY, "taskId": task_id}
                while True:
                    async with session.get(f"{url}/app/cliprise/status", params=params) as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.01)
                async with session.get(f"{url}/app/cliprise/status", params={**params, "download": "true"}) as r:
                    data = await r.read()
                if durable:
                    await asyncio.to_thread(write_durably, out / f"{index}.png", data)
                else:
                    (out / f"{index}.png").write_bytes(data)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


async def engine(url: str, manifest: Path, jobs: int, concurrency: int, out: Path) -> float:
    plan = plan_for(manifest, jobs)
    config = RunConfig(out_dir=out, concurrency=concurrency, expected_s=dict.fromkeys(("image", "video", "audio", "unknown"), 0.0))
    start = time.perf_counter()
    result = await run_campaign(plan, config, api_key=KEY, base_url=url)
    elapsed = time.perf_counter() - start
    assert result.counts == {"done": jobs}, result.counts
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="baseline and engine alternate this many times; medians are reported")
    args = parser.parse_args()
    base_rates, durable_rates, run_rates = [], [], []
    with tempfile.TemporaryDirectory() as tmp, sandbox_process("--key", KEY, "--time-scale", "0") as url:
        folder = Path(tmp)
        manifest = write_manifest(folder, args.jobs)
        bodies = [s.body for s in plan_for(manifest, args.jobs).specs]
        for n in range(args.rounds):
            for name in ("raw", "durable"):
                (folder / f"{name}{n}").mkdir()
            base_rates.append(args.jobs / asyncio.run(baseline(url, bodies, args.concurrency, folder / f"raw{n}")))
            durable_rates.append(args.jobs / asyncio.run(baseline(url, bodies, args.concurrency, folder / f"durable{n}", durable=True)))
            run_rates.append(args.jobs / asyncio.run(engine(url, manifest, args.jobs, args.concurrency, folder / f"run{n}")))
            print(
                f"round {n + 1}: baseline {base_rates[-1]:.0f} jobs/s, durable baseline {durable_rates[-1]:.0f} jobs/s, "
                f"batchrunner {run_rates[-1]:.0f} jobs/s",
                flush=True,
            )
    base_rate, durable_rate, run_rate = (statistics.median(r) for r in (base_rates, durable_rates, run_rates))
    print(f"baseline (raw aiohttp, no state, plain writes): {args.jobs} jobs, median {base_rate:.0f} jobs/s")
    print(f"durable baseline (the same, files written temp + fsync + rename): median {durable_rate:.0f} jobs/s")
    print(f"batchrunner (SQLite, atomic fdatasynced files, sidecars): {args.jobs} jobs, median {run_rate:.0f} jobs/s")
    print(f"ratio runner/baseline: {run_rate / base_rate:.2f}; runner/durable baseline: {run_rate / durable_rate:.2f}")
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "concurrency": args.concurrency,
                "rounds": args.rounds,
                "jobs_per_s": round(run_rate, 1),
                "baseline_jobs_per_s": round(base_rate, 1),
                "ratio": round(run_rate / base_rate, 3),
                "durable_baseline_jobs_per_s": round(durable_rate, 1),
                "ratio_to_durable_baseline": round(run_rate / durable_rate, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
