"""The run engine against the real sandbox, a real SQLite file and real files on disk."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from batchrunner.catalog import load_catalog
from batchrunner.errors import ManifestError
from batchrunner.expand import Plan, expand
from batchrunner.manifest import load
from batchrunner.runner import RunConfig, run_campaign
from batchrunner.sandbox import SandboxConfig, body_key, serve
from batchrunner.store import Store

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-run-test-7f3a9c"
FAST = {"image": 0.01, "video": 0.05, "audio": 0.02, "unknown": 0.02}


def plan_of(path: Path) -> Plan:
    return expand(load(path), load_catalog()[0])


def cfg(out: Path, **kw: object) -> RunConfig:
    defaults: dict[str, object] = {"concurrency": 8, "expected_s": FAST, "backoff_base_s": 0.01, "backoff_cap_s": 0.05, "poll_cap_s": 0.05}
    return RunConfig(out_dir=out, **{**defaults, **kw})  # type: ignore[arg-type]


def sandbox(**kw: object) -> SandboxConfig:
    return SandboxConfig(**{"api_key": KEY, "time_scale": 0.001, **kw})  # type: ignore[arg-type]


def check_files(out: Path) -> dict[str, object]:
    """Every done job's file is whole (sha256 as recorded) and no temp file is left."""
    report = json.loads((out / "report.json").read_text())
    for job in report["jobs"]:
        if job["state"] == "done":
            data = (out / job["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == job["sha256"] and len(data) == job["bytes"]
            sidecar = json.loads((out / (job["path"] + ".json")).read_text())
            assert sidecar["job_id"] == job["id"] and sidecar["task_id"] == job["task_id"]
    assert not [p for p in out.rglob("*.tmp")]
    return dict(report)


async def test_campaign_end_to_end_then_rerun_submits_nothing(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/formats.yaml")
    async with serve(sandbox()) as (sb, url):
        result = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.counts == {"done": 18}
        assert sb.stats.tasks_created == 18
        for spec in plan.specs:  # each distinct body was sent once per variant
            variants = sum(1 for s in plan.specs if s.body == spec.body)
            assert sb.stats.by_body[body_key(spec.body)] == variants
        report = check_files(tmp_path)
        assert report["summary"]["counts"] == {"done": 18} and report["summary"]["ambiguous_resubmitted"] == 0
        assert (tmp_path / "perfume/flux-2-1_1-v1.png").read_bytes().startswith(b"\x89PNG")
        assert (tmp_path / "watch/kling-video-turbo-5s-v1.mp4").exists()
        status_calls = sb.stats.status_requests
        again = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert again.outcome == "complete"
        assert sb.stats.tasks_created == 18 and sb.stats.status_requests == status_calls


async def test_edited_manifest_submits_only_the_changes(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", 'matrix: {p: [a, b, c]}\npath: "{p}.{ext}"\njobs:\n  - {model: flux-2, prompt: "thing {p}"}\n')
    out = tmp_path / "out"
    async with serve(sandbox()) as (sb, url):
        await run_campaign(plan_of(m), cfg(out), api_key=KEY, base_url=url)
        assert sb.stats.tasks_created == 3
        before = (out / "a.png").read_bytes()
        write("m.yaml", 'matrix: {p: [a, b, d]}\npath: "new/{p}.{ext}"\njobs:\n  - {model: flux-2, prompt: "thing {p}"}\n')
        result = await run_campaign(plan_of(m), cfg(out), api_key=KEY, base_url=url)
        assert sb.stats.tasks_created == 4  # only d is new
        assert result.counts == {"done": 3}
        assert (out / "new/a.png").read_bytes() == before and not (out / "a.png").exists()  # moved, not paid again
        report = check_files(out)
        assert sorted(j["path"] for j in report["jobs"]) == ["new/a.png", "new/b.png", "new/d.png"]


async def test_concurrency_and_rate_are_never_exceeded(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", "matrix: {i: [" + ",".join(map(str, range(30))) + "]}\njobs:\n  - {model: flux-2, prompt: 'n {i}'}\n")
    async with serve(sandbox(time_scale=0.003)) as (sb, url):
        result = await run_campaign(plan_of(m), cfg(tmp_path, concurrency=3, rate_per_s=40), api_key=KEY, base_url=url)
        assert result.outcome == "complete"
        assert 1 < sb.stats.max_in_flight <= 3
        assert sb.stats.as_json()["max_generate_per_s"] <= 41


async def test_faults_end_every_job_done_or_failed_with_a_reason(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", "matrix: {i: [" + ",".join(map(str, range(60))) + "]}\njobs:\n  - {model: flux-2, prompt: 'n {i}'}\n")
    faults = sandbox(seed=7, p_5xx=0.05, p_html502=0.05, p_drop=0.05, p_429=0.05, retry_after_s=0.05, p_truncate=0.2, failure_rate=0.05)
    async with serve(faults) as (sb, url):
        result = await run_campaign(plan_of(m), cfg(tmp_path, retries=8), api_key=KEY, base_url=url, rng=random.Random(1))
        report = check_files(tmp_path)
        states = {j["state"] for j in report["jobs"]}
        assert states <= {"done", "failed"} and result.counts.get("done", 0) >= 45
        assert all(j["error"] for j in report["jobs"] if j["state"] == "failed")
        ambiguous = report["summary"]["ambiguous_resubmitted"]
        assert sb.stats.tasks_created <= 60 + ambiguous
        assert sum(sb.stats.faults.values()) > 10  # the faults really happened


async def test_bad_key_stops_the_run_with_state_saved(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.csv")
    async with serve(sandbox()) as (sb, url):
        result = await run_campaign(plan, cfg(tmp_path), api_key="wrong-key-000", base_url=url)
        assert result.outcome == "stopped" and "401" in (result.error or "")
        assert result.counts == {"pending": 4} and sb.stats.tasks_created == 0
        result = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.outcome == "complete"


async def test_api_failures_fail_jobs_and_retry_resubmits_them(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.csv")
    async with serve(sandbox(failure_rate=1.0)) as (_, url):
        result = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.outcome == "failed" and result.counts == {"failed": 4}
        report = json.loads((tmp_path / "report.json").read_text())
        assert all("content policy" in j["error"] for j in report["jobs"])
        again = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert again.counts == {"failed": 4}  # a re-run does not pay again for API failures
    async with serve(sandbox()) as (sb, url):
        result = await run_campaign(plan, cfg(tmp_path, retry_failed=True), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and sb.stats.tasks_created == 4


async def test_max_credits_refuses_before_sending(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", "credits: {flux-2: 2}\nmax_credits: 5\nmatrix: {i: [1, 2, 3]}\njobs:\n  - {model: flux-2, prompt: 'n {i}'}\n")
    async with serve(sandbox()) as (sb, url):
        with pytest.raises(ManifestError, match="costs 6 credits"):
            await run_campaign(plan_of(m), cfg(tmp_path / "o", max_credits=5), api_key=KEY, base_url=url)
        assert sb.stats.generate_requests == 0 and not (tmp_path / "o").exists()
        result = await run_campaign(plan_of(m), cfg(tmp_path / "o", max_credits=6), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.summary["credits"] == {"spent": 6.0, "planned": 6.0}


async def test_lost_task_is_resubmitted_on_the_next_run(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.csv")
    async with serve(sandbox(time_scale=10)) as (_, url):  # nothing finishes: leave jobs submitted
        store = Store.open(tmp_path)
        store.claim(plan.manifest.name)
        store.sync(plan.specs)
        for job in store.work():
            from batchrunner.store import JobState

            store.transition(job, JobState.SUBMITTING)
            store.transition(job, JobState.SUBMITTED, task_id="f" * 28, submitted_at=0.0)
        store.close()
    async with serve(sandbox()) as (sb, url):  # another account state: the task ids are unknown
        result = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.counts == {"failed": 4} and sb.stats.tasks_created == 0
        result = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.counts == {"done": 4} and sb.stats.tasks_created == 4
