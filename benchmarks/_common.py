"""Helpers shared by the benchmark scripts: a sandbox in its own process, a generated manifest."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from batchrunner.catalog import load_catalog
from batchrunner.expand import Plan, expand
from batchrunner.manifest import load


@contextlib.contextmanager
def sandbox_process(*args: str) -> Iterator[str]:
    """``batchrunner sandbox`` on a free loopback port in its own process; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "batchrunner.cli", "sandbox", "--port", "0", *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        match = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline())
        assert match, "sandbox did not start"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_manifest(folder: Path, jobs: int, *, model: str = "flux-2", name: str = "bench") -> Path:
    """A manifest of ``jobs`` distinct jobs: a 2-D matrix × 1 job."""
    side = 1
    while side * side < jobs:
        side += 1
    rows = (jobs + side - 1) // side
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmatrix:\n  a: [{','.join(map(str, range(rows)))}]\n  b: [{','.join(map(str, range(side)))}]\n"
        f"jobs:\n  - {{model: {model}, prompt: 'product {{a}} in scene {{b}}'}}\n"
    )
    return path


def plan_for(path: Path, limit: int | None = None) -> Plan:
    plan = expand(load(path), load_catalog()[0])
    if limit is not None:
        plan.specs = plan.specs[:limit]
    return plan
