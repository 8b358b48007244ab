"""Every YAML example in the README passes ``plan`` as written, with the CSV files the README shows beside it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .conftest import ROOT, cli, make_png, red_square

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[str, str]]:
    """(the text before the block, the block) for every fenced block of ``language``."""
    return [(README[: m.start()], m[2]) for m in FENCE.finditer(README) if m[1] == language]


def test_every_yaml_example_in_the_readme_plans_as_written(tmp_path: Path) -> None:
    examples = blocks("yaml")
    assert examples, "the README shows no YAML example"
    for before, text in blocks("csv"):  # each CSV block is named in the line that introduces it
        name = re.findall(r"`([\w.-]+\.csv)`", before.rstrip().rsplit("\n", 1)[-1])
        assert name, f"a ```csv block must be introduced by its file name: {before[-80:]!r}"
        (tmp_path / name[-1]).write_text(text)
    for name in {m for _, text in examples for m in re.findall(r"file:([\w/.-]+\.png)", text)}:  # local inputs it names
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(make_png(8, 8, red_square))
    for i, (_, text) in enumerate(examples):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(text)
        result = cli("plan", str(path), "--json")
        assert result.returncode == 0, f"README example {i} is refused:\n{result.stderr}"
        plan = json.loads(result.stdout)
        assert plan["warnings"] == [], plan["warnings"]
        assert plan["jobs"] > 0


def test_the_main_example_counts_what_the_readme_says(tmp_path: Path) -> None:
    (_, products), *_ = blocks("csv")
    (tmp_path / "products.csv").write_text(products)
    (_, example), *_ = blocks("yaml")
    path = tmp_path / "spring.yaml"
    path.write_text(example)
    result = cli("plan", str(path), "--json")
    plan = json.loads(result.stdout)
    assert "shows its 16 jobs" in README
    assert plan["jobs"] == 16 and plan["by_model"]["flux-2"]["jobs"] == 8 and plan["by_model"]["kling-video-turbo"]["jobs"] == 8
    assert plan["credits"] == 8 * 4 + 8 * 40
