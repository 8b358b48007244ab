"""The model catalog, and the one function that turns a job's fields into a request body.

The shipped ``catalog.csv`` claims only what the public docs state: the model ids, the
alias ``kling-2-5`` → ``kling-video-turbo``, and each id's modality; its ``source`` column
says where each row comes from. The public docs give no per-model parameter table, enum,
required field or price, so the shipped file has none and nothing is refused for them.
An empty ``input_style`` means the docs do not say: the fields go under ``input``, as for
48 of the 54 public routes. Columns:

``id``           model id as sent in ``model`` (or an alias)
``modality``     image | video | audio
``input_style``  standard (fields under ``input``) | root (fields at the body root); empty: standard
``credits``      price per job, empty when not known
``alias_of``     for an alias, the id it stands for (accepted with a warning)
``required``     fields a job must give (``;`` or ``,`` between them)
``parameters``   known fields (``;`` or ``,`` between them); ``name=a|b|c`` restricts a field to those values
``source``       where the row comes from (free text)

A catalog the user loads (``--catalog FILE`` or ``BATCHRUNNER_CATALOG``, such as the
official ``cliprise-api-catalog.csv``) extends or replaces rows by id and is enforced as
given: its required fields and enums are checked before anything is sent, and a field its
``parameters`` do not name is a warning (we never know that a list is complete). Usual
spellings of the column names are accepted (``model``, ``model_id``, ``type``,
``input_type``, ``price``, ``alias``, ``params``, ``required_fields`` …).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem
from .manifest import MAX_CSV_BYTES, csv_rows, read_text

SHIPPED = Path(__file__).with_name("catalog.csv")
MODALITIES = ("image", "video", "audio")
# Fields that the API wants as JSON *strings* at the body root, whatever the input style.
STRINGIFIED: dict[str, type] = {"options": dict, "imageURLList": list, "videoURLList": list}
_COLUMN_ALIASES = {  # header cells are compared lower-cased, with spaces and dashes as "_"
    "model": "id", "model_id": "id", "route": "id",
    "type": "modality", "media": "modality", "media_type": "modality", "category": "modality", "output": "modality",
    "input": "input_style", "input_type": "input_style", "request_style": "input_style",
    "price": "credits", "cost": "credits", "credits_per_job": "credits", "credits_per_run": "credits",
    "alias": "alias_of", "alias_for": "alias_of",
    "required_fields": "required", "required_params": "required", "required_parameters": "required",
    "params": "parameters", "fields": "parameters", "inputs": "parameters",
}  # fmt: skip
_STYLES = {
    "standard": "standard", "standard-input": "standard", "standard_input": "standard", "standard input": "standard",
    "root": "root", "root-only": "root", "root_only": "root", "root only": "root",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Model:
    """One catalog row."""

    id: str
    modality: str
    input_style: str = "standard"
    credits: float | None = None
    alias_of: str | None = None
    required: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    enums: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = ""

    @property
    def root_only(self) -> bool:
        return self.input_style == "root"


class Catalog:
    """Models by id. ``resolve`` follows aliases; unknown ids are the caller's decision."""

    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models

    def get(self, model_id: str) -> Model | None:
        model = self.models.get(model_id)
        if model is not None and model.alias_of:
            target = self.models.get(model.alias_of)
            if target is not None:
                return Model(**{**_fields(target), "id": model_id, "alias_of": target.id})
        return model

    def by_modality(self, modality: str | None = None) -> list[Model]:
        return [m for m in sorted(self.models.values(), key=lambda m: (m.modality, m.id)) if modality in (None, m.modality)]


def _fields(model: Model) -> dict[str, Any]:
    return {name: getattr(model, name) for name in Model.__dataclass_fields__}


def _split(cell: str) -> list[str]:
    return [part.strip() for part in (cell or "").replace(",", ";").split(";") if part.strip()]


def _parse_rows(path: Path, problems: list[Problem]) -> dict[str, Model]:
    text = read_text(path, MAX_CSV_BYTES, "the catalog (--catalog / BATCHRUNNER_CATALOG)", problems)
    if text is None:
        return {}
    reader = csv.DictReader(text.splitlines())
    try:
        cells = [h.strip().lower().replace(" ", "_").replace("-", "_") for h in reader.fieldnames or []]
        header = [_COLUMN_ALIASES.get(cell, cell) for cell in cells]
    except csv.Error as exc:
        problems.append(Problem(str(path), 1, f"the header cannot be read as CSV: {exc}"))
        return {}
    if "id" not in header or "modality" not in header:
        problems.append(Problem(str(path), 1, "a catalog needs at least the columns id and modality — see `batchrunner models --help`"))
        return {}
    reader.fieldnames = header
    models: dict[str, Model] = {}
    for row in csv_rows(reader, str(path), problems):
        line = reader.line_num
        mid = (row.get("id") or "").strip()
        modality = (row.get("modality") or "").strip().lower()
        written_style = (row.get("input_style") or "").strip().lower()
        style = _STYLES.get(written_style or "standard")
        if not mid:
            continue
        if modality not in MODALITIES:
            problems.append(Problem(str(path), line, f"model {mid}: modality {modality!r} is not one of {', '.join(MODALITIES)}"))
            continue
        if style is None:
            problems.append(Problem(str(path), line, f"model {mid}: input_style {written_style!r} is not standard or root"))
            continue
        credits_cell = (row.get("credits") or "").strip()
        try:
            credits = float(credits_cell) if credits_cell else None
        except ValueError:
            problems.append(Problem(str(path), line, f"model {mid}: credits {credits_cell!r} is not a number"))
            continue
        params, enums = [], {}
        for spec in _split(row.get("parameters") or ""):
            name, _, values = spec.partition("=")
            params.append(name.strip())
            if values:
                enums[name.strip()] = tuple(v.strip() for v in values.split("|"))
        models[mid] = Model(
            id=mid,
            modality=modality,
            input_style=style,
            credits=credits,
            alias_of=(row.get("alias_of") or "").strip() or None,
            required=tuple(_split(row.get("required") or "")),
            parameters=tuple(params),
            enums=enums,
            source=(row.get("source") or "").strip() or f"{path.name}, line {line}",
        )
    return models


def load_catalog(extra: Path | None = None, *, replace: bool = False) -> tuple[Catalog, list[Problem]]:
    """The shipped catalog, extended (or replaced, with ``replace``) by the CSV at ``extra``."""
    problems: list[Problem] = []
    models = {} if (replace and extra) else _parse_rows(SHIPPED, problems)
    if extra is not None:
        models.update(_parse_rows(extra, problems))
    return Catalog(models), problems


def check_fields(model: Model, fields: dict[str, Any]) -> list[str]:
    """What is wrong with a job's model fields: missing required ones, values outside an enum of the catalog."""
    errors = []
    for name in model.required:
        if fields.get(name) in (None, ""):
            errors.append(f"model {model.id} requires {name!r} — add it to the job, its input or defaults")
    for name, allowed in model.enums.items():
        value = fields.get(name)
        if value is not None and str(value) not in allowed:
            errors.append(f"{name}={value!r} is not accepted by {model.id} (accepted: {', '.join(allowed)})")
    return errors


def model_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The model's fields of a request body, whichever input style built it (the inverse of :func:`build_body`)."""
    fields = body.get("input", body)
    return fields if isinstance(fields, dict) else {}


def build_body(
    model_id: str, root_only: bool, fields: dict[str, Any], stringified: dict[str, Any], callback_url: str | None
) -> dict[str, Any]:
    """The request body the API expects: ``input`` or root fields, JSON-string fields, ``callBackUrl``."""
    body: dict[str, Any] = {"model": model_id}
    if root_only:
        body.update(fields)
    else:
        body["input"] = fields
    for name, value in stringified.items():
        body[name] = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    if callback_url:
        body["callBackUrl"] = callback_url
    return body
