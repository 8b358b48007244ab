"""Hostile results and a hostile output folder, against the real CLI and the real sandbox (issue #10, items 1, 5, 6, 8).

A result is done only when it is verified media; a broken body is fetched again and, after
the retries, fails its job with the reason, leaving nothing at the final path. A download
that trickles ends by its deadline. Writes never follow a link they did not make. A job
that cannot be written fails alone; when nothing can be written the run stops once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchrunner import download
from batchrunner.download import Finisher
from batchrunner.errors import ResultWriteError
from batchrunner.runner import run_campaign
from batchrunner.sandbox import serve
from batchrunner.verify import verify

from .conftest import cli, sandbox_process, stats
from .test_run import KEY, cfg, plan_of, sandbox

MANIFEST = """\
name: hostile
path: "{{folder}}{{name}}.{{ext}}"
defaults: {{model: flux-2, input: {{aspect_ratio: "1:1"}}}}
jobs:
{jobs}
"""


def manifest(write: Callable[[str, str], Path], *groups: tuple[str, list[str]]) -> Path:
    """A manifest of one flux-2 job per name, each group in its folder ("" for the output folder itself)."""
    jobs = "".join(
        f'  - prompt: "a {{name}} bottle"\n    vars: {{folder: "{folder}"}}\n    matrix: {{name: [{", ".join(names)}]}}\n'
        for folder, names in groups
    )
    return write("hostile.yaml", MANIFEST.format(jobs=jobs))


def run(path: Path, out: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
    return cli("run", str(path), "--out", str(out), "--quiet", "--poll-scale", "0.001", "--concurrency", "8", *extra, env=env)


def jobs_by_name(out: Path) -> dict[str, dict[str, Any]]:
    return {job["vars"]["name"]: job for job in json.loads((out / "report.json").read_text())["jobs"]}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_broken_bodies_are_fetched_again_then_fail_leaving_nothing(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = manifest(write, ("", ["good1", "good2", "good3", "broken1", "broken2", "broken3"]))
    out, tasks = tmp_path / "out", tmp_path / "tasks.jsonl"
    faults = ("--p-random-body", "0.25", "--p-denied-page", "0.34", "--p-truncate-chunked", "0.5", "--p-truncate-eof", "1")
    with sandbox_process("--key", KEY, "--time-scale", "0", "--tasks-file", str(tasks), "--fault-prompt", "broken", *faults) as url:
        first = run(path, out, url)
        seen = stats(url)
    assert first.returncode == 1 and "Traceback" not in first.stderr
    jobs = jobs_by_name(out)
    for name in ("good1", "good2", "good3"):
        assert jobs[name]["state"] == "done" and verify(out / jobs[name]["path"], "image").kind == "png"
    for name in ("broken1", "broken2", "broken3"):
        job = jobs[name]
        assert job["state"] == "failed" and job["error"].startswith("gave up after 5 retries: ")
        assert (
            job["error"]
            .removeprefix("gave up after 5 retries: ")
            .startswith(
                (
                    "the result is not usable: not a media file: starts with ",  # random bytes, or the "Access denied" page
                    "the result is not usable: PNG ends before IEND",  # cut, without Content-Length: only the check can tell
                    "download interrupted: ClientPayloadError",  # a chunked body cut: the chunking tells
                )
            )
        )
        assert seen["status_by_task"][job["task_id"]] == 6  # asked once, then again at each of the 5 retries
    assert sum(seen["faults"].get(k, 0) for k in ("random_body", "denied_page", "truncate_chunked", "truncate_eof")) == 18
    assert not list(out.glob("broken*")) and not leftovers(out)  # no file at a final path, no sidecar, no temp

    # the failures are kept for a re-poll: a healthy answer later makes them done, and nothing is paid again
    with sandbox_process("--key", KEY, "--time-scale", "0", "--tasks-file", str(tasks)) as url:
        second = run(path, out, url)
        again = stats(url)
    assert second.returncode == 0, second.stderr
    assert again["tasks_created"] == 0 and again["downloads"] == 3
    jobs = jobs_by_name(out)
    assert all(job["state"] == "done" for job in jobs.values())
    assert verify(out / jobs["broken1"]["path"], "image").kind == "png"


async def test_a_trickling_download_ends_by_its_minimum_rate_or_its_deadline(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    plan = plan_of(manifest(write, ("", ["fast1", "fast2", "slow1"])))
    slow = sandbox(time_scale=0.0, p_slow_body=1.0, slow_body_interval_s=0.02, fault_prompt="slow")
    async with serve(slow) as (_, url):
        config = cfg(tmp_path / "rate", retries=1, download_min_rate_bps=1000.0, download_rate_window_s=0.2)
        result = await run_campaign(plan, config, api_key=KEY, base_url=url)
    assert result.counts == {"done": 2, "failed": 1}
    error = jobs_by_name(tmp_path / "rate")["slow1"]["error"]
    assert error.startswith("gave up after 1 retries: download too slow: under 200 bytes in 0.2 s (minimum 1000 bytes/s; ")
    assert not list((tmp_path / "rate").glob("slow1*")) and not leftovers(tmp_path / "rate")

    async with serve(slow) as (_, url):
        config = cfg(tmp_path / "deadline", retries=1, download_deadline_s=0.3, download_min_rate_bps=0.0)
        result = await run_campaign(plan, config, api_key=KEY, base_url=url)
    assert result.counts == {"done": 2, "failed": 1}
    error = jobs_by_name(tmp_path / "deadline")["slow1"]["error"]
    assert error.startswith("gave up after 1 retries: download not finished within its 0.3 s deadline (")


def test_planted_links_are_replaced_or_refused_never_written_through(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (outside / "dir").mkdir()
    with sandbox_process("--key", KEY, "--time-scale", "0") as url:
        assert run(manifest(write, ("img/", ["seed"])), out, url).returncode == 0  # the campaign's state exists
        planted = {
            "img/.a.part.tmp": "temp",  # the temp name of job a
            "img/b.png": "final",  # the final name of job b
            "img/c.png.json": "sidecar",  # job c's sidecar
            "img/.d.png.json.tmp": "sidecar temp",  # job d's sidecar temp
            ".report.json.tmp": "report temp",
            "report.html": "report",
        }
        for rel, what in planted.items():
            (outside / what).write_text("precious")
            (out / rel).unlink(missing_ok=True)
            (out / rel).symlink_to(outside / what)
        (out / "linked").symlink_to(outside / "dir")  # a folder segment
        path = manifest(write, ("img/", ["seed", "a", "b", "c", "d"]), ("linked/", ["e"]))
        result = run(path, out, url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for what in planted.values():
        assert (outside / what).read_text() == "precious", what
    assert not list((outside / "dir").iterdir())
    jobs = jobs_by_name(out)
    assert jobs["e"]["state"] == "failed"
    assert jobs["e"]["error"] == (
        "linked is a symbolic link: results are written only into real folders inside the output folder (replace the link with a folder)"
    )
    for name in "abcd":
        assert jobs[name]["state"] == "done"
        file = out / jobs[name]["path"]
        assert not file.is_symlink() and verify(file, "image").kind == "png"
        sidecar = out / (jobs[name]["path"] + ".json")
        assert not sidecar.is_symlink() and json.loads(sidecar.read_text())["job_id"] == jobs[name]["id"]
    for rel in ("img/.a.part.tmp", "img/.d.png.json.tmp", ".report.json.tmp"):
        assert not (out / rel).is_symlink() and not (out / rel).exists()
    assert not (out / "report.html").is_symlink() and "<html" in (out / "report.html").read_text()


def test_a_file_where_a_folder_is_needed_fails_that_job_only(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    # (tests run as root, where a chmod'ed folder is still writable: a file in the way is what cannot be written)
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("not a folder")
    path = manifest(write, ("", ["one", "two"]), ("blocked/", ["three"]), ("fine/deeper/", ["four"]))
    with sandbox_process("--key", KEY, "--time-scale", "0") as url:
        result = run(path, out, url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    jobs = jobs_by_name(out)
    assert jobs["three"]["state"] == "failed" and jobs["three"]["error"] == "blocked is a file where a folder is needed (move it away)"
    assert {name: job["state"] for name, job in jobs.items() if name != "three"} == {"one": "done", "two": "done", "four": "done"}
    assert (out / "blocked").read_text() == "not a folder" and not leftovers(out)


@pytest.fixture
def tmpfs() -> Iterator[Callable[..., None]]:
    """Mount a small tmpfs (root, where ``mount`` is permitted); skip with the reason otherwise."""
    mounted: list[Path] = []

    def mount(where: Path, size: str, *options: str) -> None:
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: a full or read-only file system cannot be made")
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(where)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): a full or read-only file system needs root")
        mounted.append(where)

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_stops_the_run_once_then_it_resumes(tmp_path: Path, write, tmpfs) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    tmpfs(out / "full", "48k")  # room for a few results and their sidecars (a page each)
    names = [f"n{i:02d}" for i in range(24)]
    path = manifest(write, ("full/", names))
    with sandbox_process("--key", KEY, "--time-scale", "0") as url:
        first = run(path, out, url, "--concurrency", "4")
        assert first.returncode == 1 and "Traceback" not in first.stderr
        errors = [line for line in first.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on the device; nothing more can be written there" in errors[0]
        jobs = jobs_by_name(out)
        states = [job["state"] for job in jobs.values()]
        assert "failed" not in states and 0 < states.count("done") < len(names)  # the rest wait for the next run, none failed
        assert not leftovers(out)
        subprocess.run(["mount", "-o", "remount,size=4m", str(out / "full")], check=True)  # space freed
        second = run(path, out, url)
        paid = stats(url)["tasks_created"]
    assert second.returncode == 0, second.stderr
    assert all(job["state"] == "done" for job in jobs_by_name(out).values())
    assert paid == len(names)  # jobs already submitted were fetched, not paid again


def test_a_read_only_file_system_stops_the_run_once(tmp_path: Path, write, tmpfs) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    tmpfs(out / "ro", "1m", "ro")
    path = manifest(write, ("", ["one", "two"]), ("ro/", ["three"]))
    with sandbox_process("--key", KEY, "--time-scale", "0") as url:
        result = run(path, out, url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: cannot write ro/three.png: the file system is read-only; nothing more can be written there" in result.stderr
    assert jobs_by_name(out)["three"]["state"] in ("submitted", "pending")


async def test_names_the_file_system_refuses_fail_that_result_plainly(tmp_path: Path) -> None:
    long = "n" * 250  # the result's name fits, its sidecar's temp name (.<name>.json.tmp) does not
    finisher = Finisher(tmp_path)
    try:
        with pytest.raises(ResultWriteError, match=r"^cannot write x/n+\.png: the name is too long for the file system$"):
            await finisher.finish(f"x/.{long[:200]}.tmp", b"data", f"x/{long}.png", "{}\n")
        with pytest.raises(ResultWriteError, match=r"^cannot write into '\.\./x': '\.\.' is not a folder name$"):
            await finisher.finish("../x/.a.tmp", b"data", "../x/a.png", "{}\n")
    finally:
        finisher.close()
    assert [p.name for p in tmp_path.rglob("*")] == ["x"]  # nothing left but the folder made on the way


async def test_large_results_spill_to_their_temp_file_with_the_same_guarantees(tmp_path: Path, write, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # results past SMALL stream to their temp file as they arrive; the thresholds are lowered so sandbox images take that path
    monkeypatch.setattr(download, "SMALL", 256)
    monkeypatch.setattr(download, "SPILL_BATCH", 1000)
    plan = plan_of(manifest(write, ("big/", ["one", "two", "broken"])))
    out = tmp_path / "out"
    (out / "big").mkdir(parents=True)
    (tmp_path / "target").write_text("precious")
    (out / "big" / ".one.part.tmp").symlink_to(tmp_path / "target")  # a link planted at a temp name
    async with serve(sandbox(time_scale=0.0, image_size=512, p_truncate_eof=1.0, fault_prompt="broken")) as (_, url):
        result = await run_campaign(plan, cfg(out, retries=1), api_key=KEY, base_url=url)
    assert result.counts == {"done": 2, "failed": 1}
    jobs = jobs_by_name(out)
    assert jobs["broken"]["error"].startswith("gave up after 1 retries: the result is not usable: PNG ends before IEND")
    for name in ("one", "two"):
        assert jobs[name]["bytes"] > 1000 and verify(out / jobs[name]["path"], "image").kind == "png"
    assert (tmp_path / "target").read_text() == "precious"
    assert not list((out / "big").glob("broken*")) and not leftovers(out)


async def test_a_result_of_another_modality_is_not_done_unless_the_model_is_unknown(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    # the sandbox's catalog says flux-2 makes videos and knows a model ours does not: it answers MP4 for both
    catalog = write(
        "sandbox-catalog.csv",
        "id,modality,input_style,credits,alias_of,required,parameters,source\n"
        "flux-2,video,standard,,,prompt,prompt;aspect_ratio=1:1,test\n"
        "mystery-model,video,standard,,,prompt,prompt,test\n",
    )
    path = write(
        "modality.yaml",
        'name: modality\npath: "{model}.{ext}"\njobs:\n'
        '  - {model: flux-2, prompt: "a bottle", input: {aspect_ratio: "1:1"}}\n'
        '  - {model: mystery-model, prompt: "a bottle"}\n',
    )
    async with serve(sandbox(time_scale=0.0, catalog_file=catalog)) as (_, url):
        result = await run_campaign(plan_of(path), cfg(tmp_path / "out", retries=1), api_key=KEY, base_url=url)
    assert result.counts == {"done": 1, "failed": 1}
    jobs = {job["model"]: job for job in json.loads((tmp_path / "out" / "report.json").read_text())["jobs"]}
    assert jobs["flux-2"]["error"] == "gave up after 1 retries: the result is not usable: an image model's result is a video file (MP4)"
    assert jobs["mystery-model"]["path"] == "mystery-model.mp4"  # not in our catalog: any verified media will do
    assert not list((tmp_path / "out").glob("flux-2*"))
