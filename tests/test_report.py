"""report.html: self-contained, relative, safe — and loaded for real in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from batchrunner.cli import main

from .cdp import chromium_fixture, open_page  # noqa: F401 (the chromium fixture)
from .conftest import ROOT


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["run", str(ROOT / "manifests/demo.yaml"), "--sandbox", "--out", str(out), "--quiet"]) == 0
    return out


def test_report_html_is_self_contained_and_relative(demo_out: Path) -> None:
    page = (demo_out / "report.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no CDN, nothing remote
    images = re.findall(r'<img src="([^"]+)"', page)
    videos = re.findall(r'<video data-src="([^"]+)"', page)
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
    assert page.count("content policy violation") == 4 and page.count('<div class="placeholder failed">') == 4


async def inspect_page(browser: str, url: str, shot: Path) -> dict[str, object]:
    """Load ``url`` in headless Chromium over the DevTools protocol: console errors, image decode, screenshot."""
    async with open_page(browser) as page:
        await page.navigate(url)
        load = "i => { i.loading = 'eager'; return i.decode().then(() => i.naturalWidth, () => 0); }"  # lazy ones would not load
        widths = await page.js(f"Promise.all(Array.from(document.images).map({load}))")
        await page.screenshot(shot)
        return {"errors": page.errors, "widths": widths}


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
