"""Hostile conditions for the run engine: signals, unbounded waits, an API that cannot be reached.

Each test drives the real CLI (or the library's run_campaign) against the real sandbox, or
against a socket that accepts requests and never answers — the network as it can really be.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from batchrunner.client import Client, Failed, Processing, Succeeded, Unrecognised
from batchrunner.runner import Interrupt, run_campaign
from batchrunner.sandbox import serve

from .conftest import ROOT, cli, sandbox_process, stats
from .test_run import KEY, cfg, plan_of, sandbox

CSV = ROOT / "manifests/demo.csv"


@contextmanager
def black_hole() -> Iterator[tuple[str, threading.Event]]:
    """A server that accepts connections, reads requests and never answers; the event is set at the first generate POST."""
    server = socket.create_server(("127.0.0.1", 0))
    got_post = threading.Event()
    conns: list[socket.socket] = []

    def serve_forever() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=read, args=(conn,), daemon=True).start()

    def read(conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                if b"POST /app/cliprise/generate" in data:
                    got_post.set()
        except OSError:
            return

    threading.Thread(target=serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", got_post
    finally:
        server.close()
        for conn in conns:
            conn.close()


def start_run(manifest: Path, out: Path, url: str, *, ignore_sigint: bool = False) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_"))}
    env.update({"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url})

    def ignore() -> None:  # as `cmd &` in a non-interactive shell starts it
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen(
        [sys.executable, "-m", "batchrunner", "run", str(manifest), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=ignore if ignore_sigint else None,
    )


def wait_for_line(proc: subprocess.Popen[str], needle: str) -> list[str]:
    """Read stderr until a line contains ``needle``; return the lines read."""
    assert proc.stderr is not None
    lines = []
    while line := proc.stderr.readline():
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} never printed; stderr: {''.join(lines)}")


def stored(out: Path) -> list[tuple[str, int]]:
    conn = sqlite3.connect(f"file:{out / '.batchrunner/state.sqlite'}?mode=ro", uri=True)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT state, ambiguous FROM jobs ORDER BY idx")]
    finally:
        conn.close()


@pytest.mark.parametrize("second", [False, True])
def test_sigterm_with_sigint_ignored_stops_a_run_whose_posts_hang(tmp_path: Path, second: bool) -> None:
    """SIGTERM works whatever was inherited; POSTs in flight get a bounded grace, a second signal none; both count as ambiguous."""
    out = tmp_path / "out"
    with black_hole() as (url, got_post):
        proc = start_run(CSV, out, url, ignore_sigint=True)
        try:
            assert got_post.wait(60), "no generate request reached the server"
            proc.send_signal(signal.SIGTERM)
            lines = wait_for_line(proc, "stopping: waiting up to 5 s for")
            if second:
                proc.send_signal(signal.SIGINT)
                lines += wait_for_line(proc, "stopping at once")
            _, err = proc.communicate(timeout=40)  # far less than the 60 s read timeout the shield used to wait for
        finally:
            proc.kill()
    err = "".join(lines) + err
    assert proc.returncode == 130, err
    assert "interrupted: " in err and "state saved in" in err and "Traceback" not in err
    rows = stored(out)
    assert rows and all(state == "pending" for state, _ in rows)
    assert sum(ambiguous for _, ambiguous in rows) >= 1  # the unanswered POSTs may have created tasks: counted


def test_a_signal_during_start_up_exits_130_quietly(tmp_path: Path) -> None:
    proc = start_run(CSV, tmp_path / "out", "http://127.0.0.1:9")
    try:
        caught = 0
        while not caught & (1 << (signal.SIGTERM - 1)):  # the entry point has trapped SIGTERM: heavy imports come next
            status = Path(f"/proc/{proc.pid}/status").read_text()
            caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


async def test_a_retry_after_longer_than_the_limit_stops_the_run_with_when(tmp_path: Path) -> None:
    async with serve(sandbox(p_429=1.0, retry_after_s=86400)) as (sb, url):
        result = await run_campaign(plan_of(CSV), cfg(tmp_path, max_pause_s=600), api_key=KEY, base_url=url)
    assert result.outcome == "stopped"
    assert result.error and "rate-limited until" in result.error and "run the same command again after that" in result.error
    assert result.counts == {"pending": 4} and sb.stats.tasks_created == 0


async def test_429_on_every_request_stops_the_run_after_the_limit(tmp_path: Path) -> None:
    async with serve(sandbox(p_429=1.0, retry_after_s=0.02)) as (sb, url):
        result = await run_campaign(plan_of(CSV), cfg(tmp_path, max_pause_s=0.3), api_key=KEY, base_url=url)
    assert result.outcome == "stopped" and result.error and "rate-limited until" in result.error
    assert result.counts == {"pending": 4} and sb.stats.generate_requests > 4


async def test_an_unreachable_api_stops_the_run_once_and_fails_no_job(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed when the block ends: nothing listens there
    events: list[str] = []
    result = await run_campaign(
        plan_of(CSV),
        cfg(tmp_path, backoff_base_s=0.2, backoff_cap_s=0.5),
        api_key=KEY,
        base_url=f"http://127.0.0.1:{port}",
        on_event=lambda kind, job, detail: events.append(kind),
    )
    assert result.outcome == "stopped"
    assert result.error and "cannot reach the API" in result.error and "CLIPRISE_BASE_URL" in result.error
    assert result.counts == {"pending": 4}  # never sent: nothing failed, nothing to retry by hand
    assert "failed" not in events


async def test_ticks_say_what_the_run_is_waiting_for(tmp_path: Path) -> None:
    ticks: list[str] = []

    def on_event(kind: str, job: object, detail: str) -> None:
        if kind == "tick":
            ticks.append(detail)

    async with serve(sandbox(time_scale=0.05)) as (_, url):  # the video takes ~3 s: ticks come meanwhile
        result = await run_campaign(plan_of(CSV), cfg(tmp_path, tick_s=0.05), api_key=KEY, base_url=url, on_event=on_event)
    assert result.outcome == "complete"
    assert any(t.startswith("waiting for") and "result(s)" in t for t in ticks), ticks[:5]


@pytest.mark.parametrize(
    ("http", "body", "expected"),
    [
        (300, b'{"status":"processing"}', Processing("processing")),
        (300, b'{"status":"queued"}', Processing("queued")),  # HTTP 300 is documented as processing
        (200, b'[{"status":"success","fileURL":"https://x/y?apiKey=k1234&taskId=1"}]', Succeeded("https://x/y?apiKey=REDACTED&taskId=1")),
        (200, b'{"status":"cancelled"}', Failed("the API answered status 'cancelled'")),
        (200, b'{"status":"rejected","failMsg":"nsfw"}', Failed("nsfw")),
        (200, b'{"status":"success"}', Unrecognised("success", '{"status": "success"}')),
        (200, b'{"status":"queued_for_review"}', Unrecognised("queued_for_review", '{"status": "queued_for_review"}')),
    ],
)
def test_status_answers_are_read_as_documented_or_flagged(http: int, body: bytes, expected: object) -> None:
    assert Client(api_key="k1234")._interpret(http, body, {}) == expected


async def test_a_status_word_never_seen_is_counted_then_fails_the_job_with_the_apis_words(tmp_path: Path) -> None:
    events: list[str] = []
    async with serve(sandbox(p_status_word=1.0, status_word="queued_for_review", fault_prompt="sneaker")) as (_, url):
        result = await run_campaign(
            plan_of(CSV), cfg(tmp_path, max_unrecognised=4), api_key=KEY, base_url=url, on_event=lambda k, j, d: events.append(k)
        )
    assert result.counts == {"done": 3, "failed": 1}  # one job's strange answers fail that job only
    report = json.loads((tmp_path / "report.json").read_text())
    (failed,) = [j for j in report["jobs"] if j["state"] == "failed"]
    assert "4 times without a result URL" in failed["error"] and "queued_for_review" in failed["error"]
    assert events.count("unrecognised") == 4


async def test_a_failure_word_fails_the_job_at_once(tmp_path: Path) -> None:
    async with serve(sandbox(p_status_word=1.0, status_word="cancelled", fault_prompt="sneaker")) as (sb, url):
        result = await run_campaign(plan_of(CSV), cfg(tmp_path), api_key=KEY, base_url=url)
    assert result.counts == {"done": 3, "failed": 1}
    report = json.loads((tmp_path / "report.json").read_text())
    (failed,) = [j for j in report["jobs"] if j["state"] == "failed"]
    assert "cancelled" in failed["error"]
    assert sb.stats.status_by_task[failed["task_id"]] == 1  # asked once, not polled on


async def test_success_without_a_file_is_counted_then_fails_the_job_kept_for_polling(tmp_path: Path) -> None:
    async with serve(sandbox(p_no_file=1.0, fault_prompt="sneaker")) as (sb, url):
        first = await run_campaign(plan_of(CSV), cfg(tmp_path, max_unrecognised=3), api_key=KEY, base_url=url)
    assert first.counts == {"done": 3, "failed": 1} and sb.stats.tasks_created == 4
    report = json.loads((tmp_path / "report.json").read_text())
    (failed,) = [j for j in report["jobs"] if j["state"] == "failed"]
    assert "3 times without a result URL" in failed["error"] and failed["task_id"]  # the task is kept: polled, not paid, next run


async def test_a_key_revoked_mid_run_stops_the_run_once_with_state_saved(tmp_path: Path) -> None:
    async with serve(sandbox(revoke_key_after=3, time_scale=0.01)) as (sb, url):
        result = await run_campaign(plan_of(CSV), cfg(tmp_path), api_key=KEY, base_url=url)
    assert result.outcome == "stopped" and result.error and "API key was refused" in result.error
    assert "failed" not in result.counts  # nothing failed one by one
    assert sb.stats.tasks_created <= 3


async def test_tasks_the_api_forgot_are_paid_again_and_counted(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    out = tmp_path / "out"
    async with serve(sandbox(time_scale=10, tasks_file=tasks)) as (sb, url):  # nothing finishes: jobs stay submitted
        interrupt = Interrupt()

        def stop_when_all_submitted(kind: str, job: object, detail: str) -> None:
            if kind == "submitted" and sb.stats.tasks_created == 4:
                interrupt.request()

        first = await run_campaign(plan_of(CSV), cfg(out), api_key=KEY, base_url=url, on_event=stop_when_all_submitted, interrupt=interrupt)
    assert first.outcome == "interrupted" and first.counts == {"submitted": 4}
    async with serve(sandbox(tasks_file=tasks, forget_tasks=True)) as (sb, url):  # the account forgot every task
        lost = await run_campaign(plan_of(CSV), cfg(out), api_key=KEY, base_url=url)
        assert lost.counts == {"failed": 4} and sb.stats.tasks_created == 0
        again = await run_campaign(plan_of(CSV), cfg(out), api_key=KEY, base_url=url)
    assert again.counts == {"done": 4} and sb.stats.tasks_created == 4
    requests = json.loads((out / "report.json").read_text())["summary"]["requests"]
    assert requests["repaid"] == 4 and requests["possibly_paid_twice"] == 4


@pytest.mark.parametrize(
    ("key", "url", "said"),
    [
        ("k", "garbage", "is not an http(s) URL"),
        ("k", "ftp://x/", "is not an http(s) URL"),
        ("k", "http://127.0.0.1:99999", "is not a URL"),
        ("k", "http://[::1", "is not a URL"),
        ("sk-XYZ-secret\r", "http://127.0.0.1:1", "CLIPRISE_API_KEY contains a space or a control character"),
    ],
)
def test_a_malformed_key_or_base_url_is_refused_before_anything_is_sent(tmp_path: Path, key: str, url: str, said: str) -> None:
    result = cli("run", str(CSV), "--out", str(tmp_path / "o"), env={"CLIPRISE_API_KEY": key, "CLIPRISE_BASE_URL": url})
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr
    assert "sk-XYZ-secret" not in result.stderr  # the key itself is never quoted
    assert not (tmp_path / "o").exists()


def test_results_made_on_the_sandbox_are_never_kept_by_a_real_run(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert cli("run", str(CSV), "--sandbox", "--out", str(out), "--quiet").returncode == 0
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        env = {"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
        refused = cli("run", str(CSV), "--out", str(out), env=env)
        planned = cli("plan", str(CSV), "--out", str(out), env=env)
        for result in (refused, planned):
            assert result.returncode == 2 and "holds the results of runs on the embedded sandbox" in result.stderr, result.stderr
        assert stats(url)["generate_requests"] == 0
        assert cli("plan", str(CSV), "--out", str(out), "--sandbox").returncode == 0  # the dry run of a sandbox run agrees
        adopted = cli("run", str(CSV), "--out", str(out), "--force", "--quiet", env=env)
        assert adopted.returncode == 0, adopted.stderr


def test_a_result_path_in_the_rejected_folder_is_refused(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text('path: "rejected/{i}.{ext}"\nmatrix: {i: [1, 2]}\njobs:\n  - {model: flux-2, prompt: "p {i}"}\n')
    result = cli("plan", str(m))
    assert result.returncode == 2 and "the folder where rejected results are kept aside" in result.stderr
