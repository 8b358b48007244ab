"""Gallery: how fast report.html opens and answers in headless Chromium with thousands of items.

    python benchmarks/gallery.py [--items 5000] [--rounds 3]

Makes a real campaign of ``--items`` image jobs (a tenth of them videos) on the embedded
sandbox (``batchrunner run --sandbox``), rewrites its report (``batchrunner report``, timed),
then opens report.html from disk in a fresh headless Chromium ``--rounds`` times and reads
the browser's own navigation timing: DOMContentLoaded (the page parsed and its script has
run: cards filterable, keys live) and the load event (what the browser fetched up front,
including the images near the screen; the rest load lazily as one scrolls). Then, in the
page: one filter change (narrow the grid, recount every option, write the fragment) and
one lightbox open, each timed to the next painted frame. Medians and bests, with the load
average of the machine while measuring; the last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.cdp import find_chromium, open_page  # noqa: E402


def make_campaign(folder: Path, items: int) -> Path:
    """``items`` jobs on five shelves (the gallery's groups): nine in ten images, one in ten videos."""
    per_shelf = max(1, items // 5)
    videos = max(1, per_shelf // 10)
    images = per_shelf - videos
    manifest = folder / "gallery.yaml"
    manifest.write_text(
        "name: gallery-bench\npath: '{shelf}/{job_id}.{ext}'\nconcurrency: 64\nmatrix: {shelf: [a, b, c, d, e]}\njobs:\n"
        f"  - {{model: flux-2, prompt: 'product {{i}} on shelf {{shelf}}', matrix: {{i: [{','.join(map(str, range(images)))}]}}}}\n"
        f"  - {{model: kling-video-turbo, prompt: 'clip {{v}} of shelf {{shelf}}', matrix: {{v: [{','.join(map(str, range(videos)))}]}}}}\n"
    )
    out = folder / "out"
    subprocess.run(
        [sys.executable, "-m", "batchrunner.cli", "run", str(manifest), "--out", str(out), "--sandbox", "--quiet",
         "--sandbox-time-scale", "0.0001", "--poll-scale", "0.0001"],
        check=True,
    )  # fmt: skip
    return out


async def measure(browser: str, page_url: str) -> dict[str, float]:
    async with open_page(browser) as page:
        await page.navigate(page_url)
        timing = await page.js(
            "(() => { const n = performance.getEntriesByType('navigation')[0];"
            " return {dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd, bytes: n.decodedBodySize,"
            " loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length, images: document.images.length,"
            " cards: document.querySelectorAll('.card').length}; })()"
        )
        timing["filter_ms"] = await page.js(
            "new Promise(done => { const s = document.querySelector('select[data-key=model]'); const t = performance.now();"
            " s.value = s.options[1].value; s.dispatchEvent(new Event('change'));"
            " requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t))); })"
        )
        timing["shown_after_filter"] = await page.js("document.querySelectorAll('.card:not([hidden])').length")
        timing["lightbox_ms"] = await page.js(
            "new Promise(done => { const c = document.querySelector('.card:not([hidden])'); c.focus(); const t = performance.now();"
            " c.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));"
            " requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t))); })"
        )
        assert not page.errors, page.errors
        return dict(timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    browser = find_chromium()
    if browser is None:
        sys.exit("needs Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="gallery-bench-") as tmp:
        out = make_campaign(Path(tmp), args.items)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "batchrunner.cli", "report", str(out)], check=True, stdout=subprocess.DEVNULL)
        report_s = time.perf_counter() - start
        page = out / "report.html"
        rounds = [asyncio.run(measure(browser, page.as_uri())) for _ in range(args.rounds)]
    load_average = os.getloadavg()[0]  # the machine's business while measuring: on 2 shared cores it is most of the spread
    figures = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    best = {key: min(r[key] for r in rounds) for key in ("dcl", "load", "filter_ms", "lightbox_ms")}
    for n, r in enumerate(rounds, 1):
        print(
            f"round {n}: DOMContentLoaded {r['dcl']:.0f} ms, load {r['load']:.0f} ms, filter {r['filter_ms']:.0f} ms, "
            f"lightbox {r['lightbox_ms']:.0f} ms; {r['loaded']:.0f} of {r['images']:.0f} images fetched at load",
            file=sys.stderr,
        )
    print(
        json.dumps(
            {"jobs": int(figures["cards"]), "html_mb": round(figures["bytes"] / 1e6, 2), "report_s": round(report_s, 2)}
            | {k: round(v, 1) for k, v in figures.items() if k not in ("cards", "bytes")}
            | {f"best_{k}": round(v, 1) for k, v in best.items()}
            | {"load_average": round(load_average, 1)}
        )
    )


if __name__ == "__main__":
    main()
