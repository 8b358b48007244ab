"""Expansion: a :class:`Manifest` times its rows, matrices and variants → :class:`JobSpec` list.

Templates (``{name}`` takes a var, ``{{`` is a literal brace) are compiled once per
distinct string, so 100,000 jobs expand in about a second. A value that is exactly one
``{name}`` keeps the var's type (``duration: "{d}"`` sends ``5``, not ``"5"``).

A job is multiplied by its own matrix and variants, and by the top-level matrix vars and
``rows`` columns it uses (anywhere in its fields or its path), so a job that uses none runs
once. The number of jobs is known, and bounded, before any is built. Every result path is
checked against batchrunner's own names, the other results (one file on a case-insensitive
file system, a file where another needs a folder) and the file system's limits, so that
``plan`` refuses what ``run`` could only break on after paying.

**The job id is a contract.** ``id = sha256("batchrunner-job-v1\\0" + canonical(body) +
"\\0" + variant)``, first 20 hex digits, where ``canonical`` is the request body minus
``callBackUrl``, as JSON with sorted keys and no spaces. It depends on what is sent and on
nothing else — not the job's position, the manifest's name, its output path or its vars
— so a re-run recognises every unchanged job wherever it moved in the manifest.

A local input (``image_url: "file:photos/a.jpg"``) is hashed as its token
``batchrunner-input:<sha256 of the file>.<ext>``, never as the presigned URL sent in its
place (that URL is signed anew at every submit): a re-run with the same files keeps every
id, a replaced photo makes new jobs, and bodies without ``file:`` keep the ids they had.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import itertools
import json
import os
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from .catalog import STRINGIFIED, Catalog, Model, build_body, check_fields
from .errors import InputError, ManifestError, Problem
from .inputs import InputFile, inspect, token
from .manifest import JobDef, LineDict, Manifest
from .pipeline import Links, Ref, is_reference

DEFAULT_PATH = "{job_id}.{ext}"
EXT = "{ext}"  # kept in a spec's path until the downloaded file's real type is known
_DOT_EXT = "." + EXT
FILE_PREFIX = "file:"  # a string value naming a local file to send (relative to the manifest's folder)
SPECIAL_VARS = ("model", "variant", "job_id", "index", "ext", "step")  # step: the job's id: (else its model), unless a var says

# Bounds (the README lists them). A prompt far longer than any model reads, or a body that
# large, is a mistake, and each is stored with the job's state and sent on every retry.
MAX_PROMPT_BYTES = 100_000
MAX_BODY_BYTES = 2**20
# A plan holds its jobs in memory up to KEEP_SPECS; past that they are made again from the
# manifest at each pass (Specs), and while the plan is checked what stays in memory is ~130 bytes
# a job: the hashes that check ids and paths are unique. DEFAULT_MAX_JOBS bounds that (~260 MB),
# checked before expanding; raised with max_jobs: (or expand(max_jobs=)).
DEFAULT_MAX_JOBS = 2_000_000
KEEP_SPECS = 50_000
EXPANSION_VERSION = 1  # part of Plan.fingerprint: raise it when the same manifest would expand to other jobs
MAX_PROBLEMS = 200
# Names batchrunner writes in an output folder, which no result may take: the state folder
# .batchrunner/ and temp files (.<name>.tmp) are hidden names, refused as a class; the reports
# sit at the top; a sidecar is <result>.json, and temp or draft names end .tmp or .part.
REPORT_NAMES = ("report.json", "report.csv", "report.html")
REJECTED_DIR = "rejected"  # results rejected in review are kept aside there (see store.retake_rejected)
OWN_SUFFIXES = (".json", ".tmp", ".part")
# File-system limits, in UTF-8 bytes, with {ext} counted as its own 5 characters (the longest
# extension is 4): 255 per name, less room for the temp name (".<name>.tmp") and the sidecar
# ("<name>.json") batchrunner makes from a file's name; a whole path short enough to leave
# room for the output folder under Linux's 4,096.
MAX_SEGMENT_BYTES = 255
MAX_FILE_NAME_BYTES = 240
MAX_PATH_BYTES = 1024
_UNSAFE = re.compile(r'[<>:"|?*\\]')
_FORMATTER = string.Formatter()


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job: the exact request body, where its file goes, and the values it was made from."""

    id: str
    model: str
    modality: str
    body: dict[str, Any]
    path: str
    variant: int
    index: int
    vars: dict[str, Any]
    credits: float | None = None
    line: int | None = None
    step: str | None = None  # the job's id: in the manifest (pipelines)
    after: tuple[str, ...] = ()  # ids of the upstream jobs whose results it uses (pipelines)


@dataclass(slots=True)
class Summary:
    """What ``plan`` counts, gathered while the jobs are checked (so a streamed plan is not expanded again for it)."""

    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    modalities: Counter[str] = field(default_factory=Counter)
    credits: float | None = 0.0
    callbacks: bool = False  # some job's body carries a callBackUrl

    def as_dict(self) -> dict[str, Any]:
        return {"models": self.models, "modalities": dict(self.modalities), "credits": self.credits, "callbacks": self.callbacks}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        return cls(dict(data["models"]), Counter(data["modalities"]), data["credits"], bool(data["callbacks"]))

    def add(self, spec: JobSpec) -> None:
        row = self.models.get(spec.model)
        if row is None:
            row = self.models[spec.model] = {"jobs": 0, "modality": spec.modality, "credits_each": spec.credits, "credits": 0.0}
        row["jobs"] += 1
        row["credits"] = None if spec.credits is None or row["credits"] is None else row["credits"] + spec.credits
        self.modalities[spec.modality] += 1
        self.credits = None if spec.credits is None or self.credits is None else self.credits + spec.credits
        if not self.callbacks and "callBackUrl" in spec.body:
            self.callbacks = True


class Specs(Sequence[JobSpec]):
    """A plan's jobs when there are more than :data:`KEEP_SPECS`: made again from the manifest at each pass.

    The expansion already checked every job (``expand`` refused a bad manifest), so a pass
    only renders: the jobs come out identical and in the same order, with the same ids.
    ``len`` is known; indexing and slicing walk from the start (meant for ``specs[:10]``).
    """

    def __init__(self, expansion: _Expansion, prepared: list[_Job], count: int, summary: Summary) -> None:
        self._expansion, self._prepared, self._count, self.summary = expansion, prepared, count, summary

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[JobSpec]:
        return self._expansion.replay().stream(self._prepared)

    def tail(self, start: int) -> Iterator[JobSpec]:
        """The jobs from the ``start``-th on, the ones before skipped unmade (a resumed feed: see runner.Feed)."""
        return self._expansion.replay().stream(self._prepared, start)

    def __getitem__(self, at: Any) -> Any:
        if isinstance(at, slice):
            start, stop, step = at.indices(self._count)
            return list(itertools.islice(self.tail(start), 0, stop - start, step)) if step > 0 else list(self)[at]
        index = at + self._count if at < 0 else at
        if not 0 <= index < self._count:
            raise IndexError(at)
        return next(itertools.islice(iter(self), index, None))


@dataclass(slots=True)
class Plan:
    """The expanded manifest: specs in manifest order, warnings, and counts for ``plan``.

    ``specs`` is a list up to :data:`KEEP_SPECS` jobs, else a :class:`Specs` stream (each
    iteration expands again, in bounded memory); the counts come from the expansion then.
    """

    manifest: Manifest
    specs: Sequence[JobSpec]
    warnings: list[str] = field(default_factory=list)
    inputs: dict[str, InputFile] = field(default_factory=dict)  # token → local file, for every file: value
    input_at: tuple[str, int | None] | None = None  # (file, line) of the first file: value (what a run without storage cites)
    reference_at: tuple[str, int | None] | None = None  # (file, line) of the first {ID.url} reference (pipelines need storage too)
    # what the jobs are made from (manifest, catalog, options): equal fingerprints, equal jobs. None when
    # the manifest sends local files (their contents are known only by expanding): such a plan is always checked
    fingerprint: str | None = None

    @property
    def group_var(self) -> str | None:
        """The var a gallery groups by: the first top-level matrix var, else the first job-level one."""
        if self.manifest.matrix:
            return next(iter(self.manifest.matrix))
        for job in self.manifest.jobs:
            if isinstance(job.fields.get("matrix"), dict) and job.fields["matrix"]:
                return str(next(iter(job.fields["matrix"])))
        return None

    def summary(self) -> Summary:
        if isinstance(self.specs, Specs):
            return self.specs.summary
        summary = Summary()
        for spec in self.specs:
            summary.add(spec)
        return summary

    def by_model(self) -> dict[str, dict[str, Any]]:
        return {model: dict(row) for model, row in self.summary().models.items()}

    def by_modality(self) -> dict[str, int]:
        return dict(self.summary().modalities)

    def credits(self, specs: Sequence[JobSpec] | None = None) -> float | None:
        """Total credits of ``specs`` (default all); None when any price is unknown."""
        if specs is None:
            return self.summary().credits
        total = 0.0
        for spec in specs:
            if spec.credits is None:
                return None
            total += spec.credits
        return total

    def record(self) -> str:
        """What a state holding exactly this plan's jobs keeps of it, so that the next run of it skips the check (see ``expand``)."""
        data = {"fingerprint": self.fingerprint, "jobs": len(self.specs), "summary": self.summary().as_dict(), "warnings": self.warnings}
        return json.dumps(data, ensure_ascii=False)

    def sends_callbacks(self) -> bool:
        """Whether some job's body carries a ``callBackUrl``."""
        return self.summary().callbacks


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off while jobs are made: many short-lived objects, no cycles.

    CPython runs a collection every 700 new containers; while expanding that cost a third of
    the time. Reference counting still frees every job as soon as it is dropped.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Missing(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


Compiled = str | tuple[tuple[str, str | None], ...]


class _Over(dict[str, Any]):
    """The special vars of a path (job_id, ext…) over a job's vars, without copying the vars."""

    __slots__ = ("env",)
    env: dict[str, Any]

    def __missing__(self, name: str) -> Any:
        try:
            return self.env[name]
        except KeyError:
            raise _Missing(name) from None


class _Templates:
    """Compiled templates by source string; a broken template becomes a problem once."""

    def __init__(self) -> None:
        self.cache: dict[str, Compiled | ValueError] = {}
        self.formats: dict[str, str] = {}  # a compiled template as a str.format string: rendered by C, not a Python loop

    def format_string(self, text: str, compiled: tuple[tuple[str, str | None], ...]) -> str | None:
        """The template as a str.format string; None when a name has a dot (a reference: format would read an attribute)."""
        fmt = self.formats.get(text)
        if fmt is None:
            fmt = self.formats[text] = (
                ""
                if any(name and "." in name for _, name in compiled)
                else "".join(
                    literal.replace("{", "{{").replace("}", "}}") + ("" if name is None else "{" + name + "}") for literal, name in compiled
                )
            )
        return fmt or None

    @staticmethod
    def joined(compiled: tuple[tuple[str, str | None], ...], env: Any) -> str:
        """The template rendered name by name (what ``format_map`` does, for names it cannot parse)."""
        out = []
        for literal, name in compiled:
            out.append(literal)
            if name is not None:
                try:
                    out.append(format(env[name], ""))
                except KeyError:
                    raise _Missing(name) from None
        return "".join(out)

    def compile(self, text: str) -> Compiled:
        hit = self.cache.get(text)
        if hit is None:
            hit = self.cache[text] = self._compile(text)
        if isinstance(hit, ValueError):
            raise hit
        return hit

    @staticmethod
    def _compile(text: str) -> Compiled | ValueError:
        if "{" not in text and "}" not in text:
            return text
        try:
            parts = []
            for literal, name, spec, conversion in _FORMATTER.parse(text):
                if name is not None and (not (name.isidentifier() or is_reference(name)) or spec or conversion):
                    return ValueError(f"{{{name}}} is not a plain variable name (write {{{{ for a literal brace)")
                parts.append((literal, name))
        except ValueError as exc:
            return ValueError(f"broken template {text!r}: {exc} (write {{{{ and }}}} for literal braces)")
        return tuple(parts)

    def names(self, value: Any) -> set[str]:
        """Every var a value's templates name (a broken template names none: rendering reports it)."""
        if isinstance(value, str):
            try:
                compiled = self.compile(value)
            except ValueError:
                return set()
            return set() if isinstance(compiled, str) else {name for _, name in compiled if name}
        if isinstance(value, dict):
            return set().union(*(self.names(v) for v in value.values()))
        if isinstance(value, list):
            return set().union(*(self.names(v) for v in value))
        return set()

    def render_over(self, text: str, env: dict[str, Any], over: dict[str, Any]) -> Any:
        """``render(text, {**env, **over})`` for a template string, without making that dict (once per job: its path)."""
        compiled = self.compile(text)
        if isinstance(compiled, str):
            return compiled
        if len(compiled) == 1 and not compiled[0][0] and compiled[0][1]:
            name = compiled[0][1]
            if name in over:
                return over[name]
            if name not in env:
                raise _Missing(name)
            return env[name]
        layered = _Over(over)
        layered.env = env
        fmt = self.format_string(text, compiled)
        return fmt.format_map(layered) if fmt is not None else self.joined(compiled, layered)

    def render(self, value: Any, env: dict[str, Any]) -> Any:
        if isinstance(value, str):
            compiled = self.compile(value)
            if isinstance(compiled, str):
                return compiled
            if len(compiled) == 1 and not compiled[0][0] and compiled[0][1]:
                name = compiled[0][1]
                if name not in env:
                    raise _Missing(name)
                return env[name]  # a lone {name} keeps the var's type
            fmt = self.format_string(value, compiled)
            if fmt is None:
                return self.joined(compiled, env)
            try:  # format(v, "") is str(v) for every value a manifest holds (text, numbers, true/false, null, lists, dates)
                return fmt.format_map(env)
            except KeyError as missing:
                raise _Missing(str(missing.args[0])) from None
        if isinstance(value, dict):
            return {k: self.render(v, env) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render(v, env) for v in value]
        return value


def merge(base: dict[str, Any], over: dict[str, Any]) -> LineDict:
    """``over`` deep-merged onto ``base`` (``over`` wins); key lines follow the winning side."""
    result = LineDict(base, line=getattr(over, "line", 0) or getattr(base, "line", 0))
    result.key_lines = {**getattr(base, "key_lines", {}), **getattr(over, "key_lines", {})}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            result[key] = merge(base[key], value)
        else:
            result[key] = value
    return result


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode, with the C
# encoder made once (JSONEncoder.encode makes one per call: half the cost of a small body)
_MARKERS: dict[int, Any] = {}  # what the encoder is inside of, to refuse a circular value (a YAML alias can make one)
_C_CANONICAL = c_make_encoder(_MARKERS, _not_json, encode_basestring, None, ":", ",", True, False, True) if c_make_encoder else None
_PY_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _CANONICAL(body: dict[str, Any]) -> str:
    if _C_CANONICAL is None:
        return _PY_CANONICAL(body)
    try:
        return "".join(_C_CANONICAL(body, 0))
    except BaseException:
        _MARKERS.clear()  # an error leaves the containers it was inside of marked
        raise


_DRIVE = re.compile(r"^[A-Za-z]:")
_PLAIN_SEGMENT = r"[\w\-{}]+(?:\.[\w\-{}]+)*"  # no empty, '.', '..', hidden or dot-ended segment, nothing _UNSAFE
_PLAIN_PATH = re.compile(f"{_PLAIN_SEGMENT}(?:/{_PLAIN_SEGMENT})*")
# Characters that are refused in a path, not replaced: they hide what a name really is
# (C0/C1 controls, DEL, and the bidirectional marks and overrides that reorder what is shown).
_OWN_FOLDER = re.compile(r"\.(?:json|tmp|part)/")
_HIDING = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def canonical(body: dict[str, Any]) -> str:
    """The request body as the job id hashes it: without ``callBackUrl``, sorted keys, no spaces."""
    return _CANONICAL({k: v for k, v in body.items() if k != "callBackUrl"} if "callBackUrl" in body else body)


def job_id(body: dict[str, Any], variant: int, *, canonical_body: str | None = None) -> str:
    """The stable id of a job (see the module docstring: this is a contract)."""
    text = canonical(body) if canonical_body is None else canonical_body
    return hashlib.sha256(f"batchrunner-job-v1\0{text}\0{variant}".encode()).hexdigest()[:20]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def safe_path(path: str) -> str:
    """A result path confined to the output folder, clear of batchrunner's own names, within file-system limits.

    Raises ValueError (the reason, to follow the path in a message) for absolute paths,
    ``..``, control and bidirectional characters, hidden names, batchrunner's own names and
    names too long; characters file systems refuse (``:`` in ``1:1``, …) become ``_``.
    """
    if not _PLAIN_PATH.fullmatch(path):  # the common case is already clean
        path = _clean(path)
    low = path.lower()
    if low.startswith((*REPORT_NAMES, REJECTED_DIR)):
        first = path.split("/", 1)[0]
        if first.lower() in REPORT_NAMES:
            raise ValueError(f"is {first}, which batchrunner writes itself — choose another name")
        if first.lower() == REJECTED_DIR:
            raise ValueError(f"starts with {first}, the folder where rejected results are kept aside — choose another name")
    if low.endswith(OWN_SUFFIXES) or ("/" in low and _OWN_FOLDER.search(low)):
        segment = next(s for s in path.split("/") if s.lower().endswith(OWN_SUFFIXES))
        raise ValueError(
            f"has a name ending in {segment[segment.rindex('.') :]} ({segment}) — names ending .json, .tmp and .part "
            "are batchrunner's own (the sidecar <file>.json beside each result, temp files); use {ext} for the extension"
        )
    if len(path) > MAX_FILE_NAME_BYTES // 4 or not path.isascii():
        if _utf8_len(path) > MAX_PATH_BYTES:
            raise ValueError(f"is {_utf8_len(path)} bytes long; at most {MAX_PATH_BYTES} bytes are allowed — shorten it")
        segments = path.split("/")
        for i, segment in enumerate(segments):
            limit = MAX_FILE_NAME_BYTES if i == len(segments) - 1 else MAX_SEGMENT_BYTES
            if _utf8_len(segment) > limit:
                kind = "file name" if i == len(segments) - 1 else "folder name"
                raise ValueError(
                    f"has a {kind} of {_utf8_len(segment)} bytes ({segment[:40]}…); at most {limit} bytes are allowed "
                    "(file systems allow 255, and batchrunner adds to a file's name for its temp file and sidecar) — shorten it"
                )
    return path


def _clean(path: str) -> str:
    hiding = _HIDING.search(path)
    if hiding:
        raise ValueError(
            f"contains the character U+{ord(hiding[0]):04X} (a control or bidirectional character, which would hide "
            "what the name really is) — remove it from the values the path is made of"
        )
    path = path.replace("\\", "/")
    if path.startswith("/") or _DRIVE.match(path):
        raise ValueError("is absolute — output paths are relative to the output folder")
    parts = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            raise ValueError("uses '..' — output paths must stay inside the output folder")
        segment = _UNSAFE.sub("_", segment).rstrip(" .") or "_"
        if segment.startswith("."):
            raise ValueError(
                f"has a name starting with '.' ({segment}) — hidden names are batchrunner's own (.batchrunner/, temp files); remove the dot"
            )
        parts.append(segment)
    if not parts:
        raise ValueError("is empty")
    return "/".join(parts)


def _fold(path: str) -> str:
    """The key two paths share when one file system (macOS, Windows: case-insensitive; NFC/NFD) holds them as one."""
    return path.lower() if path.isascii() else unicodedata.normalize("NFC", path).casefold()


def _combos(matrix: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every combination of a matrix's values, one at a time (a matrix is a product, not a list)."""
    if not matrix:
        yield {}
        return
    names = list(matrix)
    for values in itertools.product(*(matrix[n] for n in names)):
        yield dict(zip(names, values, strict=True))


@dataclass(slots=True)
class _Taken:
    """The ids, folded paths, folders and literal stems taken so far, as 64-bit hashes (~70 bytes a job, not
    the keys and their specs). A hit is only a suspicion, settled exactly by making the jobs again (:meth:`_Expansion.settle`)."""

    salt: str = ""
    ids: set[int] = field(default_factory=set)
    paths: set[int] = field(default_factory=set)
    folders: set[int] = field(default_factory=set)
    stems: set[int] = field(default_factory=set)

    def key(self, text: str) -> int:
        return hash(text + self.salt) if self.salt else hash(text)


@dataclass(slots=True)
class _Suspect:
    """A job whose id or path hashed like an earlier one's: the problem's text waits for the earlier job."""

    seq: int  # the candidate's rank in the expansion (the same in every pass)
    kind: str  # twin, path, folder, stem (its {ext} may be the other's written extension), inside (a folder named like a file)
    space: str  # what the earlier job is found by: id, path, folder or stem
    key: str
    spec: JobSpec
    job: _Job
    path_names: set[str]


def _has_colon(value: Any) -> bool:
    """Whether some text among ``value``'s values (not its keys) holds a ':' (a file: value needs one)."""
    if isinstance(value, str):
        return ":" in value
    if isinstance(value, dict):
        return any(_has_colon(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_colon(v) for v in value)
    return False


def _normal_field(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {dict: "a mapping", list: "a list", bool: "true/false"}.get(type(value), type(value).__name__)


@dataclass(slots=True)
class _Job:
    """A job definition ready to expand: its merged fields and the dimensions it is multiplied by."""

    job: JobDef
    fields: LineDict
    where: str
    variants: int
    job_matrix: dict[str, list[Any]]
    job_vars: dict[str, Any]
    path_tpl: str
    path_file: str
    path_line: int | None
    top: tuple[bool, tuple[str, ...]]  # (crossed with rows, top-level matrix names it uses)
    count: int
    name: str | None = None  # its id: (pipelines)
    refs: list[Ref] = field(default_factory=list)  # its references to other jobs' results (pipelines)


class _Expansion:
    """One call of :func:`expand`: the problems and warnings found, the specs made, the paths taken."""

    def __init__(
        self, manifest: Manifest, catalog: Catalog, strict: bool, path_template: str | None, *, checking: bool = True, salt: str = ""
    ) -> None:
        self.manifest, self.catalog, self.strict, self.path_template = manifest, catalog, strict, path_template
        self.checking = checking  # False: a later pass over a checked plan, which only makes the jobs
        self.templates = _Templates()
        self.problems: dict[tuple[str, int | None, str], Problem | None] = {}  # None: a suspect's place (see settle)
        self.warnings: dict[str, None] = {}
        self.taken = _Taken(salt)
        self.suspects: list[_Suspect] = []
        self.count = 0  # jobs made (their index)
        self.seq = 0  # candidates made, good or not
        self.models: dict[str, Model | None] = {}
        self.checked_fields: set[tuple[str, str]] = set()
        self.base = Path(manifest.file).parent
        self.inspected: dict[str, tuple[tuple[int, int] | None, InputFile | InputError]] = {}
        self.inputs: dict[str, InputFile] = {}  # token → file, every local input of the plan
        self.input_at: tuple[str, int | None] | None = None  # (file, line) of the first file: value
        self.links = Links(self)  # pipelines: references between jobs
        self.reference_at: tuple[str, int | None] | None = None  # (file, line) of the first reference
        self.key = "model"  # the field being rendered, for a problem's line

    def replay(self) -> _Expansion:
        """A pass that makes the jobs again, unchecked, sharing this one's caches (compiled templates, models, inspected files)."""
        again = _Expansion(self.manifest, self.catalog, self.strict, self.path_template, checking=False)
        again.templates, again.models, again.inspected = self.templates, self.models, self.inspected
        again.checked_fields = self.checked_fields
        again.links = self.links  # pipelines: the jobs' names and upstream ids (a replay links nothing itself)
        return again

    def stream(self, prepared: list[_Job], start: int = 0) -> Iterator[JobSpec]:
        """The jobs, from the ``start``-th on (only a pass over a checked plan may start past 0: every candidate is a job)."""
        for job in prepared:
            if start >= job.count:
                start -= job.count
                self.count += job.count
                continue
            yield from self.expand_job(job, start)
            start = 0

    def local_inputs(self, value: Any, file: str, line: int | None, where: str) -> Any:
        """``value`` with each ``file:PATH`` string replaced by the file's token (:func:`inputs.token`); a bad file is a problem."""
        if isinstance(value, dict):
            return {k: self.local_inputs(v, file, line, where) for k, v in value.items()}
        if isinstance(value, list):
            return [self.local_inputs(v, file, line, where) for v in value]
        if not isinstance(value, str) or not value.startswith(FILE_PREFIX):
            return value
        if self.input_at is None:
            self.input_at = (file, line)
        found = self.inspect(value[len(FILE_PREFIX) :])
        if isinstance(found, InputError):
            self.problem(file, line, f"{where}: {found.message}")
            return value
        name = token(found)
        self.inputs.setdefault(name, found)
        return name

    def inspect(self, name: str) -> InputFile | InputError:
        """:func:`inputs.inspect`, once per file (path, size, mtime) within one expansion."""
        path = self.base / name.strip()
        key = str(path)
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        hit = self.inspected.get(key)
        if hit is not None and hit[0] == stamp and stamp is not None:
            return hit[1]
        try:
            found: InputFile | InputError = inspect(path)
        except InputError as exc:
            found = exc
        self.inspected[key] = (stamp, found)
        return found

    def problem(self, file: str, line: int | None, message: str) -> None:
        if self.checking and len(self.problems) < MAX_PROBLEMS:
            self.problems.setdefault((file, line, message), Problem(file, line, message))

    def warn(self, file: str, line: int | None, message: str) -> None:
        self.warnings[f"{file}:{line}: {message}" if line else f"{file}: {message}"] = None

    # -- before expanding: every job's dimensions, so the count is known before anything is built --
    def prepare(self) -> list[_Job]:
        manifest = self.manifest
        row_names = set(manifest.rows[0]) if manifest.rows else set()
        prepared = []
        for job in manifest.jobs:
            fields = merge(manifest.defaults, job.fields)
            where = f"jobs[{job.index}]"
            if not fields.get("model"):
                self.problem(job.file, fields.line, f"{where}: no model — add 'model:' to the job or to defaults")
                continue
            variants = fields.get("variants", 1)
            if isinstance(variants, bool) or not isinstance(variants, int) or variants < 1:
                self.problem(job.file, fields.line_of("variants"), f"{where}.variants: must be a whole number ≥ 1, not {variants!r}")
                continue
            job_vars = dict(fields.get("vars") or {})
            job_matrix = {k: v if isinstance(v, list) else [v] for k, v in (fields.get("matrix") or {}).items()}
            path_tpl = self.path_template or fields.get("path") or manifest.path or DEFAULT_PATH
            path_file: str = job.file
            path_line: int | None = fields.line_of("path")
            if "path" not in fields or self.path_template:
                path_file, path_line = manifest.file, manifest.line_of("path")
            if not isinstance(path_tpl, str):
                self.problem(path_file, path_line, f'{where}.path: must be a path template such as "{{product}}/{{variant}}.{{ext}}"')
                continue
            used = self.templates.names({k: v for k, v in fields.items() if k not in ("vars", "matrix", "variants")})
            used |= self.templates.names(path_tpl)
            own = set(job_vars) | set(job_matrix)
            top_used = tuple(name for name in manifest.matrix if name in used and name not in own)
            uses_rows = bool(row_names & (used - own - set(manifest.matrix)))
            count = (len(manifest.rows) if uses_rows else 1) * variants
            for name in top_used:
                count *= len(manifest.matrix[name])
            for values in job_matrix.values():
                count *= len(values)
            prepared.append(
                _Job(job, fields, where, variants, job_matrix, job_vars, path_tpl, path_file, path_line, (uses_rows, top_used), count)
            )
        self.lookalike_fields(prepared)
        return self.links.link(prepared)

    def lookalike_fields(self, prepared: list[_Job]) -> None:
        """Warn once about input fields spelt two ways in one manifest (aspect_ratio, aspectratio)."""
        spellings: dict[str, dict[str, tuple[str, int]]] = {}
        for job in prepared:
            inputs = job.fields.get("input")
            if isinstance(inputs, dict):
                for name in inputs:
                    line = inputs.line_of(name) if isinstance(inputs, LineDict) else job.fields.line
                    spellings.setdefault(_normal_field(name), {}).setdefault(name, (job.job.file, line))
        for names in spellings.values():
            if len(names) > 1:
                (file, line), *_ = names.values()
                written = ", ".join(f"{n} (line {ln})" for n, (_, ln) in names.items())
                self.warn(file, line, f"input fields spelt several ways: {written} — if one is misspelt, the model may ignore it")

    # -- expanding ------------------------------------------------------------------------
    def model(self, name: str, job: _Job) -> Model | None:
        if name in self.models:
            return self.models[name]
        model = self.models[name] = self.catalog.get(name)
        file, line = job.job.file, job.fields.line_of("model")
        if model is None:
            close = difflib.get_close_matches(name, list(self.catalog.models), n=1, cutoff=0.75)
            hint = f" — did you mean {close[0]!r}?" if close else " — check the spelling, or add it with --catalog FILE"
            text = f"model {name!r} is not in the catalog{hint}"
            if self.strict:
                self.problem(file, line, f"{job.where}.model: {text}")
            else:
                self.warn(file, line, f"{text}{' It' if close else '; it'} will be sent as written")
        elif model.alias_of:
            self.warn(file, line, f"{name} is an alias of {model.alias_of}; prefer {model.alias_of} for new work")
        return model

    def check_field_names(self, job: _Job, model: Model | None, model_name: str, inputs: dict[str, Any]) -> None:
        """Warn (once per model and field) about a field its model's known parameters do not name."""
        for name in inputs:
            if (model_name, name) in self.checked_fields:
                continue
            self.checked_fields.add((model_name, name))
            inputs_def = job.fields.get("input")
            line = inputs_def.line_of(name) if isinstance(inputs_def, LineDict) and name in inputs_def else job.fields.line
            if model is not None and model.parameters and name not in model.parameters and name != "prompt":
                close = difflib.get_close_matches(name, list(model.parameters), n=1, cutoff=0.75)
                hint = f"did you mean {close[0]!r}?" if close else f"its parameters: {', '.join(model.parameters)}"
                self.warn(
                    job.job.file, line, f"{job.where}.input.{name}: {model_name} has no parameter {name!r} in {model.source} — {hint}"
                )
            elif name != "prompt" and difflib.get_close_matches(name, ["prompt"], n=1, cutoff=0.8):
                self.warn(job.job.file, line, f"{job.where}.input.{name}: did you mean 'prompt'? It will be sent as written")

    def expand_job(self, job: _Job, skip: int = 0) -> Iterator[JobSpec]:
        """The job definition's jobs, one at a time (a checking pass yields only the good ones), past the first ``skip``."""
        manifest, templates, fields, file, where = self.manifest, self.templates, job.fields, job.job.file, job.where
        uses_rows, top_used = job.top
        matrix = {name: manifest.matrix[name] for name in top_used}
        callback = fields.get("callback_url", manifest.callback_url)
        path_names = templates.names(job.path_tpl)
        named: set[str] = set()
        base_vars, job_vars = manifest.vars, job.job_vars
        # a file: value can only come from a ':' in a field (the prompt aside) or in a var's value
        sources = ([v for k, v in fields.items() if k != "prompt"], manifest.vars, job_vars, job.job_matrix, matrix)
        maybe_files = _has_colon(sources) or (uses_rows and _has_colon(manifest.rows))
        rows = manifest.rows if uses_rows else [{}]
        model_tpl, input_tpl, prompt_tpl = fields["model"], fields.get("input") or {}, fields.get("prompt")
        has_prompt = "prompt" in fields
        stringified_keys = [key for key in STRINGIFIED if key in fields]
        prices: dict[str, float | None] = {}
        pairs: Iterator[tuple[dict[str, Any], dict[str, Any]]] = (
            ({**row, **combo} if row else combo, jc) for row in rows for combo in _combos(matrix) for jc in _combos(job.job_matrix)
        )
        first_variant = 1
        if skip:  # combinations are skipped unmade (each makes `variants` jobs); the index follows
            pairs = itertools.islice(pairs, skip // job.variants, None)
            first_variant += skip % job.variants
            self.count += skip
        for top, jc in pairs:
            if len(self.problems) >= MAX_PROBLEMS:
                return
            env = {**base_vars, **top, **jc, **job_vars} if base_vars or job_vars or jc else top
            key = "model"
            after: tuple[str, ...] = ()
            renv = env
            try:
                if job.refs:  # pipelines: the upstream results this cell uses, as tokens naming their ids
                    refs, upstream = self.links.values(job, env)
                    after, renv = tuple(upstream), {**env, **refs}
                    if self.reference_at is None and after:
                        self.reference_at = (file, fields.line_of(job.refs[0].key))
                model_name = str(templates.render(model_tpl, renv))
                model = self.model(model_name, job)
                key = "input"
                inputs = templates.render(input_tpl, renv) if input_tpl else {}
                if has_prompt:
                    key = "prompt"
                    inputs["prompt"] = templates.render(prompt_tpl, renv)
                stringified = {}
                for key in stringified_keys:
                    value = templates.render(fields[key], renv)
                    stringified[key] = [value] if isinstance(value, str) and key != "options" else value
                key = "callback_url"
                cb = templates.render(callback, renv) if callback else None
                if maybe_files and FILE_PREFIX in repr((inputs, stringified)):
                    inputs = {
                        k: v if k == "prompt" else self.local_inputs(v, file, fields.line_of("input"), f"{where}.input.{k}")
                        for k, v in inputs.items()
                    }
                    stringified = {k: self.local_inputs(v, file, fields.line_of(k), f"{where}.{k}") for k, v in stringified.items()}
            except _Missing as missing:
                defined = ", ".join(sorted(env)) or "none"
                self.problem(file, fields.line_of(key), f"{where}.{key} uses {{{missing.name}}}, which is not defined (defined: {defined})")
                continue
            except ValueError as exc:
                key = exc.args[1] if len(exc.args) > 1 else key  # a reference names the field it is in
                self.problem(file, fields.line_of(key), f"{where}.{key}: {exc.args[0]}")
                continue
            prompt = inputs.get("prompt")
            if not (type(prompt) is str and len(prompt) <= MAX_PROMPT_BYTES // 4) and not self.check_prompt(job, inputs):
                return  # the same problem would repeat for every combination
            if model_name not in named:  # a job's field names are the same in every combination
                named.add(model_name)
                self.check_field_names(job, model, model_name, inputs)
            if model is not None and (model.required or model.enums):
                for text in check_fields(model, inputs):
                    self.problem(file, fields.line_of("input") if "input" in fields else fields.line, f"{where}: {text}")
            body = build_body(model_name, bool(model and model.root_only), inputs, stringified, cb)
            canon = canonical(body)
            if len(canon) > MAX_BODY_BYTES // 4 and _utf8_len(canon) > MAX_BODY_BYTES:
                size = _utf8_len(canon)
                self.problem(
                    file, fields.line, f"{where}: the request would be {size:,} bytes; at most {MAX_BODY_BYTES:,} — shorten its fields"
                )
                return
            if model_name in prices:
                price = prices[model_name]
            else:
                price = prices[model_name] = manifest.credits.get(model_name, model.credits if model else None)
            for variant in range(first_variant, job.variants + 1):
                spec = self.add(job, env, model_name, model, body, canon, variant, price, path_names, after)
                if spec is not None:
                    yield spec
            first_variant = 1

    def render_cell(self, job: _Job, env: dict[str, Any]) -> tuple[str, Model | None, dict[str, Any], dict[str, Any], Any]:
        """One cell's model, model fields, stringified fields and callback URL; ``self.key`` names the field being rendered."""
        templates, fields, file, where = self.templates, job.fields, job.job.file, job.where
        self.key = "model"
        model_name = str(templates.render(fields["model"], env))
        model = self.model(model_name, job)
        self.key = "input"
        inputs = templates.render(fields.get("input") or {}, env)
        if "prompt" in fields:
            self.key = "prompt"
            inputs["prompt"] = templates.render(fields["prompt"], env)
        stringified = {}
        for key in STRINGIFIED:
            if key in fields:
                self.key = key
                value = templates.render(fields[key], env)
                stringified[key] = [value] if isinstance(value, str) and key != "options" else value
        self.key = "callback_url"
        callback = fields.get("callback_url", self.manifest.callback_url)
        cb = templates.render(callback, env) if callback else None
        if FILE_PREFIX in repr((inputs, stringified)):
            inputs = {
                k: v if k == "prompt" else self.local_inputs(v, file, fields.line_of("input"), f"{where}.input.{k}")
                for k, v in inputs.items()
            }
            stringified = {k: self.local_inputs(v, file, fields.line_of(k), f"{where}.{k}") for k, v in stringified.items()}
        return model_name, model, inputs, stringified, cb

    def cell_id(self, job: _Job, env: dict[str, Any], variant: int) -> str:
        """The id of ``job``'s job for the cell ``env`` and ``variant`` (what a reference to it hashes; see pipeline.py)."""
        if job.refs:
            refs, _ = self.links.values(job, env)
            env = {**env, **refs}
        model_name, model, inputs, stringified, cb = self.render_cell(job, env)
        prompt = inputs.get("prompt")
        if isinstance(prompt, int | float) and not isinstance(prompt, bool):
            inputs["prompt"] = str(prompt)  # as check_prompt does
        return job_id(build_body(model_name, bool(model and model.root_only), inputs, stringified, cb), variant)

    def check_prompt(self, job: _Job, inputs: dict[str, Any]) -> bool:
        """A prompt is text (a number becomes its text) of at most MAX_PROMPT_BYTES; False after a problem."""
        prompt = inputs.get("prompt")
        if (type(prompt) is str and len(prompt) <= MAX_PROMPT_BYTES // 4) or "prompt" not in inputs:
            return True
        fields = job.fields
        line = fields.line_of("prompt") if "prompt" in fields else fields.line_of("input")
        if isinstance(prompt, int | float) and not isinstance(prompt, bool):
            inputs["prompt"] = prompt = str(prompt)
        if not isinstance(prompt, str):
            self.problem(job.job.file, line, f"{job.where}.prompt: must be text, not {_kind(prompt)} — write it as one string")
            return False
        if len(prompt) > MAX_PROMPT_BYTES // 4 and _utf8_len(prompt) > MAX_PROMPT_BYTES:
            self.problem(
                job.job.file,
                line,
                f"{job.where}.prompt: is {_utf8_len(prompt):,} bytes long; at most {MAX_PROMPT_BYTES:,} are allowed — shorten it",
            )
            return False
        return True

    def add(
        self,
        job: _Job,
        env: dict[str, Any],
        model_name: str,
        model: Model | None,
        body: dict[str, Any],
        text: str,
        variant: int,
        price: float | None,
        path_names: set[str],
        after: tuple[str, ...] = (),
    ) -> JobSpec | None:
        """The job, or None after a problem (a checking pass also refuses an id or a path already taken)."""
        self.seq += 1
        jid = job_id(body, variant, canonical_body=text)
        index = self.count
        try:
            specials = {"model": model_name, "variant": variant, "job_id": jid, "index": index, "ext": EXT}
            if "step" not in env:  # {step}: the job's id (else its model); a var named step wins
                specials["step"] = job.name or model_name
            rel = self.templates.render_over(job.path_tpl, env, specials)
            rel = safe_path(str(rel))
        except _Missing as missing:
            defined = ", ".join(sorted([*env, *SPECIAL_VARS]))
            self.problem(job.path_file, job.path_line, f"path uses {{{missing.name}}}, which is not defined (defined: {defined})")
            return None
        except ValueError as exc:
            shown = job.path_tpl if len(job.path_tpl) <= 80 else job.path_tpl[:79] + "…"
            self.problem(job.path_file, job.path_line, f"path {shown!r} {exc}")
            return None
        spec = JobSpec(
            jid, model_name, model.modality if model else "unknown", body, rel, variant, index, env, price, job.fields.line, job.name, after
        )
        if self.checking and not self.unique(spec, job, path_names):
            return None
        self.count += 1
        return spec

    def unique(self, spec: JobSpec, job: _Job, path_names: set[str]) -> bool:
        """Take the job's id, path and folders; False (a suspect, see :meth:`settle`) when one is taken already."""
        taken, rel = self.taken, spec.path
        h = taken.key if taken.salt else hash
        if h(spec.id) in taken.ids:
            return self.suspect("twin", "id", spec.id, spec, job, path_names)
        key = _fold(rel)
        hkey = h(key)
        if hkey in taken.paths:
            return self.suspect("path", "path", key, spec, job, path_names)
        if hkey in taken.folders:
            return self.suspect("folder", "folder", key, spec, job, path_names)
        # x.{ext} becomes x.png for a PNG: it may meet a path written with its extension
        literal_stem = None
        if rel.endswith(_DOT_EXT):
            if taken.stems and h(key[: -len(_DOT_EXT)]) in taken.stems:
                return self.suspect("stem", "stem", key[: -len(_DOT_EXT)], spec, job, path_names)
        elif rel.rfind(".") > rel.rfind("/"):
            literal_stem = _fold(rel[: rel.rfind(".")])
            if h(literal_stem + _DOT_EXT) in taken.paths:
                return self.suspect("stem", "path", literal_stem + _DOT_EXT, spec, job, path_names)
        folders = _folders(rel)
        for folder in folders:
            if h(folder) in taken.paths:
                return self.suspect("inside", "path", folder, spec, job, path_names)
        for folder in folders:
            taken.folders.add(h(folder))
        if literal_stem is not None:
            taken.stems.add(h(literal_stem))
        taken.ids.add(h(spec.id))
        taken.paths.add(hkey)
        return True

    def suspect(self, kind: str, space: str, key: str, spec: JobSpec, job: _Job, path_names: set[str]) -> bool:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems[("", self.seq, kind)] = None  # keeps the problem's place among the others
            self.suspects.append(_Suspect(self.seq, kind, space, key, spec, job, path_names))
        return False

    def settle(self, prepared: list[_Job]) -> bool:
        """Turn each suspect into its problem, naming the earlier job it met (found by making the jobs again).

        False when a suspect meets no earlier job: two different keys had one hash (about one
        chance in 10¹⁰ for a million jobs), and the expansion must be checked again with another salt.
        """
        wanted = {(s.space, s.key): s.seq for s in self.suspects}
        last = max(s.seq for s in self.suspects)
        found: dict[tuple[str, str], JobSpec] = {}
        again = self.replay()
        for spec in again.stream(prepared):
            if again.seq >= last:
                break
            rel = spec.path
            stem = _fold(rel[: rel.rfind(".")]) if not rel.endswith(_DOT_EXT) and rel.rfind(".") > rel.rfind("/") else ""
            keys = [("id", spec.id), ("path", _fold(rel)), *(("folder", f) for f in _folders(rel)), ("stem", stem)]
            for space_key in keys:
                if space_key in wanted and space_key not in found and again.seq < wanted[space_key]:
                    found[space_key] = spec
        messages: dict[int, Problem] = {}
        for s in self.suspects:
            other = found.get((s.space, s.key))
            if other is None:
                return False
            messages[s.seq] = Problem(s.job.job.file, s.job.fields.line, _clash(s, other))
        problems: dict[tuple[str, int | None, str], Problem | None] = {}
        for place, problem in self.problems.items():
            if problem is None:
                problem = messages[int(place[1] or 0)]
                place = (problem.file, problem.line, problem.message)
            problems.setdefault(place, problem)
        self.problems = problems
        return True


def _folders(path: str) -> list[str]:
    """The folded folders a path is inside of."""
    return [_fold(path[:i]) for i in _slashes(path)] if "/" in path else []


def _clash(s: _Suspect, other: JobSpec) -> str:
    where, rel = s.job.where, s.spec.path
    if s.kind == "twin":
        return (
            f"{where} sends the same request as the job on line {other.line} (id {s.spec.id}) — it would be paid twice "
            "for the same result; use 'variants:' for copies or make them differ"
        )
    if s.kind == "path":
        case = "" if other.path == rel else f" (its path {other.path} differs only in letter case: one file on macOS and Windows)"
        return f"{where} writes to {rel}, as does the job on line {other.line}{case}; {_differ(s.spec, other, s.path_names)}"
    if s.kind == "folder":
        return (
            f"{where} writes a file at {rel}, where the job on line {other.line} needs a folder (it writes {other.path}) — "
            "a name cannot be both; change one of the paths"
        )
    if s.kind == "stem":
        return (
            f"{where} writes to {rel}, and the job on line {other.line} writes {other.path}: they are one file whenever "
            "the result has that extension — give them different names"
        )
    return (
        f"{where} writes {rel}, inside a folder named like the file the job on line {other.line} writes ({other.path}) — "
        "a name cannot be both; change one of the paths"
    )


_NOTHING = object()


def _slashes(path: str) -> list[int]:
    found, at = [], path.find("/")
    while at >= 0:
        found.append(at)
        at = path.find("/", at + 1)
    return found


def _differ(spec: JobSpec, other: JobSpec, path_names: set[str]) -> str:
    """What tells two jobs with one path apart, to put in the path."""
    mine = {**spec.vars, "model": spec.model, "variant": spec.variant}
    theirs = {**other.vars, "model": other.model, "variant": other.variant}
    differ = [name for name in dict.fromkeys([*mine, *theirs]) if mine.get(name, _NOTHING) != theirs.get(name, _NOTHING)]
    missing = [name for name in differ if name not in path_names]
    if missing:
        names = ", ".join(f"{{{name}}}" for name in missing[:3])
        return f"they differ in {names} — add {'it' if len(missing) == 1 else 'one of them'} to 'path'"
    if differ:
        names = ", ".join(f"{{{name}}}" for name in differ[:3])
        return (
            f"their {names} differ, yet give the same file name (characters file systems refuse become '_', letter case "
            "is ignored) — make the values differ more, or add {job_id} to 'path'"
        )
    return "nothing in their vars differs — add {job_id} to 'path', or give each job its own 'path:'"


def _fingerprint(manifest: Manifest, catalog: Catalog, strict: bool, path_template: str | None) -> str | None:
    """What the jobs are made from, hashed (see :attr:`Plan.fingerprint`)."""
    made_of = repr((EXPANSION_VERSION, manifest, sorted(catalog.models.items()), strict, path_template))
    if FILE_PREFIX in made_of:
        return None
    return hashlib.sha256(made_of.encode("utf-8", "surrogatepass")).hexdigest()


def _trusted(checked: str | None, fingerprint: str | None) -> tuple[int, dict[str, Any], list[str]] | None:
    """(jobs, summary, warnings) of a state's record of this very plan; None for any other plan, or a record it cannot read."""
    if checked is None or fingerprint is None:
        return None
    try:
        data = json.loads(checked)
        if data["fingerprint"] != fingerprint:
            return None
        Summary.from_dict(data["summary"])
        return int(data["jobs"]), dict(data["summary"]), [str(w) for w in data["warnings"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def expand(
    manifest: Manifest,
    catalog: Catalog,
    *,
    strict: bool = False,
    path_template: str | None = None,
    max_jobs: int | None = None,
    keep_specs: int = KEEP_SPECS,
    checked: str | None = None,
) -> Plan:
    """Every job of the manifest, validated against the catalog. Raises :class:`ManifestError` with every problem.

    ``max_jobs`` (default: the manifest's ``max_jobs``, else :data:`DEFAULT_MAX_JOBS`) bounds the
    number of jobs; it is checked before any job is built. Warnings travel with the error too.
    ``checked`` is the :meth:`Plan.record` an output folder's state keeps of the plan it holds
    (``store.SYNCED_META``): when it is this very plan (same fingerprint, same number of jobs), the
    jobs were checked when they went into the state, and are not checked again — a resume of a
    million jobs starts in seconds. Up to ``keep_specs`` jobs the plan holds them in a list; past that, ``plan.specs`` makes them
    again at each pass (:class:`Specs`) and memory stays flat in the campaign's size.
    """
    fingerprint = _fingerprint(manifest, catalog, strict, path_template)
    trusted = _trusted(checked, fingerprint)
    salt = ""
    while True:
        expansion = _Expansion(manifest, catalog, strict, path_template, salt=salt)
        prepared = expansion.prepare()
        limit = max_jobs or manifest.max_jobs or DEFAULT_MAX_JOBS
        total = sum(job.count for job in prepared)
        kept: list[JobSpec] | None = []
        summary = Summary()
        if total > limit:
            line = manifest.line_of("max_jobs") or manifest.line_of("matrix") or manifest.line_of("jobs")
            expansion.problem(
                manifest.file,
                line,
                f"the manifest makes {total:,} jobs, more than the limit of {limit:,} — raise it with 'max_jobs:' in the manifest, "
                "or split the campaign",
            )
        elif trusted is not None and trusted[0] == total and not expansion.problems:
            summary = Summary.from_dict(trusted[1])  # this very plan is in the state, checked: its jobs are made as needed
            expansion.count, expansion.warnings, kept = total, dict.fromkeys(trusted[2]), None
        else:
            with paused_gc():
                specs_made = expansion.stream(prepared)
                for spec in specs_made:
                    summary.add(spec)
                    if kept is not None:
                        kept = kept if len(kept) < keep_specs else None
                        if kept is not None:
                            kept.append(spec)
        if not expansion.suspects or expansion.settle(prepared):
            break
        salt = f"\0{len(salt) + 1}"  # a false alarm: check again with other hashes
    if expansion.problems:
        raise ManifestError([p for p in expansion.problems.values() if p is not None], list(expansion.warnings))
    expansion.taken, expansion.suspects = _Taken(), []  # a later pass does not check: the hashes' memory goes back now
    specs: Sequence[JobSpec] = kept if kept is not None else Specs(expansion, prepared, expansion.count, summary)
    return Plan(
        manifest, specs, list(expansion.warnings), expansion.inputs, expansion.input_at,
        reference_at=expansion.reference_at, fingerprint=fingerprint,
    )  # fmt: skip
