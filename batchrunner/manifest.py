"""Reading manifests (YAML campaigns, CSV lists) into a :class:`Manifest`, with file:line for every problem.

YAML is read with a loader that remembers the line of every key and list item, and that
does not read ``1:1`` or ``16:9`` as base-60 integers, nor ``2024-05-01`` as a date (YAML
1.1 would). The loader is bounded: a document of at most :data:`MAX_YAML_BYTES`, nested at
most :data:`MAX_DEPTH` levels, at most :data:`MAX_NODES` values once its aliases are
expanded (measured while composing, before anything is built, so an alias bomb costs
nothing), plain text, numbers, lists and mappings only. Every problem is collected, then the
manifest is refused whole with :class:`ManifestError`; nothing here renders templates or
knows the catalog (that is :mod:`batchrunner.expand`).
"""

from __future__ import annotations

import csv
import difflib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from .callbacks import CallbackSettings
from .errors import ManifestError, Problem

TOP_KEYS = (
    "version", "name", "output", "path", "concurrency", "rate", "max_credits", "max_jobs", "callback_url",
    "credits", "vars", "matrix", "rows", "defaults", "jobs", "jobs_csv", "storage", "callbacks",
)  # fmt: skip
JOB_KEYS = (
    "id", "model", "prompt", "input", "options", "imageURLList", "videoURLList", "vars", "matrix", "variants", "path", "callback_url",
)  # fmt: skip
CSV_FIXED = ("model", "prompt", "variants", "path")

# Bounds on what a manifest may make us hold in memory (the README lists them).
MAX_YAML_BYTES = 10 * 2**20  # a YAML manifest; big flat lists belong in a CSV
MAX_CSV_BYTES = 100 * 2**20  # a CSV manifest, jobs_csv or rows file
MAX_DEPTH = 50  # levels of nesting, aliases expanded
MAX_NODES = 500_000  # values (scalars, lists, mappings) in the document, aliases expanded
_TAGS = {
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map", "merge")
}  # what a manifest may hold: no dates, binaries, sets or application tags
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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


class _Refused(Exception):
    """A bound of the loader was passed at ``line``."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


class _Measuring(Composer):
    """Composes nodes while measuring each one's size and height with its aliases expanded."""

    check_event: Any  # from the parser this is mixed with
    peek_event: Any

    def __init__(self) -> None:
        Composer.__init__(self)
        self.depth = 0
        self.measures: dict[int, tuple[int, int]] = {}  # id(node) → (values, levels), aliases expanded

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        self.measures.clear()  # measured: free them before the document is built
        return node

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)  # an alias: the node it names, already measured
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Refused(self.peek_event().start_mark.line + 1, f"nested more than {MAX_DEPTH} levels deep — flatten it")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if node is not None:
            self._measure(node)
        return node

    def _measure(self, node: Node) -> None:
        line = node.start_mark.line + 1
        if node.tag not in _TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _Refused(line, f"the tag {tag} is not supported — write plain text, numbers, lists and mappings")
        if isinstance(node, ScalarNode):
            if not node.value.isascii() and _SURROGATE.search(node.value):
                raise _Refused(line, "a text holds a lone surrogate (an escape such as \\ud800), which is not a character — remove it")
            self.measures[id(node)] = (1, 1)
            return
        children = node.value if isinstance(node, SequenceNode) else [n for pair in node.value for n in pair]
        size, height = 1, 1
        for child in children:
            measure = self.measures.get(id(child))
            if measure is None:
                raise _Refused(line, "an alias (*name) refers to the list or mapping that contains it — it would never end")
            size += measure[0]
            height = max(height, measure[1] + 1)
        self.measures[id(node)] = (size, height)
        if height > MAX_DEPTH:
            raise _Refused(line, f"nested more than {MAX_DEPTH} levels deep once its aliases (*name) are expanded — flatten it")
        if size > MAX_NODES:
            raise _Refused(
                line, f"expands to more than {MAX_NODES:,} values once its aliases (*name) are expanded — use fewer aliases, or a CSV"
            )


class _Constructor(SafeConstructor):
    """Plain data with the line of every mapping, key and list item; foreign exceptions become marked errors."""

    file: str
    problems: list[Problem]

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            reason = str(exc).split(";")[0]  # not Python's advice to its own programmers
            raise ConstructorError(None, None, f"cannot read this value: {reason}", node.start_mark) from None

    def construct_finite_float(self, node: ScalarNode) -> float:
        value = self.construct_yaml_float(node)
        if not math.isfinite(value):
            raise ConstructorError(None, None, f"{node.value} is not a finite number — quote it if it is text", node.start_mark)
        return value


def _mapping(loader: _Constructor, node: MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict(line=node.start_mark.line + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str | int | float | bool):
            loader.problems.append(Problem(loader.file, line, "a key must be a plain word, not a list or mapping"))
            continue
        key = str(key)
        if key in result:
            loader.problems.append(Problem(loader.file, line, f"{key!r} is given twice (first on line {result.key_lines[key]}) — keep one"))
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _sequence(loader: _Constructor, node: SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_Constructor.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)  # type: ignore[type-var]
_Constructor.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _sequence)  # type: ignore[type-var]
_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_finite_float)  # type: ignore[type-var]


class _Resolver(Resolver):
    """YAML 1.1 reads 1:1 and 16:9 as base-60 numbers and 2024-05-01 as a date; here they stay text."""


_OWN = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
_Resolver.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _OWN] for first, resolvers in Resolver.yaml_implicit_resolvers.items()
}
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class _PyLoader(Reader, Scanner, Parser, _Measuring, _Constructor, _Resolver):
    """The pure-Python reader and parser (when PyYAML was built without libyaml)."""

    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        _Measuring.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)


LOADERS: list[type[_Constructor]] = [_PyLoader]  # the first is used; tests also run the others
try:
    from yaml._yaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    pass
else:

    class _CLoader(_Measuring, CParser, _Constructor, _Resolver):
        """libyaml's reader and parser (fast, no recursion); composing stays ours, measured."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            _Measuring.__init__(self)
            _Constructor.__init__(self)
            _Resolver.__init__(self)

    LOADERS.insert(0, _CLoader)


@dataclass(frozen=True, slots=True)
class JobDef:
    """One entry of ``jobs`` (or one CSV row): its raw fields and where it was written."""

    fields: LineDict
    index: int
    file: str


STORAGE_KEYS = ("url", "endpoint", "url_lifetime", "keep_local")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageDef:
    """The manifest's ``storage:`` mapping; None where it does not say (the run resolves flag > manifest > environment)."""

    url: str | None = None
    endpoint: str | None = None
    url_lifetime_s: float | None = None
    keep_local: bool | None = None
    line: int = 0


def duration_s(value: Any) -> float | None:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"1h"`` or ``"2d"``; None if it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value > 0 else None
    match = _DURATION.fullmatch(str(value).strip())
    if match is None or float(match[1]) <= 0:
        return None
    return float(match[1]) * _UNIT_S[match[2] or "s"]


def _storage(value: Any, file: str, line: int, problems: list[Problem]) -> StorageDef | None:
    if value is None:
        return None
    if not isinstance(value, LineDict):
        problems.append(
            Problem(file, line, "storage: must be a mapping (url: s3://bucket/prefix, endpoint:, url_lifetime: 1h, keep_local: true)")
        )
        return None
    for key in value:
        if key not in STORAGE_KEYS:
            problems.append(Problem(file, value.line_of(key), f"storage.{key}: unknown key{did_you_mean(key, STORAGE_KEYS)}"))
    url, endpoint = value.get("url"), value.get("endpoint")
    if url is not None and (not isinstance(url, str) or not url.strip()):
        problems.append(Problem(file, value.line_of("url"), f"storage.url: must be a URL such as s3://bucket/prefix, not {short(url)}"))
        url = None
    if endpoint is not None and (not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://"))):
        problems.append(Problem(file, value.line_of("endpoint"), f"storage.endpoint: must be an http(s) URL, not {short(endpoint)}"))
        endpoint = None
    lifetime = None
    if "url_lifetime" in value:
        lifetime = duration_s(value["url_lifetime"])
        if lifetime is None or lifetime > 7 * 86400:
            problems.append(
                Problem(
                    file,
                    value.line_of("url_lifetime"),
                    f"storage.url_lifetime: must be a duration such as 1h, 30m or 2d (at most 7d), not {short(value['url_lifetime'])}",
                )
            )
            lifetime = None
    keep_local = value.get("keep_local")
    if keep_local is not None and not isinstance(keep_local, bool):
        problems.append(Problem(file, value.line_of("keep_local"), f"storage.keep_local: must be true or false, not {short(keep_local)}"))
        keep_local = None
    if credential := next((k for k in value if "secret" in str(k).lower() or "key" in str(k).lower()), None):
        problems.append(
            Problem(
                file,
                value.line_of(credential),
                f"storage.{credential}: credentials never go in a manifest: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "(or your cloud's variables) in the environment",
            )
        )
    return StorageDef(url=url, endpoint=endpoint, url_lifetime_s=lifetime, keep_local=keep_local, line=line)


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
    max_jobs: int | None = None
    callback_url: str | None = None
    storage: StorageDef | None = None
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


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages quote what was written, not a whole document."""
    text = repr(value) if not isinstance(value, list | dict) or len(value) < 20 else f"{type(value).__name__} of {len(value)} items"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def read_text(
    path: Path, limit: int, what: str, problems: list[Problem], *, line: int | None = None, cited: str | None = None
) -> str | None:
    """The text of ``path`` (UTF-8, BOM allowed), at most ``limit`` bytes; None after adding the reason to ``problems``.

    ``cited`` / ``line`` say where to report a file that cannot be read (default: the file itself).
    """
    where = cited or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        problems.append(Problem(where, line, f"{what}: no such file {path} — check the path (relative to the manifest's folder)"))
        return None
    except OSError as exc:
        problems.append(Problem(where, line, f"{what}: cannot read {path}: {exc.strerror or exc}"))
        return None
    if len(data) > limit:
        problems.append(Problem(str(path), None, f"{what} is larger than {_size(limit)}, the limit — split it into several files"))
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad_line = data[: exc.start].count(b"\n") + 1
        problems.append(Problem(str(path), bad_line, f"{what} is not UTF-8 text (byte {data[exc.start]:#04x}) — save it as UTF-8"))
        return None


def load(path: str | Path) -> Manifest:
    """Read a YAML or CSV manifest. Raises :class:`ManifestError` listing every problem."""
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise ManifestError([Problem(name, None, "no such manifest — check the path (try manifests/demo.yaml)")])
    problems: list[Problem] = []
    is_csv = path.suffix.lower() == ".csv"
    text = read_text(path, MAX_CSV_BYTES if is_csv else MAX_YAML_BYTES, "the manifest", problems)
    if text is None:
        raise ManifestError(problems)
    if not text.strip():
        raise ManifestError([Problem(name, 1, "the manifest is empty — see manifests/demo.yaml for a start")])
    if is_csv:
        jobs = _csv_jobs(path, text, problems)
        # a CSV has no name: key; "<stem>-csv" keeps demo.csv out of demo.yaml's folder and campaign
        title = f"{path.stem}-csv"
        manifest = Manifest(file=name, name=title, output=path.parent / "out" / title, jobs=jobs)
    else:
        manifest = _yaml_manifest(path, text, problems)
    if problems:
        raise ManifestError(problems)
    return manifest


def _csv_reader(text: str) -> csv.DictReader[str]:
    return csv.DictReader(text.splitlines())


def csv_rows(reader: csv.DictReader[str], file: str, problems: list[Problem]) -> Iterator[dict[str | Any, Any]]:
    """The rows of ``reader``; a row the csv module cannot read ends the file with a problem at its line."""
    try:
        yield from reader
    except csv.Error as exc:
        problems.append(Problem(file, reader.reader.line_num, f"this row cannot be read as CSV: {exc}"))


def _csv_jobs(path: Path, text: str, problems: list[Problem], *, standalone: bool = True) -> list[JobDef]:
    """One job per row: fixed columns, ``options.X`` / ``input.X`` columns, the rest model fields."""
    name = str(path)
    reader = _csv_reader(text)
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        problems.append(Problem(name, 1, f"the header cannot be read as CSV: {exc}"))
        return []
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
    for row in csv_rows(reader, name, problems):
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


def _parse_yaml(text: str, name: str, problems: list[Problem], loader_class: type[_Constructor] | None = None) -> Any:
    """The document, or None after adding why it cannot be read to ``problems``."""
    loader: Any = None
    try:
        loader = (loader_class or LOADERS[0])(text)  # type: ignore[call-arg]
        loader.file, loader.problems = name, problems
        return loader.get_single_data()
    except _Refused as exc:
        problems.append(Problem(name, exc.line, exc.message))
    except ReaderError as exc:  # a character YAML does not allow (NUL, BEL, other controls)
        char = exc.character if isinstance(exc.character, int) else 0
        at = text.find(chr(char))
        problems.append(
            Problem(
                name,
                text.count("\n", 0, at) + 1 if at >= 0 else None,
                f"the character U+{char:04X} is not allowed in YAML — delete it, or write it as an escape inside double quotes",
            )
        )
    except ConstructorError as exc:
        mark = exc.problem_mark or exc.context_mark
        problems.append(Problem(name, mark.line + 1 if mark else None, f"YAML: {exc.problem or exc.context}"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = str(exc.problem or exc.context)
        advice = (
            "a \\u escape must name a character, not half of a surrogate pair: write the character itself"
            if "escape" in problem
            else "fix the indentation or quoting there"
        )
        problems.append(Problem(name, mark.line + 1 if mark else None, f"YAML syntax: {problem} — {advice}"))
    except yaml.YAMLError as exc:
        problems.append(Problem(name, None, f"YAML: {exc}"))
    except RecursionError:  # bounded above; kept so that no input can end in a traceback
        problems.append(Problem(name, None, f"nested too deeply — at most {MAX_DEPTH} levels"))
    finally:
        if loader is not None:
            loader.dispose()
    return None


def _yaml_manifest(path: Path, text: str, problems: list[Problem]) -> Manifest:
    name = str(path)
    doc = _parse_yaml(text, name, problems)
    if doc is None and problems:
        return Manifest(file=name, name=path.stem, output=path.parent)
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
            bad(key, f"must be {what}, not {short(value)}")
            return None
        return value

    version = typed("version", int, "1", lambda v: v == 1)
    del version
    title = typed("name", str, "a text") or path.stem
    output = typed("output", str, "a folder path")
    concurrency = typed("concurrency", int, "a whole number ≥ 1", lambda v: v >= 1)
    rate = typed("rate", (int, float), "a number of requests per second > 0", lambda v: v > 0)
    max_credits = typed("max_credits", (int, float), "a number ≥ 0", lambda v: v >= 0)
    max_jobs = typed("max_jobs", int, "a whole number ≥ 1", lambda v: v >= 1)
    callback = typed("callback_url", str, "an https:// URL", lambda v: v.startswith("https://"))
    path_template = typed("path", str, 'a path template such as "{product}/{variant}.{ext}"')
    credits = typed("credits", dict, "a mapping of model id to credits per job") or {}
    for model, price in credits.items():
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            problems.append(
                Problem(
                    name,
                    getattr(credits, "key_lines", {}).get(model, where("credits")),
                    f"credits.{model}: must be a number ≥ 0, not {short(price)}",
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
    storage = _storage(doc.get("storage"), name, where("storage"), problems)
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
                problems.append(Problem(name, lines[i], f"jobs[{i}]: a job is a mapping (model:, prompt:, …), not {short(job)}"))
                continue
            _check_job_keys(job, name, f"jobs[{i}]", problems)
            jobs.append(JobDef(job, i, name))
    if "jobs_csv" in doc:
        csv_name = typed("jobs_csv", str, "a CSV file path")
        if csv_name:
            csv_path = path.parent / csv_name
            csv_text = read_text(csv_path, MAX_CSV_BYTES, "jobs_csv", problems, line=where("jobs_csv"), cited=name)
            if csv_text is not None:
                first = len(jobs)  # not len(jobs) in the generator: it grows as extend takes each job
                jobs.extend(JobDef(j.fields, first + j.index, j.file) for j in _csv_jobs(csv_path, csv_text, problems, standalone=False))
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
        max_jobs=max_jobs,
        callback_url=callback,
        storage=storage,
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
            problems.append(Problem(file, job.line_of(key), f"{where}.{key}: must be a mapping (key: value), not {short(job[key])}"))
    for key in ("imageURLList", "videoURLList"):
        if key in job and not isinstance(job[key], list | str):
            problems.append(Problem(file, job.line_of(key), f"{where}.{key}: must be a list of URLs"))
    variants = job.get("variants")
    if variants is not None and (isinstance(variants, bool) or not isinstance(variants, int) or variants < 1):
        problems.append(Problem(file, job.line_of("variants"), f"{where}.variants: must be a whole number ≥ 1, not {short(variants)}"))


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
    if isinstance(value, dict) and set(value) == {"files"} and isinstance(value["files"], str):
        return _file_rows(value["files"], manifest, line, problems)
    if not isinstance(value, str):
        problems.append(Problem(name, line, 'rows: must be the path of a CSV file (relative to the manifest), or {files: "photos/*.jpg"}'))
        return []
    rows_path = manifest.parent / value
    text = read_text(rows_path, MAX_CSV_BYTES, "rows", problems, line=line, cited=name)
    if text is None:
        return []
    reader = _csv_reader(text)
    try:
        header = [h.strip() for h in reader.fieldnames or []]
    except csv.Error as exc:
        problems.append(Problem(str(rows_path), 1, f"rows: the header cannot be read as CSV: {exc}"))
        return []
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
    for row in csv_rows(reader, str(rows_path), problems):
        if None in row:
            problems.append(Problem(str(rows_path), reader.line_num, "this row has more cells than the header has columns"))
            continue
        rows.append({k: (v or "").strip() for k, v in row.items()})
    if not rows:
        problems.append(Problem(str(rows_path), 1, "rows: the file has no rows"))
    return rows


def _file_rows(pattern: str, manifest: Path, line: int, problems: list[Problem]) -> list[dict[str, Any]]:
    """``rows: {files: "photos/*.jpg"}``: a row per matching file, sorted, with vars ``file`` (``file:photos/a.jpg``), ``stem`` (``a``)."""
    base = manifest.parent
    if not pattern.strip() or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        problems.append(
            Problem(str(manifest), line, f"rows.files: must be a pattern relative to the manifest's folder, not {short(pattern)}")
        )
        return []
    found = sorted(p for p in base.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if not found:
        problems.append(Problem(str(manifest), line, f"rows.files: no file matches {pattern!r} in {base}"))
        return []
    return [{"file": "file:" + p.relative_to(base).as_posix(), "stem": p.stem} for p in found]
