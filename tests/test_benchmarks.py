"""Smoke runs of the benchmark scripts at a tiny size, so they keep working (figures: benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.parametrize(
    "argv",
    [
        ["throughput.py", "--jobs", "60", "--concurrency", "8", "--rounds", "1"],
        ["scale.py", "--jobs", "100"],
        ["polling.py", "--jobs", "24", "--concurrency", "8", "--time-scale", "0.01"],
    ],
)
def test_benchmark_smoke(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["jobs"] > 0
