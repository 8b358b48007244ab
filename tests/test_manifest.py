"""Manifests: expansion, stable ids, and a corpus of broken manifests with their exact messages."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import example, given, settings
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


def test_the_two_demos_never_share_a_folder_or_a_campaign() -> None:
    yaml_manifest, csv_manifest = load(ROOT / "manifests/demo.yaml"), load(ROOT / "manifests/demo.csv")
    assert (yaml_manifest.name, yaml_manifest.output) == ("demo", ROOT / "manifests/out/demo")
    assert (csv_manifest.name, csv_manifest.output) == ("demo-csv", ROOT / "manifests/out/demo-csv")


def test_yaml_and_csv_give_the_same_jobs(write) -> None:  # type: ignore[no-untyped-def]
    y = write(
        "c.yaml",
        'jobs:\n  - model: flux-2\n    prompt: "a cat"\n    input: {aspect_ratio: "1:1"}\n    options: {tier: pro}\n    variants: 2\n',
    )
    c = write("c.csv", "model,prompt,input.aspect_ratio,options.tier,variants\nflux-2,a cat,1:1,pro,2\n")
    assert [(s.id, s.body) for s in specs(y)] == [(s.id, s.body) for s in specs(c)]


def test_root_only_model_puts_fields_at_the_root(write) -> None:  # type: ignore[no-untyped-def]
    # the public docs name no root-only model (6 exist): a catalog the user loads says which are
    catalog_file = write("models.csv", "model_id,type,input_type,source\nposter-model,image,root-only,our notes\n")
    catalog, problems = load_catalog(catalog_file)
    assert not problems and catalog.get("poster-model").root_only  # type: ignore[union-attr]
    m = write("m.yaml", 'jobs:\n  - model: poster-model\n    prompt: "{p} poster"\n    options: {aspect_ratio: "2:3"}\nvars: {p: watch}\n')
    (spec,) = expand(load(m), catalog).specs
    assert spec.body == {"model": "poster-model", "prompt": "watch poster", "options": '{"aspect_ratio":"2:3"}'}


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
        "m.yaml:4: jobs[1] writes to same.{ext}, as does the job on line 3; nothing in their vars differs — "
        "add {job_id} to 'path', or give each job its own 'path:'",
    ),
    (  # the message names the var that tells the two apart, not {variant} (already there)
        "path: 'same-{variant}.{ext}'\nmatrix: {a: [1, 2]}\njobs:\n  - {model: flux-2, prompt: 'x {a}'}\n",
        "m.yaml:4: jobs[0] writes to same-1.{ext}, as does the job on line 4; they differ in {a} — add it to 'path'",
    ),
    (
        "path: '{r}.{ext}'\nmatrix: {r: ['1:1', '1_1']}\njobs:\n  - {model: flux-2, prompt: 'x {r}'}\n",
        "m.yaml:4: jobs[0] writes to 1_1.{ext}, as does the job on line 4; their {r} differ, yet give the same file name",
    ),
    (
        "path: '{p}.{ext}'\nmatrix: {p: [Cat, cat]}\njobs:\n  - {model: flux-2, prompt: '{p}'}\n",
        "m.yaml:4: jobs[0] writes to cat.{ext}, as does the job on line 4 (its path Cat.{ext} differs only in letter case: "
        "one file on macOS and Windows)",
    ),
    # our own names: the state folder, the reports, sidecars, temp and draft files
    (
        "path: .batchrunner/state.sqlite\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '.batchrunner/state.sqlite' has a name starting with '.' (.batchrunner) — hidden names are "
        "batchrunner's own (.batchrunner/, temp files); remove the dot",
    ),
    (
        "path: '{p}/.{job_id}.{ext}.tmp'\nvars: {p: x}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '{p}/.{job_id}.{ext}.tmp' has a name starting with '.' (.36d0f63954e7b7d28c73.{ext}.tmp)",
    ),
    (
        "path: report.json\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path 'report.json' is report.json, which batchrunner writes itself — choose another name",
    ),
    (
        "path: REPORT.html/{job_id}.{ext}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path 'REPORT.html/{job_id}.{ext}' is REPORT.html, which batchrunner writes itself",
    ),
    (
        "jobs:\n  - {model: flux-2, prompt: a, path: a.png}\n  - {model: flux-2, prompt: b, path: a.png.json}\n",
        "m.yaml:3: path 'a.png.json' has a name ending in .json (a.png.json) — names ending .json, .tmp and .part are "
        "batchrunner's own (the sidecar <file>.json beside each result, temp files); use {ext} for the extension",
    ),
    ("path: '{job_id}.tmp'\njobs:\n  - {model: flux-2, prompt: a}\n", "m.yaml:1: path '{job_id}.tmp' has a name ending in .tmp"),
    (
        "path: 'x.part/{job_id}.{ext}'\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path 'x.part/{job_id}.{ext}' has a name ending in .part (x.part)",
    ),
    # a name cannot be a file for one job and a folder for another
    (
        "jobs:\n  - {model: flux-2, prompt: a, path: 'x'}\n  - {model: flux-2, prompt: b, path: 'x/y.{ext}'}\n",
        "m.yaml:3: jobs[1] writes x/y.{ext}, inside a folder named like the file the job on line 2 writes (x) — "
        "a name cannot be both; change one of the paths",
    ),
    (
        "jobs:\n  - {model: flux-2, prompt: b, path: 'x/y.{ext}'}\n  - {model: flux-2, prompt: a, path: 'X'}\n",
        "m.yaml:3: jobs[1] writes a file at X, where the job on line 2 needs a folder (it writes x/y.{ext})",
    ),
    (
        "jobs:\n  - {model: flux-2, prompt: a, path: 'x.{ext}'}\n  - {model: flux-2, prompt: b, path: 'X.png'}\n",
        "m.yaml:3: jobs[1] writes to X.png, and the job on line 2 writes x.{ext}: they are one file whenever the result has "
        "that extension — give them different names",
    ),
    ("jobs:\n  - {model: flux-2, prompt: a, path: 'x.png'}\n  - {model: flux-2, prompt: b, path: 'x.jpg'}\n", None),
    # file-system limits, in UTF-8 bytes, {ext} counted as 5
    (
        "path: '{long}.{ext}'\nvars: {long: " + "a" * 236 + "}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '{long}.{ext}' has a file name of 242 bytes (" + "a" * 40 + "…); at most 240 bytes are allowed",
    ),
    (
        "path: '{long}/{job_id}.{ext}'\nvars: {long: " + "é" * 128 + "}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '{long}/{job_id}.{ext}' has a folder name of 256 bytes",
    ),
    (
        "path: '{d}/{d}/{d}/{d}/{d}/{job_id}.{ext}'\nvars: {d: " + "d" * 200 + "}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '{d}/{d}/{d}/{d}/{d}/{job_id}.{ext}' is 1031 bytes long; at most 1024 bytes are allowed — shorten it",
    ),
    # characters that hide what a name is
    (
        "path: '{p}.{ext}'\nvars: {p: \"invoice\\u202Egnp.exe\"}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '{p}.{ext}' contains the character U+202E (a control or bidirectional character, which would hide "
        "what the name really is) — remove it from the values the path is made of",
    ),
    (
        "path: '{p}.{ext}'\nvars: {p: \"a\\x07b\"}\njobs:\n  - {model: flux-2, prompt: a}\n",
        "m.yaml:1: path '{p}.{ext}' contains the character U+0007",
    ),
    # prompts are text, of bounded length
    ("jobs:\n  - model: flux-2\n    prompt: [a, b]\n", "m.yaml:3: jobs[0].prompt: must be text, not a list — write it as one string"),
    ("jobs:\n  - model: flux-2\n    input: {prompt: {a: 1}}\n", "m.yaml:3: jobs[0].prompt: must be text, not a mapping"),
    ("jobs:\n  - model: flux-2\n    prompt:\n", "m.yaml:3: jobs[0].prompt: must be text, not empty"),
    (
        "jobs:\n  - model: flux-2\n    prompt: " + "p" * 100_001 + "\n",
        "m.yaml:3: jobs[0].prompt: is 100,001 bytes long; at most 100,000 are allowed — shorten it",
    ),
    (
        "jobs:\n  - model: flux-2\n    prompt: x\n    input: {negative_prompt: " + "n" * 2**20 + "}\n",
        "m.yaml:2: jobs[0]: the request would be 1,048,638 bytes; at most 1,048,576 — shorten its fields",
    ),
    (
        "max_jobs: 5\nmatrix: {a: [1, 2, 3], b: [1, 2, 3]}\njobs:\n  - {model: flux-2, prompt: '{a} {b}'}\n",
        "m.yaml:1: the manifest makes 9 jobs, more than the limit of 5 — raise it with 'max_jobs:' in the manifest, or split the campaign",
    ),
    # values YAML can hold but a request cannot
    ("jobs:\n  - model: flux-2\n    prompt: !!binary aGVsbG8=\n", "m.yaml:3: the tag !!binary is not supported"),
    ("jobs:\n  - model: flux-2\n    prompt: x\n    input: {seed: .inf}\n", "m.yaml:4: YAML: .inf is not a finite number"),
    (
        "jobs:\n  - model: flux-2\n    prompt: x\n    input: {seed: " + "9" * 5000 + "}\n",
        "m.yaml:4: YAML: cannot read this value: Exceeds the limit (4300 digits)",
    ),
    ("path: ../{job_id}.{ext}\njobs:\n  - {model: flux-2, prompt: a}\n", "m.yaml:1: path '../{job_id}.{ext}' uses '..'"),
    ("path: /abs/{job_id}\njobs:\n  - {model: flux-2, prompt: a}\n", "is absolute"),
    # the public docs list no enums or required fields: nothing invented is enforced
    ("jobs:\n  - model: flux-2\n    prompt: a\n    input: {aspect_ratio: '5:7'}\n", None),
    ("jobs:\n  - model: flux-2\n    input: {image_url: 'https://e.com/a.png'}\n", None),
    ("jobs:\n  - prompt: x\n", "m.yaml:2: jobs[0]: no model"),
    ("jobs:\n  - model: flux-2\n    prompt: x\n    variants: 0\n", "m.yaml:4: jobs[0].variants: must be a whole number ≥ 1"),
    ("jobs:\n  - model: flux-2\n    prompt: '{a.b}'\n", "is not a plain variable name"),
    ("- just\n- a list\n", "a manifest is a mapping"),
    ("name: a\nname: b\njobs:\n  - {model: flux-2, prompt: x}\n", "m.yaml:2: 'name' is given twice"),
    ("matrix: {p: []}\njobs:\n  - {model: flux-2, prompt: x}\n", "matrix.p: must be a non-empty list"),
    # plan refuses what run refuses (one check, batchrunner.dryrun)
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


def test_warnings_name_what_looks_wrong_and_travel_with_errors(write, capsys) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "m.yaml",
        "jobs:\n  - model: flux2\n    prompt: a\n    input: {aspectratio: '1:1', promt: x}\n"
        "  - model: flux-2\n    prompt: b\n    input: {aspect_ratio: '1:1'}\n",
    )
    warnings = expand(load(m), CATALOG).warnings
    assert warnings == [
        f"{m}:4: input fields spelt several ways: aspectratio (line 4), aspect_ratio (line 7) — "
        "if one is misspelt, the model may ignore it",
        f"{m}:2: model 'flux2' is not in the catalog — did you mean 'flux-2'? It will be sent as written",
        f"{m}:4: jobs[0].input.promt: did you mean 'prompt'? It will be sent as written",
    ]
    broken = write("b.yaml", "jobs:\n  - model: flux2\n    prompt: [a]\n")
    with pytest.raises(ManifestError) as caught:
        expand(load(broken), CATALOG)
    assert caught.value.warnings == [f"{broken}:2: model 'flux2' is not in the catalog — did you mean 'flux-2'? It will be sent as written"]
    assert main(["plan", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"warning: {broken}:2: model 'flux2'" in err and f"error: {broken}:3: jobs[0].prompt: must be text, not a list" in err


def test_a_loaded_catalog_is_enforced_as_given(write, capsys) -> None:  # type: ignore[no-untyped-def]
    catalog = write(
        "official.csv",
        "model_id,name,type,input_type,credits,required_fields,params\n"
        "flux-2,FLUX.2,Image,standard-input,4,prompt,prompt;aspect_ratio=1:1|16:9\n",
    )
    m = write(
        "m.yaml", "jobs:\n  - model: flux-2\n    prompt: a\n    input: {aspect_ratio: '5:7', aspectratio: '1:1'}\n  - model: flux-2\n"
    )
    assert main(["plan", str(m), "--catalog", str(catalog)]) == 2
    err = capsys.readouterr().err
    assert f"error: {m}:4: jobs[0]: aspect_ratio='5:7' is not accepted by flux-2 (accepted: 1:1, 16:9)" in err
    assert f"error: {m}:5: jobs[1]: model flux-2 requires 'prompt' — add it to the job, its input or defaults" in err
    assert (
        f"warning: {m}:4: jobs[0].input.aspectratio: flux-2 has no parameter 'aspectratio' in official.csv, line 2 — "
        "did you mean 'aspect_ratio'?" in err
    )
    ok = write("ok.yaml", "jobs:\n  - model: flux-2\n    prompt: a\n    input: {aspect_ratio: '16:9'}\n")
    assert main(["plan", str(ok), "--catalog", str(catalog), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["credits"] == 4


def test_rows_multiply_only_the_jobs_that_use_their_columns(write) -> None:  # type: ignore[no-untyped-def]
    write("products.csv", "product,image\nperfume,https://e.com/p.png\nwatch,https://e.com/w.png\n")
    m = write(
        "m.yaml",
        "rows: products.csv\nmatrix: {ratio: ['1:1', '9:16']}\npath: '{model}/{job_id}.{ext}'\njobs:\n"
        "  - {model: flux-2, prompt: '{product} on white', input: {aspect_ratio: '{ratio}'}}\n"
        "  - {model: kling-video-turbo, prompt: 'a slow pan', input: {image_url: '{image}'}}\n"
        "  - {model: seedream-4-5, prompt: 'a brand mood board'}\n",
    )
    out = specs(m)
    assert [s.model for s in out].count("flux-2") == 2 * 2  # rows × the matrix var it uses
    assert [s.model for s in out].count("kling-video-turbo") == 2  # rows only: it does not use {ratio}
    assert [s.model for s in out].count("seedream-4-5") == 1  # neither


def test_yaml_values_stay_text_where_yaml_1_1_would_guess(write) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "m.yaml",
        "vars: {day: 2024-05-01, ratio: 16:9}\njobs:\n  - {model: flux-2, prompt: '{day}', input: {aspect_ratio: '{ratio}', n: 4}}\n",
    )
    (spec,) = specs(m)
    assert spec.body["input"] == {"prompt": "2024-05-01", "aspect_ratio": "16:9", "n": 4}


def test_a_number_prompt_is_sent_as_its_text(write) -> None:  # type: ignore[no-untyped-def]
    m = write("m.yaml", "matrix: {n: [1, 2]}\njobs:\n  - {model: flux-2, prompt: '{n}'}\n")
    assert [s.body["input"]["prompt"] for s in specs(m)] == ["1", "2"]


# -- property: expansion of valid manifests -------------------------------------------------
NAMES = ("a", "b", "c", "d")
value_text = st.text(alphabet="xyz01: -", min_size=1, max_size=6)
values = st.one_of(value_text, st.integers(0, 99))


@st.composite
def manifests(draw: st.DrawFn) -> tuple[dict[str, list[object]], list[dict[str, object]], bool]:
    """A manifest built from valid pieces: a matrix, jobs whose prompts use some of its vars; rarely one broken piece."""
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3))
    matrix = {n: draw(st.lists(values, min_size=1, max_size=3, unique_by=lambda v: str(v))) for n in names}
    jobs = []
    for i in range(draw(st.integers(1, 4))):
        used = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
        words = draw(st.lists(st.sampled_from(["red", "bottle", "{{literal}}", "studio"]), max_size=3))
        prompt = " ".join([f"job{i}", *words, *(f"{{{n}}}" for n in used)])
        jobs.append({"model": draw(st.sampled_from(["flux-2", "imagen-v4", "kling-video-turbo"])), "prompt": prompt, "variants": 1 + i % 2})
    broken = draw(st.integers(0, 19)) == 7  # a few name a var nobody defined (7: not a value hypothesis favours)
    if broken:
        jobs[0]["prompt"] = str(jobs[0]["prompt"]) + " {undefined}"
    return matrix, jobs, broken


def test_expansion_of_valid_manifests_is_exact_and_ids_survive_reordering(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    outcomes: list[bool] = []

    @settings(max_examples=80, deadline=None, database=None, derandomize=True)
    @given(manifest=manifests(), seed=st.integers(0, 1000))
    @example(manifest=({"a": ["x", 1]}, [{"model": "flux-2", "prompt": "job0 {a} {undefined}", "variants": 1}], True), seed=3)
    def check(manifest: tuple[dict[str, list[object]], list[dict[str, object]], bool], seed: int) -> None:
        matrix, jobs, broken = manifest
        folder = tmp_path_factory.mktemp("h")

        def run(order: list[dict[str, object]]) -> list[tuple[str, str, str, int]]:
            path = folder / "m.yaml"
            path.write_text(json.dumps({"matrix": matrix, "path": "{model}/{job_id}.{ext}", "jobs": order}))
            return [(s.id, json.dumps(s.body, sort_keys=True), s.path, s.variant) for s in specs(path)]

        shuffled = jobs[:]
        random.Random(seed).shuffle(shuffled)
        if broken:
            with pytest.raises(ManifestError, match=r"m\.yaml:1: jobs\[\d\]\.prompt uses \{undefined\}, which is not defined"):
                run(jobs)
            outcomes.append(False)
            return
        first, second = run(jobs), run(shuffled)
        outcomes.append(True)
        assert sorted(first) == sorted(second)  # the same jobs, ids and paths in any order
        expected = 0
        for job in jobs:
            used = [n for n in matrix if f"{{{n}}}" in str(job["prompt"])]
            count = int(str(job["variants"]))
            for n in used:
                count *= len(matrix[n])
            expected += count
        assert len(first) == expected  # each job multiplied by the matrix vars it uses, and its variants
        assert len({p for _, _, p, _ in first}) == len(first)
        for jid, body, path, variant in first:
            assert job_id(json.loads(body), variant) == jid and path.endswith(f"{jid}.{{ext}}")

    check()
    valid = sum(outcomes) / len(outcomes)
    assert len(outcomes) >= 50 and valid >= 0.9, f"only {valid:.0%} of {len(outcomes)} generated manifests were valid"
    assert not all(outcomes)  # the refusal path ran too
