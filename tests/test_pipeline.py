"""Pipelines: references between jobs, expanded, run, failed, retried, killed and resumed on the real sandbox."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from batchrunner.catalog import load_catalog
from batchrunner.dryrun import preview
from batchrunner.errors import ManifestError
from batchrunner.expand import JobSpec, Plan, expand, job_id
from batchrunner.manifest import load
from batchrunner.pipeline import RESULT_PREFIX, result_ids
from batchrunner.runner import RunConfig, run_campaign
from batchrunner.sandbox import SandboxConfig, serve
from batchrunner.store import Store

from .conftest import S3Server, cli, make_png, sandbox_process, stats

KEY = "sk-pipeline-test-5e1d"
FAST = {"image": 0.01, "video": 0.05, "audio": 0.02, "unknown": 0.02}

CHAIN = """\
name: chain
matrix: {product: [lamp, chair], ratio: ["1:1", "9:16"]}
path: "{product}/{ratio}/{step}.{ext}"
jobs:
  - id: hero
    model: flux-2
    prompt: "{product} on oak, soft daylight"
    input: {aspect_ratio: "{ratio}"}
  - id: cutout
    model: recraft-remove-bg
    input: {image_url: "{hero.url}"}
  - vars: {step: video}                   # a var named step wins over the job's id in path
    model: kling-video-turbo
    input: {prompt: "{product} turning slowly", image_url: "{cutout.url}", duration: "5"}
"""


def plan_of(path: Path) -> Plan:
    return expand(load(path), load_catalog()[0])


def problems(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        plan_of(path)
    return [str(p) for p in caught.value.problems]


def by(plan: Plan, model: str) -> list[JobSpec]:
    return [s for s in plan.specs if s.model == model]


def cell(spec: JobSpec) -> tuple[Any, ...]:
    return (spec.vars.get("product"), spec.vars.get("ratio"))


def cfg(out: Path, **kw: object) -> RunConfig:
    defaults: dict[str, object] = {
        "concurrency": 4, "expected_s": FAST, "backoff_base_s": 0.01, "backoff_cap_s": 0.05, "poll_cap_s": 0.05, "backend": "sandbox",
    }  # fmt: skip
    return RunConfig(out_dir=out, **{**defaults, **kw})  # type: ignore[arg-type]


def sandbox(**kw: object) -> SandboxConfig:
    return SandboxConfig(**{"api_key": KEY, "time_scale": 0.001, **kw})  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- expansion ------------------------------------------------------------------------------------


def test_a_reference_takes_the_upstream_job_of_the_same_cell(write) -> None:  # type: ignore[no-untyped-def]
    plan = plan_of(write("m.yaml", CHAIN))
    heroes, cutouts, videos = by(plan, "flux-2"), by(plan, "recraft-remove-bg"), by(plan, "kling-video-turbo")
    assert len(heroes) == len(cutouts) == len(videos) == 4  # the cut-out inherits product × ratio from hero
    hero_of = {cell(s): s.id for s in heroes}
    cutout_of = {cell(s): s.id for s in cutouts}
    for s in cutouts:
        assert s.body["input"]["image_url"] == RESULT_PREFIX + hero_of[cell(s)]
        assert s.after == (hero_of[cell(s)],) and result_ids(s.body) == [hero_of[cell(s)]]
        assert s.step == "cutout" and s.id == job_id(s.body, 1)  # the id hashes the upstream's id, as any value
    for s in videos:
        assert s.after == (cutout_of[cell(s)],) and s.step is None
    assert {s.path for s in videos} == {f"{p}/{r}/video.{{ext}}" for p in ("lamp", "chair") for r in ("1_1", "9_16")}


def test_variants_fan_out_unless_pinned_and_urls_fan_in(write) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "m.yaml",
        """\
matrix: {product: [lamp, chair], ratio: ["1:1", "9:16"]}
jobs:
  - id: hero
    model: flux-2
    prompt: "{product} on oak"
    input: {aspect_ratio: "{ratio}"}
    variants: 3
  - id: cutout
    model: recraft-remove-bg
    input: {image_url: "{hero.url}"}
    path: "{product}/{ratio}/cutout-of-{hero.variant}.{ext}"
  - model: flux-kontext-pro
    prompt: "{product} in a room"
    input: {image_url: "{hero.2.url}"}
    path: "{product}/{ratio}/pinned.{ext}"
  - model: flux-kontext-pro
    prompt: "a collage of every {product}"
    imageURLList: "{hero.urls}"
    path: "{product}/collage.{ext}"
""",
    )
    plan = plan_of(m)
    heroes = by(plan, "flux-2")
    hero_of = {(*cell(s), s.variant): s.id for s in heroes}
    assert len(heroes) == 12
    cutouts = [s for s in by(plan, "recraft-remove-bg") if "cutout-of" in s.path]
    assert len(cutouts) == 12  # one per hero variant
    for s in cutouts:
        assert s.after == (hero_of[(*cell(s), s.vars["hero.variant"])],) and s.variant == 1
    pinned = [s for s in plan.specs if "pinned" in s.path]
    assert len(pinned) == 4 and all(s.after == (hero_of[(*cell(s), 2)],) for s in pinned)
    collages = [s for s in plan.specs if "collage" in s.path]
    assert len(collages) == 2  # one per product: fan-in over ratio and variants
    for s in collages:
        wanted = [hero_of[(s.vars["product"], r, v)] for r in ("1:1", "9:16") for v in (1, 2, 3)]
        assert json.loads(s.body["imageURLList"]) == [RESULT_PREFIX + i for i in wanted]
        assert list(s.after) == wanted


def test_ids_are_stable_and_an_upstream_edit_changes_exactly_its_downstream(write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", CHAIN)
    first = {s.path: s.id for s in plan_of(m).specs}
    assert first == {s.path: s.id for s in plan_of(m).specs}
    write("m.yaml", CHAIN.replace('prompt: "{product} on oak, soft daylight"', 'prompt: "{product} on walnut, soft daylight"'))
    edited = {s.path: s.id for s in plan_of(m).specs}
    assert {p for p in first if first[p] != edited[p]} == set(first)  # every step of every cell is downstream of the edit
    write("m.yaml", CHAIN.replace('"{product} turning slowly"', '"{product} turning fast"'))
    video_edit = {s.path: s.id for s in plan_of(m).specs}
    assert {p for p in first if first[p] != video_edit[p]} == {p for p in first if p.endswith("video.{ext}")}
    write("m.yaml", CHAIN.replace("matrix: {product: [lamp, chair]", "matrix: {product: [lamp, chair, desk]"))
    grown = {s.path: s.id for s in plan_of(m).specs}
    assert all(grown[p] == i for p, i in first.items()) and len(grown) == 18  # a new cell adds its chain, changes nothing else


def test_every_bad_reference_is_refused_with_file_and_line(write, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "bad.yaml",
        """\
matrix: {product: [lamp, chair], ratio: ["1:1", "9:16"]}
jobs:
  - id: hero
    model: flux-2
    prompt: "{product} on oak, {cutout.url}"
  - id: cutout
    model: recraft-remove-bg
    input: {image_url: "{hero.url}"}
  - id: hero
    model: recraft-remove-bg
    input: {image_url: "{hero.url}"}
  - model: recraft-remove-bg
    input: {image_url: "{heor.url}"}
  - model: recraft-remove-bg
    input: {image_url: "{other.url}"}
""",
    )
    found = problems(m)
    assert any(p.startswith(f"{m}:9: jobs[2].id: 'hero' is also the id of jobs[0]") and "ambiguous" in p for p in found)
    assert any(p.startswith(f"{m}:3: jobs[0]: circular references (hero → cutout → hero)") for p in found)
    assert any(p.startswith(f"{m}:13: jobs[3].input refers to {{heor.url}}") and "did you mean {hero.url}?" in p for p in found)
    assert any(p.startswith(f"{m}:15: jobs[4].input refers to {{other.url}}, but no job has id 'other'") for p in found)
    assert len(found) == 4  # no echo of the same problem as an undefined var
    m2 = write(
        "bad2.yaml",
        """\
matrix: {product: [lamp, chair], ratio: ["1:1", "9:16"]}
jobs:
  - id: hero
    model: flux-2
    prompt: "{product} on oak"
    input: {aspect_ratio: "{ratio}"}
  - model: recraft-remove-bg
    matrix: {ratio: ["4:5"]}
    input: {image_url: "{hero.url}"}
  - model: recraft-remove-bg
    input: {image_url: "{hero.2.url}"}
  - model: flux-kontext-pro
    prompt: "see {hero.urls}"
  - model: "{hero.url}"
""",
    )
    found = problems(m2)
    assert any(
        p.startswith(f"{m2}:9: jobs[1].input: {{hero.url}}: this job's cell has ratio='4:5'") and "do not line up" in p for p in found
    )
    assert any(p.startswith(f"{m2}:11: jobs[2].input: {{hero.2.url}} pins variant 2, but hero makes variants 1–1") for p in found)
    assert any(p.startswith(f"{m2}:13: jobs[3].prompt: {{hero.urls}} is a list of results") for p in found)
    assert any(p.startswith(f"{m2}:14: jobs[4].model: {{hero.url}} is a reference") for p in found)
    done = cli("plan", str(m2), "--sandbox")  # the CLI: exit 2, every problem with its line, nothing sent
    assert done.returncode == 2 and f"{m2}:9:" in done.stderr and "nothing was sent" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_real_run_of_a_pipeline_needs_storage_for_the_results(write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", CHAIN)
    done = cli("plan", str(m))
    assert done.returncode == 2 and f"{m}:11:" in done.stderr and "other jobs' results ({ID.url}) need object storage" in done.stderr
    folder = m.parent / "kept"  # a local folder as storage: the API would be sent file: URLs naming the disk (it was accepted)
    for args in ((), ("--sandbox",)):
        done = cli("plan", str(m), "--storage", str(folder), *args)
        assert done.returncode == 2 and f"{m}:11: other jobs' results ({{ID.url}}) need object storage" in done.stderr
        assert f"the storage {folder} is a local folder" in done.stderr and "use s3://, gs:// or az:// storage" in done.stderr
    done = cli("run", str(m), "--sandbox", "--storage", folder.as_uri(), "--out", str(m.parent / "out"))
    assert done.returncode == 2 and "--sandbox without storage serves them itself" in done.stderr and not (m.parent / "out").exists()


# -- running --------------------------------------------------------------------------------------

PHOTO_CHAIN = """\
name: photo-chain
rows: {files: "photos/*.png"}
path: "{stem}/{step}.{ext}"
jobs:
  - id: hero
    vars: {step: hero}
    model: flux-kontext-pro
    prompt: "{stem} on oak, soft daylight"
    input: {image_url: "{file}", aspect_ratio: "1:1"}
  - id: cutout
    vars: {step: cutout}
    model: recraft-remove-bg
    input: {image_url: "{hero.url}"}
  - vars: {step: video}
    model: kling-video-turbo
    input: {prompt: "{stem} turning slowly", image_url: "{cutout.url}", duration: "5"}
"""


def photos(tmp: Path, *stems: str) -> None:
    (tmp / "photos").mkdir(exist_ok=True)
    for i, stem in enumerate(stems):
        colour = (40 * i % 256, 200, 90)
        data = make_png(48, 32, lambda x, y, c=colour: c if 12 <= x < 36 and 8 <= y < 24 else (255, 255, 255))  # type: ignore[misc]
        (tmp / "photos" / f"{stem}.png").write_bytes(data)


def report_of(out: Path) -> dict[str, Any]:
    report = json.loads((out / "report.json").read_text())
    for job in report["jobs"]:  # every finished file whole
        if job["state"] == "done":
            assert sha((out / job["path"]).read_bytes()) == job["sha256"]
    assert not list(out.rglob("*.tmp"))
    return dict(report)


def chains(out: Path) -> dict[str, dict[str, Any]]:
    """Each job of the state by path template: its row and its upstream ids."""
    with Store.open(out, lock=False) as store:
        return {json.loads(r["spec"])["path"]: {**dict(r), "after": json.loads(r["spec"]).get("after", [])} for r in store.rows()}


async def test_three_steps_end_to_end_each_input_is_the_upstream_results_own_bytes(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    photos(tmp_path, "lamp", "chair", "desk")
    m = write("chain.yaml", PHOTO_CHAIN)
    out = tmp_path / "out"
    async with serve(sandbox()) as (sb, url):
        result = await run_campaign(plan_of(m), cfg(out), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.counts == {"done": 9}
        tasks = sb.tasks
        assert sb.stats.tasks_created == 9
        assert sb.stats.downloads == 9  # each result fetched once, by us: no request handed the API its own fileURL
    report = report_of(out)
    jobs = {j["id"]: j for j in report["jobs"]}
    rows = chains(out)
    for stem in ("lamp", "chair", "desk"):
        hero, cutout, video = (rows[f"{stem}/{step}.{{ext}}"] for step in ("hero", "cutout", "video"))
        photo = sha((tmp_path / "photos" / f"{stem}.png").read_bytes())
        assert dict(tasks[hero["task_id"]].inputs) == {"input.image_url": photo}
        assert cutout["after"] == [hero["id"]] and video["after"] == [cutout["id"]]
        assert dict(tasks[cutout["task_id"]].inputs) == {"input.image_url": jobs[hero["id"]]["sha256"]}  # the hero's own bytes
        assert dict(tasks[video["task_id"]].inputs) == {"input.image_url": jobs[cutout["id"]]["sha256"]}
    state = (out / ".batchrunner" / "state.sqlite").read_bytes()
    assert b"apiKey" not in state and KEY.encode() not in state and b"sig=" not in state
    gallery = (out / "report.html").read_text()
    assert "lamp/hero.png" in gallery and "class=chain" in gallery and "photos/lamp.png" in gallery


async def test_concurrency_holds_across_steps_and_downstream_jobs_start_before_the_first_step_ends(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("chain.yaml", CHAIN.replace("[lamp, chair]", "[" + ", ".join(f"p{i}" for i in range(8)) + "]"))
    async with serve(sandbox(time_scale=0.003)) as (sb, url):
        result = await run_campaign(plan_of(m), cfg(tmp_path, concurrency=3), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.counts == {"done": 48}
        assert 1 < sb.stats.max_in_flight <= 3
    rows = list(chains(tmp_path).values())
    last_hero = max(r["submitted_at"] for r in rows if r["model"] == "flux-2")
    first_video = min(r["submitted_at"] for r in rows if r["model"] == "kling-video-turbo")
    assert first_video < last_hero  # a chain ran on as soon as its own inputs were done, not step by step
    for r in rows:
        for upstream in r["after"]:
            assert next(u for u in rows if u["id"] == upstream)["finished_at"] <= r["submitted_at"]


async def test_an_upstream_failure_fails_its_dependents_unsent_then_retry_runs_the_chain(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("chain.yaml", CHAIN)
    async with serve(sandbox(fail_prompts=("chair on oak",))) as (sb, url):
        result = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.outcome == "failed" and result.counts == {"done": 6, "failed": 6}
        assert sb.stats.tasks_created == 8  # 4 heroes (2 failed by the API), 2 cut-outs and 2 videos of lamp
        rows = chains(tmp_path)
        for ratio in ("1_1", "9_16"):
            hero, cutout, video = (rows[f"chair/{ratio}/{step}.{{ext}}"] for step in ("hero", "cutout", "video"))
            assert hero["state"] == "failed" and "content policy" in hero["error"]
            assert cutout["state"] == "failed" and cutout["error"] == f"input chair/{ratio}/hero failed"
            assert video["state"] == "failed" and video["error"] == f"input chair/{ratio}/cutout failed"
            assert cutout["sends"] == video["sends"] == 0 and cutout["credits_spent"] == video["credits_spent"] == 0
        again = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)  # a plain run: the API's failure stays
        assert again.counts == {"done": 6, "failed": 6} and sb.stats.tasks_created == 8
        planned = preview(plan_of(m), cfg(tmp_path))  # plan, the dry run, says the same: nothing to send, 6 failed
        assert (planned.to_submit, planned.stays_failed) == (0, 6)
        assert preview(plan_of(m), cfg(tmp_path, retry_failed=True)).to_submit == 6
        sb.config = replace(sb.config, fail_prompts=())
        retried = await run_campaign(None, cfg(tmp_path, retry_failed=True), api_key=KEY, base_url=url)  # `batchrunner retry DIR`
        assert retried.outcome == "complete" and retried.counts == {"done": 12}
        assert sb.stats.tasks_created == 14  # the 2 failed heroes again, then their 4 dependents: nothing else
    report_of(tmp_path)


async def test_a_deleted_or_rejected_upstream_result_remakes_its_dependents_only(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("chain.yaml", CHAIN)
    async with serve(sandbox()) as (sb, url):
        await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert sb.stats.tasks_created == 12
        (tmp_path / "lamp/1_1/hero.png").unlink()
        result = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.counts == {"done": 12} and sb.stats.tasks_created == 15  # lamp 1:1's hero, cut-out and video
        rows = chains(tmp_path)
        with Store.open(tmp_path, lock=False, write=True) as store:
            assert store.decide([rows["chair/9_16/cutout.{ext}"]["id"]], "rejected")
        result = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert result.counts == {"done": 12} and sb.stats.tasks_created == 17  # chair 9:16's cut-out (take 2) and its video
        assert (tmp_path / "rejected/chair/9_16/cutout.take1.png").exists()
        tasks = sb.tasks
    rows = chains(tmp_path)
    cutout, video = rows["chair/9_16/cutout.{ext}"], rows["chair/9_16/video.{ext}"]
    assert cutout["take"] == 2 and dict(tasks[video["task_id"]].inputs) == {"input.image_url": cutout["sha256"]}
    report_of(tmp_path)


def kill_after(args: list[str], env: dict[str, str], lines: int) -> bool:
    """Start the real CLI and kill -9 it once it has printed ``lines`` lines (an event, not a sleep); False if it ended first."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_"))} | env
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrunner.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
    )
    assert proc.stdout is not None
    try:
        for n, _ in enumerate(proc.stdout, 1):
            if n >= lines:
                proc.send_signal(signal.SIGKILL)
                return True
        return False
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def sandbox_tasks(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sandbox/tasks", timeout=10) as resp:
        return dict(json.loads(resp.read()))


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_at_random_moments_of_a_pipeline_then_resume_loses_nothing_and_pays_once(s3: S3Server, tmp_path: Path, seed: int) -> None:
    photos(tmp_path, "lamp", "chair", "desk", "sofa")
    prefix = f"pipeline-kill-{os.urandom(4).hex()}"
    storage = f"storage:\n  url: {s3.url(prefix)}\n  endpoint: {s3.endpoint}\n  url_lifetime: 30m\n"
    m = tmp_path / "chain.yaml"
    m.write_text(PHOTO_CHAIN.replace("jobs:\n", storage + "concurrency: 3\njobs:\n", 1))
    out = tmp_path / "out"
    rng = random.Random(seed)
    args = ["run", str(m), "--out", str(out), "--poll-scale", "0.001", "-v"]
    with sandbox_process("--time-scale", "0.001") as url:
        env = {"CLIPRISE_API_KEY": "sandbox-key", "CLIPRISE_BASE_URL": url}
        env |= {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1"}
        kills = 0
        for _ in range(3):  # three hard kills at seeded moments: the run's nth line of output
            kills += kill_after(args, env, rng.randint(2, 30))
        assert kills, "no kill landed: the test proves nothing"
        resumed = cli(*args[:-1], env=env)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        created = stats(url)["tasks_created"]
        tasks = sandbox_tasks(url)
    report = report_of(out)
    assert report["summary"]["counts"] == {"done": 12}
    assert created <= 12 + report["summary"]["ambiguous_resubmitted"]
    rows = chains(out)
    for stem in ("lamp", "chair", "desk", "sofa"):
        hero, cutout, video = (rows[f"{stem}/{step}.{{ext}}"] for step in ("hero", "cutout", "video"))
        assert tasks[cutout["task_id"]]["inputs"] == {"input.image_url": hero["sha256"]}
        assert tasks[video["task_id"]]["inputs"] == {"input.image_url": cutout["sha256"]}


def test_plan_shows_steps_credits_and_why_a_rerun_makes_what_it_makes(write, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = write("chain.yaml", CHAIN + "credits: {flux-2: 4, recraft-remove-bg: 1, kling-video-turbo: 20}\n")
    out = tmp_path / "out"
    planned = json.loads(cli("plan", str(m), "--sandbox", "--out", str(out), "--json").stdout)
    assert planned["steps"] == [
        {"step": "hero", "model": "flux-2", "jobs": 4, "credits": 16.0, "uses": []},
        {"step": "cutout", "model": "recraft-remove-bg", "jobs": 4, "credits": 4.0, "uses": ["hero"]},
        {"step": "kling-video-turbo (line 12)", "model": "kling-video-turbo", "jobs": 4, "credits": 80.0, "uses": ["cutout"]},
    ]
    text = cli("plan", str(m), "--sandbox", "--out", str(out)).stdout
    assert "steps (a job waits for the results it uses" in text and "uses hero" in text
    assert cli("run", str(m), "--sandbox", "--out", str(out)).returncode == 0
    write("chain.yaml", m.read_text().replace("on oak,", "on walnut,"))
    planned = json.loads(cli("plan", str(m), "--sandbox", "--out", str(out), "--json").stdout)
    assert planned["to_submit"] == 12 and planned["credits_to_run"] == 100.0
    assert planned["redo"] == [
        {"step": "hero", "why": "new or edited", "jobs": 4},
        {"step": "cutout", "why": "hero changed (its id is new)", "jobs": 4},
        {"step": "kling-video-turbo (line 12)", "why": "cutout changed (its id is new)", "jobs": 4},
    ]
    write("chain.yaml", m.read_text().replace("on walnut,", "on oak,"))
    (out / "chair/1_1/hero.png").unlink()
    planned = json.loads(cli("plan", str(m), "--sandbox", "--out", str(out), "--json").stdout)
    assert planned["to_submit"] == 3 and planned["files_gone"] == 1
    assert [(r["step"], r["jobs"]) for r in planned["redo"]] == [("hero", 1), ("cutout", 1), ("kling-video-turbo (line 12)", 1)]
    assert planned["redo"][0]["why"] == "its result file is gone, or was rejected in review"  # the hero itself: it was not listed
    assert all("results of hero it uses, directly or not, are made again" in r["why"] for r in planned["redo"][1:])
    ran = cli("run", str(m), "--sandbox", "--out", str(out))
    assert ran.returncode == 0 and "ran 3 (3 done), skipped 9 already done" in ran.stdout
    status = cli("status", str(out)).stdout
    assert "done         12" in status


def test_the_readme_pipeline_example_counts_prices_and_lists_its_steps_as_shown(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("name: launch-chain")
    example = tmp_path / "launch.yaml"
    example.write_text(readme[start : readme.index("```", start)])
    planned = json.loads(cli("plan", str(example), "--json").stdout)
    assert planned["jobs"] == 12 and planned["credits"] == 180 and "(12 jobs, 180 credits)" in readme
    assert [(s["step"], s["jobs"], s["credits"], s["uses"]) for s in planned["steps"]] == [
        ("hero", 4, 16, []), ("cutout", 4, 4, ["hero"]), ("video", 4, 160, ["cutout"]),
    ]  # fmt: skip
    shown = cli("plan", str(example)).stdout
    for line in ("hero                         flux-2", "cutout                       recraft-remove-bg", "uses cutout"):
        assert line in shown and line in readme


def test_the_demo_is_a_pipeline_from_the_shipped_photos_and_its_gallery_shows_each_chain(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    planned = cli("plan", "manifests/demo.yaml", "--sandbox", "--out", str(tmp_path), cwd=root)
    assert planned.returncode == 0
    assert planned.stdout.endswith(f"  to run it: batchrunner run manifests/demo.yaml --sandbox --out {tmp_path}\n")
    done = cli("run", "manifests/demo.yaml", "--sandbox", "--out", str(tmp_path), cwd=root)
    assert done.returncode == 0, done.stderr
    report = report_of(tmp_path)
    assert report["summary"]["counts"] == {"done": 21}
    steps = {j["step"] for j in report["jobs"]}
    assert steps == {"hero", "cutout", "video", "sheet"}
    for stem in ("perfume", "sneaker", "watch"):
        photo = root / "manifests/photos" / f"{stem}.png"
        assert photo.stat().st_size < 4096  # small files in the repository
        video = next(j for j in report["jobs"] if j["path"] == f"{stem}/video-9_16.mp4")
        assert [label for label, _ in video["inputs"]] == [
            f"input {sha(photo.read_bytes())}.png", f"{stem}/hero-9_16.png", f"{stem}/cutout-9_16.png"
        ]  # fmt: skip
        assert (tmp_path / video["inputs"][0][1]).read_bytes() == photo.read_bytes()  # the photo's stored copy
        assert video["parameters"]["image_url"] == f"result of {stem}/cutout-9_16.png"
        sheet = next(j for j in report["jobs"] if j["path"] == f"{stem}/sheet.png")
        assert [label for label, _ in sheet["inputs"]][-2:] == [f"{stem}/cutout-1_1.png", f"{stem}/cutout-9_16.png"]
    gallery = (tmp_path / "report.html").read_text()
    assert gallery.count("<p class=chain>") == 15  # every card after the first step
    for _, href in video["inputs"]:
        assert (tmp_path / href).is_file()  # the chain links files that are there (the photo: its stored copy)
    rejected = cli("reject", str(tmp_path), "perfume/hero-1_1.png", "watch/video-9_16.mp4")  # the README's review example
    assert rejected.returncode == 0, rejected.stderr
    again = cli("run", "manifests/demo.yaml", "--sandbox", "--out", str(tmp_path), cwd=root)
    assert again.returncode == 0 and "ran 5 (5 done), skipped 16 already done" in again.stdout  # hero, cut-out, video, sheet; video
    assert (tmp_path / "rejected/perfume/hero-1_1.take1.png").is_file() and (tmp_path / "rejected/watch/video-9_16.take1.mp4").is_file()


def test_the_cli_retry_runs_the_failed_upstream_jobs_then_their_dependents(write, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = write("chain.yaml", CHAIN)
    out = str(tmp_path / "out")
    failed = cli("run", str(m), "--sandbox", "--sandbox-failure-rate", "1", "--out", out, "--quiet")
    assert failed.returncode == 1
    status = cli("status", out)
    assert "failed       12" in status.stdout and "input lamp/1_1/hero failed" in status.stdout
    assert json.loads(cli("status", out, "--json").stdout)["requests"]["sent"] == 4  # the heroes only: dependents unsent
    retried = cli("retry", out, "--sandbox", "--quiet")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert "ran 12 (12 done)" in retried.stdout
    report_of(Path(out))


def test_a_chain_too_long_is_refused_once_whatever_the_order_it_is_written_in(write) -> None:  # type: ignore[no-untyped-def]
    steps = ['  - id: s0\n    model: flux-2\n    prompt: "start"\n']
    steps += [f'  - id: s{i}\n    model: recraft-remove-bg\n    input: {{image_url: "{{s{i - 1}.url}}"}}\n' for i in range(1, 60)]
    for name, order in (("forward.yaml", steps), ("backward.yaml", steps[::-1])):
        found = problems(write(name, "jobs:\n" + "".join(order)))
        assert len(found) == 1 and "jobs[" in found[0] and "it ends a chain of more than 50 steps" in found[0], found
    assert len(plan_of(write("fifty.yaml", "jobs:\n" + "".join(steps[:50]))).specs) == 50


async def test_a_job_made_from_an_upstream_result_since_made_again_is_remade(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    m = write("chain.yaml", CHAIN)
    async with serve(sandbox()) as (sb, url):
        await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        rows = chains(tmp_path)
        # a kill while the lamp 1:1 cut-out was in flight, and its hero's file deleted since: the cut-out, already
        # paid, is collected — made from the old hero — while the hero is made again
        cutout = rows["lamp/1_1/cutout.{ext}"]
        with sqlite3.connect(tmp_path / ".batchrunner" / "state.sqlite") as conn:
            conn.execute("UPDATE jobs SET state = 'submitted', path = NULL, sha256 = NULL WHERE id = ?", (cutout["id"],))
        (tmp_path / "lamp/1_1/cutout.png").unlink()
        (tmp_path / "lamp/1_1/hero.png").unlink()
        first = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert first.counts == {"done": 12} and sb.stats.tasks_created == 14  # the hero again, the video again
        second = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert second.counts == {"done": 12} and sb.stats.tasks_created == 16  # the stale cut-out and its video
        third = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert third.counts == {"done": 12} and sb.stats.tasks_created == 16  # settled
        tasks = sb.tasks
    rows = chains(tmp_path)
    hero, cutout, video = (rows[f"lamp/1_1/{step}.{{ext}}"] for step in ("hero", "cutout", "video"))
    assert dict(tasks[cutout["task_id"]].inputs) == {"input.image_url": hero["sha256"]}
    assert dict(tasks[video["task_id"]].inputs) == {"input.image_url": cutout["sha256"]}


def test_waiting_jobs_show_in_status_and_the_report(write, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = write("chain.yaml", CHAIN)
    out = tmp_path / "out"
    with Store.open(out) as store:  # the state a run leaves when stopped before any hero finished
        store.claim("chain")
        store.sync(plan_of(m).specs)
        assert store.settle() == {"waiting": 8, "remade": 0, "failed": 0}
    status = cli("status", str(out))
    assert "pending      4" in status.stdout and "waiting      8  (for other jobs' results: pipelines)" in status.stdout
    assert json.loads(cli("status", str(out), "--json").stdout)["counts"] == {"pending": 4, "waiting": 8}
    assert cli("report", str(out)).returncode == 0
    page = (out / "report.html").read_text()
    assert page.count('data-state="waiting"') == 8 and "waiting for its inputs (other jobs&#x27; results)" in page
    assert {j["state"] for j in json.loads((out / "report.json").read_text())["jobs"]} == {"pending", "waiting"}


async def test_an_upstream_result_replaced_or_changed_since_fails_its_dependents_only_and_is_never_sent(
    tmp_path: Path,
    write,  # type: ignore[no-untyped-def]
) -> None:
    m = write("chain.yaml", CHAIN)
    async with serve(sandbox()) as (sb, url):
        await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert sb.stats.tasks_created == 12
        secret = tmp_path.parent / "secret.png"  # a file outside the campaign: a link to it must never be read and sent
        secret.write_bytes(make_png(40, 40, lambda x, y: (x, y, 7)))
        (tmp_path / "lamp/1_1/hero.png").unlink()
        (tmp_path / "lamp/1_1/hero.png").symlink_to(secret)
        changed = tmp_path / "chair/1_1/hero.png"  # the same size, other bytes
        data = bytearray(changed.read_bytes())
        data[-13] ^= 0xFF
        changed.write_bytes(bytes(data))
        for copy in (tmp_path / ".batchrunner" / "inputs").iterdir():  # no verified copy left to serve instead
            copy.unlink()
        for cell in ("lamp/1_1", "chair/1_1"):
            (tmp_path / cell / "cutout.png").unlink()
        result = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)  # no run-level error
        assert result.outcome == "failed" and result.counts == {"done": 8, "failed": 4}
        assert sb.stats.tasks_created == 12  # nothing sent
        assert sha(secret.read_bytes()) not in sb.stats.inputs_by_sha
        rows = chains(tmp_path)
        for cell in ("lamp/1_1", "chair/1_1"):
            error = rows[f"{cell}/cutout.{{ext}}"]["error"]
            assert error.startswith(f"input {cell}/hero.png is not the file that was made") and "delete it" in error
            assert rows[f"{cell}/video.{{ext}}"]["error"] == f"input {cell}/cutout failed"
        for cell in ("lamp/1_1", "chair/1_1"):  # as the message says: delete them, run again
            (tmp_path / cell / "hero.png").unlink()
        again = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=url)
        assert again.outcome == "complete" and again.counts == {"done": 12}
        tasks = sb.tasks
    rows = chains(tmp_path)
    for cell in ("lamp/1_1", "chair/1_1"):
        hero, cutout = rows[f"{cell}/hero.{{ext}}"], rows[f"{cell}/cutout.{{ext}}"]
        assert dict(tasks[cutout["task_id"]].inputs) == {"input.image_url": hero["sha256"]}
    report_of(tmp_path)


def test_rows_are_taken_whole_and_an_upstream_that_cannot_be_made_is_named_on_the_referring_line(write) -> None:  # type: ignore[no-untyped-def]
    write("rows.csv", "product,color\nlamp,red\nchair,blue\n")
    head = 'rows: rows.csv\npath: "{step}-{job_id}.{ext}"\njobs:\n  - id: hero\n    model: flux-2\n    prompt: "{product} in {color}"\n'
    cut = '  - id: cut\n    model: recraft-remove-bg\n    vars: {product: lamp}\n    input: {image_url: "{hero.url}"}\n'
    pinned = write("pinned.yaml", head + cut)
    found = problems(pinned)  # it was accepted: a cut-out of lamp in blue, waiting for a hero no job makes, forever
    assert len(found) == 1 and found[0].startswith(f"{pinned}:9: jobs[1]: sets product (of rows:) itself and uses {{hero.url}}")
    assert "a row is taken whole" in found[0] and "{hero.urls}" in found[0]
    mixed = write("mixed.yaml", head + cut.replace("vars: {product: lamp}", "matrix: {product: [lamp, sofa]}"))
    assert problems(mixed)[0].startswith(f"{mixed}:9: jobs[1]: sets product (of rows:) itself")
    sheet = '  - id: sheet\n    model: flux-kontext-pro\n    prompt: sheet\n    vars: {product: PICK}\n    imageURLList: "{hero.urls}"\n'
    plan = plan_of(write("fanin.yaml", head + sheet.replace("PICK", "lamp")))  # a var it sets pins the rows it takes
    heroes = {s.vars["product"]: s.id for s in by(plan, "flux-2")}
    (taken,) = by(plan, "flux-kontext-pro")
    assert taken.after == (heroes["lamp"],) and json.loads(taken.body["imageURLList"]) == [RESULT_PREFIX + heroes["lamp"]]
    none = write("none.yaml", head + sheet.replace("PICK", "sofa"))
    assert problems(none) == [f"{none}:10: jobs[1].vars: {{hero.urls}}: no row has product='sofa', so there are no results of hero to take"]
    broken = write(
        "broken.yaml",
        'jobs:\n  - id: y\n    model: flux-2\n    prompt: "{nothing}"\n  - model: recraft-remove-bg\n    input: {image_url: "{y.url}"}\n',
    )
    assert problems(broken) == [
        f"{broken}:4: jobs[0].prompt uses {{nothing}}, which is not defined (defined: none)",
        f"{broken}:6: jobs[1].input: {{y.url}}: y cannot be made for this cell ({{nothing}} is not defined) — fix y (line 2) first",
    ]  # it said "jobs[1].prompt uses {nothing}" (a field it does not have)


def test_an_id_a_reference_cannot_name_is_refused_on_its_own_line(write) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "m.yaml",
        'jobs:\n  - id: élan\n    model: flux-2\n    prompt: "x"\n  - model: recraft-remove-bg\n    input: {image_url: "{élan.url}"}\n',
    )
    found = problems(m)  # it was accepted, and its reference refused as "not a plain variable name"
    assert found[0] == f"{m}:2: jobs[0].id: must be a name of letters, digits and _ (such as hero), not 'élan'", found


def test_jobs_from_a_jobs_csv_are_numbered_in_order(write) -> None:  # type: ignore[no-untyped-def]
    write("more.csv", "model,image_url\nrecraft-remove-bg,{hero.url}\nrecraft-remove-bg,{nope.url}\nrecraft-remove-bg,{hero.7.url}\n")
    m = write("m.yaml", 'jobs_csv: more.csv\njobs:\n  - id: hero\n    model: flux-2\n    prompt: "a lamp"\n')
    found = problems(m)
    assert any(p.startswith(f"{m.parent / 'more.csv'}:3: jobs[2].input refers to {{nope.url}}") for p in found), found
    assert any(p.startswith(f"{m.parent / 'more.csv'}:4: jobs[3].input: {{hero.7.url}} pins variant 7") for p in found), found
    csv = write("c.csv", "id,model,prompt,image_url\nhero,flux-2,a lamp,\n,recraft-remove-bg,,{hero.url}\n")
    done = cli("plan", str(csv), "--sandbox")  # a CSV's id column is a model field, as documented: say so where it matters
    assert done.returncode == 2 and f"{csv}:3: jobs[1].input refers to {{hero.url}}, but no job has id 'hero'" in done.stderr
    assert "a CSV column 'id' is a model field, sent as input.id" in done.stderr


def test_the_text_batchrunner_puts_in_place_of_a_result_or_a_file_is_refused_where_written(write) -> None:  # type: ignore[no-untyped-def]
    # it was accepted, then sent with a signed URL to another job's result in its place, or failed at its submit
    # ("no storage is configured", even with --sandbox)
    m = write(
        "m.yaml",
        'jobs:\n  - id: hero\n    model: flux-2\n    prompt: "a lamp"\n  - model: flux-2\n'
        '    prompt: "about batchrunner-result:0123456789abcdef0123"\n',
    )
    assert problems(m) == [
        f"{m}:6: jobs[1].prompt: contains 'batchrunner-result:', which batchrunner writes itself in place of a job's result "
        "until it is sent — write {ID.url} to use the result of the job with id: ID"
    ]
    write("rows.csv", "product,note\nlamp,batchrunner-input:abc.png\n")
    rows = write("rows.yaml", 'rows: rows.csv\njobs:\n  - model: flux-2\n    prompt: "{product} {note}"\n')
    assert problems(rows) == [
        f"{rows}:1: rows (row 1): contains 'batchrunner-input:', which batchrunner writes itself in place of a local file "
        "until it is sent — write file:PATH"
    ]
    csv = write("c.csv", "model,prompt\nflux-2,see batchrunner-result:0123456789abcdef0123\n")
    done = cli("plan", str(csv), "--sandbox")
    assert done.returncode == 2 and f"{csv}:2: jobs[0].prompt: contains 'batchrunner-result:'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_list_of_results_as_an_item_of_a_list_is_refused(write) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "m.yaml",
        """\
matrix: {product: [lamp, chair]}
jobs:
  - id: hero
    model: flux-2
    prompt: "{product}"
  - model: flux-kontext-pro
    prompt: sheet
    imageURLList: ["{hero.urls}", "{hero.urls}"]
  - model: flux-kontext-pro
    prompt: sheet
    input: {image_urls: ["{hero.urls}"]}
""",
    )
    found = problems(m)  # it was accepted: the API refused the first ([[…]]: not an array of URLs), the second went as [[…]]
    assert [p.split(" — ")[0] if " — " in p else p.split(": write")[0] for p in found] == [
        f"{m}:8: jobs[1].imageURLList: {{hero.urls}} is a list of results already",
        f"{m}:11: jobs[2].input: {{hero.urls}} is a list of results already",
    ], found


async def test_no_request_carries_the_key_or_the_apis_result_url_only_our_own_signed_copy(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    """Every generate body the API receives, recorded by a loopback proxy in front of the sandbox."""
    import aiohttp
    from aiohttp import web

    m = write("chain.yaml", CHAIN)
    bodies: list[bytes] = []
    async with serve(sandbox()) as (sb, url), aiohttp.ClientSession() as session:

        async def forward(request: web.Request) -> web.StreamResponse:
            data = await request.read()
            if request.method == "POST":
                bodies.append(data)
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "host")}
            async with session.request(request.method, url + request.path_qs, data=data, headers=headers) as answer:
                return web.Response(status=answer.status, body=await answer.read(), content_type=answer.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            result = await run_campaign(plan_of(m), cfg(tmp_path), api_key=KEY, base_url=f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()
        assert result.outcome == "complete" and sb.stats.tasks_created == 12
    assert len(bodies) == 12
    sources = [json.loads(b)["input"]["image_url"] for b in bodies if "image_url" in json.loads(b)["input"]]
    assert len(sources) == 8  # every cut-out and video
    for body in bodies:
        assert KEY.encode() not in body and b"apiKey" not in body and b"cliprise" not in body and RESULT_PREFIX.encode() not in body
    for source in sources:  # a freshly signed URL to batchrunner's own loopback copy, content-addressed
        assert source.startswith("http://127.0.0.1:") and f":{port}/" not in source and "sig=" in source
    for item in tmp_path.rglob("*"):  # state, sidecars, reports, logs: neither the key nor a signature
        if item.is_file():
            data = item.read_bytes()
            assert KEY.encode() not in data and b"apiKey" not in data, item
            assert not any(text.split("?")[1].encode() in data for text in sources), item


def test_a_run_that_leaves_jobs_waiting_says_so_and_is_not_complete(write, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # a safety net: every known way for an input never to be made is refused when the manifest is read, so the state
    # is tampered with here — one finished job is made to wait for a job that does not exist
    import sqlite3

    m = write("chain.yaml", CHAIN)
    out = tmp_path / "out"
    assert cli("run", str(m), "--sandbox", "--out", str(out)).returncode == 0
    conn = sqlite3.connect(out / ".batchrunner" / "state.sqlite")
    with conn:
        (victim,) = conn.execute("SELECT id FROM jobs WHERE spec LIKE '%cutout%' ORDER BY id LIMIT 1").fetchone()
        conn.execute("UPDATE jobs SET state = 'waiting' WHERE id = ?", (victim,))
        conn.execute("INSERT INTO needs (job, upstream) VALUES (?, ?)", (victim, "0" * 16))
    conn.close()
    again = cli("run", str(m), "--sandbox", "--out", str(out))
    assert again.returncode == 1, again.stdout + again.stderr
    # the job, and the video made from it (made again, as its input is): both wait
    assert "2 job(s) still wait for inputs no job made" in again.stderr
    assert json.loads(cli("status", str(out), "--json").stdout)["counts"]["waiting"] == 2
