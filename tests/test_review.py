"""The review loop without a browser: decisions, retakes through the real CLI and sandbox, export, and the review server's walls."""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from batchrunner.cli import main
from batchrunner.report import Gallery, _dimensions
from batchrunner.store import Store, peek, peek_rejected, retake_id

from .conftest import ROOT, cli, sandbox_process, stats

KEY = "sk-review-SECRET-81c3"
DEMO = ROOT / "manifests/demo.yaml"


def report_jobs(out: Path) -> dict[str, dict[str, str]]:
    """report.csv by path."""
    with open(out / "report.csv", newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_rows(out: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{out / '.batchrunner/state.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo campaign, finished once on the embedded sandbox; tests work on copies."""
    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["run", str(DEMO), "--sandbox", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def demo(demo_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    shutil.copytree(demo_run, out, symlinks=True)
    return out


# -- reject, re-run: exactly the rejected ones again -------------------------------------------
def test_reject_three_then_rerun_makes_exactly_those_three_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with sandbox_process("--key", KEY, "--time-scale", "0.001") as url:
        env = {"CLIPRISE_API_KEY": KEY, "CLIPRISE_BASE_URL": url}
        run = ["run", str(DEMO), "--out", str(out), "--quiet", "--poll-scale", "0.001"]
        first = cli(*run, env=env)
        assert first.returncode == 0, first.stderr
        assert stats(url)["tasks_created"] == 18
        before = report_jobs(out)
        rejected = ["perfume/flux-2-1_1-v1.png", "sneaker/seedream-4-5-poster-v1.png", "watch/kling-video-turbo-5s-v1.mp4"]
        old = {p: (before[p]["id"], sha(out / p)) for p in rejected}

        said = cli("reject", str(out), *rejected)
        assert said.returncode == 0, said.stderr
        assert "rejected 3" in said.stdout
        assert state_rows(out, "SELECT count(*) FROM jobs WHERE review = 'rejected'") == [(3,)]
        assert peek_rejected(out) == {old[p][0] for p in rejected}
        plan = json.loads(cli("plan", str(DEMO), "--out", str(out), "--json").stdout)
        assert plan["to_run"] == 3 and plan["already_done"] == 15 and plan["rejected_to_redo"] == 3

        again = cli(*run, env=env)
        assert again.returncode == 0, again.stderr
        assert stats(url)["tasks_created"] == 21  # exactly three new generate calls
        after = report_jobs(out)
        for path in rejected:
            old_id, old_sha = old[path]
            folder, _, name = path.rpartition("/")
            stem, _, ext = name.rpartition(".")
            kept = out / "rejected" / folder / f"{stem}.take1.{ext}"
            assert sha(kept) == old_sha  # the rejected file, kept aside, whole
            assert json.loads(kept.with_name(kept.name + ".json").read_text())["job_id"] == old_id
            assert sha(out / path) != old_sha and sha(out / path) == after[path]["sha256"]  # a new take at the same path
            assert after[path]["id"] == retake_id(old_id, 2) and after[path]["take"] == "2" and after[path]["review"] == ""
            assert json.loads((out / (path + ".json")).read_text())["job_id"] == after[path]["id"]
        for path, row in before.items():
            if path not in rejected:
                assert after[path]["id"] == row["id"] and after[path]["sha256"] == row["sha256"]  # never-rejected jobs keep their ids

        third = cli(*run, env=env)  # sync finds the retaken jobs through their first ids: nothing more to do
        assert third.returncode == 0 and stats(url)["tasks_created"] == 21
        assert report_jobs(out) == after

        cli("reject", str(out), "perfume/flux-2-1_1-v1.png")  # a second rejection, redone by `retry` this time
        retry = cli("retry", str(out), "--quiet", "--poll-scale", "0.001", env=env)
        assert retry.returncode == 0, retry.stderr
        assert stats(url)["tasks_created"] == 22
        assert (out / "rejected/perfume/flux-2-1_1-v1.take2.png").is_file()
        assert report_jobs(out)["perfume/flux-2-1_1-v1.png"]["id"] == retake_id(old["perfume/flux-2-1_1-v1.png"][0], 3)
    assert not list(out.rglob("*.tmp"))


def test_unknown_path_is_refused_whole(demo: Path) -> None:
    result = cli("reject", str(demo), "perfume/flux-2-1_1-v1.png", "perfume/nope.png", "../escape.png")
    assert result.returncode == 2
    assert "no finished job at 'perfume/nope.png', '../escape.png'" in result.stderr and "Traceback" not in result.stderr
    assert state_rows(demo, "SELECT count(*) FROM jobs WHERE review IS NOT NULL") == [(0,)]  # all or nothing
    approved = cli("approve", str(demo), f"{demo}/perfume/flux-2-1_1-v1.png", "./watch/flux-2-9_16-v2.png")  # DIR/ and ./ are accepted
    assert approved.returncode == 0, approved.stderr
    assert state_rows(demo, "SELECT count(*) FROM jobs WHERE review = 'approved'") == [(2,)]
    missing = cli("approve", str(demo.parent / "nothing-here"), "a.png")
    assert missing.returncode == 2 and "holds no batchrunner state" in missing.stderr


def test_max_credits_counts_the_rejected_jobs_a_rerun_makes_again(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    jobs = 'matrix: {p: [a, b, c]}\npath: "{p}.{ext}"\njobs:\n  - {model: flux-2, prompt: "thing {p}"}\n'
    m = write("m.yaml", "credits: {flux-2: 10}\nmax_credits: 40\n" + jobs)
    out = tmp_path / "out"
    assert main(["run", str(m), "--sandbox", "--out", str(out), "--quiet"]) == 0  # 30 credits spent
    assert cli("reject", str(out), "a.png", "b.png").returncode == 0
    too_much = "the plan costs 20 credits to run (30 already spent), more than max_credits 40"
    planned = cli("plan", str(m), "--out", str(out), "--json", "--sandbox")  # plan refuses what run refuses
    assert planned.returncode == 2 and too_much in planned.stderr
    refused = cli("run", str(m), "--sandbox", "--out", str(out), "--quiet")
    assert refused.returncode == 2 and too_much in refused.stderr
    assert (out / "a.png").exists() and not (out / "rejected").exists()  # refused before anything moved
    assert cli("approve", str(out), "b.png").returncode == 0  # changed my mind: one retake fits the budget
    plan = json.loads(cli("plan", str(m), "--out", str(out), "--json", "--sandbox").stdout)
    assert plan["to_run"] == 1 and plan["credits_to_run"] == 10 and plan["rejected_to_redo"] == 1
    assert main(["run", str(m), "--sandbox", "--out", str(out), "--quiet"]) == 0
    assert (out / "rejected/a.take1.png").is_file() and not (out / "rejected/b.take1.png").exists()


def test_a_rejected_job_edited_out_of_the_manifest_is_still_kept_aside(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", 'matrix: {p: [a, b]}\npath: "{p}.{ext}"\njobs:\n  - {model: flux-2, prompt: "thing {p}"}\n')
    out = tmp_path / "out"
    assert main(["run", str(m), "--sandbox", "--out", str(out), "--quiet"]) == 0
    first = sha(out / "a.png")
    assert cli("reject", str(out), "a.png").returncode == 0
    write("m.yaml", 'matrix: {p: [a, b]}\npath: "{p}.{ext}"\njobs:\n  - {model: flux-2, prompt: "thing {p}, brighter"}\n')
    assert main(["run", str(m), "--sandbox", "--out", str(out), "--quiet"]) == 0  # new ids: new jobs at the same paths
    assert sha(out / "rejected/a.take1.png") == first and sha(out / "a.png") != first


def test_rejected_file_moved_but_state_not_updated_is_retaken_once(demo: Path) -> None:
    """A crash between moving the rejected file aside and recording the retake: the next start finishes the job."""
    assert cli("reject", str(demo), "sneaker/flux-2-1_1-v2.png").returncode == 0
    (demo / "rejected/sneaker").mkdir(parents=True)
    os.rename(demo / "sneaker/flux-2-1_1-v2.png", demo / "rejected/sneaker/flux-2-1_1-v2.take1.png")
    store = Store.open(demo)
    try:
        found = store.recover()
        assert found["files_missing"] == 1 and found["retaken"] == 1
        assert store.recover()["retaken"] == 0
    finally:
        store.close()
    assert state_rows(demo, "SELECT state, take, review FROM jobs WHERE origin IS NOT NULL") == [("pending", 2, None)]


def test_sync_keeps_finding_a_retaken_job_and_a_changed_spec_is_a_new_job(demo: Path, write) -> None:  # type: ignore[no-untyped-def]
    from batchrunner.catalog import load_catalog
    from batchrunner.expand import expand
    from batchrunner.manifest import load

    plan = expand(load(DEMO), load_catalog()[0])
    assert cli("reject", str(demo), "watch/flux-2-1_1-v1.png").returncode == 0
    store = Store.open(demo)
    try:
        [new_id] = store.retake_rejected()
        result = store.sync(plan.specs)
        assert result.new == 0 and result.dropped == 0 and result.known == {"done": 17, "pending": 1}
        rejected = next(s.id for s in plan.specs if s.path == "watch/flux-2-1_1-v1.{ext}")
        assert peek(demo)[0] == {s.id for s in plan.specs} - {rejected}  # the retaken job, still pending: not kept
    finally:
        store.close()
    assert new_id not in {s.id for s in plan.specs}
    assert state_rows(demo, "SELECT count(*) FROM jobs") == [(18,)]


# -- export ------------------------------------------------------------------------------------
def test_export_copies_the_approved_results_only_with_a_listing(demo: Path, tmp_path: Path) -> None:
    approved = ["perfume/flux-2-1_1-v1.png", "watch/kling-video-turbo-5s-v1.mp4"]
    assert cli("approve", str(demo), *approved).returncode == 0
    assert cli("reject", str(demo), "perfume/flux-2-1_1-v2.png").returncode == 0
    dest = tmp_path / "delivery"
    result = cli("export", str(demo), str(dest), "--approved")
    assert result.returncode == 0, result.stderr
    assert "exported 2 approved files" in result.stdout
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["batchrunner-export.csv", *approved]  # no sidecar, no rejected or undecided result
    jobs = report_jobs(demo)
    with open(dest / "batchrunner-export.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == approved
    for row in rows:
        assert row["sha256"] == sha(dest / row["path"]) == jobs[row["path"]]["sha256"]
        assert int(row["bytes"]) == (dest / row["path"]).stat().st_size and row["job_id"] == jobs[row["path"]]["id"]
    assert rows[0]["var.product"] == "perfume" and rows[0]["var.format"] == "1:1" and rows[0]["model"] == "flux-2"
    assert not list(dest.rglob("*export-tmp"))


def test_export_refuses_a_destination_inside_and_never_follows_a_symlink(demo: Path, tmp_path: Path) -> None:
    assert cli("approve", str(demo), "perfume/flux-2-1_1-v1.png", "sneaker/flux-2-1_1-v1.png").returncode == 0
    inside = cli("export", str(demo), str(demo / "delivery"), "--approved")
    assert inside.returncode == 2 and "is inside the output folder" in inside.stderr
    around = cli("export", str(demo), str(demo.parent), "--approved")
    assert around.returncode == 2 and "is inside" in around.stderr
    unsaid = cli("export", str(demo), str(tmp_path / "d"))
    assert unsaid.returncode == 2 and "--approved" in unsaid.stderr
    cloud = cli("export", str(demo), "s3://bucket/x", "--approved")
    assert cloud.returncode == 2 and "object storage" in cloud.stderr
    secret = tmp_path / "secret.txt"
    secret.write_text("not for export")
    (demo / "sneaker/flux-2-1_1-v1.png").unlink()
    (demo / "sneaker/flux-2-1_1-v1.png").symlink_to(secret)  # planted in the output folder
    dest = tmp_path / "d"
    (dest / "perfume").mkdir(parents=True)
    (dest / "perfume/flux-2-1_1-v1.png").symlink_to(secret)  # planted in the destination: replaced, not written through
    result = cli("export", str(demo), str(dest), "--approved")
    assert result.returncode == 1 and "sneaker/flux-2-1_1-v1.png" in result.stderr and "not exported" in result.stderr
    assert secret.read_text() == "not for export"
    assert not (dest / "perfume/flux-2-1_1-v1.png").is_symlink() and (dest / "perfume/flux-2-1_1-v1.png").read_bytes()[:4] == b"\x89PNG"
    assert not (dest / "sneaker").exists()


# -- the review server's walls -------------------------------------------------------------------
@contextmanager
def review_process(out: Path) -> Iterator[tuple[str, int]]:
    """``batchrunner review DIR`` in its own process; yields (host, port) from the line it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "batchrunner.cli", "review", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://(127\.0\.0\.1):(\d+)/", line)
        assert match, f"review did not start: {line!r}"
        yield match.group(1), int(match.group(2))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def request(
    server: tuple[str, int], method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """One raw HTTP request, the path sent exactly as given (no client-side clean-up of '..' or '%2f')."""
    conn = http.client.HTTPConnection(*server, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in {"Host": f"{server[0]}:{server[1]}", **(headers or {})}.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def decision(server: tuple[str, int], token: str, job_id: str, verdict: str | None, **headers: str) -> int:
    body = json.dumps({"id": job_id, "decision": verdict}).encode()
    hdrs = {"Content-Type": "application/json", "X-Batchrunner-Token": token, **headers}
    return request(server, "POST", "/api/decision", body=body, headers=hdrs)[0]


def test_review_server_refuses_cross_origin_writes_and_files_outside(demo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("outside the output folder")
    (demo / "watch/flux-2-1_1-v1.png").unlink()
    (demo / "watch/flux-2-1_1-v1.png").symlink_to(secret)  # a result path, planted as a link to outside
    (demo / "sneaker").rename(demo / "sneaker-real")
    (demo / "sneaker").symlink_to(demo / "sneaker-real", target_is_directory=True)  # a planted folder link
    job = report_jobs(demo)["perfume/flux-2-1_1-v1.png"]["id"]
    with review_process(demo) as server:
        status, page, headers = request(server, "GET", "/")
        assert status == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        token = re.search(rb'name=batchrunner-token content="([^"]+)"', page)
        assert token is not None
        token_s = token.group(1).decode()
        assert request(server, "GET", "/perfume/flux-2-1_1-v1.png")[0] == 200
        status, body, headers = request(server, "GET", "/watch/kling-video-turbo-5s-v1.mp4", headers={"Range": "bytes=0-99"})
        size = (demo / "watch/kling-video-turbo-5s-v1.mp4").stat().st_size
        assert status == 206 and len(body) == 100 and headers["Content-Range"] == f"bytes 0-99/{size}"
        for path in (
            "/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/perfume/..%2f..%2f" + "etc/passwd", "//etc/passwd", "/%2fetc%2fpasswd",
            f"/{secret}", "/watch/flux-2-1_1-v1.png", "/sneaker/flux-2-1_1-v1.png", "/perfume/", "/perfume",
            "/perfume/flux-2-1_1-v1.png.json", "/.batchrunner/state.sqlite", "/report.json", "/rejected/",
        ):  # fmt: skip
            status, body, _ = request(server, "GET", path)
            assert status in (403, 404), path
            assert b"outside the output folder" not in body and b"root:" not in body
        assert request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
        assert decision(server, token_s, job, "approved", Origin="http://evil.example") == 403
        assert decision(server, token_s, job, "approved", **{"Sec-Fetch-Site": "cross-site"}) == 403
        assert decision(server, "wrong-token", job, "approved") == 403
        assert decision(server, token_s, job, "approved", Host="evil.example") == 403
        assert decision(server, token_s, job, "maybe") == 400
        assert state_rows(demo, "SELECT count(*) FROM jobs WHERE review IS NOT NULL") == [(0,)]  # nothing refused was written
        assert decision(server, token_s, job, "approved", Origin=f"http://127.0.0.1:{server[1]}") == 200
        assert state_rows(demo, "SELECT review FROM jobs WHERE id = ?", job) == [("approved",)]
        assert decision(server, token_s, "no-such-job", "rejected") == 409
    assert secret.read_text() == "outside the output folder"


def test_review_refuses_a_directory_without_state_and_a_taken_port(demo: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("review", str(empty))
    assert result.returncode == 2 and "holds no batchrunner state" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = cli("review", str(demo), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "choose another --port" in busy.stderr and "Traceback" not in busy.stderr


# -- the gallery's markup (the browser tests check its behaviour) ----------------------------------
def job(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "j1", "state": "done", "model": "flux-2", "modality": "image", "path": "a/one.png", "sha256": None, "bytes": None,
        "task_id": None, "submits": 1, "ambiguous": 0, "error": None, "prompt": "p", "parameters": {}, "vars": {}, "variant": 1,
        "review": None, "take": 1, "intended_path": "a/one.{ext}",
    }  # fmt: skip
    return {**base, **fields}


def summary(**fields: Any) -> dict[str, Any]:
    return {
        "campaign": "c", "outcome": "complete", "error": None, "jobs": 3, "counts": {"done": 1, "failed": 1, "pending": 1},
        "ambiguous_resubmitted": 0, "submits": 2, "credits": {"spent": 0.0, "planned": None}, "wall_s": 1.5, "runs": 1,
        "models": ["flux-2"],
        "requests": {"sent": 2, "answered_with_task_id": 2, "ambiguous": 0, "repaid": 0, "possibly_paid_twice": 0}, **fields,
    }  # fmt: skip


def test_failed_and_waiting_jobs_sit_in_their_group_with_path_and_reason() -> None:
    page = Gallery(summary(), "product")
    page.add(job(vars={"product": "cup"}))
    page.add(job(id="j2", state="failed", path=None, intended_path="cup/two.{ext}", error="content policy", vars={"product": "cup"}))
    page.add(job(id="j3", state="pending", path=None, intended_path="mug/three.{ext}", vars={"product": "mug"}))
    html = page.render()
    cup, mug = html.index("product cup"), html.index("product mug")
    assert cup < html.index('data-id="j2"') < mug < html.index('data-id="j3"')
    assert "cup/two.*" in html and "content policy" in html and "mug/three.*" in html and "not made yet" in html
    assert "<b>1</b> failed" in html and "<b>1</b> pending" in html and "wall time 1.5 s" in html


def test_everything_from_the_state_is_escaped_and_redacted() -> None:
    hostile = "<img src=x onerror=alert(1)>\"' apiKey=sk-LEAK"
    page = Gallery(summary(campaign=hostile), "product")
    page.add(job(prompt=hostile, vars={"product": hostile, "state": hostile}, error=hostile, path='a/"x<y>.png'))
    page.add(job(id="j2", state="failed", prompt=hostile, vars={"product": "b", "state": "b"}, error=hostile, path=None))
    html = page.render()
    assert "<img src=x" not in html and "sk-LEAK" not in html and "onerror=alert(1)>" not in html
    assert 'data-key="var:state"' in html  # a var named like a built-in facet gets its own key
    assert html.count("<script>") == 1


def test_a_pipeline_job_shows_its_chain() -> None:
    """The seam for pipelines: a job record with ``inputs`` (upstream result paths) is drawn as input → … → this."""
    page = Gallery(summary(), None)
    page.add(job(inputs=["base/shot.png", "base/shot-upscaled.png"], step="animate"))
    html = page.render()
    assert '<p class=chain><a href="base/shot.png">base/shot.png</a> → <a href="base/shot-upscaled.png">' in html
    assert 'data-step="animate"' in html


def test_the_page_is_bounded_and_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchrunner.report.GALLERY_LIMIT", 2)
    second = Gallery(summary(), None, review_token="t", page=2)
    for n in range(5):
        second.add(job(id=f"j{n}", path=f"{n}.png"))
    html = second.render()
    assert html.count("<figure") == 2 and 'data-id="j2"' in html and 'data-id="j3"' in html
    assert "showing jobs 3–4 of 5" in html and '?page=3">next page' in html and '?page=1">‹ previous' in html


def png(width: int, height: int, rgb: tuple[int, int, int] = (200, 80, 40)) -> bytes:
    """A real RGB PNG of ``width`` × ``height`` (a gradient, so it is visibly an image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes((rgb[0], rgb[1], (rgb[2] + 255 * y // height) % 256)) * width for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_image_sizes_come_from_png_and_gif_headers(tmp_path: Path) -> None:
    (tmp_path / "wide.png").write_bytes(png(160, 90))
    gif = b"GIF89a" + (300).to_bytes(2, "little") + (20).to_bytes(2, "little") + b"\x00\x00\x00;"
    assert _dimensions((tmp_path / "wide.png").read_bytes()) == (160, 90)
    assert _dimensions(gif) == (300, 20)
    assert _dimensions(b"not an image") is None and _dimensions(b"\xff\xd8\xff") is None
