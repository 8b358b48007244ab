"""What the CLI tells the user before, during and after a run — and that it is true.

`plan` against `run` on a corpus of manifests and output folders (same exit status, same
error lines; the runs go to the embedded sandbox); the last line of a run; `status` paths;
help texts; `plan | head`; progress from its events (the runner's `tick`/`paused`
contract) and across a real interrupted and resumed run, in plain-line mode and on a pty.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import pty
import re
import selectors
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchrunner import cli as cli_module
from batchrunner import load_plan
from batchrunner.cli import PLAIN_EVERY_S, Progress, main
from batchrunner.dryrun import Preview
from batchrunner.store import STATE_DIR, JobState, Store, peek

from .conftest import ROOT, cli

FAST = ["--sandbox", "--sandbox-time-scale", "0.001"]
PRICED = "credits: {flux-2: 2}\nmatrix: {i: [1, 2, 3]}\njobs:\n  - {model: flux-2, prompt: 'thing {i}'}\n"


def run_demo_csv(out: Path) -> None:
    assert main(["run", "manifests/demo.csv", "--out", str(out), "--quiet", *FAST]) == 0


def delete_one_result(out: Path) -> None:
    report = json.loads((out / "report.json").read_text())
    (out / report["jobs"][0]["path"]).unlink()


def ran_then_deleted(out: Path, manifest: str) -> None:
    assert main(["run", manifest, "--out", str(out), "--quiet", *FAST]) == 0
    delete_one_result(out)  # a flux-2 image: the re-run costs 1 credit more, on top of the 8 spent


def killed_mid_run(out: Path, manifest: str) -> None:
    """The state a hard kill can leave: one job caught mid-submit (ambiguous), one submitted (its task unknown to this sandbox)."""
    plan = load_plan(manifest)
    store = Store.open(out)
    store.claim(plan.manifest.name)
    store.sync(plan.specs)
    first, second = list(store.work())[:2]
    store.transition(first, JobState.SUBMITTING)
    store.transition(second, JobState.SUBMITTING)
    store.transition(second, JobState.SUBMITTED, task_id="task-of-another-sandbox", submitted_at=time.time())
    store.close()


def other_campaign(out: Path, manifest: str) -> None:
    store = Store.open(out)
    store.claim("someone-else")
    store.close()


def broken_state(out: Path, manifest: str) -> None:
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / "state.sqlite").write_bytes(b"this is not a database" * 100)


def newer_state(out: Path, manifest: str) -> None:
    (out / STATE_DIR).mkdir(parents=True)
    conn = sqlite3.connect(out / STATE_DIR / "state.sqlite")
    conn.execute("PRAGMA user_version = 99")
    conn.close()


def file_in_the_way(out: Path, manifest: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("not a folder")


DEMO_PRICED = f"credits: {{flux-2: 1, imagen-v4: 1, kling-video-turbo: 5}}\njobs_csv: {ROOT / 'manifests/demo.csv'}\n"  # 8 credits

# (name, manifest text, extra args, environment, set-up of the output folder)
CORPUS: list[tuple[str, str, list[str], dict[str, str], Callable[[Path, str], None] | None]] = [
    ("priced, no cap", PRICED, [], {}, None),
    ("cap in the manifest below the cost", "max_credits: 5\n" + PRICED, [], {}, None),
    ("cap equal to the cost", "max_credits: 6\n" + PRICED, [], {}, None),
    ("cap with an unknown price", "max_credits: 100\njobs:\n  - {model: flux-2, prompt: x}\n", [], {}, None),
    ("cap from the flag", PRICED, ["--max-credits", "4"], {}, None),
    ("cap from the environment", PRICED, [], {"BATCHRUNNER_MAX_CREDITS": "4"}, None),
    ("flag beats the manifest", "max_credits: 1\n" + PRICED, ["--max-credits", "10"], {}, None),
    ("bad environment value", PRICED, [], {"BATCHRUNNER_CONCURRENCY": "lots"}, None),
    ("unknown key", "matrx: {}\n" + PRICED, [], {}, None),
    ("unknown model, strict", "jobs:\n  - {model: flux2, prompt: x}\n", ["--strict"], {}, None),
    ("unknown model, warned", "jobs:\n  - {model: flux-2, prompt: x}\n  - {model: flux2, prompt: y}\n", [], {}, None),
    ("left by a hard kill", PRICED, [], {}, killed_mid_run),
    ("left by a hard kill, past the cap", "max_credits: 3\n" + PRICED, [], {}, killed_mid_run),
    ("another campaign's folder", PRICED, [], {}, other_campaign),
    ("another campaign's folder, --force", PRICED, ["--force"], {}, other_campaign),
    ("not a state file", PRICED, [], {}, broken_state),
    ("state from a newer batchrunner", PRICED, [], {}, newer_state),
    ("a file where the folder goes", PRICED, [], {}, file_in_the_way),
    ("re-run after a result was deleted, within the cap", DEMO_PRICED, ["--max-credits", "9"], {}, ran_then_deleted),
    ("re-run after a result was deleted, past the cap", DEMO_PRICED, ["--max-credits", "8.5"], {}, ran_then_deleted),
]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("error:", "warning:")) or "problem(s)" in line]


@pytest.mark.parametrize(("name", "manifest", "extra", "env", "setup"), CORPUS, ids=[c[0] for c in CORPUS])
def test_plan_refuses_exactly_what_run_refuses(
    tmp_path: Path, write, capsys, monkeypatch, name: str, manifest: str, extra: list[str], env: dict[str, str], setup
) -> None:  # type: ignore[no-untyped-def]
    for key in [k for k in os.environ if k.startswith(("BATCHRUNNER_", "CLIPRISE_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = str(write("m.yaml", manifest))
    out = tmp_path / "out"
    if setup is not None:
        setup(out, path)
    existed = out.exists()
    capsys.readouterr()

    plan_code = main(["plan", path, "--out", str(out), "--json", "--sandbox", *extra])
    plan_out = capsys.readouterr()
    run_code = main(["run", path, "--out", str(out), *extra, *FAST])
    run_out = capsys.readouterr()

    assert error_lines(plan_out.err) == error_lines(run_out.err), (plan_out.err, run_out.err)
    assert "Traceback" not in plan_out.err + run_out.err
    if plan_code == 0:  # the run goes ahead (a job the API refuses fails alone: exit 1) and does what plan counted
        assert run_code in (0, 1), run_out
        planned = json.loads(plan_out.out)
        ran = re.search(r"^\w+: ran (\d+) \(\d+ done\), skipped (\d+) already done, \d+ failed", run_out.out, re.M)
        assert ran, run_out.out
        assert (int(ran[1]), int(ran[2])) == (planned["to_run"], planned["already_done"])
    else:
        assert plan_code == run_code == 2 and error_lines(run_out.err), (plan_out, run_out)
        assert out.exists() == existed  # refused before anything was created


def test_plan_and_run_refuse_a_folder_another_run_holds(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o"
    holder = Store.open(out)
    try:
        plan_code = main(["plan", "manifests/demo.csv", "--out", str(out), "--sandbox"])
        plan_err = capsys.readouterr().err
        run_code = main(["run", "manifests/demo.csv", "--out", str(out), *FAST])
        run_err = capsys.readouterr().err
    finally:
        holder.close()
    expected = f"error: another batchrunner run (pid {os.getpid()}) is using {out} — wait for it to finish, or stop it"
    assert plan_code == run_code == 2 and error_lines(plan_err) == error_lines(run_err) == [expected]


def test_plan_counts_a_deleted_result_as_run_again(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o"
    run_demo_csv(out)
    capsys.readouterr()
    assert main(["plan", "manifests/demo.csv", "--out", str(out), "--sandbox"]) == 0
    assert "a re-run skips 4 finished jobs and runs 0\n" in capsys.readouterr().out
    delete_one_result(out)
    assert main(["plan", "manifests/demo.csv", "--out", str(out), "--sandbox"]) == 0
    assert "a re-run skips 3 finished jobs and runs 1 (1 because their result file is gone)" in capsys.readouterr().out
    assert main(["run", "manifests/demo.csv", "--out", str(out), *FAST]) == 0
    captured = capsys.readouterr()
    assert "resuming: 3 done, 0 in flight, 1 to submit (1 of them because their result file is gone)" in captured.err
    assert captured.out.splitlines()[-1].startswith("complete: ran 1 (1 done), skipped 3 already done, 0 failed → ")


def test_last_lines_after_failures_point_to_status_and_retry(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "o")
    assert main(["run", "manifests/demo.csv", "--out", out, "--sandbox-failure-rate", "1", "--quiet", *FAST]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == f"failed: ran 4 (0 done), skipped 0 already done, 4 failed → {out}/report.html"
    assert lines[-1] == f"4 jobs failed: `batchrunner status {out}` shows why; `batchrunner retry {out} --sandbox` runs them again"
    assert main(["status", out]) == 0
    status = capsys.readouterr().out
    assert "  failed csv/perfume-1.* (job " in status and "csv/watch.* (job " in status and "content policy" in status
    assert main(["status", out, "--json"]) == 0
    assert {f["path"] for f in json.loads(capsys.readouterr().out)["failed"]} == {
        "csv/perfume-1.*", "csv/perfume-2.*", "csv/sneaker.*", "csv/watch.*"
    }  # fmt: skip
    # a plain re-run leaves them failed and says so; retry runs them
    assert main(["run", "manifests/demo.csv", "--out", out, *FAST]) == 1
    captured = capsys.readouterr()
    assert "resuming: 0 done, 0 in flight, 0 to submit (4 failed earlier, left alone: `batchrunner retry` runs them)" in captured.err
    assert "failed: ran 0 (0 done), skipped 0 already done, 0 failed" in captured.out
    assert main(["retry", out, *FAST]) == 0
    assert "complete: ran 4 (4 done), skipped 0 already done, 0 failed" in capsys.readouterr().out


def test_plan_piped_into_a_reader_that_left_ends_quietly(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` once head has exited: every write gets EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "batchrunner.cli", "plan", "manifests/demo.yaml"], stdout=write_end, stderr=subprocess.PIPE,
            text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_every_flag_states_its_default() -> None:
    parser = cli_module._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) >= {"run", "plan", "status", "retry", "report", "models", "sandbox"}
    for name, sub in commands.items():
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help and "default" in action.help, f"batchrunner {name} {action.option_strings[0]}: {action.help!r}"


def test_models_has_a_header_and_says_how_to_add_what_is_missing(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["model", "type", "input", "credits"] and any(r.startswith("flux-2 ") for r in rows)
    assert main(["models", "--modality", "audio"]) == 0
    said = capsys.readouterr().out
    assert "no audio model is known yet: add one with --catalog FILE" in said
    extra = tmp_path / "more.csv"
    extra.write_text("id,modality,input_style,credits,alias_of,required,parameters,source\nmy-voice,audio,standard,3,,prompt,prompt,mine\n")
    assert main(["models", "--modality", "audio", "--catalog", str(extra)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split()[:4] == ["my-voice", "audio", "standard", "3"]


# -- progress: the event contract ---------------------------------------------------------------
def start(**kw: object) -> Preview:
    fields: dict[str, object] = {
        "out_dir": Path("out"), "jobs": 270, "done": 96, "in_flight": 8, "to_submit": 166, "stays_failed": 0, "files_gone": 0,
        "ambiguous": 0, "credits_to_submit": None, "spent": 0.0, "ambiguous_before": 0, "resuming": True,
    }  # fmt: skip
    return Preview(**{**fields, **kw})  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_starts_from_the_resumed_state_and_lines_follow_the_ticks() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = Progress(quiet=False, verbose=False, stream=stream, tty=False, clock=clock)
    progress.begin(start())
    assert stream.getvalue() == "resuming: 96 done, 8 in flight, 166 to submit\n"
    # the runner's contract: a "tick" at least once a second saying what the run waits for
    ticks = 0
    while stream.getvalue().count("progress:") < 3:
        clock.now += 1.0
        ticks += 1
        progress("tick", None, f"waiting for 8 results ({ticks} s)")
    lines = stream.getvalue().splitlines()[1:]
    assert ticks <= 3 * PLAIN_EVERY_S  # a line at least every few seconds, from ticks alone
    assert lines[0] == "progress: 96/270 done, 0 failed, 8 in flight; waiting for 8 results (2 s)"
    progress("retry", None, "server error (HTTP 503)")
    progress("rate_limited", None, "429")
    progress("paused", None, "rate-limited until 12:03:04 (Retry-After 30 s)")
    assert stream.getvalue().splitlines()[-1] == "paused: rate-limited until 12:03:04 (Retry-After 30 s)"  # at once
    progress("a-kind-from-the-future", None, "ignored")
    for _ in range(4):
        progress("done", None, "x.png")
    clock.now += 10
    progress("tick", None, "waiting for 4 results; rate-limited until 12:03:04")
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("progress: 100/270 done, 0 failed, 8 in flight, 1 retries, 1× 429; waiting for 4 results; rate-limited")
    # 4 finished in the 16 s since the start: 170 left take 680 s
    assert last.endswith("; ETA 11:20")
    progress.close()


def test_progress_bar_starts_at_what_is_done_and_redraws_on_every_tick() -> None:
    stream = io.StringIO()
    progress = Progress(quiet=False, verbose=False, stream=stream, tty=True, clock=Clock())
    progress.begin(start(stays_failed=4, to_submit=162))
    assert "96/270" not in stream.getvalue() and "100/270" in stream.getvalue()  # failed for good count as finished
    before = stream.getvalue()
    progress("tick", None, "waiting for 8 results")
    redrawn = stream.getvalue()[len(before) :]
    assert "100/270" in redrawn and "waiting for 8 results" in redrawn and "4 failed" in redrawn
    progress("done", None, "x.png")
    progress.close()
    assert "101/270" in stream.getvalue()


def test_quiet_progress_prints_only_what_a_stopping_run_waits_for() -> None:
    stream = io.StringIO()
    progress = Progress(quiet=True, verbose=False, stream=stream, tty=True, clock=Clock())
    progress.begin(start())
    for kind in ("tick", "paused", "submitted", "done", "failed", "status"):
        progress(kind, None, "x")
    assert stream.getvalue() == ""
    progress("stopping", None, "stopping: waiting for 2 generate request(s) to be answered")
    progress.close()
    assert stream.getvalue() == "stopping: waiting for 2 generate request(s) to be answered\n"


@pytest.mark.slow
def test_a_long_wait_still_shows_progress_lines(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = write("v.yaml", "jobs:\n  - {model: kling-video-turbo, prompt: one slow clip}\n")
    done = cli("run", str(path), "--out", str(tmp_path / "o"), "--sandbox", "--sandbox-time-scale", "0.2", timeout=180)
    assert done.returncode == 0, done.stderr
    waiting = [line for line in done.stderr.splitlines() if line.startswith("progress: 0/1 done") and ";" in line]
    assert waiting, done.stderr  # the video takes seconds: the runner's ticks keep the user informed meanwhile


# -- progress: a real run, interrupted and resumed ---------------------------------------------
def wait_for_line(proc: subprocess.Popen[str], pattern: str, deadline_s: float = 120) -> re.Match[str]:
    """Read ``proc``'s stderr until a line matches (no fixed sleep: the line is the event)."""
    assert proc.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    seen = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if not selector.select(timeout=end - time.monotonic()):
            break
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r} in {seen}")


def read_pty(fd: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_the_right_counts(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    total = 40
    path = write(
        "m.yaml", f"concurrency: 2\nmatrix: {{i: [{','.join(map(str, range(total)))}]}}\njobs:\n  - {{model: flux-2, prompt: 'p {{i}}'}}\n"
    )
    out = tmp_path / "o"
    command = [sys.executable, "-m", "batchrunner.cli", "run", str(path), "--out", str(out), "--sandbox", "--sandbox-time-scale", "0.05"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_"))}

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    wait_for_line(first, rf"^progress: ([1-9]\d*)/{total} done")  # plain-line mode (stderr is a pipe): some are done
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 130, err
    assert "interrupted: ran" in err and "Traceback" not in err
    done = len(peek(out)[0])
    assert 0 < done < total

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    resumed = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=child_fd, text=True, env=env, cwd=ROOT)
    os.close(child_fd)
    screen = read_pty(main_fd)
    os.close(main_fd)
    assert resumed.stdout is not None
    stdout = resumed.stdout.read()
    resumed.stdout.close()
    assert resumed.wait(timeout=60) == 0, screen

    first_line, bar = screen.split("\n", 1)
    found = re.fullmatch(r"resuming: (\d+) done, (\d+) in flight, (\d+) to submit\r?", first_line)
    assert found, screen
    assert int(found[1]) == done and int(found[1]) + int(found[2]) + int(found[3]) == total
    shown = [int(n) for n in re.findall(rf"(\d+)/{total} \[", bar)]
    assert shown[0] == done and min(shown) == done and shown[-1] == total, shown  # the bar starts at what was done
    assert f"complete: ran {total - done} ({total - done} done), skipped {done} already done, 0 failed" in stdout
