"""The real CLI as a subprocess: kill -9 and resume, Ctrl-C, locks, newcomer mistakes, secrets."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from batchrunner.cli import main
from batchrunner.store import peek

from .conftest import ROOT, cli, sandbox_process, stats

KEY = "sk-cli-SECRET-4b1d2e"


def manifest(write, n: int, video: int = 0) -> Path:  # type: ignore[no-untyped-def]
    jobs = "  - {model: flux-2, prompt: 'image {i}', variants: 2}\n"
    if video:
        jobs += "  - {model: kling-video-turbo, prompt: 'clip {i}'}\n"
    return write("m.yaml", f"name: kills\nconcurrency: 6\nmatrix: {{i: [{','.join(map(str, range(n)))}]}}\njobs:\n{jobs}")  # type: ignore[no-any-return]


def wait_for_events(proc: subprocess.Popen[str], n: int, kind: str = "[") -> None:
    """Read the run's --verbose event lines until ``n`` of ``kind`` have been printed (or the run ended)."""
    assert proc.stderr is not None
    seen = 0
    while seen < n and (line := proc.stderr.readline()):
        seen += line.startswith(kind)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = manifest(write, 25, video=1)  # 75 jobs
    out = tmp_path / "out"
    rng = random.Random(2026)
    with sandbox_process("--key", KEY, "--time-scale", "0.01", "--seed", "3") as url:
        env = {"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
        cmd = [sys.executable, "-m", "batchrunner.cli", "run", str(path), "--out", str(out), "--verbose", "--poll-scale", "0.01"]
        full_env = {**os.environ, **env}
        progress = []
        for _ in range(5):  # each kill lands after a random number of job events: submits, downloads, anything between
            proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wait_for_events(proc, rng.randint(2, 30))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
            progress.append(len(peek(out)[0]))
        assert any(0 < done < 75 for done in progress), progress  # kills landed mid-campaign
        done = cli("run", str(path), "--out", str(out), "--quiet", "--poll-scale", "0.01", env=env)
        assert done.returncode == 0, done.stderr
        counters = stats(url)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["counts"] == {"done": 75}
    paths = [j["path"] for j in report["jobs"]]
    assert len(set(paths)) == 75
    for job in report["jobs"]:
        data = (out / job["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == job["sha256"]
    on_disk = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".png", ".mp4"))
    assert len(on_disk) == 75 and not list(out.rglob("*.tmp"))
    ambiguous = report["summary"]["ambiguous_resubmitted"]
    assert counters["tasks_created"] <= 75 + ambiguous  # never paid twice unless counted as ambiguous
    assert 2 <= report["summary"]["runs"] <= 6


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_state_exits_130_and_resumes(tmp_path: Path, write, stop: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    path = manifest(write, 30)
    out = tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.02") as url:
        env = {**os.environ, "CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchrunner.cli", "run", str(path), "--out", str(out), "--poll-scale", "0.02", "--verbose"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_events(proc, 10, kind="[done]")  # mid-campaign: some jobs done, others in flight
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        report = json.loads((out / "report.json").read_text())
        assert report["summary"]["outcome"] == "interrupted"
        resumed = cli("run", str(path), "--out", str(out), "--poll-scale", "0.02", env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url})
        assert resumed.returncode == 0, resumed.stderr
        counters = stats(url)
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["counts"] == {"done": 60}
    assert counters["tasks_created"] == 60 and report["summary"]["ambiguous_resubmitted"] == 0  # Ctrl-C strands nothing


def test_key_never_reaches_files_or_logs(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = manifest(write, 6)
    out = tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.001", "--failure-rate", "0.3", "--p-5xx", "0.1", "--p-truncate", "0.2") as url:
        result = cli(
            "run",
            str(path),
            "--out",
            str(out),
            "--verbose",
            "--poll-scale",
            "0.001",
            env={"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url},
        )
    assert result.returncode in (0, 1), result.stderr
    assert KEY not in result.stdout + result.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "state.sqlite" for p in files) and any(p.name == "report.html" for p in files)
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p


def test_second_runner_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    from batchrunner.store import Store

    holder = Store.open(tmp_path)
    try:
        result = cli("run", "manifests/demo.yaml", "--sandbox", "--out", str(tmp_path))
    finally:
        holder.close()
    assert result.returncode == 2
    assert f"another batchrunner run (pid {os.getpid()}) is using {tmp_path}" in result.stderr


def test_newcomer_mistakes(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    no_key = cli("run", "manifests/demo.yaml", "--out", str(tmp_path / "a"))
    assert no_key.returncode == 2 and "No API key: set CLIPRISE_API_KEY, or try the demo with --sandbox" in no_key.stderr
    assert not (tmp_path / "a").exists()
    missing = cli("run", "manifests/nope.yaml", "--sandbox")
    assert missing.returncode == 2 and "no such manifest" in missing.stderr and "Traceback" not in missing.stderr
    first = cli("run", "manifests/demo.csv", "--sandbox", "--out", str(tmp_path / "b"), "--quiet")
    assert first.returncode == 0, first.stderr
    other_manifest = write("other.yaml", "name: other\njobs:\n  - {model: flux-2, prompt: x}\n")
    other = cli("run", str(other_manifest), "--sandbox", "--out", str(tmp_path / "b"))
    assert other.returncode == 2 and "holds the state of campaign 'demo-csv'" in other.stderr
    zero = cli("run", "manifests/demo.csv", "--sandbox", "--out", str(tmp_path / "c"), "--poll-scale", "0")
    assert zero.returncode == 2 and "--poll-scale: must be a positive number" in zero.stderr and not (tmp_path / "c").exists()


def test_status_retry_and_report_commands(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = str(tmp_path / "o")
    assert main(["run", "manifests/demo.csv", "--sandbox", "--sandbox-failure-rate", "1", "--out", out, "--quiet"]) == 1
    capsys.readouterr()
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    assert "failed       4" in text and "content policy" in text
    assert main(["status", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"failed": 4}
    assert main(["retry", out, "--sandbox", "--quiet"]) == 0
    assert main(["report", out]) == 0
    assert json.loads((tmp_path / "o/report.json").read_text())["summary"]["counts"] == {"done": 4}
    assert main(["status", str(tmp_path / "nothing")]) == 2


def test_demo_command_from_the_readme(tmp_path: Path) -> None:
    result = cli("run", "manifests/demo.yaml", "--sandbox", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "complete: ran 18 (18 done), skipped 0 already done, 0 failed" in result.stdout
    assert (tmp_path / "report.html").exists()


def test_models_command(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["models", "--modality", "video", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["modality"] for r in rows} == {"video"}
    assert any(r["id"] == "kling-2-5" and r["alias_of"] == "kling-video-turbo" for r in rows)
    assert main(["models"]) == 0
    assert "flux-2" in capsys.readouterr().out


def test_help_and_version() -> None:
    for command in ("run", "plan", "status", "retry", "report", "models", "sandbox"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "example" in result.stdout, command
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("batchrunner ")
    assert ROOT.exists()
