"""A campaign too big to hold: the streamed plan, the bounded uniqueness checks, the limit before expanding."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrunner.catalog import load_catalog
from batchrunner.errors import ManifestError
from batchrunner.expand import Plan, Specs, expand
from batchrunner.manifest import load

CATALOG = load_catalog()[0]

MANIFEST = """name: big
credits: {kling-video-turbo: 12, flux-2: 1.5}
matrix:
  a: [1, 2, 3, 4, 5]
  b: [x, y, z]
jobs:
  - model: flux-2
    prompt: "product {a} in {b}"
    variants: 2
    path: "{a}/{b}-{variant}.{ext}"
  - model: kling-video-turbo
    prompt: "clip {a}"
    path: "clips/{a}.{ext}"
"""


def plans(tmp_path: Path, text: str) -> tuple[Plan, Plan]:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return expand(load(path), CATALOG), expand(load(path), CATALOG, keep_specs=0)


def test_a_streamed_plan_makes_the_same_jobs_in_the_same_order(tmp_path: Path) -> None:
    kept, streamed = plans(tmp_path, MANIFEST)
    assert isinstance(streamed.specs, Specs) and isinstance(kept.specs, list)
    assert len(streamed.specs) == len(kept.specs) == 5 * 3 * 2 + 5
    assert list(streamed.specs) == kept.specs
    assert list(streamed.specs) == kept.specs  # every pass: the same jobs again
    assert streamed.specs[:3] == kept.specs[:3] and streamed.specs[-1] == kept.specs[-1] and streamed.specs[7] == kept.specs[7]
    assert [s.index for s in streamed.specs] == list(range(len(kept.specs)))
    with pytest.raises(IndexError):
        streamed.specs[len(kept.specs)]
    assert streamed.by_model() == kept.by_model() and streamed.by_modality() == kept.by_modality()
    assert streamed.credits() == kept.credits() and streamed.credits() is not None
    assert streamed.sends_callbacks() is kept.sends_callbacks() is False


def test_a_clash_far_apart_names_the_earlier_job_in_a_streamed_plan(tmp_path: Path) -> None:
    """The uniqueness checks keep hashes, not jobs: the earlier job of a clash is found by making the jobs again."""
    text = MANIFEST + '  - model: flux-2\n    prompt: "product 3 in y"\n    path: "other.{ext}"\n'
    text += '  - model: flux-2\n    prompt: "another"\n    path: "CLIPS/4.{ext}"\n'
    path = tmp_path / "m.yaml"
    path.write_text(text)
    for keep in (0, 1000):
        with pytest.raises(ManifestError) as caught:
            expand(load(path), CATALOG, keep_specs=keep)
        (twin, clash) = [(p.line, p.message) for p in caught.value.problems]
        assert twin[0] == 14 and twin[1].startswith("jobs[2] sends the same request as the job on line 7 (id ")
        assert clash == (
            17,
            "jobs[3] writes to CLIPS/4.{ext}, as does the job on line 11 (its path clips/4.{ext} differs only in letter case: "
            "one file on macOS and Windows); they differ in {model}, {a} — add one of them to 'path'",
        )


def test_ten_million_jobs_are_refused_before_expanding(tmp_path: Path) -> None:
    side = ",".join(map(str, range(1000)))
    path = tmp_path / "m.yaml"
    ten = ",".join(map(str, range(10)))
    jobs = "jobs:\n  - {model: flux-2, prompt: '{a} {b} {c}'}\n"
    path.write_text(f"name: huge\nmatrix:\n  a: [{side}]\n  b: [{side}]\n  c: [{ten}]\n" + jobs)
    with pytest.raises(ManifestError) as caught:
        expand(load(path), CATALOG)
    (problem,) = caught.value.problems
    assert "makes 10,000,000 jobs, more than the limit of 2,000,000 — raise it with 'max_jobs:' in the manifest" in str(problem)


def test_a_new_campaign_goes_into_the_state_a_page_at_a_time(tmp_path: Path) -> None:
    """The runner's feed: a page in the state before the first job is worked on, the rest as the run reaches it."""
    from batchrunner.runner import Feed
    from batchrunner.store import Store

    _, plan = plans(tmp_path, MANIFEST)
    with Store.open(tmp_path / "out") as store:
        assert store.is_empty()
        feed = Feed(store, plan.specs, 4, 3)
        assert sum(store.counts().values()) == 4 and feed.left == len(plan.specs) - 4
        jobs = iter(feed)
        taken = [next(jobs) for _ in range(5)]  # past the first page: the second is in the state
        assert sum(store.counts().values()) == 7
        taken += list(jobs)
        assert [j.id for j in taken] == [s.id for s in plan.specs] and all(j.state == "pending" for j in taken)
        assert feed.left == 0
        assert store.sync(plan.specs).known == {"pending": len(plan.specs)}  # exactly what sync would have put there
        assert [j.id for j in store.work()] == [s.id for s in plan.specs]


def test_a_rerun_of_an_unchanged_plan_skips_sync_and_a_changed_one_does_not(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from batchrunner._api import load_plan
    from batchrunner.store import SYNCED_META, Store

    manifest, out = tmp_path / "m.yaml", tmp_path / "out"
    manifest.write_text("name: small\nmatrix: {a: [1, 2, 3]}\njobs:\n  - {model: flux-2, prompt: 'x {a}', path: '{a}.{ext}'}\n")

    def run() -> dict[str, object]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_"))}
        argv = [sys.executable, "-m", "batchrunner.cli", "run", str(manifest), "--out", str(out), "--sandbox", "--quiet"]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return dict(json.loads((out / "report.json").read_text()))

    first = run()
    with Store.open(out) as store:
        stamp = store.meta(SYNCED_META)
    assert stamp is not None and json.loads(stamp)["jobs"] == 3 and first["summary"]["counts"] == {"done": 3}  # type: ignore[index]
    trusted, checked = load_plan(manifest, out=out), load_plan(manifest)  # the state holds this very plan: not checked again
    assert isinstance(trusted.specs, Specs) and list(trusted.specs) == checked.specs and trusted.fingerprint == checked.fingerprint
    assert trusted.by_model() == checked.by_model() and trusted.warnings == checked.warnings
    csv_before = (out / "report.csv").stat().st_mtime_ns
    again = run()  # nothing changed: no sync, no job touched, only report.json's summary line rewritten
    assert again["jobs"] == first["jobs"] and (out / "report.csv").stat().st_mtime_ns == csv_before
    assert list(again) == ["jobs", "summary"] and again["summary"]["counts"] == {"done": 3}  # type: ignore[index]
    manifest.write_text("name: small\nmatrix: {a: [1, 2, 3, 4]}\njobs:\n  - {model: flux-2, prompt: 'x {a}', path: '{a}.{ext}'}\n")
    changed = run()  # a changed manifest is synced: its new job runs
    assert changed["summary"]["counts"] == {"done": 4} and (out / "4.png").exists()  # type: ignore[index]
    with Store.open(out) as store:
        assert store.meta(SYNCED_META) not in (None, stamp)
    manifest.write_text(manifest.read_text().replace("x {a}", "y {a}"))
    assert isinstance(load_plan(manifest, out=out).specs, list)  # another plan than the state's: checked


async def test_a_new_campaign_stopped_mid_feed_resumes_where_it_stopped(tmp_path: Path) -> None:
    """Stopped while most of its jobs are not yet in the state, the same plan runs on from there: no check, no sync, none twice."""
    from batchrunner.runner import Interrupt, RunConfig, run_campaign
    from batchrunner.sandbox import SandboxConfig, serve
    from batchrunner.store import Store

    kept, plan = plans(tmp_path, MANIFEST)
    out, key = tmp_path / "out", "sk-scale-test"
    fast = dict.fromkeys(("image", "video", "audio", "unknown"), 0.01)
    config = RunConfig(out_dir=out, concurrency=2, expected_s=fast, feed_first=5, feed_page=4, poll_cap_s=0.05)
    interrupt, done = Interrupt(), []

    def on_event(kind: str, job: object, detail: str) -> None:
        if kind == "done":
            done.append(job)
            if len(done) == 7:
                interrupt.request()

    async with serve(SandboxConfig(api_key=key, time_scale=0.001)) as (sb, url):
        first = await run_campaign(plan, config, api_key=key, base_url=url, on_event=on_event, interrupt=interrupt)
        assert first.outcome == "interrupted" and sum(first.counts.values()) == len(kept.specs)
        with Store.open(out) as store:
            held = [row["id"] for row in store.rows()]
        assert 7 <= len(held) < len(kept.specs) and held == [s.id for s in kept.specs[: len(held)]]  # a prefix, in order
        from batchrunner._api import load_plan

        assert isinstance(load_plan(tmp_path / "m.yaml", out=out).specs, Specs)  # the state's record: not checked again
        second = await run_campaign(plan, config, api_key=key, base_url=url)
        assert second.outcome == "complete" and second.counts == {"done": len(kept.specs)}
        assert sb.stats.tasks_created == len(kept.specs)  # none paid twice
        with Store.open(out) as store:
            assert [row["id"] for row in store.rows()] == [s.id for s in kept.specs]
