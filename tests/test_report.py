"""report.html: self-contained, relative, safe — and loaded for real in headless Chromium."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from batchrunner.cli import main

from .conftest import ROOT

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here when missing (CI runs as root), else the test is skipped."""
    path = find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=900)
        path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed and could not be installed here (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["run", str(ROOT / "manifests/demo.yaml"), "--sandbox", "--out", str(out), "--quiet"]) == 0
    return out


def test_report_html_is_self_contained_and_relative(demo_out: Path) -> None:
    page = (demo_out / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN, nothing remote
    images = re.findall(r'<img src="([^"]+)"', page)
    videos = re.findall(r'<video src="([^"]+)"', page)
    assert len(images) == 15 and len(videos) == 3
    for src in images + videos:
        assert not src.startswith("/") and (demo_out / src).is_file()
    for group in ("perfume", "sneaker", "watch"):
        assert f"product {group}" in page
    assert "Acme perfume, studio light, minimal" in page and "aspect_ratio=1:1" in page
    assert "sandbox-key" not in page


def test_report_lists_failures_with_reasons(tmp_path: Path) -> None:
    assert (
        main(["run", str(ROOT / "manifests/demo.csv"), "--sandbox", "--sandbox-failure-rate", "1", "--out", str(tmp_path), "--quiet"]) == 1
    )
    page = (tmp_path / "report.html").read_text()
    assert page.count("content policy violation") == 4 and "<h2>failed</h2>" in page


async def inspect_page(browser: str, url: str, shot: Path) -> dict[str, object]:
    """Load ``url`` in headless Chromium over the DevTools protocol: console errors, image decode, screenshot."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         "--window-size=1280,1000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().split()) < 2:
            assert time.monotonic() < deadline, "Chromium did not start"
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10_000))
                errors: list[str] = []
                loaded = asyncio.Event()

                async def call(method: str, **params: object) -> dict[str, object]:
                    my_id = next(ids)
                    await ws.send_json({"id": my_id, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json(timeout=30)
                        if msg.get("method") == "Page.loadEventFired":
                            loaded.set()
                        elif msg.get("method") == "Runtime.exceptionThrown":
                            errors.append(str(msg["params"]))
                        elif msg.get("method") == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                            errors.append(str(msg["params"]["args"]))
                        elif msg.get("method") == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
                            errors.append(msg["params"]["entry"]["text"])
                        if msg.get("id") == my_id:
                            return dict(msg.get("result", {}))

                for domain in ("Page", "Runtime", "Log"):
                    await call(f"{domain}.enable")
                await call("Page.navigate", url=url)
                while not loaded.is_set():
                    await call("Runtime.evaluate", expression="1")
                    await asyncio.sleep(0.05)
                check = "Promise.all(Array.from(document.images).map(i => i.decode().then(() => i.naturalWidth, () => 0)))"
                widths = (await call("Runtime.evaluate", expression=check, awaitPromise=True, returnByValue=True))["result"]["value"]  # type: ignore[index]
                shot_data = await call("Page.captureScreenshot", format="png")
                shot.write_bytes(base64.b64decode(str(shot_data["data"])))
                return {"errors": errors, "widths": widths}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.browser
async def test_report_in_real_headless_chromium(chromium: str, demo_out: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = await inspect_page(chromium, (demo_out / "report.html").as_uri(), shot)
    assert result["errors"] == []
    widths = result["widths"]
    assert isinstance(widths, list) and len(widths) == 15 and all(w > 0 for w in widths)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
    if os.environ.get("BATCHRUNNER_UPDATE_DOCS"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "report.png")


def test_every_command_named_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"batchrunner (run|plan|status|retry|report|models|sandbox|[a-z]+)\b", readme))
    named -= {"turns", "is"}  # prose
    for command in named:
        result = subprocess.run([sys.executable, "-m", "batchrunner.cli", command, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, f"README names `batchrunner {command}`, which does not exist"
        for line in readme.splitlines():
            if f"batchrunner {command}" in line:
                for flag in re.findall(r"(--[a-z][a-z-]+)", line.split(f"batchrunner {command}", 1)[1]):
                    assert flag in result.stdout, f"README shows `batchrunner {command} {flag}`, which --help does not list"
