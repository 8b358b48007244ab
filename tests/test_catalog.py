"""The catalog claims only what the public docs state; a catalog the user loads is enforced as given, by plan and sandbox alike."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from batchrunner.catalog import SHIPPED, load_catalog
from batchrunner.sandbox import SandboxConfig, serve

from .test_sandbox_conformance import post

# The public ids batchrunner's API notes list (the public markdown docs name some of them, and
# the alias); the docs state 55 entries but not per-model parameters, enums, required fields or prices.
PUBLIC_IDS = {
    "flux-2": "image", "imagen-v4": "image", "flux-kontext-pro": "image", "gpt-image-1": "image", "seedream-4-5": "image",
    "recraft-remove-bg": "image", "kling-video-turbo": "video", "kling-2-5": "video", "kling-2-1-standard": "video",
    "seedance-v1-lite": "video", "hailuo-2-3-standard": "video", "wan-animate-replace": "video", "runway-aleph": "video",
}  # fmt: skip
NAMED_IN_THE_PUBLIC_DOCS = {
    "flux-2",
    "imagen-v4",
    "flux-kontext-pro",
    "seedance-v1-lite",
    "hailuo-2-3-standard",
    "kling-video-turbo",
    "kling-2-5",
}


def test_the_shipped_catalog_holds_public_facts_only() -> None:
    rows = list(csv.DictReader(SHIPPED.read_text().splitlines()))
    assert {row["id"]: row["modality"] for row in rows} == PUBLIC_IDS
    for row in rows:
        # nothing the public docs do not state: no input style, price, required field or parameter list
        assert (row["input_style"], row["credits"], row["required"], row["parameters"]) == ("", "", "", ""), row
        assert row["alias_of"] == ("kling-video-turbo" if row["id"] == "kling-2-5" else "")
        # the source says where the id came from, truthfully
        assert row["source"].startswith("public docs" if row["id"] in NAMED_IN_THE_PUBLIC_DOCS else "API notes (public id"), row
    catalog, problems = load_catalog()
    assert not problems
    assert all(not m.root_only and not m.enums and not m.required for m in catalog.models.values())


def test_an_official_style_catalog_is_read_with_its_own_column_names(tmp_path: Path) -> None:
    path = tmp_path / "cliprise-api-catalog.csv"
    path.write_text(
        "Model ID,Name,Type,Input Type,Price,Alias For,Required Fields,Params,Docs\n"
        'poster-model,Poster,Image,root-only,12,,prompt,"prompt, aspect_ratio=2:3|3:4",https://example.invalid/card\n'
        "new-video,New,video,standard-input,,,,,\n"
        "old-video,Old,video,standard-input,,new-video,,,\n"
    )
    catalog, problems = load_catalog(path)
    assert not problems
    poster = catalog.get("poster-model")
    assert poster is not None and poster.root_only and poster.credits == 12 and poster.required == ("prompt",)
    assert poster.parameters == ("prompt", "aspect_ratio") and poster.enums == {"aspect_ratio": ("2:3", "3:4")}
    assert poster.source == "cliprise-api-catalog.csv, line 2"
    old = catalog.get("old-video")
    assert old is not None and old.alias_of == "new-video" and old.modality == "video"
    assert catalog.get("flux-2") is not None  # extends the shipped catalog


def test_catalog_problems_are_file_line_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("id,modality,input_style,credits\na,image,sideways,\nb,picture,,\nc,image,,cheap\n")
    _, problems = load_catalog(path)
    assert [str(p) for p in problems] == [
        f"{path}:2: model a: input_style 'sideways' is not standard or root",
        f"{path}:3: model b: modality 'picture' is not one of image, video, audio",
        f"{path}:4: model c: credits 'cheap' is not a number",
    ]


async def test_the_sandbox_enforces_no_invented_enum_or_required_field() -> None:
    async with serve(SandboxConfig()) as (sandbox, url):
        for body in (
            {"model": "flux-2", "input": {"prompt": "x", "aspect_ratio": "5:7"}},  # refused before: an enum nobody published
            {"model": "kling-video-turbo", "input": {"prompt": "x", "duration": "7"}},
            {"model": "recraft-remove-bg", "input": {"prompt": "x"}},  # no image_url: nothing public makes it required
        ):
            status, raw = await post(url, body)
            assert status == 200 and json.loads(raw)[0]["code"] == 200, (body, raw)
        assert sandbox.stats.tasks_created == 3


async def test_the_sandbox_enforces_a_loaded_catalog_as_given(tmp_path: Path) -> None:
    path = tmp_path / "models.csv"
    path.write_text("id,modality,input_style,required,parameters\nposter-model,image,root,prompt,prompt;aspect_ratio=2:3|3:4\n")
    async with serve(SandboxConfig(catalog_file=path)) as (sandbox, url):
        for body, field in (
            ({"model": "poster-model", "input": {"prompt": "x"}}, "input: not allowed"),
            ({"model": "poster-model"}, "prompt: This field is required"),
            ({"model": "poster-model", "prompt": "x", "aspect_ratio": "1:1"}, "aspect_ratio: must be one of 2:3, 3:4"),
        ):
            status, raw = await post(url, body)
            answer = json.loads(raw)
            assert status == 200 and answer["code"] == 400 and field in answer["msg"], (body, answer)
        status, raw = await post(url, {"model": "poster-model", "prompt": "a poster", "options": '{"style":"flat"}'})
        assert status == 200 and "taskId" in json.loads(raw)[0]
        assert sandbox.stats.tasks_created == 1
