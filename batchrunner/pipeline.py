"""Pipelines: a job that uses another job's result (photo → hero image → cut-out → video).

**Syntax.** A job named with ``id: hero`` can be referred to from any field of another job:

- ``{hero.url}`` — hero's result *for the same matrix cell* (the same value of every var hero
  varies over). The referring job inherits every dimension of hero it does not set itself
  (top-level matrix vars, ``rows``, hero's own ``matrix``) and fans out over hero's
  variants: ``variants: 3`` upstream makes three downstream jobs, told apart by the var
  ``{hero.variant}``;
- ``{hero.2.url}`` — pins hero's variant 2 (no fan-out over hero's variants);
- ``{hero.urls}`` — fan-in: the list of hero's results over every dimension the referring
  job does not vary over itself, all variants, in manifest order; used alone as a value
  (``imageURLList: "{hero.urls}"``), it is a list.

**Ids.** A reference is rendered as the token ``batchrunner-result:<upstream job id>`` and
the job id hashes it like any other value, so ids are known when the manifest is expanded:
``plan`` counts and prices the whole pipeline, and an edit to an upstream job changes its
id and so the id of everything downstream — nothing else. The upstream id a cell needs is
computed from the cell's own values by rendering the upstream job for that cell
(:meth:`Links.upstream_id`, memoised with a bound), never from a table of every job, so
expansion may stream. At submit time the runner replaces each token with a freshly
presigned URL to batchrunner's own stored copy of the upstream result (never the API's
``fileURL``, which carries the key): :func:`result_ids`, :func:`resolve`.

**Errors** (file:line, before anything is sent): an unknown id, an id given twice (a
reference to it would be ambiguous), a reference in ``model``/``path``/``callback_url``, a
circular chain, a pinned variant the upstream does not make, ``{ID.urls}`` inside text or as
an item of a list, a cell the upstream does not make (cells that do not line up; a job using
``{ID.url}`` that sets a var of ``rows:`` itself: a row is taken whole), an upstream that
cannot be rendered for a cell, and the token text itself written in a manifest.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .errors import BatchRunnerError, StorageError, StorageUnavailable

if TYPE_CHECKING:
    from .expand import JobSpec, _Expansion, _Job
    from .inputs import InputFile, Inputs
    from .store import Job, Store

RESULT_PREFIX = "batchrunner-result:"
_RESULT = re.compile(re.escape(RESULT_PREFIX) + r"([0-9a-f]{20})")
REFERENCE = re.compile(r"([A-Za-z_]\w*)\.(?:(\d+)\.)?(url|urls|variant)")
NO_REFERENCES = ("model", "path", "callback_url", "vars", "matrix", "variants", "id")
MAX_CACHE = 200_000
MAX_STEPS = 50  # a chain longer than this is refused (what a campaign needs is a handful)


@dataclass(frozen=True, slots=True)
class Ref:
    """One reference as written: ``{name.url}``, ``{name.N.url}``, ``{name.urls}`` or ``{name.variant}``."""

    text: str  # the template name, e.g. "hero.url"
    upstream: str
    pin: int | None
    attr: str  # url | urls | variant
    key: str  # the job field it was written in (for the line)


def is_reference(name: str) -> bool:
    return REFERENCE.fullmatch(name) is not None


def result_token(job_id: str) -> str:
    """What a job's body holds in place of an upstream result until it is sent."""
    return RESULT_PREFIX + job_id


def result_ids(body: Any) -> list[str]:
    """The upstream job ids a body refers to, in order, each once."""
    text = body if isinstance(body, str) else json.dumps(body)
    return list(dict.fromkeys(_RESULT.findall(text))) if RESULT_PREFIX in text else []


def resolve(body: Any, urls: Mapping[str, str]) -> Any:
    """``body`` with each result token replaced by ``urls[upstream id]`` (JSON-escaped inside a stringified field)."""
    if isinstance(body, str):
        if RESULT_PREFIX not in body:
            return body
        return _RESULT.sub(lambda m: json.dumps(urls[m[1]])[1:-1], body)
    if isinstance(body, dict):
        return {k: resolve(v, urls) for k, v in body.items()}
    if isinstance(body, list):
        return [resolve(v, urls) for v in body]
    return body


def _names(value: Any) -> Iterator[str]:
    """Every ``{name}`` of a template value, without compiling it (references only are wanted)."""
    if isinstance(value, str):
        if "{" in value:
            yield from re.findall(r"(?<!\{)\{([^{}]*)\}", value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _names(v)
    elif isinstance(value, list):
        for v in value:
            yield from _names(v)


def _lone(value: Any, text: str) -> bool:
    """Whether ``{text}`` appears only as a whole value (so it keeps a list's type)."""
    if isinstance(value, str):
        return "{" + text + "}" not in value or value == "{" + text + "}"
    if isinstance(value, dict):
        return all(_lone(v, text) for v in value.values())
    if isinstance(value, list):
        return all(_lone(v, text) for v in value)
    return True


def _in_list(value: Any, text: str) -> bool:
    """Whether ``{text}`` is an item of a list (a list of results there would be a list inside the list)."""
    if isinstance(value, dict):
        return any(_in_list(v, text) for v in value.values())
    if isinstance(value, list):
        return any(v == "{" + text + "}" or _in_list(v, text) for v in value)
    return False


class Links:
    """The references of one expansion: which job each job uses, the dimensions it inherits, the upstream ids per cell."""

    def __init__(self, expansion: _Expansion) -> None:
        self.x = expansion
        self.by_name: dict[str, _Job] = {}
        self.cache: dict[tuple[str, str, int], str] = {}
        self.active = False
        self.broken: set[int] = set()  # id() of jobs with a problem in their id or references: not expanded
        self._prepared: list[_Job] = []
        self._rows: set[tuple[str, ...]] | None = None  # each row's values (a cell's row must be one of them)

    def _refuse(self, job: _Job, line: int | None, message: str) -> None:
        """A problem in ``job``'s id or references: said once; the job (and what uses it) is not expanded."""
        self.x.problem(job.job.file, line, message)
        self.broken.add(id(job))

    # -- linking: before anything is built ------------------------------------------------------
    def link(self, prepared: list[_Job]) -> list[_Job]:
        """Name the jobs, parse their references, refuse bad ones, inherit dimensions; returns the jobs still usable."""
        self._forged(prepared)
        self._prepared = prepared
        for job in prepared:
            name = job.fields.get("id")
            if name is None:
                continue
            line = job.fields.line_of("id")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):  # ASCII, as a template's names
                self._refuse(job, line, f"{job.where}.id: must be a name of letters, digits and _ (such as hero), not {name!r}")
                continue
            twin = self.by_name.get(name)
            if twin is not None:
                self._refuse(
                    job,
                    line,
                    f"{job.where}.id: {name!r} is also the id of {twin.where} (line {twin.fields.line}) — a reference "
                    f"{{{name}.url}} would be ambiguous; give each job its own id",
                )
                continue
            self.by_name[name] = job
            job.name = name
        for job in prepared:
            job.refs = self._refs(job)
        ordered = self._order(prepared)
        usable = []
        for job in ordered:
            if id(job) in self.broken or any(id(self.by_name[r.upstream]) in self.broken for r in job.refs):
                self.broken.add(id(job))  # its own problem is reported; its dependents would only repeat it
                continue
            if self._inherit(job):
                usable.append(job)
        self.active = any(job.refs for job in usable)
        return [job for job in prepared if id(job) not in self.broken]

    def _forged(self, prepared: list[_Job]) -> None:
        """Refuse the text batchrunner puts in a body in place of a result or a local file until it is sent, written as such
        (in a job, ``vars``, ``matrix`` or ``rows``): it would be replaced by a signed URL, or fail the job at its submit."""
        from .inputs import TOKEN_PREFIX

        what = {
            RESULT_PREFIX: ("a job's result", "write {ID.url} to use the result of the job with id: ID"),
            TOKEN_PREFIX: ("a local file", "write file:PATH"),
        }

        def check(value: Any, file: str, line: int | None, where: str) -> bool:
            text = value if isinstance(value, str) else repr(value)
            prefix = next((p for p in what if p in text), None)
            if prefix is not None:
                stands, instead = what[prefix]
                self.x.problem(
                    file,
                    line,
                    f"{where}: contains {prefix!r}, which batchrunner writes itself in place of {stands} until it is sent — {instead}",
                )
            return prefix is not None

        manifest = self.x.manifest
        check(manifest.vars, manifest.file, manifest.line_of("vars"), "vars")
        check(manifest.matrix, manifest.file, manifest.line_of("matrix"), "matrix")
        for i, row in enumerate(manifest.rows):
            if check(row, manifest.file, manifest.line_of("rows"), f"rows (row {i + 1})"):
                break
        for job in prepared:
            for key, value in job.fields.items():
                if check(value, job.job.file, job.fields.line_of(key), f"{job.where}.{key}"):
                    self.broken.add(id(job))

    def _refs(self, job: _Job) -> list[Ref]:
        refs: list[Ref] = []
        for key, value in job.fields.items():
            for text in dict.fromkeys(_names(value)):
                m = REFERENCE.fullmatch(text)
                if m is None:
                    continue
                upstream, pin, attr = m[1], int(m[2]) if m[2] else None, m[3]
                line = job.fields.line_of(key)
                if upstream not in self.by_name:
                    known = list(self.by_name)
                    close = difflib.get_close_matches(upstream, known, n=1, cutoff=0.6)
                    hint = f"did you mean {{{close[0]}.{attr}}}?" if close else (
                        f"the jobs with an id: {', '.join(known)}" if known else "no job has an id: add 'id: NAME' to the job it means"
                    )  # fmt: skip
                    if any(isinstance(j.fields.get("input"), dict) and j.fields["input"].get("id") == upstream for j in self._prepared):
                        hint += " (a CSV column 'id' is a model field, sent as input.id: name the job with 'id:' in a YAML manifest)"
                    self._refuse(job, line, f"{job.where}.{key} refers to {{{text}}}, but no job has id {upstream!r} — {hint}")
                    continue
                if key in NO_REFERENCES and not (attr == "variant" and key == "path"):
                    self._refuse(
                        job,
                        line,
                        f"{job.where}.{key}: {{{text}}} is a reference to another job's result — references go in input "
                        "fields (input, prompt, options, imageURLList, videoURLList)",
                    )
                    continue
                if attr == "variant" and pin is not None:
                    self._refuse(job, line, f"{job.where}.{key}: write {{{upstream}.variant}}, not {{{text}}}")
                    continue
                if attr == "urls" and _in_list(value, text):
                    self._refuse(
                        job,
                        line,
                        f"{job.where}.{key}: {{{text}}} is a list of results already: write it alone as the value "
                        f'(imageURLList: "{{{text}}}"), not as an item of [ ] (that would send a list inside the list)',
                    )
                    continue
                if attr == "urls" and (pin is not None or not _lone(value, text)):
                    self._refuse(
                        job,
                        line,
                        f"{job.where}.{key}: {{{text}}} is a list of results: use {{{upstream}.urls}} alone as a value "
                        f'(imageURLList: "{{{upstream}.urls}}"), or {{{upstream}.url}} for one result',
                    )
                    continue
                up = self.by_name[upstream]
                if pin is not None and not 1 <= pin <= up.variants:
                    self._refuse(
                        job,
                        line,
                        f"{job.where}.{key}: {{{text}}} pins variant {pin}, but {upstream} makes variants 1–{up.variants} — "
                        f"use one of those, or {{{upstream}.url}} for every variant",
                    )
                    continue
                refs.append(Ref(text, upstream, pin, attr, key))
        return refs

    def _order(self, prepared: list[_Job]) -> list[_Job]:
        """The jobs, upstream before downstream (no recursion: a chain may be long); a circular chain, or one
        longer than :data:`MAX_STEPS`, is a problem, and the jobs on it or after it are left out."""
        x = self.x
        uses = {
            id(j): list({id(u): u for u in (self.by_name[r.upstream] for r in j.refs if r.attr != "variant")}.values()) for j in prepared
        }
        users: dict[int, list[_Job]] = {}
        waiting = {id(j): len(uses[id(j)]) for j in prepared}
        for job in prepared:
            for up in uses[id(job)]:
                users.setdefault(id(up), []).append(job)
        ready = deque(j for j in prepared if not waiting[id(j)])
        depth: dict[int, int] = {}
        out = []
        while ready:
            job = ready.popleft()
            depth[id(job)] = 1 + max((depth[id(u)] for u in uses[id(job)]), default=0)
            if depth[id(job)] == MAX_STEPS + 1:
                text = f"{job.where}: it ends a chain of more than {MAX_STEPS} steps — shorten the pipeline"
                self._refuse(job, job.fields.line_of("id"), text)
            out.append(job)
            for user in users.get(id(job), []):
                waiting[id(user)] -= 1
                if not waiting[id(user)]:
                    ready.append(user)
        left = {id(j): j for j in prepared if id(j) not in depth}  # on a loop, or after one
        for start in list(left.values()):
            if id(start) not in left:
                continue
            seen: dict[int, int] = {}
            walk: list[_Job] = []
            on: _Job | None = start
            while on is not None and id(on) in left and id(on) not in seen:
                seen[id(on)] = len(walk)
                walk.append(on)
                on = next((u for u in uses[id(on)] if id(u) in left), None)  # None: after a loop already reported
            if on is not None and id(on) in seen:
                job = on
                loop = [*walk[seen[id(job)] :], job]
                chain = " → ".join(f"{j.name or j.where}" for j in reversed(loop))
                first = min(loop[:-1], key=lambda j: j.job.index)
                x.problem(
                    first.job.file,
                    first.fields.line_of("id"),
                    f"{first.where}: circular references ({chain}) — a job cannot use its own result, directly or through others",
                )
            for j in walk:
                left.pop(id(j), None)
                self.broken.add(id(j))
        for job in prepared:
            if id(job) not in depth:
                self.broken.add(id(job))
        return out

    def _inherit(self, job: _Job) -> bool:
        """A job using ``{U.url}`` varies over everything U varies over that it does not set itself, and over U's variants.

        False after a problem: it sets a var of ``rows:`` while it takes a result made once per row (a row is
        taken whole; its vars cannot pin it as a matrix var can).
        """
        if not any(ref.attr == "url" for ref in job.refs):
            return True
        manifest = self.x.manifest
        columns = list(manifest.rows[0]) if manifest.rows else []
        for ref in job.refs:
            up = self.by_name[ref.upstream]
            pinned = [c for c in columns if c in job.job_vars or c in job.job_matrix]
            if ref.attr == "url" and up.top[0] and pinned:
                names = ", ".join(pinned)
                self._refuse(
                    job,
                    job.fields.line_of("vars" if pinned[0] in job.job_vars else "matrix"),
                    f"{job.where}: sets {names} (of rows:) itself and uses {{{ref.text}}}, which {up.name} makes once per row — "
                    f"a row is taken whole: remove {names} from this job (to use only some rows' results, take them with "
                    f"{{{up.name}.urls}} in a job that sets {names})",
                )
                return False
        own = set(job.job_vars) | set(job.job_matrix)
        uses_rows, top_used = job.top
        top = set(top_used)
        for ref in job.refs:
            if ref.attr != "url":
                continue
            up = self.by_name[ref.upstream]
            if ref.pin is None and f"{up.name}.variant" not in own:
                job.job_matrix.setdefault(f"{up.name}.variant", list(range(1, up.variants + 1)))
            for name, values in up.job_matrix.items():
                if name not in own:
                    job.job_matrix.setdefault(name, values)
            uses_rows = uses_rows or up.top[0]
            top |= {name for name in up.top[1] if name not in own}
        job.top = (uses_rows, tuple(name for name in manifest.matrix if name in top))
        count = (len(manifest.rows) if uses_rows else 1) * job.variants
        for name in job.top[1]:
            count *= len(manifest.matrix[name])
        for values in job.job_matrix.values():
            count *= len(values)
        job.count = count
        return True

    # -- expanding: one cell at a time ----------------------------------------------------------
    def values(self, job: _Job, env: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The reference values a cell of ``job`` renders with (tokens, lists of tokens), and its upstream ids.

        Raises ValueError (with the field in ``.args[1]``) when the cell's values are not a
        cell the upstream makes.
        """
        found: dict[str, Any] = {}
        after: list[str] = []
        for ref in job.refs:
            if ref.attr == "variant" or ref.text in found:
                continue
            up = self.by_name[ref.upstream]
            if ref.attr == "url":
                variant = ref.pin if ref.pin is not None else int(env[f"{up.name}.variant"])
                uid = self.upstream_id(up, env, variant, job, ref)
                found[ref.text] = result_token(uid)
                after.append(uid)
            else:
                ids = [self.upstream_id(up, cell, v, job, ref) for cell in self._cells(job, up, env) for v in range(1, up.variants + 1)]
                found[ref.text] = [result_token(i) for i in ids]
                after.extend(ids)
        return found, list(dict.fromkeys(after))

    def _cells(self, job: _Job, up: _Job, env: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """For ``{U.urls}``: the cell ``env`` with every dimension of U that ``job`` does not vary over taken in turn."""
        from .expand import _combos

        manifest = self.x.manifest
        bound = set(job.top[1]) | set(job.job_matrix) | set(job.job_vars)
        free = {name: manifest.matrix[name] for name in up.top[1] if name not in bound}
        free |= {name: values for name, values in up.job_matrix.items() if name not in bound}
        rows: list[dict[str, Any]] = manifest.rows if up.top[0] and not job.top[0] else [{}]
        if up.top[0] and not job.top[0] and (pinned := {k: str(v) for k, v in job.job_vars.items() if k in manifest.rows[0]}):
            rows = [row for row in rows if all(str(row[k]) == v for k, v in pinned.items())]  # a var it sets pins the rows
            if not rows:
                shown = ", ".join(f"{k}={v!r}" for k, v in pinned.items())
                raise ValueError(f"{{{up.name}.urls}}: no row has {shown}, so there are no results of {up.name} to take", "vars")
        for row in rows:
            for combo in _combos(free):
                yield {**env, **row, **combo}

    def upstream_id(self, up: _Job, env: dict[str, Any], variant: int, job: _Job, ref: Ref) -> str:
        """The id of ``up``'s job for the cell ``env`` (of ``job``) and ``variant``: ``up`` rendered for that cell."""
        manifest = self.x.manifest
        cell: dict[str, Any] = dict(manifest.vars)
        if up.top[0]:
            cell.update({name: env[name] for name in manifest.rows[0] if name in env})
            self._a_row(job, ref, up, env)
        for name in up.top[1]:
            self._aligned(job, ref, up, name, env, manifest.matrix[name])
            cell[name] = env[name]
        for name, values in up.job_matrix.items():
            self._aligned(job, ref, up, name, env, values)
            cell[name] = env[name]
        cell.update(up.job_vars)
        key = (up.where, repr(sorted(cell.items(), key=lambda kv: kv[0])), variant)
        hit = self.cache.get(key)
        if hit is None:
            if len(self.cache) >= MAX_CACHE:
                self.cache.clear()
            hit = self.cache[key] = self._render(up, cell, variant, ref)
        return hit

    def _render(self, up: _Job, cell: dict[str, Any], variant: int, ref: Ref) -> str:
        """``up``'s id for ``cell``; a cell it cannot be made for is ``up``'s own problem (reported on its line), named here as such."""
        from .expand import _Missing

        try:
            return self.x.cell_id(up, cell, variant)
        except (_Missing, ValueError) as exc:
            why = f"{{{exc.name}}} is not defined" if isinstance(exc, _Missing) else str(exc.args[0])
            raise ValueError(
                f"{{{ref.text}}}: {up.name} cannot be made for this cell ({why}) — fix {up.name} (line {up.fields.line}) first",
                ref.key,
            ) from None

    def _a_row(self, job: _Job, ref: Ref, up: _Job, env: dict[str, Any]) -> None:
        """The row values of ``env`` must be one row of ``rows:`` together — a job that sets a row's var itself does not mix rows."""
        columns = list(self.x.manifest.rows[0])
        if self._rows is None:
            self._rows = {tuple(str(row.get(c)) for c in columns) for row in self.x.manifest.rows}
        if tuple(str(env.get(c)) for c in columns) in self._rows:
            return
        pinned = ", ".join(c for c in columns if c in job.job_vars) or "a column of the rows"
        shown = ", ".join(f"{c}={env.get(c)!r}" for c in columns)
        raise ValueError(
            f"{{{ref.text}}}: this job's cell has {shown}, which is no row of rows: — {up.name} is made once per row, so the cells do "
            f"not line up; do not set {pinned} in its vars (a row's values go together), or take the results of the rows "
            f"you want with {{{up.name}.urls}}",
            ref.key,
        )

    @staticmethod
    def _aligned(job: _Job, ref: Ref, up: _Job, name: str, env: dict[str, Any], values: list[Any]) -> None:
        if name not in env:
            raise ValueError(
                f"{{{ref.text}}}: {up.name} varies over {name}, which this job does not — set {name} in its vars or matrix, "
                f"or take every {name} with {{{up.name}.urls}}",
                ref.key,
            )
        if env[name] not in values:
            shown = ", ".join(str(v) for v in values)
            raise ValueError(
                f"{{{ref.text}}}: this job's cell has {name}={env[name]!r}, but {up.name} makes {name} = {shown} only — "
                f"the cells do not line up; use values {up.name} makes, or pin one with vars",
                ref.key,
            )


MAX_CHAIN = 20  # steps shown before a job in the gallery


def label(spec: JobSpec) -> str:
    """A job's step as ``plan`` names it: its ``id:``, else its model and line."""
    return spec.step or f"{spec.model} (line {spec.line})"


@dataclass(frozen=True, slots=True)
class Step:
    """One job definition of a pipeline in ``plan``: its jobs, their credits (None: a price unknown), the steps it uses."""

    name: str
    model: str
    jobs: int
    credits: float | None
    uses: tuple[str, ...]


def steps(specs: Sequence[JobSpec]) -> list[Step]:
    """The steps of a pipeline (empty when no job uses another's result), in manifest order."""
    if not any(s.after for s in specs):
        return []
    step_of = {s.id: label(s) for s in specs}
    found: dict[str, list[Any]] = {}
    for s in specs:
        row = found.setdefault(label(s), [s.model, 0, 0.0, {}])
        row[1] += 1
        row[2] = None if s.credits is None or row[2] is None else row[2] + s.credits
        row[3].update(dict.fromkeys(step_of[u] for u in s.after if u in step_of))
    return [Step(name, model, n, credits, tuple(uses)) for name, (model, n, credits, uses) in found.items()]


def remade(specs: Sequence[JobSpec], finished: Callable[[JobSpec], bool]) -> dict[str, str]:
    """Finished jobs a run makes again because an input, directly or not, is not finished (deleted, rejected, changed):
    {job id: the step of that input}."""
    by_id = {s.id: s for s in specs}
    missing: dict[str, str | None] = {}  # id → the step not finished on its way up, or None

    def unfinished(job_id: str) -> str | None:
        if job_id not in missing:
            spec = by_id.get(job_id)
            missing[job_id] = None
            if spec is not None:
                if not finished(spec):
                    missing[job_id] = label(spec)
                else:
                    missing[job_id] = next((m for m in map(unfinished, spec.after) if m), None)
        return missing[job_id]

    out = {}
    for spec in specs:
        if spec.after and finished(spec):
            why = next((m for m in map(unfinished, spec.after) if m), None)
            if why is not None:
                out[spec.id] = why
    return out


def blocked(specs: Sequence[JobSpec], finished: Callable[[JobSpec], bool], failed: Callable[[JobSpec], bool]) -> set[str]:
    """Unfinished jobs a run fails without sending them: an input of theirs, directly or not, stays failed."""
    by_id = {s.id: s for s in specs}
    memo: dict[str, bool] = {}

    def stuck(job_id: str) -> bool:
        if job_id not in memo:
            spec = by_id.get(job_id)
            memo[job_id] = False
            if spec is not None and not finished(spec):
                memo[job_id] = failed(spec) or any(map(stuck, spec.after))
        return memo[job_id]

    return {s.id for s in specs if s.after and not finished(s) and any(map(stuck, s.after))}


def reasons(
    specs: Sequence[JobSpec], known: Callable[[str], bool], redo: dict[str, str], again: Collection[str] = ()
) -> list[tuple[str, str, int]]:
    """Why a re-run makes each pipeline job it makes: (step, reason, jobs), for ``plan`` of a folder run before;
    ``again``: finished jobs made again themselves (their file gone, or rejected in review)."""
    found: dict[tuple[str, str], int] = {}
    step_of = {s.id: label(s) for s in specs}
    for spec in specs:
        if spec.id in again:
            why = "its result file is gone, or was rejected in review"
        elif spec.id in redo:
            why = f"results of {redo[spec.id]} it uses, directly or not, are made again (deleted, rejected or failed)"
        elif not known(spec.id):
            changed = [step_of[u] for u in spec.after if u in step_of and not known(u)]
            why = f"{changed[0]} changed (its id is new)" if changed else "new or edited"
        else:
            continue
        found[(label(spec), why)] = found.get((label(spec), why), 0) + 1
    return [(step, why, n) for (step, why), n in found.items()]


def chain(store: Store, spec: dict[str, Any]) -> list[tuple[str, str]]:
    """What a job was made from, first step first, as (label, link) pairs for the gallery: the local input
    photo (its stored copy), then each upstream result along the first reference, then every direct input."""
    steps: list[list[tuple[str, str]]] = []
    current = spec
    while current.get("after") and len(steps) < MAX_CHAIN:
        level = []
        for upstream in current["after"]:
            found = store.job_of(upstream)
            if found is None:
                continue
            state, path, text = found
            shown = path if state == "done" and path else str(json.loads(text)["path"]).replace("{ext}", "*")
            level.append((shown, shown))
        if not level:
            break
        steps.append(level)
        found = store.job_of(current["after"][0])
        current = json.loads(found[2]) if found is not None else {}
    if not steps:
        return []
    files = [str(v)[len("file:") :] for v in current.get("vars", {}).values() if isinstance(v, str) and v.startswith("file:")]
    stored = [f".batchrunner/inputs/{name}" for name in _input_names(current.get("body", {}))]
    photos = list(zip(files, stored, strict=False)) if len(files) == len(stored) else [(f"input {n.rsplit('/', 1)[-1]}", n) for n in stored]
    out = photos[:1]
    for level in reversed(steps[1:]):
        out.append(level[0])
    return out + steps[0]


def readable(value: Any, store: Store) -> Any:
    """``value`` with each result token replaced by ``result of <path>`` (for people: the gallery's parameters)."""
    if isinstance(value, str) and RESULT_PREFIX in value:

        def path(m: re.Match[str]) -> str:
            found = store.job_of(m[1])
            if found is None:
                return m[0]
            state, done_path, spec = found
            return "result of " + (done_path if state == "done" and done_path else str(json.loads(spec)["path"]).replace("{ext}", "*"))

        return _RESULT.sub(path, value)
    if isinstance(value, dict):
        return {k: readable(v, store) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v, store) for v in value]
    return value


async def local_result_url(inputs: Inputs, file: InputFile, rel: str) -> str:
    """A signed URL to the input store's copy of a local upstream result, put there first if it is not yet.

    The result must still be the file that was made: a link, a folder or a file of another
    size or content in its place (replaced or tampered with since) fails the job using it —
    not the run — and is never read past its recorded size nor sent.
    """
    changed = f"input {rel} is not the file that was made (replaced or changed since) — delete it, and the next run makes it again"
    try:
        found = os.lstat(file.path)
    except OSError:
        raise StorageError(f"input {rel} is gone since it was made — run again to make it again") from None
    if not stat.S_ISREG(found.st_mode) or found.st_size != file.bytes:
        raise StorageError(changed)
    try:
        return await inputs.url(file)
    except BaseExceptionGroup as group:  # the upload's task group wraps the one error
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        if isinstance(first, StorageUnavailable) or not isinstance(first, BatchRunnerError):
            raise first from None
        raise StorageError(changed if "changed while being stored" in first.message else first.message) from None


def _input_names(body: Any) -> list[str]:
    from .inputs import TOKEN_PREFIX, tokens

    return sorted(name[len(TOKEN_PREFIX) :] for name in tokens(body))


class Flow:
    """The runner's work list once jobs wait for others: jobs whose inputs just became ready first, then the stored work.

    The runner takes a slot (``concurrency`` bounds jobs in flight across every step), then
    the next job from :meth:`feed`; when there is none but jobs are still running, the feed
    waits for one of them to finish (a done job may release its dependents, see
    :meth:`Store.release`). A job released during the run is skipped when the stored work
    list reaches it (its page may have been read before it was released).
    """

    def __init__(self, store: Store, on_event: Callable[[str, Job | None, str], None]) -> None:
        self.store, self.on_event = store, on_event
        self.ready: deque[Job] = deque()
        self.released: set[str] = set()
        self.running = 0
        self._wake = anyio.Event()

    def started(self) -> None:
        self.running += 1

    def finished(self) -> None:
        self.running -= 1
        self._wake.set()

    def done(self, job: Job) -> None:
        """``job`` is done: its dependents whose inputs are all done now run, before anything else."""
        for dependent in self.store.release(job):
            self.released.add(dependent.id)
            self.ready.append(dependent)
            self.on_event("ready", dependent, f"its inputs are done (the last: {job.id})")
        self._wake.set()

    def failed(self, job: Job) -> None:
        """``job`` failed: every job waiting for it fails, unsent and unpaid."""
        for dependent, reason in self.store.fail_dependents(job):
            self.on_event("failed", dependent, reason)

    async def feed(self, work: Iterable[Job], slots: anyio.Semaphore) -> AsyncIterator[Job]:
        """Each job to run, once a slot is held for it (the caller releases the slot when the job ends)."""
        stored = iter(work)
        while True:
            await slots.acquire()
            while True:
                if self.ready:
                    yield self.ready.popleft()
                    break
                job = next(stored, None)
                while job is not None and job.id in self.released:
                    job = next(stored, None)
                if job is not None:
                    yield job
                    break
                if self.running == 0:
                    slots.release()
                    return
                self._wake = anyio.Event()
                await self._wake.wait()
