"""Shared fixtures: the real sandbox (in-process or as a separate process) and small manifests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def sandbox_process(*args: str) -> Iterator[str]:
    """``batchrunner sandbox`` in its own process on a free loopback port; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchrunner.cli", "sandbox", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, f"sandbox did not start: {line!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/_sandbox/stats", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI as a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPRISE_", "BATCHRUNNER_"))}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "batchrunner.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT
    )


@pytest.fixture
def write(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write a file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    return _write
