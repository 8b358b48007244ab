"""Expansion: a :class:`Manifest` times its rows, matrices and variants → :class:`JobSpec` list.

Templates (``{name}`` takes a var, ``{{`` is a literal brace) are compiled once per
distinct string, so 100,000 jobs expand in about a second. A value that is exactly one
``{name}`` keeps the var's type (``duration: "{d}"`` sends ``5``, not ``"5"``).

**The job id is a contract.** ``id = sha256("batchrunner-job-v1\\0" + canonical(body) +
"\\0" + variant)``, first 20 hex digits, where ``canonical`` is the request body minus
``callBackUrl``, as JSON with sorted keys and no spaces. It depends on what is sent and on
nothing else — not the job's position, the manifest's name, its output path or its vars
— so a re-run recognises every unchanged job wherever it moved in the manifest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .catalog import STRINGIFIED, Catalog, Model, build_body, check_fields
from .errors import ManifestError, Problem
from .manifest import LineDict, Manifest

DEFAULT_PATH = "{job_id}.{ext}"
EXT = "{ext}"  # kept in a spec's path until the downloaded file's real type is known
SPECIAL_VARS = ("model", "variant", "job_id", "index", "ext")
_UNSAFE = re.compile(r'[<>:"|?*\\\x00-\x1f]')
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


@dataclass(slots=True)
class Plan:
    """The expanded manifest: specs in manifest order, warnings, and counts for ``plan``."""

    manifest: Manifest
    specs: list[JobSpec]
    warnings: list[str] = field(default_factory=list)

    @property
    def group_var(self) -> str | None:
        """The var a gallery groups by: the first top-level matrix var, else the first job-level one."""
        if self.manifest.matrix:
            return next(iter(self.manifest.matrix))
        for job in self.manifest.jobs:
            if isinstance(job.fields.get("matrix"), dict) and job.fields["matrix"]:
                return str(next(iter(job.fields["matrix"])))
        return None

    def by_model(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for spec in self.specs:
            row = out.setdefault(spec.model, {"jobs": 0, "modality": spec.modality, "credits_each": spec.credits, "credits": 0.0})
            row["jobs"] += 1
            row["credits"] = None if spec.credits is None or row["credits"] is None else row["credits"] + spec.credits
        return out

    def by_modality(self) -> dict[str, int]:
        return dict(Counter(spec.modality for spec in self.specs))

    def credits(self, specs: list[JobSpec] | None = None) -> float | None:
        """Total credits of ``specs`` (default all); None when any price is unknown."""
        total = 0.0
        for spec in self.specs if specs is None else specs:
            if spec.credits is None:
                return None
            total += spec.credits
        return total


class _Missing(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


Compiled = str | tuple[tuple[str, str | None], ...]


class _Templates:
    """Compiled templates by source string; a broken template becomes a problem once."""

    def __init__(self) -> None:
        self.cache: dict[str, Compiled | ValueError] = {}

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
                if name is not None and (not name.isidentifier() or spec or conversion):
                    return ValueError(f"{{{name}}} is not a plain variable name (write {{{{ for a literal brace)")
                parts.append((literal, name))
        except ValueError as exc:
            return ValueError(f"broken template {text!r}: {exc} (write {{{{ and }}}} for literal braces)")
        return tuple(parts)

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
            out = []
            for literal, field_name in compiled:
                out.append(literal)
                if field_name is not None:
                    if field_name not in env:
                        raise _Missing(field_name)
                    out.append(str(env[field_name]))
            return "".join(out)
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


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_DRIVE = re.compile(r"^[A-Za-z]:")
_PLAIN_SEGMENT = r"[\w\-{}]+(?:\.[\w\-{}]+)*"  # no empty, '.', '..' or dot-ended segment, nothing _UNSAFE
_PLAIN_PATH = re.compile(f"{_PLAIN_SEGMENT}(?:/{_PLAIN_SEGMENT})*")


def job_id(body: dict[str, Any], variant: int) -> str:
    """The stable id of a job (see the module docstring: this is a contract)."""
    canonical = _CANONICAL({k: v for k, v in body.items() if k != "callBackUrl"} if "callBackUrl" in body else body)
    return hashlib.sha256(f"batchrunner-job-v1\0{canonical}\0{variant}".encode()).hexdigest()[:20]


def safe_path(path: str) -> str:
    """A relative path confined to the output folder; raises ValueError for absolute paths and ``..``."""
    if _PLAIN_PATH.fullmatch(path):  # the common case, already safe: skip the segment-by-segment clean-up
        return path
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
        parts.append(segment)
    if not parts:
        raise ValueError("is empty")
    return "/".join(parts)


def _combos(matrix: dict[str, list[Any]]) -> list[dict[str, Any]]:
    if not matrix:
        return [{}]
    names = list(matrix)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(matrix[n] for n in names))]


def expand(manifest: Manifest, catalog: Catalog, *, strict: bool = False, path_template: str | None = None) -> Plan:
    """Every job of the manifest, validated against the catalog. Raises :class:`ManifestError` with every problem."""
    templates = _Templates()
    problems: dict[tuple[str, int | None, str], Problem] = {}
    warnings: dict[str, None] = {}
    specs: list[JobSpec] = []
    seen_ids: dict[str, JobSpec] = {}
    seen_paths: dict[str, JobSpec] = {}
    models: dict[str, Model | None] = {}
    top_combos = [{**row, **combo} for row in (manifest.rows or [{}]) for combo in _combos(manifest.matrix)]

    def problem(file: str, line: int | None, message: str) -> None:
        if len(problems) < 200:
            problems.setdefault((file, line, message), Problem(file, line, message))

    for job in manifest.jobs:
        fields = merge(manifest.defaults, job.fields)
        where = f"jobs[{job.index}]"
        file = job.file
        if not fields.get("model"):
            problem(file, fields.line, f"{where}: no model — add 'model:' to the job or to defaults")
            continue
        job_vars = fields.get("vars") or {}
        job_matrix = {k: v if isinstance(v, list) else [v] for k, v in (fields.get("matrix") or {}).items()}
        variants = fields.get("variants", 1)
        if not isinstance(variants, int) or variants < 1:
            problem(file, fields.line_of("variants"), f"{where}.variants: must be a whole number ≥ 1, not {variants!r}")
            continue
        job_combos = _combos(job_matrix)
        path_tpl = path_template or fields.get("path") or manifest.path or DEFAULT_PATH
        path_file, path_line = (
            (file, fields.line_of("path")) if "path" in fields and not path_template else (manifest.file, manifest.line_of("path"))
        )
        callback = fields.get("callback_url", manifest.callback_url)
        for top in top_combos:
            for jc in job_combos:
                env = {**manifest.vars, **top, **jc, **job_vars}
                key = "model"
                try:
                    model_name = str(templates.render(fields["model"], env))
                    seen = model_name in models
                    model = models[model_name] = models[model_name] if seen else catalog.get(model_name)
                    if not seen:
                        if model is None:
                            text = f"model {model_name!r} is not in the catalog — check the spelling, or add it with --catalog FILE"
                            if strict:
                                problem(file, fields.line_of("model"), f"{where}.model: {text}")
                            else:
                                warnings[f"{file}:{fields.line_of('model')}: {text}; it will be sent as written"] = None
                        elif model.alias_of:
                            warnings[
                                f"{file}:{fields.line_of('model')}: {model_name} is an alias of {model.alias_of}; "
                                f"prefer {model.alias_of} for new work"
                            ] = None
                    key = "input"
                    inputs = templates.render(fields.get("input") or {}, env)
                    if "prompt" in fields:
                        key = "prompt"
                        inputs["prompt"] = templates.render(fields["prompt"], env)
                    stringified = {}
                    for key in STRINGIFIED:
                        if key in fields:
                            value = templates.render(fields[key], env)
                            stringified[key] = [value] if isinstance(value, str) and key != "options" else value
                    key = "callback_url"
                    cb = templates.render(callback, env) if callback else None
                except _Missing as missing:
                    defined = ", ".join(sorted(env)) or "none"
                    problem(file, fields.line_of(key), f"{where}.{key} uses {{{missing.name}}}, which is not defined (defined: {defined})")
                    continue
                except ValueError as exc:
                    problem(file, fields.line_of(key), f"{where}.{key}: {exc}")
                    continue
                if model is not None:
                    for text in check_fields(model, inputs):
                        problem(file, fields.line_of("input") if "input" in fields else fields.line, f"{where}: {text}")
                body = build_body(model_name, bool(model and model.root_only), inputs, stringified, cb)
                price = manifest.credits.get(model_name, model.credits if model else None)
                for variant in range(1, variants + 1):
                    jid = job_id(body, variant)
                    index = len(specs)
                    try:
                        rel = templates.render(
                            path_tpl, {**env, "model": model_name, "variant": variant, "job_id": jid, "index": index, "ext": EXT}
                        )
                        rel = safe_path(str(rel))
                    except _Missing as missing:
                        defined = ", ".join(sorted([*env, *SPECIAL_VARS]))
                        problem(path_file, path_line, f"path uses {{{missing.name}}}, which is not defined (defined: {defined})")
                        continue
                    except ValueError as exc:
                        problem(path_file, path_line, f"path {path_tpl!r} {exc}")
                        continue
                    spec = JobSpec(
                        jid, model_name, model.modality if model else "unknown", body, rel, variant, index, env, price, fields.line
                    )
                    twin = seen_ids.get(jid)
                    if twin is not None:
                        problem(
                            file,
                            fields.line,
                            f"{where} sends the same request as the job on line {twin.line} (id {jid}) — it would be paid twice "
                            "for the same result; use 'variants:' for copies or make them differ",
                        )
                        continue
                    other = seen_paths.get(rel)
                    if other is not None:
                        problem(
                            file,
                            fields.line,
                            f"{where} writes to {rel}, as does the job on line {other.line} — "
                            "add a var such as {variant} or {job_id} to 'path'",
                        )
                        continue
                    seen_ids[jid] = seen_paths[rel] = spec
                    specs.append(spec)
    if problems:
        raise ManifestError(list(problems.values()))
    return Plan(manifest, specs, list(warnings))
