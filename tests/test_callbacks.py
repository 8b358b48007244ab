"""Callbacks: the receiver, the poll wake-ups and the sandbox that sends them, on real parts.

The campaigns run the real runner against the real sandbox over loopback (in-process, or
the CLI and the sandbox as separate processes), with the sandbox's counters as the
assertions. Waits are for events (a counter, a line, a file), never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from batchrunner.callbacks import (
    SILENCE_WARN,
    STRETCH_MAX,
    CallbackSettings,
    Hub,
    check_url,
    listening,
    parse_listen,
    stretch_factor,
    token,
)
from batchrunner.catalog import load_catalog
from batchrunner.errors import ManifestError, StateError, redact
from batchrunner.expand import Plan, expand
from batchrunner.manifest import load
from batchrunner.runner import RunConfig, run_campaign
from batchrunner.sandbox import SandboxConfig, serve
from batchrunner.store import Job, Store, peek

from .conftest import ROOT, cli, sandbox_process, stats

KEY = "sk-callbacks-test-51c0"
SLOW_POLLS = {"image": 200.0, "video": 200.0, "audio": 200.0, "unknown": 200.0}  # first scheduled poll after 100 s: only callbacks wake
QUICK_POLLS = {"image": 0.2, "video": 0.2, "audio": 0.2, "unknown": 0.2}
LOCAL = CallbackSettings(host="127.0.0.1", port=0)


def campaign(folder: Path, n: int, *, video: bool = False) -> Plan:
    jobs = "  - {model: flux-2, prompt: 'image {i}'}\n" + ("  - {model: kling-video-turbo, prompt: 'clip {i}'}\n" if video else "")
    path = folder / "m.yaml"
    path.write_text(f"name: cb\nmatrix: {{i: [{','.join(map(str, range(n)))}]}}\njobs:\n{jobs}")
    return expand(load(path), load_catalog()[0])


def cfg(out: Path, expected: dict[str, float], **kw: Any) -> RunConfig:
    kw.setdefault("concurrency", 16)
    return RunConfig(out_dir=out, expected_s=expected, backoff_base_s=0.01, backoff_cap_s=0.05, callbacks=LOCAL, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def events_of(out: Path, kind: str) -> list[tuple[str, str]]:
    """(job id, detail) of the state's events of ``kind``, read straight from the state file."""
    conn = sqlite3.connect(f"file:{out / '.batchrunner' / 'state.sqlite'}?mode=ro", uri=True)
    try:
        return [(r[0], r[1]) for r in conn.execute("SELECT job_id, detail FROM events WHERE kind = ?", (kind,))]
    finally:
        conn.close()


def secrets_of(out: Path) -> tuple[str, list[str]]:
    """The campaign's secret and every job's token, read from the state file."""
    conn = sqlite3.connect(out / ".batchrunner" / "state.sqlite")
    try:
        secret = conn.execute("SELECT value FROM meta WHERE key = 'callback_secret'").fetchone()[0]
        ids = [r[0] for r in conn.execute("SELECT id FROM jobs")]
    finally:
        conn.close()
    return secret, [token(secret, i) for i in ids]


def assert_nowhere(out: Path, secret: str, tokens: list[str], *texts: str) -> None:
    """No token in any file or text; the secret only in the state file."""
    for text in texts:
        assert secret not in text and not any(t in text for t in tokens)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in files) and any(p.name.endswith(".json") and p.name != "report.json" for p in files)
    for p in files:
        data = p.read_bytes()
        assert not any(t.encode() in data for t in tokens), p
        if not p.name.startswith("state.sqlite"):
            assert secret.encode() not in data, p


# -- pure parts -------------------------------------------------------------------------------
def test_tokens_urls_and_listen_addresses() -> None:
    a, b = token("s1", "job-a"), token("s1", "job-b")
    assert len(a) == 32 and int(a, 16) >= 0 and a != b and token("s2", "job-a") != a and token("s1", "job-a") == a
    hub = Hub("https://hooks.example.com/br", "s1")
    assert hub.url("job-a") == f"https://hooks.example.com/br/cb/job-a/{a}"
    assert hub.valid("job-a", a) and not hub.valid("job-a", b) and not hub.valid("job-b", a) and not hub.valid("job-a", a[:-1])
    assert hub.body("job-a", {"model": "m"}) == {"model": "m", "callBackUrl": hub.url("job-a")}
    assert redact(f"refused {hub.url('job-a')} today") == "refused https://hooks.example.com/br/cb/job-a/REDACTED today"
    assert check_url("https://hooks.example.com/br/") == "https://hooks.example.com/br"
    assert check_url("http://127.0.0.1:8787") == "http://127.0.0.1:8787" and check_url("http://[::1]:9/x") == "http://[::1]:9/x"
    for bad in ("http://hooks.example.com/x", "ftp://127.0.0.1/", "hooks.example.com", "https://h.example/x?a=1", "https://u:p@h.example/"):
        with pytest.raises(ValueError):
            check_url(bad)
    assert parse_listen("127.0.0.1:8787") == ("127.0.0.1", 8787) and parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8787", "127.0.0.1", "127.0.0.1:http", ":80", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_stretch_only_when_callbacks_come_reliably() -> None:
    ratios = [0.2 + 0.01 * i for i in range(100)]  # announced at up to 1.19 of the first wait
    assert stretch_factor([], []) == 1.0
    assert stretch_factor(ratios, [True] * 3) == 1.0  # too little evidence: (0 + 1) / 5 missed
    full = stretch_factor(ratios, [True] * 100)
    assert full == pytest.approx(1.1 * sorted(ratios)[96], rel=0.01)
    assert stretch_factor(ratios, [True] * 70 + [False] * 30) == 1.0  # 30 % lost: the poll-only schedule, untouched
    partial = stretch_factor(ratios, [True] * 90 + [False] * 10)
    assert 1.0 < partial < full
    censored = [*ratios[:90], *[float("inf")] * 10]  # 10 % of first waits ran out with the job still running: wait longer
    assert stretch_factor(censored, [True] * 100) == pytest.approx(STRETCH_MAX, rel=0.05)
    assert stretch_factor([50.0] * 20, [True] * 100) == pytest.approx(STRETCH_MAX, rel=0.05)  # never beyond the cap


async def test_silence_is_said_once_per_silence_and_ends_with_any_callback() -> None:
    hub = Hub("https://hooks.example.com/br", "s" * 64)
    for i in range(SILENCE_WARN - 1):
        hub.finished(f"a{i}")
    assert hub.alarm() is None  # 19 in a row: not yet
    hub.finished("a-last")
    said = hub.alarm()
    assert said is not None and "https://hooks.example.com/br" in said and "polling goes on" in said
    hub.finished("after")
    assert hub.alarm() is None  # said once, not at every finish
    hub.hint("late-one")  # a callback came (for any job): the silence is over
    for i in range(SILENCE_WARN):
        hub.finished(f"b{i}")
    assert hub.alarm() is not None  # a new silence is said again


async def test_what_a_run_learned_about_callbacks_carries_over_as_a_share(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    try:
        for reliable, missed in ((100, 0), (70, 30)):
            hub = Hub("http://127.0.0.1:9", "s", store)
            for i in range(reliable + missed):
                if i < reliable:
                    hub.hint(f"job{i}")  # a callback came while the job was being polled…
                hub.finished(f"job{i}")  # …and the poll found it finished
            for _ in range(20):
                hub._learn(1.5)
            hub.save()
            again = Hub("http://127.0.0.1:9", "s", store)
            flags = [r[0] for r in again.announced]
            assert len(flags) == 30 and flags.count(True) == round(30 * reliable / (reliable + missed))
            if missed:  # a run that lost 30 % starts the next one unstretched; a reliable one, stretched
                assert again.stretch() == 1.0
            else:
                assert again.stretch() > 1.5
    finally:
        store.close()


# -- campaigns against the sandbox ------------------------------------------------------------
async def test_each_job_is_polled_about_once_when_callbacks_arrive(tmp_path: Path) -> None:
    plan = campaign(tmp_path, 24, video=True)
    durations = {"image": (8.0, 0.1), "video": (8.0, 0.1), "audio": (8.0, 0.1)}  # ~0.4 s: every job is submitted before any finishes
    async with serve(SandboxConfig(api_key=KEY, time_scale=0.05, seed=5, durations_s=durations)) as (sb, url):
        # all in flight at once, so every first poll is timed from the defaults (a poll after 100 s), not from learned durations
        result = await run_campaign(plan, cfg(tmp_path / "out", SLOW_POLLS, concurrency=48), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.counts == {"done": 48}
        assert sb.stats.tasks_created == 48 and sb.stats.callbacks["delivered"] == 48
        # the first scheduled poll would come after 100 s: every job was asked once, when its callback came
        assert sorted(set(sb.stats.status_by_task.values())) == [1]
    cb = result.summary["callbacks"]
    assert cb["received"] == 48 and cb["refused"] == 0 and cb["announced"] == cb["finished"] == 48
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert report["summary"]["counts"] == {"done": 48}
    secret, tokens = secrets_of(tmp_path / "out")
    assert_nowhere(tmp_path / "out", secret, tokens)
    # the raw callbacks are kept for diagnosis, redacted (the sandbox's notice carries the key in its fileURL)
    kept = [json.loads(detail) for _, detail in events_of(tmp_path / "out", "callback")]
    assert len(kept) == 48 and all(k["whole"] and "apiKey=REDACTED" in k["body"] for k in kept)


@pytest.mark.parametrize(
    "knobs",
    [
        {"p_callback_drop": 0.5},
        {"p_callback_duplicate": 1.0, "callback_delay_s": 4.0},
        {"p_callback_reorder": 0.5, "callback_delay_s": 4.0},
    ],
    ids=["dropped", "duplicated-delayed", "reordered"],
)
async def test_unreliable_callbacks_lose_no_job(tmp_path: Path, knobs: dict[str, float]) -> None:
    plan = campaign(tmp_path, 30)
    async with serve(SandboxConfig(api_key=KEY, time_scale=0.005, seed=9, **knobs)) as (sb, url):  # type: ignore[arg-type]
        result = await run_campaign(plan, cfg(tmp_path / "out", QUICK_POLLS), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.counts == {"done": 30}
        assert sb.stats.tasks_created == 30  # nothing resubmitted
        counts = sb.stats.callbacks
        if "p_callback_drop" in knobs:
            assert counts["dropped"] > 5 and counts["sent"] == 30 - counts["dropped"]
            silent = [t for t in sb.tasks if t not in _announced(tmp_path / "out")]
            assert len(silent) >= counts["dropped"]  # found by polling alone
        if "p_callback_duplicate" in knobs:
            assert counts["duplicated"] == 30
        if "p_callback_reorder" in knobs:
            assert counts["reordered"] > 5
    assert result.summary["callbacks"]["refused"] == 0


def _announced(out: Path) -> set[str]:
    """Task ids of jobs that received at least one callback (from the kept raw callbacks)."""
    conn = sqlite3.connect(out / ".batchrunner" / "state.sqlite")
    try:
        rows = conn.execute("SELECT j.task_id FROM events e JOIN jobs j ON j.id = e.job_id WHERE e.kind = 'callback'").fetchall()
    finally:
        conn.close()
    return {r[0] for r in rows}


async def test_early_callbacks_before_the_task_id_is_recorded_change_nothing_by_themselves(tmp_path: Path) -> None:
    # every task gets a premature notice, claiming success, when it is created (before the generate answer: before the
    # runner can have recorded its task id), and the real one when it finishes
    plan = campaign(tmp_path, 20)
    durations = {"image": (8.0, 0.1), "video": (8.0, 0.1), "audio": (8.0, 0.1)}
    async with serve(SandboxConfig(api_key=KEY, time_scale=0.05, seed=3, durations_s=durations, p_callback_early=1.0)) as (sb, url):
        result = await run_campaign(plan, cfg(tmp_path / "out", SLOW_POLLS, concurrency=20), api_key=KEY, base_url=url)
        assert result.outcome == "complete" and result.counts == {"done": 20}
        assert sb.stats.callbacks["early"] == 20 and sb.stats.callbacks["delivered"] == 40
        # no scheduled poll comes before 100 s: each job was asked once when it had its task id (the early notice
        # was kept until then), was told "processing" and stayed submitted, then asked again at the real notice
        assert sorted(sb.stats.status_by_task.values()) == [2] * 20
        assert all(t.seen_at is not None and t.seen_at >= t.finish_at for t in sb.tasks.values())
    cb = result.summary["callbacks"]
    assert cb["received"] == 40 and cb["announced"] == 20


async def test_forged_callbacks_are_refused_and_poll_nothing(tmp_path: Path) -> None:
    plan = campaign(tmp_path, 6)
    submitted = anyio.Event()
    seen: list[str] = []

    def on_event(kind: str, job: Job | None, detail: str) -> None:
        if kind == "submitted":
            seen.append(detail)
            if len(seen) == 6:
                submitted.set()

    durations = {"image": (8.0, 0.01), "video": (8.0, 0.01), "audio": (8.0, 0.01)}
    async with serve(SandboxConfig(api_key=KEY, time_scale=0.25, seed=4, durations_s=durations)) as (sb, url):  # tasks take ~2 s
        result: dict[str, Any] = {}

        async def run() -> None:
            result["r"] = await run_campaign(
                plan, cfg(tmp_path / "out", SLOW_POLLS, concurrency=6), api_key=KEY, base_url=url, on_event=on_event
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await submitted.wait()
            real = next(iter(sb.tasks.values())).callback
            assert real is not None
            base, job_id, good = real.rsplit("/", 2)
            other = next(s.id for s in plan.specs if s.id != job_id)
            forged = [
                ("POST", f"{base}/{job_id}/{'0' * 32}"),  # wrong token
                ("POST", f"{base}/{other}/{good}"),  # another job's token
                ("POST", f"{base}/{job_id}/{good[:-1]}"),  # cut token
                ("POST", f"{base}/{'f' * 20}/{good}"),  # unknown job
                ("GET", real),  # right URL, wrong method
                ("POST", base.rsplit("/cb", 1)[0] + "/"),
            ]
            async with aiohttp.ClientSession() as session:
                for method, target in forged:
                    async with session.request(method, target, data=b'{"taskId": "x", "status": "success"}') as resp:
                        assert resp.status == 404, target
            assert sb.stats.status_requests == 0
        assert result["r"].counts == {"done": 6}
        assert sorted(sb.stats.status_by_task.values()) == [1] * 6  # only the real callbacks caused a poll
    assert result["r"].summary["callbacks"]["refused"] == 6 and result["r"].summary["callbacks"]["received"] == 6


async def test_an_oversized_or_slow_body_does_not_stall_the_receiver(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    settings = CallbackSettings(host="127.0.0.1", port=0, read_timeout_s=2.0)
    try:
        async with listening(settings) as receiver:
            hub = receiver.arm(store)
            host, port = receiver.address.rsplit(":", 1)

            def request(job: str, length: int) -> bytes:
                path = hub.url(job).split(receiver.address, 1)[1]
                return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode()

            slow = await anyio.connect_tcp(host, int(port))
            await slow.send(request("slowjob", 1000) + b'{"taskId": "slo')  # …and the rest never comes
            async with aiohttp.ClientSession() as session:
                async with session.post(hub.url("quickjob"), json={"taskId": "q", "status": "success"}) as resp:
                    assert resp.status == 200
                assert "quickjob" in hub._hints  # woken while the slow client still holds its connection
                big = await anyio.connect_tcp(host, int(port))
                await big.send(request("bigjob", 1 << 20) + b"x" * (100 * 1024))
                big_answer = await big.receive()
                assert big_answer.startswith(b"HTTP/1.1 200")
                await big.aclose()
            slow_answer = await slow.receive()  # answered once its read time is up
            assert slow_answer.startswith(b"HTTP/1.1 200")
            await slow.aclose()
            assert {"slowjob", "bigjob", "quickjob"} <= set(hub._hints)
            assert receiver.counts["accepted"] == 3 and receiver.counts["cut"] == 2
        store.flush()
    finally:
        store.close()
    kept = {job_id: json.loads(detail) for job_id, detail in events_of(tmp_path, "callback")}
    assert kept["quickjob"]["whole"] and not kept["slowjob"]["whole"] and not kept["bigjob"]["whole"]
    assert kept["bigjob"]["bytes"] == 64 * 1024 and len(kept["bigjob"]["body"]) <= 4096


async def test_the_sandbox_calls_back_only_loopback_addresses_and_accepts_http_only_there() -> None:
    async with serve(SandboxConfig(time_scale=0.001)) as (sb, url):
        headers = {"Host": "business.api.cliprise.app", "Authorization": "Bearer sandbox-key"}
        answers = []
        async with aiohttp.ClientSession() as session:
            for cb in ("http://hooks.example.com/x", "https://hooks.example.com/x", "http://127.0.0.1:9/x"):
                body = {"model": "flux-2", "input": {"prompt": "p"}, "callBackUrl": cb}
                async with session.post(url + "/app/cliprise/generate", json=body, headers=headers) as resp:
                    answers.append(json.loads(await resp.read()))
        assert answers[0] == {"code": 400, "msg": "callBackUrl: must be an HTTPS URL", "data": None}
        assert answers[1][0]["code"] == 200 and answers[2][0]["code"] == 200
        assert sb.stats.callbacks["not_loopback"] == 1 and sb.stats.callbacks["scheduled"] == 1


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_campaign_with_callbacks_keeps_tokens_out_of_reports_and_logs(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = write(
        "m.yaml", "name: cbcli\nmatrix: {i: [0,1,2,3,4,5,6,7,8,9]}\njobs:\n  - {model: flux-2, prompt: 'image {i}', variants: 2}\n"
    )
    out = tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.05", "--failure-rate", "0.2") as url:  # images take ~0.4 s
        run = cli(
            "run",
            str(path),
            "--out",
            str(out),
            "--verbose",
            "--concurrency",
            "20",
            "--callback-listen",
            "127.0.0.1:0",
            env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url},
        )
        counters = stats(url)
    assert run.returncode in (0, 1), run.stderr
    assert "callbacks: 20 received, 0 refused" in run.stdout
    assert counters["callbacks"]["delivered"] == 20 and counters["tasks_created"] == 20
    # all 20 in flight at once, timed from the default expectations (a first poll after 5 s): each was asked once, when called back
    assert sorted(set(counters["status_by_task"].values())) == [1]
    secret, tokens = secrets_of(out)
    assert_nowhere(out, secret, tokens, run.stdout, run.stderr)
    assert KEY not in run.stdout + run.stderr


@pytest.mark.parametrize("drop", ["1.0", "0.0"], ids=["tunnel-dead", "tunnel-up"])
def test_a_run_says_when_callbacks_stop_coming(tmp_path: Path, write, drop: str) -> None:  # type: ignore[no-untyped-def]
    n = SILENCE_WARN + 10
    cells = ",".join(map(str, range(n)))
    path = write("m.yaml", f"name: cbsilent\nmatrix: {{i: [{cells}]}}\njobs:\n  - {{model: flux-2, prompt: 'image {{i}}'}}\n")
    out = tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.01", "--p-callback-drop", drop) as url:
        run = cli(
            "run", str(path), "--out", str(out), "--poll-scale", "0.01", "--concurrency", "8", "--callback-listen", "127.0.0.1:0",
            env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url},
        )  # fmt: skip
        counters = stats(url)
    assert run.returncode == 0, run.stderr
    assert f"{n} done" in run.stdout  # found by polling, every one
    said = [line for line in (run.stdout + run.stderr).splitlines() if "no callback has come" in line]
    if drop == "1.0":
        assert counters["callbacks"]["dropped"] == n
        assert len(said) == 1 and said[0].startswith("warning: ") and "polling goes on" in said[0]
    else:
        assert counters["callbacks"]["delivered"] == n and said == []


def test_cli_refuses_bad_callback_settings(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    bad = write(
        "bad.yaml",
        "name: b\ncallbacks:\n  listen: nowhere\n  url: http://hooks.example.com/x\n  secret: x\njobs:\n  - {model: flux-2, prompt: p}\n",
    )
    result = cli("plan", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:3: callbacks.listen: 'nowhere' must be host:port" in result.stderr
    assert f"{bad}:4: callbacks.url: 'http://hooks.example.com/x' must be an https:// URL" in result.stderr
    assert f"{bad}:5: callbacks.secret: unknown key" in result.stderr
    both = write("both.yaml", "name: b\ncallback_url: https://mine.example.com/hook\njobs:\n  - {model: flux-2, prompt: p}\n")
    result = cli("run", str(both), "--sandbox", "--out", str(tmp_path / "o"), "--callback-listen", "127.0.0.1:0")
    assert result.returncode == 2 and f"{both}:2: callback_url is set and batchrunner's callback receiver is on" in result.stderr
    alone = cli("run", str(both), "--sandbox", "--out", str(tmp_path / "o"), "--callback-url", "https://h.example.com/x")
    assert alone.returncode == 2 and "--callback-url: a callback URL needs a receiver" in alone.stderr
    assert not (tmp_path / "o" / ".batchrunner" / "state.sqlite").exists()


def test_a_receiver_that_cannot_listen_refuses_the_run(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", "name: busy\ncallbacks: {listen: '127.0.0.1:PORT'}\njobs:\n  - {model: flux-2, prompt: p}\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path.write_text(path.read_text().replace("PORT", str(port)))
        with sandbox_process("--key", KEY) as url:
            result = cli("run", str(path), "--out", str(tmp_path / "o"), env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url})
            counters = stats(url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{path}:2: callbacks.listen: cannot listen on 127.0.0.1:{port}" in result.stderr and "nothing was sent" in result.stderr
    assert counters["generate_requests"] == 0 and not (tmp_path / "o" / ".batchrunner" / "state.sqlite").exists()


def done_jobs(out: Path) -> int:
    try:
        return len(peek(out)[0])
    except StateError:  # the state file is being created
        return 0


@pytest.mark.slow
def test_sigkill_and_resume_with_callbacks_on(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    head = f"name: cbkill\nconcurrency: 6\ncallbacks: {{listen: '127.0.0.1:{port}'}}\n"
    path = write("m.yaml", head + f"matrix: {{i: [{','.join(map(str, range(20)))}]}}\n"
                 "jobs:\n  - {model: flux-2, prompt: 'image {i}'}\n  - {model: kling-video-turbo, prompt: 'clip {i}'}\n")  # fmt: skip
    out = tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.01", "--seed", "8") as url:
        env = {"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
        cmd = [sys.executable, "-m", "batchrunner.cli", "run", str(path), "--out", str(out), "--quiet", "--poll-scale", "0.01"]
        for kill_at in (3, 15):
            proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 60
                while done_jobs(out) < kill_at and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)  # waiting for the state file to show kill_at jobs done
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        assert 0 < len(peek(out)[0]) < 40
        done = cli(*cmd[3:], env=env)
        assert done.returncode == 0, done.stderr
        counters = stats(url)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["counts"] == {"done": 40} and report["summary"]["runs"] == 3
    assert counters["tasks_created"] <= 40 + report["summary"]["ambiguous_resubmitted"]
    assert counters["callbacks"]["sent"] >= 1
    secret, tokens = secrets_of(out)
    assert_nowhere(out, secret, tokens, done.stdout, done.stderr)


def test_benchmark_callbacks_mode_smoke() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/polling.py"),
            "--callbacks",
            "--jobs",
            "16",
            "--concurrency",
            "8",
            "--time-scale",
            "0.01",
            "--sigmas",
            "0.35",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["mode"] for r in figures["rows"]] == ["poll-only", "callbacks", "callbacks, 30% dropped"]


def test_manifest_error_names_where_each_setting_came_from() -> None:
    with pytest.raises(ManifestError) as caught:
        CallbackSettings.parse("x", "ftp://h", listen_at=("--callback-listen", None), url_at=("m.yaml", 7))
    assert str(caught.value.problems[0]).startswith("--callback-listen: callbacks.listen:")
    assert str(caught.value.problems[1]).startswith("m.yaml:7: callbacks.url:")
