"""Hostile manifests: alias bombs, deep nesting, bytes YAML refuses, oversized files — each a file:line error, exit 2.

The in-process cases run with every YAML loader batchrunner can use (libyaml's parser and
the pure-Python one, used when PyYAML was built without libyaml). The bombs also run as the
real CLI in a process whose address space is capped, so "bounded memory" is a fact the
kernel checks, not a timing.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from batchrunner import manifest as manifest_module
from batchrunner.catalog import load_catalog
from batchrunner.cli import main
from batchrunner.errors import ManifestError
from batchrunner.manifest import LOADERS, MAX_CSV_BYTES, MAX_YAML_BYTES, load

from .conftest import ROOT

JOB = "jobs:\n  - {model: flux-2, prompt: x}\n"


def laughs(levels: int = 9) -> str:
    """The billion laughs: nine aliases of nine aliases of … (9**9 = 387,420,489 strings once expanded)."""
    lines = ["vars:", "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\njobs:\n  - model: flux-2\n    prompt: x\n    input: {{words: '{{l{levels - 1}}}'}}\n"


def merge_bomb(levels: int = 40) -> str:
    """Merge keys naming a mapping twice at every level: PyYAML (>= 6.0.2) merges each key once, but what the
    aliases name still counts in full, so this is refused as the alias bomb it is written as."""
    lines = ["vars:", "  m0: &m0 {k: x, l: y}"]
    lines += [f"  m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: z}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n" + JOB


BOMBS = [
    (laughs(), ":7: expands to more than 500,000 values once its aliases (*name) are expanded — use fewer aliases, or a CSV"),
    (merge_bomb(), ":18: expands to more than 500,000 values once its aliases (*name) are expanded"),
    (
        "vars:\n  c0: &c0 {k: x}\n" + "".join(f"  c{i}: &c{i} {{<<: *c{i - 1}, k{i}: z}}\n" for i in range(1, 200)) + JOB,
        ":51: nested more than 50 levels deep once its aliases (*name) are expanded — flatten it",
    ),
    ("jobs:\n  - model: flux-2\n    prompt: x\n    input: {deep: " + "[" * 300 + "]" * 300 + "}\n", ":4: nested more than 50 levels deep"),
    (
        "jobs:\n  - model: flux-2\n    prompt: x\n    input:\n" + "".join("  " * (i + 3) + f"k{i}:\n" for i in range(300)),
        ":51: nested more",
    ),
    ("vars:\n  a: &a [x, *a]\n" + JOB, ":2: an alias (*name) refers to the list or mapping that contains it — it would never end"),
    (
        "jobs:\n  - model: flux-2\n    prompt: 'a\x07b'\n",
        ":3: the character U+0007 is not allowed in YAML — delete it, or write it as an escape",
    ),
    ("jobs:\n  - model: flux-2\n\n    prompt: a\x00b\n", ":4: the character U+0000 is not allowed in YAML"),
    ("jobs:\n  - model: flux-2\n    prompt: 'a\x85\x9f'\n", ":3: the character U+009F is not allowed in YAML"),
]


@pytest.fixture(params=[cls.__name__ for cls in LOADERS])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each YAML loader in turn."""
    chosen = next(cls for cls in LOADERS if cls.__name__ == request.param)
    monkeypatch.setattr(manifest_module, "LOADERS", [chosen])
    return str(request.param)


def refusal(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load(path)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize(("text", "expected"), BOMBS, ids=range(len(BOMBS)))
def test_bombs_and_bad_bytes_are_file_line_errors(write, loader: str, text: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", text)
    problems = refusal(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}{expected}"), problems


def test_a_surrogate_escape_is_a_file_line_error(write, loader: str) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", 'jobs:\n  - model: flux-2\n    prompt: "a\\ud800 b"\n')
    (problem,) = refusal(path)
    assert problem.startswith(f"{path}:3: ")
    assert "surrogate" in problem  # libyaml refuses the escape; the Python reader would make a lone surrogate, which we refuse


def test_a_document_or_a_csv_past_its_size_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with open(big, "w") as f:
        f.write(JOB + "# " + "x" * MAX_YAML_BYTES + "\n")
    assert refusal(big) == [f"{big}: the manifest is larger than 10 MiB, the limit — split it into several files"]
    rows = tmp_path / "rows.csv"
    with open(rows, "wb") as f:
        f.truncate(MAX_CSV_BYTES + 1)  # sparse: no disk used
    manifest = tmp_path / "m.yaml"
    manifest.write_text("rows: rows.csv\n" + JOB)
    assert refusal(manifest) == [f"{rows}: rows is larger than 100 MiB, the limit — split it into several files"]


def test_text_that_is_not_utf8_and_csv_cells_too_big_to_read(tmp_path: Path) -> None:
    latin = tmp_path / "m.yaml"
    latin.write_bytes(b"jobs:\n  - model: flux-2\n    prompt: caf\xe9\n")
    assert refusal(latin) == [f"{latin}:3: the manifest is not UTF-8 text (byte 0xe9) — save it as UTF-8"]
    huge_cell = tmp_path / "m.csv"
    huge_cell.write_text("model,prompt\nflux-2,ok\nflux-2," + "p" * 200_000 + "\n")
    (problem,) = refusal(huge_cell)
    assert problem.startswith(f"{huge_cell}:3: this row cannot be read as CSV: field larger than field limit")


def test_a_broken_catalog_is_a_file_line_error(tmp_path: Path) -> None:
    catalog = tmp_path / "c.csv"
    catalog.write_bytes(b"id,modality\nflux-9,image\nflux-\xff,image\n")
    _, problems = load_catalog(catalog)
    assert [str(p) for p in problems] == [
        f"{catalog}:3: the catalog (--catalog / BATCHRUNNER_CATALOG) is not UTF-8 text (byte 0xff) — save it as UTF-8"
    ]
    catalog.write_text("id,modality\nflux-9,image\nflux-x," + "m" * 200_000 + "\n")
    _, problems = load_catalog(catalog)
    assert [str(p)[: len(str(catalog)) + 3] for p in problems] == [f"{catalog}:3:"]


def _cap_memory() -> None:
    cap = 512 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


@pytest.mark.parametrize("loader_name", [cls.__name__ for cls in LOADERS])
def test_billion_laughs_is_refused_by_plan_within_512_mib(tmp_path: Path, loader_name: str) -> None:
    """The real CLI, as a process whose address space the kernel caps at 512 MiB (before the bound: MemoryError)."""
    path = tmp_path / "bomb.yaml"
    path.write_text(laughs())
    code = (
        "import sys; import batchrunner.manifest as m; "
        f"m.LOADERS[:] = [c for c in m.LOADERS if c.__name__ == {loader_name!r}]; "
        "from batchrunner.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "plan", str(path)], capture_output=True, text=True, cwd=ROOT, preexec_fn=_cap_memory, timeout=300
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "expands to more than 500,000 values" in result.stderr and "Traceback" not in result.stderr
    assert "nothing was sent" in result.stderr


def test_plan_and_run_refuse_a_reserved_path_alike(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    path = write("m.yaml", "path: .batchrunner/state.sqlite\n" + JOB)
    out = tmp_path / "out"
    for command in (["plan", str(path)], ["run", str(path), "--sandbox", "--out", str(out), "--quiet"]):
        assert main(command) == 2
    assert not out.exists()  # nothing written, nothing sent
