"""Media in, media kept, end to end: the real CLI, the real sandbox, a real S3 server (SeaweedFS).

Local ``file:`` inputs are uploaded once (content-addressed) and sent as presigned URLs
that the sandbox really fetches; results and sidecars are stored whole in the bucket and
found again on resume by one listing; bad inputs are refused before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import obstore
import pytest
from obstore.store import S3Store

from batchrunner.inputs import TOKEN_PREFIX

from .conftest import S3Server, cli, make_png, sandbox_process

BLUE, GREEN = (0, 0, 255), (0, 200, 0)
FAST = ("--poll-scale", "0.001")  # poll as fast as the sandbox (--time-scale 0.001) runs


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tasks(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sandbox/tasks", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def bucket(s3: S3Server) -> S3Store:
    return S3Store(
        s3.bucket,
        endpoint=s3.endpoint,
        virtual_hosted_style_request=False,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        region="us-east-1",
        client_options={"allow_http": True},
    )


def listing(s3: S3Server, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` (relative key → size), in one listing."""
    out: dict[str, int] = {}
    for page in obstore.list(bucket(s3), prefix + "/"):
        for meta in page:
            out[meta["path"][len(prefix) + 1 :]] = meta["size"]
    return out


def get(s3: S3Server, key: str) -> bytes:
    return bytes(obstore.get(bucket(s3), key).bytes())


def photos(tmp: Path, **colours: tuple[int, int, int]) -> dict[str, bytes]:
    (tmp / "photos").mkdir(exist_ok=True)
    made = {}
    for stem, colour in colours.items():
        data = make_png(60, 40, lambda x, y, c=colour: c if 15 <= x < 45 and 10 <= y < 30 else (255, 255, 255))  # type: ignore[misc]
        (tmp / "photos" / f"{stem}.png").write_bytes(data)
        made[stem] = data
    return made


def manifest(tmp: Path, storage: str = "", *, variants: int = 1, extra: str = "") -> Path:
    path = tmp / "campaign.yaml"
    path.write_text(
        "name: photos\n"
        'path: "{stem}/{model}-v{variant}.{ext}"\n'
        'rows: {files: "photos/*.png"}\n'
        + storage
        + "jobs:\n"
        + "  - model: kling-video-turbo\n"
        + '    prompt: "{stem} turning slowly"\n'
        + '    input: {image_url: "{file}", duration: "5", aspect_ratio: "9:16"}\n'
        + f"    variants: {variants}\n"
        + extra
    )
    return path


def storage_yaml(s3: S3Server, prefix: str, *, keep_local: bool = True) -> str:
    return f"storage:\n  url: {s3.url(prefix)}\n  endpoint: {s3.endpoint}\n  url_lifetime: 30m\n  keep_local: {str(keep_local).lower()}\n"


def env_for(url: str, s3: S3Server | None = None) -> dict[str, str]:
    env = {"CLIPRISE_API_KEY": "sandbox-key", "CLIPRISE_BASE_URL": url}
    if s3 is not None:
        env |= {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1"}
    return env


def uploads(stdout: str) -> int:
    found = re.findall(r"\[inputs\]\s+(\d+) input file\(s\) uploaded", stdout)
    assert found, stdout
    return int(found[-1])


def state_bodies(out: Path) -> list[str]:
    with sqlite3.connect(out / ".batchrunner" / "state.sqlite") as conn:
        return [r[0] for r in conn.execute("SELECT spec FROM jobs")]


def no_secrets_in(folder: Path, *secrets: str) -> None:
    """No secret, and no presigned URL, in any file of ``folder`` (state, reports, sidecars, logs)."""
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret[:6]}… found in {path}"
            assert b"X-Amz-Signature" not in data, f"a presigned URL in {path}"


def test_inputs_go_up_once_results_come_back_whole_and_ids_follow_the_files(s3: S3Server, tmp_path: Path) -> None:
    made = photos(tmp_path, red=(255, 0, 0), blue=BLUE)
    prefix = f"run-{os.urandom(4).hex()}"
    path = manifest(tmp_path, storage_yaml(s3, prefix))
    out = tmp_path / "out"
    with sandbox_process("--time-scale", "0.001") as url:
        first = cli("run", str(path), "--out", str(out), *FAST, "-v", env=env_for(url, s3))
        assert first.returncode == 0, first.stderr + first.stdout
        assert uploads(first.stdout + first.stderr) == 2
        # the sandbox fetched each input through its presigned URL: it hashed what it got
        seen = sorted(t["inputs"]["input.image_url"] for t in tasks(url).values())
        assert seen == sorted(sha(d) for d in made.values())
        stored = listing(s3, prefix)
        assert {k for k in stored if k.startswith(".batchrunner/inputs/")} == {f".batchrunner/inputs/{sha(d)}.png" for d in made.values()}
        # every result and its sidecar are in the bucket, whole, at the same relative path
        results = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.mp4"))
        assert len(results) == 2
        for rel in results:
            assert sha(get(s3, f"{prefix}/{rel}")) == sha((out / rel).read_bytes())
            assert json.loads(get(s3, f"{prefix}/{rel}.json"))["sha256"] == sha((out / rel).read_bytes())
        bodies = state_bodies(out)
        assert all(TOKEN_PREFIX in b for b in bodies)
        ids = {r.split("/")[0]: json.loads((out / (r + ".json")).read_text())["job_id"] for r in results}

        # a re-run uploads nothing and sends nothing
        again = cli("run", str(path), "--out", str(out), *FAST, "-v", env=env_for(url, s3))
        assert again.returncode == 0, again.stderr
        assert len(tasks(url)) == 2

        # a replaced photo is a new job; the unchanged one keeps its id (and is not sent again)
        photos(tmp_path, blue=GREEN)
        changed = cli("run", str(path), "--out", str(out), *FAST, "-v", env=env_for(url, s3))
        assert changed.returncode == 0, changed.stderr + changed.stdout
        assert uploads(changed.stdout + changed.stderr) == 1
        assert len(tasks(url)) == 3
        new_ids = {p.parent.name: json.loads(p.read_text())["job_id"] for p in out.glob("*/*.mp4.json")}
        assert new_ids["red"] == ids["red"] and new_ids["blue"] != ids["blue"]
    no_secrets_in(out, s3.secret_key)
    for stream in (first, again, changed):
        assert s3.secret_key not in stream.stdout + stream.stderr
        assert "X-Amz-Signature" not in stream.stdout + stream.stderr


def test_an_input_already_in_the_bucket_is_never_put_again(s3: S3Server, tmp_path: Path) -> None:
    """Plant different (valid) bytes under the photo's content address: a re-upload would overwrite them; the sandbox fetches them."""
    made = photos(tmp_path, red=(255, 0, 0))
    prefix = f"once-{os.urandom(4).hex()}"
    out = tmp_path / "out"
    with sandbox_process("--time-scale", "0.001") as url:
        first = cli("run", str(manifest(tmp_path, storage_yaml(s3, prefix))), "--out", str(out), *FAST, "-v", env=env_for(url, s3))
        assert first.returncode == 0, first.stderr + first.stdout
        planted = make_png(20, 20, lambda x, y: GREEN)
        key = f"{prefix}/.batchrunner/inputs/{sha(made['red'])}.png"
        obstore.put(bucket(s3), key, planted)
        second = cli(
            "run", str(manifest(tmp_path, storage_yaml(s3, prefix), variants=2)), "--out", str(out), *FAST, "-v", env=env_for(url, s3)
        )
        assert second.returncode == 0, second.stderr + second.stdout
        assert uploads(second.stdout + second.stderr) == 0
        assert get(s3, key) == planted
        assert sorted(t["inputs"]["input.image_url"] for t in tasks(url).values()) == sorted([sha(made["red"]), sha(planted)])


def test_the_sandbox_needs_no_cloud_for_file_inputs(tmp_path: Path) -> None:
    photos(tmp_path, red=(255, 0, 0))
    out = tmp_path / "out"
    done = cli("run", str(manifest(tmp_path)), "--out", str(out), "--sandbox", "-v")
    assert done.returncode == 0, done.stderr + done.stdout
    assert uploads(done.stdout + done.stderr) == 1
    assert len(list(out.glob("red/*.mp4"))) == 1
    assert cli("plan", str(manifest(tmp_path)), "--out", str(out), "--sandbox").returncode == 0
    no_secrets_in(out)


def test_bad_inputs_are_refused_with_file_and_line_and_nothing_sent(s3: S3Server, tmp_path: Path) -> None:
    photos(tmp_path, good=(255, 0, 0))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not a picture at all")
    (tmp_path / "folder.png").mkdir()
    jobs = "".join(
        f'  - model: kling-video-turbo\n    prompt: "p{i}"\n    input: {{image_url: "file:{name}"}}\n'
        for i, name in enumerate(("missing.png", "folder.png", "empty.png", "notes.png"))
    )
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nstorage: {{url: {s3.url('bad')}}}\njobs:\n" + jobs)
    with sandbox_process() as url:
        for command in (("plan", str(path)), ("run", str(path), "--out", str(tmp_path / "out"))):
            refused = cli(*command, env=env_for(url, s3))
            assert refused.returncode == 2, refused.stderr
            for line, words in ((6, "no such file"), (9, "is a folder"), (12, "is empty"), (15, "not an image, video or audio")):
                assert re.search(rf"bad\.yaml:{line}: .*{words}", refused.stderr), (words, refused.stderr)
            assert "nothing was sent" in refused.stderr
        # file: inputs with no storage configured: said how to configure it, at the first file: value
        path.write_text(
            'name: nostore\njobs:\n  - model: kling-video-turbo\n    prompt: p\n    input: {image_url: "file:photos/good.png"}\n'
        )
        for command in (("plan", str(path)), ("run", str(path), "--out", str(tmp_path / "out2"))):
            refused = cli(*command, env=env_for(url))
            assert refused.returncode == 2, refused.stderr
            assert re.search(r"bad\.yaml:5: file: inputs need object storage.*--storage", refused.stderr), refused.stderr
        # a bucket that cannot be reached, or refuses our credentials: one clear error before anything is sent, no secret
        path.write_text(
            'name: unreachable\njobs:\n  - model: kling-video-turbo\n    prompt: p\n    input: {image_url: "file:photos/good.png"}\n'
        )
        wrong = env_for(url, s3) | {"AWS_SECRET_ACCESS_KEY": "wrong-secret-" + os.urandom(6).hex()}
        for env, endpoint in ((env_for(url, s3), "http://127.0.0.1:9"), (wrong, s3.endpoint)):
            refused = cli(
                "run", str(path), "--out", str(tmp_path / "out3"), "--storage", s3.url("x"), env=env | {"AWS_ENDPOINT_URL": endpoint}
            )
            assert refused.returncode == 2, refused.stderr + refused.stdout
            assert "nothing was sent" in refused.stderr
            assert env["AWS_SECRET_ACCESS_KEY"] not in refused.stderr + refused.stdout
        with urllib.request.urlopen(url + "/_sandbox/stats", timeout=10) as resp:
            stats = json.loads(resp.read())
        assert not tasks(url), stats


def test_no_local_copies_results_live_in_the_bucket_and_the_gallery_links_them(s3: S3Server, tmp_path: Path) -> None:
    photos(tmp_path, red=(255, 0, 0), blue=BLUE)
    prefix = f"remote-{os.urandom(4).hex()}"
    path = manifest(tmp_path, storage_yaml(s3, prefix, keep_local=False))
    out = tmp_path / "out"
    with sandbox_process("--time-scale", "0.001") as url:
        first = cli("run", str(path), "--out", str(out), *FAST, env=env_for(url, s3))
        assert first.returncode == 0, first.stderr + first.stdout
        assert not list(out.glob("*/*.mp4")) and not list(out.glob("*/*.json"))  # nothing kept locally
        stored = listing(s3, prefix)
        results = sorted(k for k in stored if k.endswith(".mp4"))
        assert len(results) == 2 and all(k + ".json" in stored for k in results)
        for key in results:
            data = get(s3, f"{prefix}/{key}")
            assert json.loads(get(s3, f"{prefix}/{key}.json"))["sha256"] == sha(data)
        # the gallery links each result with a presigned URL that really works, and says when they expire
        page = (out / "report.html").read_text()
        assert "links expire" in page
        links = re.findall(r'<a href="(http://127\.0\.0\.1:\d+/[^"]+)">', page)
        assert len(links) == 2
        with urllib.request.urlopen(links[0].replace("&amp;", "&"), timeout=10) as resp:
            assert sha(resp.read()) in {sha(get(s3, f"{prefix}/{k}")) for k in results}
        # resume knows by one listing that they are done: nothing is sent again
        again = cli("run", str(path), "--out", str(out), *FAST, env=env_for(url, s3))
        assert again.returncode == 0, again.stderr
        assert "skipped 2 already done" in again.stdout, again.stdout
        assert len(tasks(url)) == 2
        # `retry DIR` has no manifest and no --storage: the state remembers where the results are, nothing is paid again
        retried = cli("retry", str(out), *FAST, env=env_for(url, s3))
        assert retried.returncode == 0, retried.stderr + retried.stdout
        assert len(tasks(url)) == 2 and not list(out.glob("*/*.mp4"))
    for item in out.rglob("*"):
        if item.is_file() and item.name != "report.html":  # the gallery's links are the presigned URLs of results, by design
            assert b"X-Amz-Signature" not in item.read_bytes(), item
        if item.is_file():
            assert s3.secret_key.encode() not in item.read_bytes()


def test_large_videos_streamed_without_content_length_and_cut_mid_stream_end_up_whole_in_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    photos(tmp_path, red=(255, 0, 0), blue=BLUE, green=GREEN)
    prefix = f"stream-{os.urandom(4).hex()}"
    path = manifest(tmp_path, storage_yaml(s3, prefix))
    out = tmp_path / "out"
    knobs = (
        "--time-scale",
        "0.001",
        "--video-min-bytes",
        str(3 << 20),
        "--chunked-media",
        "--p-truncate-chunked",
        "0.5",
        "--seed",
        "1",
    )  # seed 1 cuts one
    with sandbox_process(*knobs) as url:
        done = cli("run", str(path), "--out", str(out), *FAST, env=env_for(url, s3))
        assert done.returncode == 0, done.stderr + done.stdout
        with urllib.request.urlopen(url + "/_sandbox/stats", timeout=10) as resp:
            faults = json.loads(resp.read())["faults"]
        assert faults.get("truncate_chunked", 0) >= 1, faults  # at least one download was cut mid-stream and fetched again
    stored = listing(s3, prefix)
    results = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.mp4"))
    assert len(results) == 3
    for rel in results:
        local = (out / rel).read_bytes()
        assert len(local) > 1 << 20
        assert stored[rel] == len(local) and sha(get(s3, f"{prefix}/{rel}")) == sha(local)


def run_until(args: list[str], env: dict[str, str], marker: str) -> None:
    """Start the real CLI, wait for ``marker`` in its output (an event, not a sleep), then kill -9 it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_", "AWS_"))} | env
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrunner.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env
    )
    assert proc.stdout is not None
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                proc.send_signal(signal.SIGKILL)
                break
        else:
            raise AssertionError(f"{marker!r} never came: {''.join(seen)[-2000:]}")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.parametrize("marker", ["[inputs]", "[submitted]", "[done]"])
def test_a_hard_kill_during_uploads_or_result_writes_then_resume_loses_nothing_and_pays_once(
    s3: S3Server, tmp_path: Path, marker: str
) -> None:
    photos(tmp_path, red=(255, 0, 0), blue=BLUE, green=GREEN)
    prefix = f"kill-{os.urandom(4).hex()}"
    path = manifest(tmp_path, storage_yaml(s3, prefix), variants=3)
    out = tmp_path / "out"
    with sandbox_process("--time-scale", "0.001") as url:
        run_until(["run", str(path), "--out", str(out), *FAST, "-v"], env_for(url, s3), marker)
        resumed = cli("run", str(path), "--out", str(out), *FAST, env=env_for(url, s3))
        assert resumed.returncode == 0, resumed.stderr + resumed.stdout
        created = stats_of(url)["tasks_created"]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["counts"] == {"done": 9}
    assert created - 9 <= report["summary"]["ambiguous_resubmitted"]
    stored = listing(s3, prefix)
    for job in report["jobs"]:
        local = (out / job["path"]).read_bytes()
        assert sha(local) == job["sha256"]
        assert stored[job["path"]] == len(local) and sha(get(s3, f"{prefix}/{job['path']}")) == job["sha256"]
        assert job["path"] + ".json" in stored
    assert len([k for k in stored if k.startswith(".batchrunner/inputs/")]) == 3


def stats_of(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


# -- the manifest side: offline, in process ----------------------------------------------------


def test_file_values_become_content_tokens_in_yaml_csv_cells_and_rows_files(tmp_path: Path) -> None:
    from batchrunner import load_plan
    from batchrunner.errors import ManifestError

    made = photos(tmp_path, red=(255, 0, 0), blue=BLUE)
    (tmp_path / "jobs.csv").write_text("model,prompt,image_url\nkling-video-turbo,a,file:photos/red.png\n")
    (tmp_path / "rows.csv").write_text("name,photo\nb,file:photos/blue.png\n")
    path = tmp_path / "m.yaml"
    path.write_text(
        "name: m\nrows: rows.csv\njobs_csv: jobs.csv\njobs:\n"
        '  - model: kling-video-turbo\n    prompt: "{name}"\n    input: {image_url: "{photo}"}\n'
        '  - model: kling-video-turbo\n    prompt: list\n    imageURLList: ["file:photos/red.png", "file:photos/blue.png"]\n'
    )
    plan = load_plan(path)
    red, blue = f"{TOKEN_PREFIX}{sha(made['red'])}.png", f"{TOKEN_PREFIX}{sha(made['blue'])}.png"
    assert set(plan.inputs) == {red, blue}
    bodies = [json.dumps(s.body) for s in plan.specs]
    assert sum(red in b for b in bodies) == 2 and sum(blue in b for b in bodies) == 2
    assert not any("file:" in b for b in bodies)
    assert plan.input_at is not None and plan.input_at[1] is not None
    # the id is the token's: the same content under another name keeps it; new content changes it
    ids = [s.id for s in plan.specs]
    (tmp_path / "photos" / "red.png").rename(tmp_path / "photos" / "red2.png")
    (tmp_path / "jobs.csv").write_text("model,prompt,image_url\nkling-video-turbo,a,file:photos/red2.png\n")
    (tmp_path / "photos" / "red.png").write_bytes(made["red"])
    assert [s.id for s in load_plan(path).specs] == ids
    photos(tmp_path, blue=GREEN)
    changed = [s.id for s in load_plan(path).specs]
    only_red = [i for i, b in enumerate(bodies) if blue not in b]
    assert len(only_red) == 1
    assert [c == i for c, i in zip(changed, ids, strict=True)] == [n in only_red for n in range(len(ids))]
    # rows: {files: …} — one row per file, vars file and stem (the same content twice would be paid twice: refused)
    with pytest.raises(ManifestError, match="sends the same request"):
        path.write_text('name: m\nrows: {files: "photos/*.png"}\njobs:\n  - model: recraft-remove-bg\n    input: {image_url: "{file}"}\n')
        load_plan(path)
    (tmp_path / "photos" / "red2.png").unlink()
    path.write_text(
        'name: m\nrows: {files: "photos/*.png"}\njobs:\n  - model: recraft-remove-bg\n    input: {image_url: "{file}"}\n'
        '    path: "{stem}.{ext}"\n'
    )
    assert sorted(s.path for s in load_plan(path).specs) == ["blue.{ext}", "red.{ext}"]
    path.write_text('name: m\nrows: {files: "nothing/*.png"}\njobs:\n  - model: recraft-remove-bg\n    input: {image_url: "{file}"}\n')
    with pytest.raises(ManifestError, match=r"m\.yaml:2: rows.files: no file matches"):
        load_plan(path)


def test_the_storage_block_is_checked_and_never_holds_credentials(tmp_path: Path) -> None:
    from batchrunner import load_plan
    from batchrunner._api import resolve_config
    from batchrunner.errors import ManifestError

    path = tmp_path / "m.yaml"
    path.write_text(
        "name: m\nstorage:\n  url: s3://b/p\n  url_lifetime: soon\n  keep_local: maybe\n  secret_access_key: x\n"
        "jobs:\n  - model: flux-2\n    prompt: p\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_plan(path)
    text = str(caught.value)
    assert "m.yaml:4: storage.url_lifetime" in text and "m.yaml:5: storage.keep_local" in text
    assert "m.yaml:6: storage.secret_access_key: credentials never go in a manifest" in text
    path.write_text("name: m\nstorage: {url: s3://b/p, url_lifetime: 30m, keep_local: false}\njobs:\n  - model: flux-2\n    prompt: p\n")
    plan = load_plan(path)
    config = resolve_config(plan, env={"BATCHRUNNER_STORAGE": "s3://env/x"})
    assert (config.storage_url, config.url_lifetime_s, config.keep_local) == ("s3://b/p", 1800.0, False)
    assert resolve_config(plan, storage="s3://flag/y", env={}).storage_url == "s3://flag/y"
    path.write_text("name: m\njobs:\n  - model: flux-2\n    prompt: p\n")
    assert resolve_config(load_plan(path), env={"BATCHRUNNER_STORAGE": "s3://env/x"}).storage_url == "s3://env/x"


async def test_an_api_error_quoting_a_presigned_url_is_stored_with_the_token_instead(tmp_path: Path) -> None:
    """The real API may echo what it could not fetch: the signature never reaches the state, a report or an event."""
    from batchrunner import load_plan
    from batchrunner.client import Client
    from batchrunner.errors import PermanentApiError
    from batchrunner.runner import RunConfig, run_campaign
    from batchrunner.sandbox import SandboxConfig, serve

    class Echoing(Client):
        async def generate(self, body: dict[str, Any]) -> str:
            raise PermanentApiError(f"input.image_url: {body['input']['image_url']} could not be fetched")

    made = photos(tmp_path, red=(255, 0, 0))
    out = tmp_path / "out"
    heard: list[str] = []
    async with serve(SandboxConfig(api_key="k-sandbox")) as (_, url), Echoing(api_key="k-sandbox", base_url=url) as client:
        result = await run_campaign(
            load_plan(manifest(tmp_path)), RunConfig(out_dir=out, backend="sandbox"), client=client,
            on_event=lambda kind, job, detail: heard.append(detail),
        )  # fmt: skip
    assert result.counts == {"failed": 1}
    report = json.loads((out / "report.json").read_text())
    assert f"{TOKEN_PREFIX}{sha(made['red'])}.png could not be fetched" in report["jobs"][0]["error"]
    assert not any("sig=" in h for h in heard)
    for item in out.rglob("*"):
        if item.is_file():
            assert b"sig=" not in item.read_bytes() and b"expires=" not in item.read_bytes(), item


def test_a_store_that_refuses_one_result_fails_that_job_only_and_the_next_run_stores_it(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text('name: two\npath: "{name}/x.{ext}"\nmatrix: {name: [a, b]}\njobs:\n  - model: flux-2\n    prompt: "{name} on white"\n')
    kept, out = tmp_path / "kept", tmp_path / "out"
    kept.mkdir()
    (kept / "a").write_text("a file where the result's folder must go")
    first = cli("run", str(path), "--out", str(out), "--sandbox", "--storage", str(kept))
    assert first.returncode == 1, first.stderr + first.stdout
    assert "Traceback" not in first.stderr
    report = json.loads((out / "report.json").read_text())
    jobs = {j["path"] or j["intended_path"]: j for j in report["jobs"]}
    assert report["summary"]["counts"] == {"done": 1, "failed": 1}
    failed = next(j for j in report["jobs"] if j["state"] == "failed")
    assert "a/" in str(failed["intended_path"]) and failed["error"], failed
    assert (kept / "b" / "x.png").read_bytes() == (out / "b" / "x.png").read_bytes()
    assert (kept / "b" / "x.png.json").is_file()
    (kept / "a").unlink()
    second = cli("run", str(path), "--out", str(out), "--sandbox", "--storage", str(kept))
    assert second.returncode == 0, second.stderr + second.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["counts"] == {"done": 2}
    assert report["summary"]["requests"]["sent"] == 2, jobs  # fetched again, never paid again
    assert (kept / "a" / "x.png").read_bytes() == (out / "a" / "x.png").read_bytes()
