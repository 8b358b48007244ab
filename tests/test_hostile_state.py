"""A hostile environment for the state file, against the real CLI and the real sandbox in its own process.

An emptied, deleted or damaged state file is refused with the way out and never re-pays
anything; `batchrunner recover DIR` rebuilds it from the results' sidecars, trusting only
the ones that check out; a state disk that fills up mid-run stops the run (exit 1) with the
task ids it received committed; the counters of what was paid add up against the sandbox's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batchrunner.client import Client
from batchrunner.errors import StateWriteError
from batchrunner.runner import Runner, run_campaign
from batchrunner.sandbox import serve
from batchrunner.store import STATE_DIR, Store

from .conftest import cli, sandbox_process, stats
from .test_run import KEY as SANDBOX_KEY
from .test_run import cfg, plan_of, sandbox

KEY = "sk-hostile-state-5e1f"
SCALE = ("--poll-scale", "0.001")


def campaign(write: Any, n: int = 15, name: str = "hostile") -> Path:  # 2n jobs
    matrix = ",".join(map(str, range(n)))
    text = f"name: {name}\nconcurrency: 6\nmatrix: {{i: [{matrix}]}}\npath: 'set/{{i}}/img-{{variant}}.{{ext}}'\n"
    return write(f"{name}.yaml", text + "jobs:\n  - {model: flux-2, prompt: 'image {i}', variants: 2}\n")  # type: ignore[no-any-return]


def run(manifest: Path, out: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("run", str(manifest), "--out", str(out), "--quiet", *SCALE, *extra, env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url})


def results(out: Path) -> dict[str, str]:
    """sha256 of every result file under ``out`` (not the sidecars, reports or state)."""
    found = {}
    for path in out.rglob("*"):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and not rel.startswith(STATE_DIR) and path.suffix != ".json" and not rel.startswith("report."):
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "report.json").read_text()))


def plain(result: subprocess.CompletedProcess[str]) -> str:
    """stderr of a command that must fail plainly: no traceback, no advice that would pay again."""
    assert "Traceback" not in result.stderr and "afresh" not in result.stderr and "move it away" not in result.stderr, result.stderr
    return result.stderr


def finished_campaign(tmp_path: Path, write: Any, url: str, n: int = 15) -> tuple[Path, Path, dict[str, str]]:
    manifest, out = campaign(write, n), tmp_path / "out"
    first = run(manifest, out, url)
    assert first.returncode == 0, first.stderr
    files = results(out)
    assert len(files) == 2 * n and report(out)["summary"]["counts"] == {"done": 2 * n}
    return manifest, out, files


@pytest.mark.parametrize("loss", ["emptied", "deleted"])
def test_a_lost_state_is_refused_then_recovered_and_nothing_is_paid_again(tmp_path: Path, write, loss: str) -> None:  # type: ignore[no-untyped-def]
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        manifest, out, files = finished_campaign(tmp_path, write, url)
        sent = stats(url)["generate_requests"]
        db = out / STATE_DIR / "state.sqlite"
        if loss == "emptied":
            db.write_bytes(b"")
        else:
            db.unlink()
        refused = run(manifest, out, url)
        assert refused.returncode == 2
        assert (
            f"run `batchrunner recover {out}`" in plain(refused)
            and ("empty (0 bytes)" if loss == "emptied" else "missing") in refused.stderr
        )
        for command in (("status", str(out)), ("report", str(out)), ("plan", str(manifest), "--out", str(out))):
            other = cli(*command)
            assert other.returncode == 2 and "batchrunner recover" in plain(other), command
        assert stats(url)["generate_requests"] == sent  # refused before anything was sent

        recovered = cli("recover", str(out))
        assert recovered.returncode == 0, recovered.stderr
        assert "recovered 30 finished jobs" in recovered.stdout and "not recovered" not in recovered.stderr
        assert (loss == "emptied") == any(p.name.startswith("state.sqlite.lost-") for p in db.parent.iterdir())  # kept, not deleted

        again = run(manifest, out, url)
        assert again.returncode == 0, again.stderr
        assert stats(url)["generate_requests"] == sent  # nothing paid again
    assert results(out) == files  # every file intact
    summary = report(out)["summary"]
    assert summary["counts"] == {"done": 30} and summary["recovered"]["jobs"] == 30


def test_a_damaged_page_is_reported_plainly_everywhere_then_recovered(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        manifest, out, files = finished_campaign(tmp_path, write, url, n=40)
        sent = stats(url)["generate_requests"]
        db = out / STATE_DIR / "state.sqlite"
        pages = db.stat().st_size // 4096
        assert pages >= 8
        with open(db, "r+b") as f:  # garbage over one whole page in the middle of the file
            f.seek(pages // 2 * 4096)
            f.write(random.Random(11).randbytes(4096))
        commands = {
            "run": ("run", str(manifest), "--out", str(out), "--quiet", *SCALE),
            "status": ("status", str(out)),
            "report": ("report", str(out)),
            "retry": ("retry", str(out), "--quiet", *SCALE),
            "plan": ("plan", str(manifest), "--out", str(out)),
        }
        for name, command in commands.items():
            result = cli(*command, env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url})
            assert result.returncode != 0, name
            assert f"the state file {db} is damaged" in plain(result), name
            assert f"run `batchrunner recover {out}` to rebuild it from the results' sidecars; your results are untouched" in result.stderr
        assert stats(url)["generate_requests"] == sent

        recovered = cli("recover", str(out))
        assert recovered.returncode == 0, recovered.stderr
        assert "the state file was damaged; set aside as state.sqlite.damaged-" in recovered.stdout
        assert "recovered" in recovered.stdout and "not recovered" not in recovered.stderr
        again = run(manifest, out, url)
        assert again.returncode == 0, again.stderr
        assert stats(url)["generate_requests"] == sent
    assert results(out) == files
    assert report(out)["summary"]["counts"] == {"done": 80}


def test_a_file_that_is_not_sqlite_is_damaged_not_a_traceback(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        manifest, out, files = finished_campaign(tmp_path, write, url, n=3)
        sent = stats(url)["generate_requests"]
        (out / STATE_DIR / "state.sqlite").write_bytes(b"<html>an error page saved over the state</html>\n" * 100)
        refused = run(manifest, out, url)
        assert refused.returncode == 2 and "is damaged (file is not a database)" in plain(refused)
        assert cli("recover", str(out)).returncode == 0
        assert run(manifest, out, url).returncode == 0
        assert stats(url)["generate_requests"] == sent
    assert results(out) == files


def test_a_result_that_does_not_match_its_sidecar_is_not_recovered_and_runs_again(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        manifest, out, files = finished_campaign(tmp_path, write, url, n=5)
        sent = stats(url)["generate_requests"]
        altered, deleted = sorted(files)[:2]
        with open(out / altered, "r+b") as f:  # one byte changed in the middle
            f.seek(20)
            byte = f.read(1)
            f.seek(20)
            f.write(bytes([byte[0] ^ 0xFF]))
        (out / deleted).unlink()
        (out / STATE_DIR / "state.sqlite").unlink()
        recovered = cli("recover", str(out))
        assert recovered.returncode == 0, recovered.stderr
        assert "recovered 8 finished jobs" in recovered.stdout
        assert f"not recovered: {altered}.json: {altered} does not match the sha256 its sidecar recorded" in recovered.stderr
        assert f"not recovered: {deleted}.json: {deleted} is missing" in recovered.stderr
        assert "warning: 2 results were not recovered: their jobs run (and are paid) again" in recovered.stderr
        again = run(manifest, out, url)
        assert again.returncode == 0, again.stderr
        assert stats(url)["generate_requests"] == sent + 2  # only those two are paid again
    now = results(out)
    assert now.keys() == files.keys() and all(now[k] == files[k] for k in files if k not in (altered, deleted))  # the others untouched
    assert now[altered] == files[altered] or hashlib.sha256((out / altered).read_bytes()).hexdigest() == now[altered]
    jobs = {j["path"]: j for j in report(out)["jobs"]}
    assert jobs[altered]["sha256"] == now[altered] and jobs[deleted]["sha256"] == now[deleted]


def test_a_read_only_state_folder_still_answers_status_and_report(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        manifest, out, _ = finished_campaign(tmp_path, write, url, n=3)
        state = out / STATE_DIR
        with read_only(state):
            status = cli("status", str(out), "--json")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["counts"] == {"done": 6}
            rewritten = cli("report", str(out))
            assert rewritten.returncode == 0, rewritten.stderr
            refused = run(manifest, out, url)
            assert refused.returncode == 2 and f"cannot use {state}" in plain(refused) and "read-only" in refused.stderr
    assert report(out)["summary"]["counts"] == {"done": 6}


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only for everyone, root included (a read-only bind mount of itself); skips where mounting is not allowed."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to make a read-only mount")
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode != 0:
        pytest.skip("mount --bind is not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True, capture_output=True)


@contextlib.contextmanager
def tiny_disk(folder: Path, size: str) -> Iterator[None]:
    """A real tmpfs of ``size`` mounted at ``folder``; skips where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (needs root); tests/test_engine_parts.py and the max_page_count test cover the logic")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True, capture_output=True)


def fill(folder: Path) -> Path:
    """Write one file in ``folder`` until its disk is full, to the last byte."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            block = bytes(chunk)
            while True:
                try:
                    f.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    return filler


def test_state_disk_full_mid_run_on_a_real_tmpfs(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    manifest, out = campaign(write, n=75), tmp_path / "out"  # 150 jobs, paced so the disk fills early in the run
    state = out / STATE_DIR
    with tiny_disk(state, "8m"), sandbox_process("--key", KEY, "--time-scale", "0.01") as url:
        cmd = [sys.executable, "-m", "batchrunner.cli", "run", str(manifest), "--out", str(out), "--quiet", "--rate", "20", *SCALE]
        env = {**os.environ, "CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: stats(url)["tasks_created"] >= 20 or proc.poll() is not None)  # the event: 20 tasks created
            assert proc.poll() is None, proc.communicate()
            assert (state / "reserve").stat().st_size == 4 << 20
            filler = fill(state)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 1, err  # not "bad input": requests were sent
        assert "the disk is full; what the run had received so far (task ids, finished files) was saved" in err and "Traceback" not in err
        created = stats(url)["tasks_created"]
        assert 20 <= created < 150
        with Store.open(out, lock=False, create=False) as store:  # what the state holds, read as `status` reads it
            rows = list(store.rows())
        held = sum(1 for r in rows if r["task_id"])
        in_flight = sum(1 for r in rows if r["state"] == "submitting")  # sent when the store broke: counted ambiguous on resume
        assert created <= held + in_flight and held >= 20
        assert report(out)["summary"]["outcome"] == "stopped"  # the reports were written (the output folder had room)

        filler.unlink()
        again = run(manifest, out, url)
        assert again.returncode == 0, again.stderr
        counters = stats(url)
    summary = report(out)["summary"]
    assert summary["counts"] == {"done": 150}
    assert counters["tasks_created"] - 150 <= summary["requests"]["ambiguous"] == summary["requests"]["possibly_paid_twice"]


def wait_until(condition: Any, timeout_s: float = 60) -> None:
    """Return once ``condition()`` holds (the sandbox's counters are the events here)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the event never came"
        time.sleep(0.02)


async def test_state_write_limit_mid_run_via_max_page_count(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    """Where a tmpfs cannot be mounted: SQLite's page limit stands in for the full disk (the reserve cannot help it)."""
    plan = plan_of(campaign(write, n=40))
    store = Store.open(tmp_path)
    store.claim(plan.manifest.name)
    store.sync(plan.specs)
    store.start_run()
    conn = store._conn  # the only way to give SQLite a page limit
    armed: list[int] = []

    def arm(kind: str, job: object, detail: str) -> None:  # the disk "fills" once ten tasks are created
        if kind == "submitted" and not armed and sb.stats.tasks_created >= 10:
            armed.append(conn.execute("PRAGMA page_count").fetchone()[0])
            conn.execute(f"PRAGMA max_page_count = {armed[0]}")

    async with serve(sandbox(time_scale=0.01)) as (sb, url):
        async with Client(api_key=SANDBOX_KEY, base_url=url) as client:
            runner = Runner(cfg(tmp_path, concurrency=4, rate_per_s=40), store, client, on_event=arm)
            with pytest.raises(StateWriteError, match=r"cannot write the state file .*: the disk is full — free disk space"):
                await runner.run(store.work())
        store.close()
        assert armed and 10 <= sb.stats.tasks_created < 80
        result = await run_campaign(plan, cfg(tmp_path), api_key=SANDBOX_KEY, base_url=url)
        assert result.counts == {"done": 80}
        assert sb.stats.tasks_created - 80 <= result.summary["requests"]["ambiguous"]


def test_accounting_adds_up_against_the_sandbox_under_dropped_connections(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    manifest, out = campaign(write, n=30), tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.001", "--p-drop", "0.15", "--seed", "4") as url:
        for _ in range(4):  # a job whose submits go unanswered too often fails; `retry` sends it again
            result = (
                run(manifest, out, url)
                if not (out / "report.json").exists()
                else cli("retry", str(out), "--quiet", *SCALE, env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url})
            )
            if result.returncode == 0:
                break
        assert result.returncode == 0, result.stderr
        counters = stats(url)
        status = cli("status", str(out), "--json")
    summary = report(out)["summary"]
    requests = summary["requests"]
    assert summary["counts"] == {"done": 60} and counters["faults"].get("drop", 0) > 0
    assert requests["sent"] == counters["generate_requests"]
    assert requests["answered_with_task_id"] <= counters["tasks_created"] <= requests["answered_with_task_id"] + requests["ambiguous"]
    assert requests["ambiguous"] > 0 and requests["repaid"] == 0
    assert requests["possibly_paid_twice"] == requests["ambiguous"] >= counters["tasks_created"] - 60
    assert json.loads(status.stdout)["requests"] == requests
    page = (out / "report.html").read_text()
    assert f"generate requests sent {requests['sent']}" in page and f"possibly paid twice {requests['possibly_paid_twice']}" in page
