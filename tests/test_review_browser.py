"""The gallery and the review page in real headless Chromium: shapes, lightbox keys, filters and the fragment, decisions."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchrunner.cli import main
from batchrunner.report import _dimensions

from .cdp import Page, chromium_fixture, open_page  # noqa: F401 (the chromium fixture)
from .conftest import ROOT
from .test_review import png, report_jobs, review_process, state_rows

pytestmark = pytest.mark.browser

SHAPES = {"perfume/flux-2-1_1-v1.png": (160, 90), "perfume/flux-2-9_16-v1.png": (90, 160), "sneaker/flux-2-1_1-v2.png": (300, 100)}
VISIBLE = "document.querySelectorAll('.card:not([hidden])').length"


@pytest.fixture(scope="module")
def gallery_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo campaign with three results replaced by real non-square PNGs (the sandbox makes squares), report rewritten."""
    out = tmp_path_factory.mktemp("gallery") / "out"
    assert main(["run", str(ROOT / "manifests/demo.yaml"), "--sandbox", "--out", str(out), "--quiet"]) == 0
    for path, (width, height) in SHAPES.items():
        (out / path).write_bytes(png(width, height))
    assert main(["report", str(out)]) == 0
    return out


@pytest.fixture
def gallery(gallery_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(gallery_run, out)
    return out


async def lightbox_src(page: Page) -> str:
    return str(await page.js("(document.querySelector('#lb-body img, #lb-body video') || {}).src || ''"))


async def card_src(page: Page, n: int) -> str:
    """The absolute URL of the n-th card's picture or video (a video's src waits in data-src until it is near the screen)."""
    card = f"document.querySelectorAll('.card')[{n}]"
    return str(await page.js(f"(c => new URL(c.querySelector('img, video').getAttribute('src') || c.querySelector('video').dataset.src, location.href).href)({card})"))  # fmt: skip  # noqa: E501


async def test_gallery_loads_clean_and_keeps_every_picture_s_shape(chromium: str, gallery_run: Path, tmp_path: Path) -> None:
    async with open_page(chromium) as page:
        await page.navigate((gallery_run / "report.html").as_uri())
        shapes = await page.js(
            """(async () => {
              const out = [];
              for (const img of document.querySelectorAll('.media img')) {
                img.scrollIntoView();
                await img.decode();
                const r = img.getBoundingClientRect();
                out.push([img.getAttribute('src'), img.naturalWidth, img.naturalHeight, r.width, r.height]);
              }
              return out;
            })()"""
        )
        await page.screenshot(tmp_path / "gallery.png")
        assert page.errors == []
    assert len(shapes) == 15
    for src, natural_w, natural_h, width, height in shapes:
        assert natural_w > 0 and abs(width / height - natural_w / natural_h) < 0.02, src  # no crop, no stretch
        if src in SHAPES:
            assert (natural_w, natural_h) == SHAPES[src]
    assert {src for src, *_ in shapes} >= set(SHAPES)


async def test_lightbox_opens_on_enter_and_moves_with_the_arrow_keys(chromium: str, gallery_run: Path) -> None:
    async with open_page(chromium) as page:
        await page.navigate((gallery_run / "report.html").as_uri())
        assert await page.js("document.getElementById('lightbox').hidden")
        await page.js("document.querySelector('.card').focus()")
        await page.key("Enter")
        assert await page.js("!document.getElementById('lightbox').hidden")
        assert await lightbox_src(page) == await card_src(page, 0)
        await page.key("ArrowRight")
        await page.key("ArrowRight")
        assert await lightbox_src(page) == await card_src(page, 2)
        await page.key("ArrowLeft")
        assert await lightbox_src(page) == await card_src(page, 1)
        assert "flux-2-1_1-v2" in await page.js("document.getElementById('lb-caption').textContent")
        await page.key("Escape")
        assert await page.js("document.getElementById('lightbox').hidden")
        assert await page.js("document.activeElement === document.querySelectorAll('.card')[1]")  # back where the eye was
        await page.click(".card:nth-child(3) .media img")  # a click opens it too
        assert await lightbox_src(page) == await card_src(page, 2)
        for _ in range(20):  # to the end and past it: a video plays in the lightbox, then the last item stays
            await page.key("ArrowRight")
        assert await lightbox_src(page) == await card_src(page, 17)
        assert await page.js("document.querySelector('#lb-body video').controls")
        assert page.errors == []


async def test_filters_narrow_the_grid_recount_and_live_in_the_fragment(chromium: str, gallery_run: Path) -> None:
    url = (gallery_run / "report.html").as_uri()
    pick = "(k, v) => { const s = document.querySelector(`select[data-key=${k}]`); s.value = v; s.dispatchEvent(new Event('change')); }"
    async with open_page(chromium) as page:
        await page.navigate(url)
        assert await page.js(VISIBLE) == 18
        await page.js(f"({pick})('product', '=sneaker')")
        assert await page.js(VISIBLE) == 6
        assert await page.js("location.hash") == "#product=sneaker"
        assert await page.js("document.querySelector('select[data-key=model] option[value=\"=flux-2\"]').textContent") == "flux-2 (4)"
        assert await page.js("document.getElementById('shown').textContent") == "6 of 18 shown"
        await page.js(f"({pick})('model', '=flux-2')")
        assert (
            await page.js(VISIBLE) == 4 and await page.js("location.hash") == "#model=flux-2&product=sneaker"
        )  # in the filter bar's order
        assert await page.js("[...document.querySelectorAll('main section')].filter(s => !s.hidden).length") == 1
        await page.js("document.querySelector('.card:not([hidden])').focus()")
        await page.key("Enter")
        for _ in range(6):  # the arrows move through what the filters show, and no further
            await page.key("ArrowRight")
            assert await page.js("document.querySelector('.card.current').dataset.path.startsWith('sneaker/flux-2')")
        await page.key("Escape")

        await page.navigate("about:blank")
        await page.navigate(url + "#product=watch&format=poster")  # a shared link opens the same view
        assert await page.js(VISIBLE) == 1
        assert await page.js("document.querySelector('.card:not([hidden])').dataset.path") == "watch/seedream-4-5-poster-v1.png"
        assert await page.js("document.querySelector('select[data-key=format]').value") == "=poster"
        await page.js("document.getElementById('clear').click()")
        assert await page.js(VISIBLE) == 18 and await page.js("location.hash") in ("", "#")
        assert page.errors == []


async def wait_state(out: Path, job_id: str, review: str | None, timeout: float = 30) -> None:
    """Wait (for the event, not a fixed time) until the state file holds ``review`` for ``job_id``."""
    deadline = time.monotonic() + timeout
    while state_rows(out, "SELECT review FROM jobs WHERE id = ?", job_id) != [(review,)]:
        assert time.monotonic() < deadline, f"{job_id} never became {review}"
        await asyncio.sleep(0.02)


async def test_approve_and_reject_in_the_review_page_land_in_the_state(chromium: str, gallery: Path) -> None:
    ids = {path: row["id"] for path, row in report_jobs(gallery).items()}
    with review_process(gallery) as (host, port):
        async with open_page(chromium) as page:
            await page.navigate(f"http://{host}:{port}/")
            await page.click(".card:nth-child(1) .decide button[data-d=approved]")  # a real mouse click
            await wait_state(gallery, ids["perfume/flux-2-1_1-v1.png"], "approved")
            await page.wait_js("document.querySelector('.card').dataset.review === 'approved'")
            badge = await page.js("getComputedStyle(document.querySelector('.card'), '::before').content")
            assert "approved" in badge

            await page.js("document.querySelectorAll('.card')[1].focus()")
            await page.key("r")  # the shortcut on the focused card
            await wait_state(gallery, ids["perfume/flux-2-1_1-v2.png"], "rejected")
            await page.wait_js("document.querySelectorAll('.card')[1].dataset.review === 'rejected'")  # the page heard back too

            await page.js("document.querySelectorAll('.card')[2].focus()")
            await page.key("Enter")
            await page.key("a")  # in the lightbox: approve, then on to the next
            await wait_state(gallery, ids["perfume/flux-2-9_16-v1.png"], "approved")
            await page.wait_js("document.getElementById('lightbox').dataset.id === document.querySelectorAll('.card')[3].dataset.id")
            await page.key("ArrowLeft")
            await page.key("u")  # back, and undecided again
            await wait_state(gallery, ids["perfume/flux-2-9_16-v1.png"], None)
            await page.wait_js("document.querySelectorAll('.card')[2].dataset.review === ''")
            await page.key("Escape")

            review = "document.querySelector('select[data-key=review]')"
            await page.js(f"(s => {{ s.value = '=approved'; s.dispatchEvent(new Event('change')); }})({review})")
            assert await page.js(VISIBLE) == 1
            assert await page.js(f"{review}.querySelector('option[value=\"=rejected\"]').textContent") == "rejected (1)"
            await page.click(".card:nth-child(1) .decide button[data-d=approved]")  # clicking the decision again clears it
            await wait_state(gallery, ids["perfume/flux-2-1_1-v1.png"], None)

            await page.navigate("about:blank")
            await page.navigate(f"http://{host}:{port}/#review=rejected")  # decisions come back from the state, the view from the link
            assert await page.js(VISIBLE) == 1
            assert await page.js("document.querySelector('.card:not([hidden])').dataset.path") == "perfume/flux-2-1_1-v2.png"
            assert page.errors == []
    assert state_rows(gallery, "SELECT count(*) FROM jobs WHERE review IS NOT NULL") == [(1,)]
    cli_view = subprocess.run(
        [sys.executable, "-m", "batchrunner.cli", "report", str(gallery)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "18 jobs" in cli_view.stdout
    assert report_jobs(gallery)["perfume/flux-2-1_1-v2.png"]["review"] == "rejected"


async def test_jpeg_and_webp_sizes_are_read_from_their_headers(chromium: str) -> None:
    """Real JPEG and WebP files, encoded by Chromium's own encoders, give the gallery their width and height."""
    async with open_page(chromium) as page:
        encoded = await page.js(
            """(() => { const c = document.createElement('canvas'); c.width = 161; c.height = 91;
              const g = c.getContext('2d'); g.fillStyle = '#c52'; g.fillRect(0, 0, 161, 91);
              g.fillStyle = '#25c'; g.fillRect(20, 20, 50, 30);
              return [c.toDataURL('image/jpeg', 0.9), c.toDataURL('image/webp', 0.8), c.toDataURL('image/webp', 1.0)]; })()"""
        )
    kinds = set()
    for url in encoded:
        data = base64.b64decode(url.split(",", 1)[1])
        kinds.add(data[:4] if data[:2] == b"\xff\xd8" else data[12:16])
        assert _dimensions(data) == (161, 91), data[:40]
    assert len(kinds) >= 2


@pytest.mark.slow
def test_a_5000_item_gallery_opens_in_chromium(chromium: str) -> None:
    """The benchmark at its full size: 5,000 cards load with no console error; the time goes to benchmarks/README.md."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gallery.py"), "--items", "5000", "--rounds", "1"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["jobs"] == 5000 and figures["shown_after_filter"] == 4500
    assert figures["loaded"] < figures["images"] / 10  # lazy: what is far from the screen is not fetched at load
