"""Headless Chromium driven over the DevTools protocol (no Playwright, no driver): the real browser the gallery is tested in.

``chromium`` is a pytest fixture (import ``chromium_fixture``): Debian's chromium, installed when missing (CI runs as
root), else the test is skipped. :func:`open_page` starts a private browser and yields a
:class:`Page` that navigates, evaluates, clicks and types, and collects console errors.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
KEY_CODES = {"Enter": 13, "Escape": 27, "ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session", name="chromium")
def chromium_fixture() -> str:
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


class Page:
    """One browser tab: ``call`` sends a DevTools command and returns its result; events are watched as they pass."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = iter(range(1, 1_000_000))
        self.errors: list[str] = []
        self.loads = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        my_id = next(self.ids)
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=60)
            event = msg.get("method")
            if event == "Page.loadEventFired":
                self.loads += 1
            elif event == "Runtime.exceptionThrown":
                self.errors.append(str(msg["params"]))
            elif event == "Runtime.consoleAPICalled" and msg["params"]["type"] == "error":
                self.errors.append(str(msg["params"]["args"]))
            elif event == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
                self.errors.append(msg["params"]["entry"]["text"])
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def navigate(self, url: str) -> None:
        """Open ``url`` and return once its load event fired."""
        loads = self.loads
        await self.call("Page.navigate", url=url)
        await self.until(lambda: self.loads > loads)

    async def until(self, ready: Any, timeout: float = 60) -> None:
        """Keep the protocol moving (events are read while calls wait) until ``ready()`` — an event, not a fixed sleep."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert time.monotonic() < deadline, "the page did not get there in time"
            await self.call("Runtime.evaluate", expression="1")
            await asyncio.sleep(0.02)

    async def js(self, expression: str) -> Any:
        """The value of ``expression`` (awaited if it is a promise)."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_js(self, expression: str, timeout: float = 30) -> Any:
        """Wait until ``expression`` is truthy in the page; return its value."""
        deadline = time.monotonic() + timeout
        while not (value := await self.js(expression)):
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            await asyncio.sleep(0.02)
        return value

    async def key(self, key: str) -> None:
        """Press and release ``key`` ('Enter', 'ArrowRight', 'a', …) as the keyboard would, on the focused element."""
        code = KEY_CODES.get(key, ord(key.upper()) if len(key) == 1 else 0)
        text = {"Enter": "\r"}.get(key, key if len(key) == 1 else "")
        down: dict[str, Any] = {"type": "keyDown" if text else "rawKeyDown", "key": key, "windowsVirtualKeyCode": code}
        if text:
            down["text"] = text
        await self.call("Input.dispatchKeyEvent", **down)
        await self.call("Input.dispatchKeyEvent", type="keyUp", key=key, windowsVirtualKeyCode=code)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the first element matching ``selector`` (scrolled into view)."""
        box = await self.js(
            f"(() => {{ const e = document.querySelector({selector!r}); e.scrollIntoView({{block: 'center'}});"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(str(shot["data"])))


@asynccontextmanager
async def open_page(browser: str, *, width: int = 1280, height: int = 1000) -> AsyncIterator[Page]:
    """A private headless Chromium with one tab, closed (and its profile removed) on exit."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-port=0",
         f"--window-size={width},{height}", "about:blank"],
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
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Page", "Runtime", "Log"):
                    await page.call(f"{domain}.enable")
                yield page
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)
