"""Manifests: expansion, stable ids, and a corpus of broken manifests with their exact messages."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchrunner.catalog import load_catalog
from batchrunner.cli import main
from batchrunner.errors import ManifestError
from batchrunner.expand import expand, job_id
from batchrunner.manifest import load

CATALOG = load_catalog()[0]
ROOT = Path(__file__).resolve().parent.parent


def specs(path: Path, **kw: object):  # type: ignore[no-untyped-def]
    return expand(load(path), CATALOG, **kw).specs  # type: ignore[arg-type]


def test_demo_yaml_and_csv_expand() -> None:
    yaml_specs = specs(ROOT / "manifests/demo.yaml")
    assert len(yaml_specs) == 3 * (2 * 2 + 1 + 1)
    first = yaml_specs[0]
    assert first.body == {"model": "flux-2", "input": {"aspect_ratio": "1:1", "prompt": "Acme perfume, studio light, minimal"}}
    assert first.path == "perfume/flux-2-1_1-v1.{ext}" and first.modality == "image"
    csv_specs = specs(ROOT / "manifests/demo.csv")
    assert [s.model for s in csv_specs] == ["flux-2", "flux-2", "imagen-v4", "kling-video-turbo"]
    assert csv_specs[0].body["options"] == '{"style":"clean"}'  # a JSON *string*
    assert csv_specs[0].path == "csv/perfume-1.{ext}"


def test_yaml_and_csv_give_the_same_jobs(write) -> None:  # type: ignore[no-untyped-def]
    y = write(
        "c.yaml",
        'jobs:\n  - model: flux-2\n    prompt: "a cat"\n    input: {aspect_ratio: "1:1"}\n    options: {tier: pro}\n    variants: 2\n',
    )
    c = write("c.csv", "model,prompt,input.aspect_ratio,options.tier,variants\nflux-2,a cat,1:1,pro,2\n")
    assert [(s.id, s.body) for s in specs(y)] == [(s.id, s.body) for s in specs(c)]


def test_root_only_model_puts_fields_at_the_root(write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", 'jobs:\n  - model: midjourney\n    prompt: "{p} poster"\n    options: {aspect_ratio: "2:3"}\nvars: {p: watch}\n')
    (spec,) = specs(m)
    assert spec.body == {"model": "midjourney", "prompt": "watch poster", "options": '{"aspect_ratio":"2:3"}'}


def test_rows_matrix_vars_precedence_and_typed_values(write) -> None:  # type: ignore[no-untyped-def]
    write("rows.csv", "product,image\nperfume,https://e.com/p.png\nwatch,https://e.com/w.png\n")
    m = write(
        "m.yaml",
        "vars: {brand: Acme, style: base}\nrows: rows.csv\nmatrix: {style: [a, b]}\n"
        "jobs:\n  - model: kling-video-turbo\n    matrix: {d: [5, 10]}\n    vars: {brand: Zed}\n"
        '    input: {prompt: "{brand} {product} {style} {{literal}}", image_url: "{image}", duration: "{d}"}\n'
        '    path: "{product}/{style}-{d}.{ext}"\n',
    )
    out = specs(m)
    assert len(out) == 2 * 2 * 2
    assert out[0].body["input"] == {"prompt": "Zed perfume a {literal}", "image_url": "https://e.com/p.png", "duration": 5}
    assert [s.path for s in out[:2]] == ["perfume/a-5.{ext}", "perfume/a-10.{ext}"]


def test_alias_is_accepted_with_a_warning(write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", 'jobs:\n  - model: kling-2-5\n    prompt: "x"\n')
    plan = expand(load(m), CATALOG)
    assert plan.specs[0].modality == "video"
    assert any("alias of kling-video-turbo" in w for w in plan.warnings)


def test_unknown_model_warns_or_fails_with_strict(write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", 'jobs:\n  - model: brand-new-model\n    prompt: "x"\n    input: {whatever: 1}\n')
    plan = expand(load(m), CATALOG)
    assert plan.specs[0].body["input"] == {"whatever": 1, "prompt": "x"}
    assert "not in the catalog" in plan.warnings[0]
    with pytest.raises(ManifestError, match=r"m.yaml:2: jobs\[0\].model: model 'brand-new-model' is not in the catalog"):
        expand(load(m), CATALOG, strict=True)


def test_job_id_contract() -> None:
    body = {"model": "flux-2", "input": {"prompt": "x"}}
    assert job_id(body, 1) == job_id({"input": {"prompt": "x"}, "model": "flux-2", "callBackUrl": "https://h"}, 1)
    assert job_id(body, 1) != job_id(body, 2)
    expected = __import__("hashlib").sha256(b'batchrunner-job-v1\0{"input":{"prompt":"x"},"model":"flux-2"}\x001').hexdigest()[:20]
    assert job_id(body, 1) == expected


BROKEN = [
    ("", "m.yaml:1: the manifest is empty"),
    ("jobs:\n  - model: flux-2\n    prompt: [unclosed\n", "m.yaml:4: YAML syntax"),
    ("name: x\nmatrx: {a: [1]}\njobs: []\n", "m.yaml:2: matrx: unknown key — did you mean 'matrix'?"),
    ("jobs:\n  - model: flux-2\n    promt: x\n", "m.yaml:3: jobs[0].promt: unknown key — did you mean 'prompt'?"),
    (
        "jobs:\n  - model: flux-2\n    prompt: '{colour} bottle'\nvars: {brand: A}\n",
        "m.yaml:3: jobs[0].prompt uses {colour}, which is not defined (defined: brand)",
    ),
    ("concurrency: lots\njobs:\n  - {model: flux-2, prompt: x}\n", "m.yaml:1: concurrency: must be a whole number ≥ 1, not 'lots'"),
    ("rows: nowhere.csv\njobs:\n  - {model: flux-2, prompt: x}\n", "m.yaml:1: rows: "),
    ("jobs:\n  - model: flux-2\n    prompt: x\n  - model: flux-2\n    prompt: x\n", "sends the same request as the job on line 2"),
    (
        "path: same.{ext}\njobs:\n  - {model: flux-2, prompt: a}\n  - {model: flux-2, prompt: b}\n",
        "writes to same.{ext}, as does the job on line 3",
    ),
    ("path: ../{job_id}.{ext}\njobs:\n  - {model: flux-2, prompt: a}\n", "m.yaml:1: path '../{job_id}.{ext}' uses '..'"),
    ("path: /abs/{job_id}\njobs:\n  - {model: flux-2, prompt: a}\n", "is absolute"),
    ("jobs:\n  - model: flux-2\n    prompt: a\n    input: {aspect_ratio: '5:7'}\n", "aspect_ratio='5:7' is not accepted by flux-2"),
    ("jobs:\n  - model: flux-2\n", "model flux-2 requires 'prompt'"),
    ("jobs:\n  - prompt: x\n", "m.yaml:2: jobs[0]: no model"),
    ("jobs:\n  - model: flux-2\n    prompt: x\n    variants: 0\n", "m.yaml:4: jobs[0].variants: must be a whole number ≥ 1"),
    ("jobs:\n  - model: flux-2\n    prompt: '{a.b}'\n", "is not a plain variable name"),
    ("- just\n- a list\n", "a manifest is a mapping"),
    ("name: a\nname: b\njobs:\n  - {model: flux-2, prompt: x}\n", "m.yaml:2: 'name' is given twice"),
    ("matrix: {p: []}\njobs:\n  - {model: flux-2, prompt: x}\n", "matrix.p: must be a non-empty list"),
    # plan refuses what run refuses (one check, batchrunner.preview)
    ("max_credits: 1\njobs:\n  - {model: flux-2, prompt: x}\n", "m.yaml:1: max_credits is set but the price of flux-2 is unknown"),
    ("credits: {flux-2: 2}\nmax_credits: 1\njobs:\n  - {model: flux-2, prompt: x}\n", "the plan costs 2 credits to run"),
    ("credits: {flux-2: 1}\nmax_credits: 1\njobs:\n  - {model: flux-2, prompt: x}\n", None),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN)
def test_broken_manifest_corpus(write, capsys, text: str, expected: str | None) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", text)
    code = main(["plan", str(path)])
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0
        return
    assert code == 2, err
    assert expected.replace("m.yaml", str(path)) in err, err
    assert "Traceback" not in err and "nothing was sent" in err


def test_every_problem_is_reported_at_once(write, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", "rate: -1\nmatrx: {}\njobs:\n  - model: flux-2\n    promt: x\n")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert ":1: rate:" in err and ":2: matrx:" in err and ":5: jobs[0].promt:" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompt\nx\n", "needs a 'model' column"),
        ("model,prompt\n", ":2: the CSV has a header but no rows"),
        ("model,prompt,bad.col\nflux-2,x,1\n", "only options.<key> and input.<key>"),
        ("model,prompt\nflux-2,x,extra\n", ":2: this row has more cells"),
    ],
)
def test_broken_csv_manifests(write, capsys, text: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = write("m.csv", text)
    assert main(["plan", str(path)]) == 2
    assert expected in capsys.readouterr().err


def test_missing_manifest_file(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["plan", "nowhere.yaml"]) == 2
    assert "no such manifest" in capsys.readouterr().err


def test_plan_json(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["plan", str(ROOT / "manifests/demo.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["jobs"] == 18 and data["credits"] is None
    assert data["by_model"]["flux-2"]["jobs"] == 12


def test_plan_with_prices(write, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", "credits: {flux-2: 2.5}\nmatrix: {p: [a, b, c]}\njobs:\n  - {model: flux-2, prompt: '{p}'}\n")
    assert main(["plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["credits"] == 7.5


names = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
values = st.one_of(st.text(alphabet="xyz 01:{}", max_size=6), st.integers(0, 99))


@settings(max_examples=60, deadline=None)
@given(
    matrix=st.dictionaries(names, st.lists(values, min_size=1, max_size=3, unique_by=str), max_size=3),
    prompts=st.lists(st.text(alphabet="abc {}", max_size=12), min_size=1, max_size=4),
    seed=st.integers(0, 1000),
)
def test_expansion_never_crashes_and_ids_survive_reordering(tmp_path_factory, matrix, prompts, seed) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("h")
    jobs = [{"model": "flux-2", "prompt": p, "variants": 1 + i % 2} for i, p in enumerate(prompts)]

    def run(order: list[dict[str, object]]) -> set[tuple[str, str]] | None:
        path = folder / "m.yaml"
        path.write_text(json.dumps({"matrix": matrix, "path": "{job_id}.{ext}", "jobs": order}))
        try:
            return {(s.id, json.dumps(s.body, sort_keys=True)) for s in specs(path)}
        except ManifestError as exc:
            assert exc.problems and all(p.message for p in exc.problems)
            return None

    shuffled = jobs[:]
    random.Random(seed).shuffle(shuffled)
    first, second = run(jobs), run(shuffled)
    assert first == second
