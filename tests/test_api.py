"""The public Python API (``import batchrunner``) against the real sandbox, a real state file and real files."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import pytest

import batchrunner
from batchrunner._api import resolve_config
from batchrunner.client import Client, Download, Failed, Processing
from batchrunner.errors import UnknownTask
from batchrunner.runner import run_campaign
from batchrunner.sandbox import SandboxConfig, serve

from .conftest import ROOT

KEY = "sk-api-test-5e8d1c"


def fast_sandbox(**kw: object) -> SandboxConfig:
    return SandboxConfig(**{"api_key": KEY, "time_scale": 0.001, **kw})  # type: ignore[arg-type]


def test_the_public_surface_is_all_and_only_all() -> None:
    for name in batchrunner.__all__:
        assert hasattr(batchrunner, name), name
        obj = getattr(batchrunner, name)
        assert name == "__version__" or obj.__doc__, f"{name} has no docstring"
    public = {n for n, v in vars(batchrunner).items() if not n.startswith("_") and not isinstance(v, ModuleType)}
    assert public <= set(batchrunner.__all__), public - set(batchrunner.__all__)
    assert issubclass(batchrunner.ManifestError, batchrunner.BatchRunnerError)
    assert issubclass(batchrunner.RateLimited, batchrunner.ApiError)


def test_settings_resolve_flag_then_manifest_then_environment_then_default(write) -> None:  # type: ignore[no-untyped-def]
    job = "jobs:\n  - {model: flux-2, prompt: x}\n"
    with_settings = batchrunner.load_plan(write("a.yaml", f"concurrency: 8\nrate: 2\nmax_credits: 50\ncredits: {{flux-2: 1}}\n{job}"))
    bare = batchrunner.load_plan(write("b.yaml", job))
    env = {"BATCHRUNNER_CONCURRENCY": "3", "BATCHRUNNER_RATE": "1.5", "BATCHRUNNER_MAX_CREDITS": "9"}

    flag = resolve_config(with_settings, concurrency=5, rate_per_s=7, max_credits=70, env=env)
    assert (flag.concurrency, flag.rate_per_s, flag.max_credits) == (5, 7, 70)
    manifest = resolve_config(with_settings, env=env)
    assert (manifest.concurrency, manifest.rate_per_s, manifest.max_credits) == (8, 2.0, 50.0)
    assert manifest.out_dir == with_settings.manifest.output
    environment = resolve_config(bare, env=env)
    assert (environment.concurrency, environment.rate_per_s, environment.max_credits) == (3, 1.5, 9.0)
    default = resolve_config(bare, env={})
    assert (default.concurrency, default.rate_per_s, default.max_credits) == (4, None, None)
    assert resolve_config(bare, out="elsewhere", env={}).out_dir == Path("elsewhere")

    with pytest.raises(batchrunner.ManifestError, match=r"\$BATCHRUNNER_CONCURRENCY: 'lots' is not a whole number ≥ 1"):
        resolve_config(bare, env={"BATCHRUNNER_CONCURRENCY": "lots"})
    with pytest.raises(batchrunner.ManifestError, match=r"\$BATCHRUNNER_RATE: '0' is not a number of requests per second > 0"):
        resolve_config(bare, env={"BATCHRUNNER_RATE": "0"})
    with pytest.raises(ValueError, match="concurrency must be a whole number ≥ 1, not 0"):
        resolve_config(bare, concurrency=0, env={})
    with pytest.raises(ValueError, match="poll_scale must be a positive number"):
        resolve_config(bare, poll_scale=0, env={})
    with pytest.raises(ValueError, match="out is required"):
        resolve_config(None, env={})


async def test_library_callers_keep_the_manifests_settings(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    # before the public API, concurrency/rate/max_credits of the manifest were applied only by the CLI
    text = "concurrency: 2\ncredits: {flux-2: 1}\nmatrix: {i: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}\n"
    text += "jobs:\n  - {model: flux-2, prompt: 'n {i}'}\n"
    plan = batchrunner.load_plan(write("m.yaml", text))
    async with serve(fast_sandbox(durations_s={"image": (50.0, 0.1)})) as (sb, url):
        result = await batchrunner.run_async(plan, out=tmp_path / "o", api_key=KEY, base_url=url, poll_scale=0.001, env={})
        assert result.outcome == "complete" and sb.stats.tasks_created == 12
        assert sb.stats.max_in_flight == 2  # the manifest's concurrency, not the default 4
    capped = batchrunner.load_plan(write("c.yaml", text.replace("concurrency: 2", "max_credits: 5")))
    with pytest.raises(batchrunner.ManifestError, match="the plan costs 12 credits to run"):
        await batchrunner.run_async(capped, out=tmp_path / "c", sandbox=True, env={})
    assert not (tmp_path / "c").exists()  # refused before anything was created
    with pytest.raises(batchrunner.AuthError, match="no API key"):
        await batchrunner.run_async(plan, out=tmp_path / "k", env={})
    assert not (tmp_path / "k").exists()


def test_run_status_results_and_preview_agree(tmp_path: Path) -> None:
    plan = batchrunner.load_plan(ROOT / "manifests/demo.csv")
    out = tmp_path / "o"
    before = batchrunner.preview(plan, out=out, env={}, sandbox=True)
    assert (before.resuming, before.to_run, before.done) == (False, 4, 0)
    result = batchrunner.run(plan, out=out, sandbox=SandboxConfig(time_scale=0.001), env={})
    assert result.outcome == "complete" and result.tally is not None
    assert (result.tally.ran, result.tally.done, result.tally.skipped, result.tally.failed) == (4, 4, 0, 0)

    found = list(batchrunner.results(out))
    assert sorted(r.path.relative_to(out).as_posix().rsplit(".", 1)[0] for r in found) == sorted(
        s.path.rsplit(".", 1)[0] for s in plan.specs
    )
    for item in found:
        assert hashlib.sha256(item.path.read_bytes()).hexdigest() == item.sha256 and item.path.stat().st_size == item.bytes
    assert {r.model for r in found} == {"flux-2", "imagen-v4", "kling-video-turbo"} and {r.variant for r in found} == {1, 2}

    gone = found[0].path
    gone.unlink()
    again = batchrunner.preview(plan, out=out, env={}, sandbox=True)
    assert (again.resuming, again.done, again.files_gone, again.to_submit, again.to_run) == (True, 3, 1, 1, 1)
    starts: list[batchrunner.Preview] = []
    rerun = batchrunner.run(plan, out=out, sandbox=SandboxConfig(time_scale=0.001), on_start=starts.append, env={})
    assert rerun.tally is not None and (rerun.tally.ran, rerun.tally.skipped) == (again.to_run, again.done) == (1, 3)
    # what preview predicted is what the run found, counted in its own store
    counted = ("jobs", "done", "in_flight", "to_submit", "stays_failed", "files_gone", "ambiguous", "resuming")
    assert starts == [rerun.start] and [getattr(rerun.start, f) for f in counted] == [getattr(again, f) for f in counted]
    assert gone.exists()

    st = batchrunner.status(out)
    assert st.counts == {"done": 4} and st.jobs == 4 and st.failures == [] and st.campaign == "demo-csv" and st.runs == 2
    with pytest.raises(batchrunner.StateError, match="holds no batchrunner state"):
        batchrunner.status(tmp_path / "nothing")
    with pytest.raises(batchrunner.StateError, match="holds no batchrunner state"):
        batchrunner.results(tmp_path / "nothing")


def test_failures_carry_their_path_and_retry_runs_them(tmp_path: Path) -> None:
    plan = batchrunner.load_plan(ROOT / "manifests/demo.csv")
    out = tmp_path / "o"
    failing = SandboxConfig(time_scale=0.001, failure_rate=1.0)
    result = batchrunner.run(plan, out=out, sandbox=failing, env={})
    assert result.outcome == "failed" and result.tally is not None and result.tally.failed == 4
    st = batchrunner.status(out)
    assert sorted(f.path for f in st.failures) == sorted(s.path.replace("{ext}", "*") for s in plan.specs)
    assert all("content policy" in f.error for f in st.failures)
    # a plain re-run leaves the API's failures alone (they would cost again); retry runs them
    assert batchrunner.preview(plan, out=out, env={}, sandbox=True).stays_failed == 4
    retried = batchrunner.run(None, out=out, retry_failed=True, sandbox=SandboxConfig(time_scale=0.001), env={})
    assert retried.outcome == "complete" and retried.tally is not None and retried.tally.ran == 4


class LosesOneTask(Client):
    """The real client, except that the status endpoint "forgets" the first task (``invalid_taskId``): the sandbox never does."""

    lost: str | None = None

    @asynccontextmanager
    async def download(self, task_id: str) -> AsyncIterator[Download | Processing | Failed]:
        if self.lost in (None, task_id):
            self.lost = task_id
            raise UnknownTask("invalid_taskId")
        async with super().download(task_id) as answer:
            yield answer


async def test_an_injected_client_covers_answers_the_sandbox_cannot_give(tmp_path: Path) -> None:
    plan = batchrunner.load_plan(ROOT / "manifests/demo.csv")
    async with serve(fast_sandbox()) as (sb, url):
        async with LosesOneTask(api_key=KEY, base_url=url) as client:
            result = await batchrunner.run_async(plan, out=tmp_path, client=client, poll_scale=0.001, env={})
            assert client.session is not None  # the caller's client is left open for the caller to close
        assert result.counts == {"done": 3, "failed": 1}
        lost = next(iter(batchrunner.status(tmp_path).failures))
        assert "resubmitted on the next run" in lost.error
        again = await run_campaign(plan, resolve_config(plan, out=tmp_path, poll_scale=0.001, env={}), api_key=KEY, base_url=url)
        assert again.counts == {"done": 4} and sb.stats.tasks_created == 5  # the lost task was sent again, once


def python_blocks(markdown: str, heading: str) -> list[str]:
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_python_example_runs_against_the_embedded_sandbox(tmp_path: Path) -> None:
    (example,) = python_blocks((ROOT / "README.md").read_text(), "Python API")
    shutil.copytree(ROOT / "manifests", tmp_path / "manifests")
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "18 jobs; warnings: []"
    assert lines[1] == "18 to run, 0 already done"
    assert lines[2].startswith("complete RunTally(ran=18, done=18, failed=0, skipped=0,")
    files = [line.split()[0] for line in lines[3:21]]
    assert len(files) == 18 and all((tmp_path / f).is_file() for f in files)
    assert lines[21] == "{'done': 18} []"
