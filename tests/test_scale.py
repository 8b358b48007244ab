"""A campaign too big to hold: the streamed plan, the bounded uniqueness checks, the limit before expanding."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchrunner.catalog import load_catalog
from batchrunner.errors import ManifestError
from batchrunner.expand import Plan, Specs, expand
from batchrunner.manifest import load

CATALOG = load_catalog()[0]

MANIFEST = """name: big
credits: {kling-video-turbo: 12, flux-2: 1.5}
matrix:
  a: [1, 2, 3, 4, 5]
  b: [x, y, z]
jobs:
  - model: flux-2
    prompt: "product {a} in {b}"
    variants: 2
    path: "{a}/{b}-{variant}.{ext}"
  - model: kling-video-turbo
    prompt: "clip {a}"
    path: "clips/{a}.{ext}"
"""


def plans(tmp_path: Path, text: str) -> tuple[Plan, Plan]:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return expand(load(path), CATALOG), expand(load(path), CATALOG, keep_specs=0)


def test_a_streamed_plan_makes_the_same_jobs_in_the_same_order(tmp_path: Path) -> None:
    kept, streamed = plans(tmp_path, MANIFEST)
    assert isinstance(streamed.specs, Specs) and isinstance(kept.specs, list)
    assert len(streamed.specs) == len(kept.specs) == 5 * 3 * 2 + 5
    assert list(streamed.specs) == kept.specs
    assert list(streamed.specs) == kept.specs  # every pass: the same jobs again
    assert streamed.specs[:3] == kept.specs[:3] and streamed.specs[-1] == kept.specs[-1] and streamed.specs[7] == kept.specs[7]
    assert [s.index for s in streamed.specs] == list(range(len(kept.specs)))
    with pytest.raises(IndexError):
        streamed.specs[len(kept.specs)]
    assert streamed.by_model() == kept.by_model() and streamed.by_modality() == kept.by_modality()
    assert streamed.credits() == kept.credits() and streamed.credits() is not None
    assert streamed.sends_callbacks() is kept.sends_callbacks() is False


def test_a_clash_far_apart_names_the_earlier_job_in_a_streamed_plan(tmp_path: Path) -> None:
    """The uniqueness checks keep hashes, not jobs: the earlier job of a clash is found by making the jobs again."""
    text = MANIFEST + '  - model: flux-2\n    prompt: "product 3 in y"\n    path: "other.{ext}"\n'
    text += '  - model: flux-2\n    prompt: "another"\n    path: "CLIPS/4.{ext}"\n'
    path = tmp_path / "m.yaml"
    path.write_text(text)
    for keep in (0, 1000):
        with pytest.raises(ManifestError) as caught:
            expand(load(path), CATALOG, keep_specs=keep)
        (twin, clash) = [(p.line, p.message) for p in caught.value.problems]
        assert twin[0] == 14 and twin[1].startswith("jobs[2] sends the same request as the job on line 7 (id ")
        assert clash == (
            17,
            "jobs[3] writes to CLIPS/4.{ext}, as does the job on line 11 (its path clips/4.{ext} differs only in letter case: "
            "one file on macOS and Windows); they differ in {model}, {a} — add one of them to 'path'",
        )


def test_ten_million_jobs_are_refused_before_expanding(tmp_path: Path) -> None:
    side = ",".join(map(str, range(1000)))
    path = tmp_path / "m.yaml"
    ten = ",".join(map(str, range(10)))
    jobs = "jobs:\n  - {model: flux-2, prompt: '{a} {b} {c}'}\n"
    path.write_text(f"name: huge\nmatrix:\n  a: [{side}]\n  b: [{side}]\n  c: [{ten}]\n" + jobs)
    with pytest.raises(ManifestError) as caught:
        expand(load(path), CATALOG)
    (problem,) = caught.value.problems
    assert "makes 10,000,000 jobs, more than the limit of 2,000,000 — raise it with 'max_jobs:' in the manifest" in str(problem)
