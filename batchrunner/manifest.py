"""Reading manifests (YAML campaigns, CSV lists) into a :class:`Manifest`, with file:line for every problem.

YAML is read with a loader that remembers the line of every key and list item, and that
does not read ``1:1`` or ``16:9`` as base-60 integers (YAML 1.1 would). Every problem is
collected, then the manifest is refused whole with :class:`ManifestError`; nothing here
renders templates or knows the catalog (that is :mod:`batchrunner.expand`).
"""

from __future__ import annotations

import csv
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .callbacks import CallbackSettings
from .errors import ManifestError, Problem

TOP_KEYS = (
    "version", "name", "output", "path", "concurrency", "rate", "max_credits", "callback_url",
    "credits", "vars", "matrix", "rows", "defaults", "jobs", "jobs_csv", "callbacks",
)  # fmt: skip
JOB_KEYS = ("model", "prompt", "input", "options", "imageURLList", "videoURLList", "vars", "matrix", "variants", "path", "callback_url")
CSV_FIXED = ("model", "prompt", "variants", "path")


class LineDict(dict[str, Any]):
    """A mapping that knows its own line and each key's line (1-based)."""

    line: int = 0
    key_lines: dict[str, int]

    def __init__(self, *args: Any, line: int = 0, key_lines: dict[str, int] | None = None) -> None:
        super().__init__(*args)
        self.line = line
        self.key_lines = key_lines if key_lines is not None else {}

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list[Any]):
    """A list that knows each item's line."""

    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    problems: list[Problem]


def _mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict(line=node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str | int | float | bool):
            loader.problems.append(Problem(loader.name, line, "a key must be a plain word, not a list or mapping"))
            continue
        key = str(key)
        if key in result:
            loader.problems.append(Problem(loader.name, line, f"{key!r} is given twice (first on line {result.key_lines[key]}) — keep one"))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)
# YAML 1.1 reads 1:1 and 16:9 as base-60 numbers; aspect ratios must stay strings.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


@dataclass(frozen=True, slots=True)
class JobDef:
    """One entry of ``jobs`` (or one CSV row): its raw fields and where it was written."""

    fields: LineDict
    index: int
    file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """A loaded manifest. Run settings are None where the manifest does not set them."""

    file: str
    name: str
    output: Path
    path: str | None = None
    concurrency: int | None = None
    rate: float | None = None
    max_credits: float | None = None
    callback_url: str | None = None
    credits: dict[str, float] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    matrix: dict[str, list[Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    defaults: LineDict = field(default_factory=LineDict)
    jobs: list[JobDef] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)
    callbacks: LineDict = field(default_factory=LineDict)  # listen, url (checked); empty: no callback receiver

    def line_of(self, key: str) -> int | None:
        return self.lines.get(key)


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" — did you mean {close[0]!r}?" if close else f" — known keys: {', '.join(choices)}"


def load(path: str | Path) -> Manifest:
    """Read a YAML or CSV manifest. Raises :class:`ManifestError` listing every problem."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ManifestError([Problem(name, None, "no such manifest — check the path (try manifests/demo.yaml)")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError([Problem(name, None, f"cannot read the manifest: {exc}")]) from None
    if not text.strip():
        raise ManifestError([Problem(name, 1, "the manifest is empty — see manifests/demo.yaml for a start")])
    problems: list[Problem] = []
    if path.suffix.lower() == ".csv":
        jobs = _csv_jobs(path, text, problems)
        manifest = Manifest(file=name, name=path.stem, output=path.parent / "out" / path.stem, jobs=jobs)
    else:
        manifest = _yaml_manifest(path, text, problems)
    if problems:
        raise ManifestError(problems)
    return manifest


def _csv_jobs(path: Path, text: str, problems: list[Problem], *, standalone: bool = True) -> list[JobDef]:
    """One job per row: fixed columns, ``options.X`` / ``input.X`` columns, the rest model fields."""
    name = str(path)
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if "model" not in header and (standalone or "prompt" not in header):
        problems.append(
            Problem(name, 1, f"a CSV manifest needs a 'model' column (and usually 'prompt'); found: {', '.join(header) or 'none'}")
        )
        return []
    for i, column in enumerate(header):
        if not column:
            problems.append(Problem(name, 1, f"column {i + 1} has no name — name it or delete it"))
        elif header.count(column) > 1 and header.index(column) == i:
            problems.append(Problem(name, 1, f"column {column!r} appears twice — keep one"))
        elif "." in column and column.split(".", 1)[0] not in ("options", "input"):
            problems.append(Problem(name, 1, f"column {column!r}: only options.<key> and input.<key> may contain a dot"))
    jobs: list[JobDef] = []
    for row in reader:
        line = reader.line_num
        if None in row:
            problems.append(Problem(name, line, "this row has more cells than the header has columns"))
            continue
        fields = LineDict(line=line)
        inputs = LineDict(line=line)
        options = LineDict(line=line)
        for column, value in row.items():
            value = (value or "").strip()
            if not column or value == "":
                continue
            if column in CSV_FIXED:
                target, key = fields, column
            elif column.startswith("options."):
                target, key = options, column[len("options.") :]
            else:
                target, key = inputs, column.removeprefix("input.")
            target[key] = value
            target.key_lines[key] = line
        for key, sub in (("input", inputs), ("options", options)):
            if sub:
                fields[key] = sub
                fields.key_lines[key] = line
        if "variants" in fields:
            fields["variants"] = _int_or_text(fields["variants"])
        if fields:
            jobs.append(JobDef(fields, len(jobs), name))
    if not jobs and not problems:
        problems.append(Problem(name, 2, "the CSV has a header but no rows — add one job per row"))
    return jobs


def _int_or_text(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def _yaml_manifest(path: Path, text: str, problems: list[Problem]) -> Manifest:
    name = str(path)
    loader = _Loader(text)
    loader.name = name
    loader.problems = problems
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.append(
            Problem(
                name, mark.line + 1 if mark else None, f"YAML syntax: {exc.problem or exc.context} — fix the indentation or quoting there"
            )
        )
        return Manifest(file=name, name=path.stem, output=path.parent)
    except yaml.YAMLError as exc:
        problems.append(Problem(name, None, f"YAML: {exc}"))
        return Manifest(file=name, name=path.stem, output=path.parent)
    finally:
        loader.dispose()
    if not isinstance(doc, LineDict):
        problems.append(Problem(name, 1, "a manifest is a mapping of keys (name, matrix, defaults, jobs, …) — see manifests/demo.yaml"))
        return Manifest(file=name, name=path.stem, output=path.parent)

    def where(key: str) -> int:
        return doc.line_of(key)

    def bad(key: str, message: str) -> None:
        problems.append(Problem(name, where(key), f"{key}: {message}"))

    for key in doc:
        if key not in TOP_KEYS:
            bad(key, f"unknown key{did_you_mean(key, TOP_KEYS)}")

    def typed(key: str, kinds: type | tuple[type, ...], what: str, check: Any = None) -> Any:
        value = doc.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, kinds) or (check is not None and not check(value)):
            bad(key, f"must be {what}, not {value!r}")
            return None
        return value

    version = typed("version", int, "1", lambda v: v == 1)
    del version
    title = typed("name", str, "a text") or path.stem
    output = typed("output", str, "a folder path")
    concurrency = typed("concurrency", int, "a whole number ≥ 1", lambda v: v >= 1)
    rate = typed("rate", (int, float), "a number of requests per second > 0", lambda v: v > 0)
    max_credits = typed("max_credits", (int, float), "a number ≥ 0", lambda v: v >= 0)
    callback = typed("callback_url", str, "an https:// URL", lambda v: v.startswith("https://"))
    path_template = typed("path", str, 'a path template such as "{product}/{variant}.{ext}"')
    credits = typed("credits", dict, "a mapping of model id to credits per job") or {}
    for model, price in credits.items():
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            problems.append(
                Problem(
                    name,
                    getattr(credits, "key_lines", {}).get(model, where("credits")),
                    f"credits.{model}: must be a number ≥ 0, not {price!r}",
                )
            )
    callbacks = typed("callbacks", dict, "a mapping with listen: (host:port) and url: (https://…)") or LineDict()
    if callbacks:
        for key in callbacks:
            if key not in ("listen", "url"):
                problems.append(Problem(name, callbacks.line_of(key), f"callbacks.{key}: unknown key — known: listen, url"))
        if "listen" not in callbacks:
            problems.append(Problem(name, where("callbacks"), "callbacks.listen: required (host:port where the receiver binds)"))
        else:
            try:
                CallbackSettings.parse(
                    callbacks["listen"],
                    callbacks.get("url"),
                    listen_at=(name, callbacks.line_of("listen")),
                    url_at=(name, callbacks.line_of("url")),
                )
            except ManifestError as exc:
                problems.extend(exc.problems)
    variables = typed("vars", dict, "a mapping of names to values") or {}
    matrix = _matrix(doc.get("matrix"), name, where("matrix"), "matrix", problems)
    rows = _rows(doc.get("rows"), path, where("rows"), problems)
    defaults = typed("defaults", dict, "a mapping of job fields") or LineDict()
    _check_job_keys(defaults, name, "defaults", problems)
    jobs: list[JobDef] = []
    raw_jobs = doc.get("jobs")
    if raw_jobs is not None and not isinstance(raw_jobs, list):
        bad("jobs", "must be a list of jobs (each starting with '- ')")
    elif raw_jobs:
        lines = getattr(raw_jobs, "item_lines", [where("jobs")] * len(raw_jobs))
        for i, job in enumerate(raw_jobs):
            if not isinstance(job, LineDict):
                problems.append(Problem(name, lines[i], f"jobs[{i}]: a job is a mapping (model:, prompt:, …), not {job!r}"))
                continue
            _check_job_keys(job, name, f"jobs[{i}]", problems)
            jobs.append(JobDef(job, i, name))
    if "jobs_csv" in doc:
        csv_name = typed("jobs_csv", str, "a CSV file path")
        if csv_name:
            csv_path = path.parent / csv_name
            try:
                csv_text = csv_path.read_text(encoding="utf-8-sig")
            except OSError:
                bad("jobs_csv", f"{csv_path} cannot be read — check the path (relative to the manifest's folder)")
            else:
                jobs.extend(
                    JobDef(j.fields, len(jobs) + j.index, j.file) for j in _csv_jobs(csv_path, csv_text, problems, standalone=False)
                )
    if not jobs and "jobs" not in doc and "jobs_csv" not in doc:
        problems.append(Problem(name, doc.line or 1, "no jobs: add a 'jobs:' list or 'jobs_csv: file.csv'"))
    return Manifest(
        file=name,
        name=title,
        output=(path.parent / output) if output else path.parent / "out" / title,
        path=path_template,
        concurrency=concurrency,
        rate=float(rate) if rate is not None else None,
        max_credits=float(max_credits) if max_credits is not None else None,
        callback_url=callback,
        credits={str(k): float(v) for k, v in credits.items() if isinstance(v, int | float)},
        vars=dict(variables),
        matrix=matrix,
        rows=rows,
        defaults=defaults,
        jobs=jobs,
        lines=dict(doc.key_lines),
        callbacks=callbacks,
    )


def _check_job_keys(job: LineDict, file: str, where: str, problems: list[Problem]) -> None:
    for key in job:
        if key not in JOB_KEYS:
            problems.append(Problem(file, job.line_of(key), f"{where}.{key}: unknown key{did_you_mean(key, JOB_KEYS)}"))
    for key in ("input", "options", "vars", "matrix"):
        if key in job and not isinstance(job[key], dict):
            problems.append(Problem(file, job.line_of(key), f"{where}.{key}: must be a mapping (key: value), not {job[key]!r}"))
    for key in ("imageURLList", "videoURLList"):
        if key in job and not isinstance(job[key], list | str):
            problems.append(Problem(file, job.line_of(key), f"{where}.{key}: must be a list of URLs"))
    variants = job.get("variants")
    if variants is not None and (isinstance(variants, bool) or not isinstance(variants, int) or variants < 1):
        problems.append(Problem(file, job.line_of("variants"), f"{where}.variants: must be a whole number ≥ 1, not {variants!r}"))


def _matrix(value: Any, file: str, line: int, where: str, problems: list[Problem]) -> dict[str, list[Any]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(Problem(file, line, f"{where}: must map each name to a list of values"))
        return {}
    result = {}
    for key, values in value.items():
        key_line = value.key_lines.get(key, line) if isinstance(value, LineDict) else line
        if not isinstance(values, list) or not values:
            problems.append(Problem(file, key_line, f"{where}.{key}: must be a non-empty list, e.g. [a, b]"))
            continue
        result[key] = list(values)
    return result


def _rows(value: Any, manifest: Path, line: int, problems: list[Problem]) -> list[dict[str, Any]]:
    if value is None:
        return []
    name = str(manifest)
    if not isinstance(value, str):
        problems.append(Problem(name, line, "rows: must be the path of a CSV file (relative to the manifest)"))
        return []
    rows_path = manifest.parent / value
    try:
        text = rows_path.read_text(encoding="utf-8-sig")
    except OSError:
        problems.append(Problem(name, line, f"rows: {rows_path} cannot be read — check the path (relative to the manifest's folder)"))
        return []
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    bad = [h for h in header if not h.isidentifier()]
    if not header or bad:
        problems.append(
            Problem(
                str(rows_path),
                1,
                f"rows: every column needs a name usable as {{name}}; bad: {', '.join(repr(b) for b in bad) or 'no header'}",
            )
        )
        return []
    rows = []
    for row in reader:
        if None in row:
            problems.append(Problem(str(rows_path), reader.line_num, "this row has more cells than the header has columns"))
            continue
        rows.append({k: (v or "").strip() for k, v in row.items()})
    if not rows:
        problems.append(Problem(str(rows_path), 1, "rows: the file has no rows"))
    return rows
