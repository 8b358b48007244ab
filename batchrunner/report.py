"""report.json, report.csv and report.html of an output directory, written from the store alone.

Rewritten at the end of every run (complete, failed, stopped or interrupted) and by
``batchrunner report DIR``. Everything that leaves here passes through :func:`redact`.
The HTML page is self-contained (inline CSS and a few lines of script, no CDN) and links
files relatively, so the output folder can be zipped and opened anywhere.
"""

from __future__ import annotations

import contextlib
import csv
import html
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .catalog import model_fields
from .errors import ReportError, redact
from .store import Store

CSV_COLUMNS = (
    "id", "state", "model", "modality", "path", "sha256", "bytes", "task_id", "sends", "submits", "ambiguous", "repaid", "error", "prompt",
)  # fmt: skip
GALLERY_LIMIT = 5000
_IMAGE = {"png", "jpg", "jpeg", "webp", "gif"}
_VIDEO = {"mp4", "webm", "mov"}
_AUDIO = {"wav", "mp3", "ogg", "flac"}


def _job_record(row: Any) -> dict[str, Any]:
    spec = json.loads(row["spec"])
    fields = model_fields(spec["body"])
    return {
        "id": row["id"], "state": row["state"], "model": row["model"], "modality": row["modality"],
        "path": row["path"], "sha256": row["sha256"], "bytes": row["bytes"], "task_id": row["task_id"],
        "sends": row["sends"], "submits": row["submits"], "ambiguous": row["ambiguous"], "repaid": row["repaid"], "error": row["error"],
        "prompt": str(fields.get("prompt", "")), "parameters": {k: v for k, v in fields.items() if k not in ("prompt", "model")},
        "vars": spec.get("vars", {}), "variant": spec.get("variant"),
    }  # fmt: skip


class _Redacting:
    """A text file whose every write passes through :func:`redact`."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> None:
        self.file.write(redact(text))


@contextlib.contextmanager
def _report_file(path: Path) -> Iterator[_Redacting]:
    """A report written beside its final name and renamed into place only when whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield _Redacting(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summarize(store: Store, *, wall_s: float | None = None, outcome: str | None = None, error: str | None = None) -> dict[str, Any]:
    """The campaign's summary, from SQL aggregates (no job is loaded).

    ``requests`` is what was paid for: generate requests ``sent``, ``answered_with_task_id``,
    ``ambiguous`` (sent, unanswered: each may have created a task we hold no id for),
    ``repaid`` (tasks created again because the API forgot an earlier one) and
    ``possibly_paid_twice`` (ambiguous + repaid).
    """
    counts = store.counts()
    totals = store.totals()
    recovered = store.meta("recovered")
    return {
        "campaign": store.meta("campaign"),
        "outcome": outcome,
        "error": error,
        "jobs": sum(counts.values()),
        "counts": counts,
        "ambiguous_resubmitted": totals["ambiguous_resubmitted"],
        "submits": totals["submits"],
        "requests": {
            "sent": totals["sends"],
            "answered_with_task_id": totals["submits"],
            "ambiguous": totals["ambiguous"],
            "repaid": totals["repaid"],
            "possibly_paid_twice": totals["possibly_paid_twice"],
        },
        "credits": {"spent": totals["credits_spent"], "planned": store.planned_credits()},
        "recovered": json.loads(recovered) if recovered else None,
        "wall_s": round(wall_s, 3) if wall_s is not None else None,
        "runs": len(store.runs()),
        "models": store.models(),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_reports(store: Store, *, wall_s: float | None = None, outcome: str | None = None, error: str | None = None) -> dict[str, Any]:
    """Write the three reports into the store's directory; return the summary.

    Streamed: jobs are read from the store one at a time and written as they come, one
    JSON object per line of report.json, so a 100,000-job report costs little memory.
    Only the gallery's cards (at most :data:`GALLERY_LIMIT` each of results and failures)
    are held until the page is written.
    """
    summary = summarize(store, wall_s=wall_s, outcome=outcome, error=error)
    try:
        _write(store, summary)
    except OSError as exc:  # a full or read-only output folder
        out = store.out_dir
        raise ReportError(
            f"cannot write the reports in {out} ({exc.strerror or exc}) — free space or make the folder writable, "
            f"then run `batchrunner report {out}`"
        ) from exc
    return summary


def _write(store: Store, summary: dict[str, Any]) -> None:
    out = store.out_dir
    with (
        _report_file(out / "report.json") as as_json,
        _report_file(out / "report.csv") as as_csv,
        _report_file(out / "report.html") as as_html,
    ):
        page = Gallery(summary, store.meta("group_var") or None)
        writer = csv.DictWriter(as_csv, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        as_json.write('{"summary": ' + json.dumps(summary, ensure_ascii=False) + ',\n"jobs": [')
        for n, row in enumerate(store.rows()):
            job = _job_record(row)
            as_json.write((",\n" if n else "\n") + json.dumps(job, ensure_ascii=False, default=str))
            writer.writerow(job)
            page.add(job)
        as_json.write("\n]}\n")
        as_html.write(page.render())


def _requests_line(requests: dict[str, int]) -> str:
    """What was paid for, in words (the report page's header and ``batchrunner status``)."""
    return (
        f"generate requests sent {requests['sent']} · answered with a task id {requests['answered_with_task_id']} · "
        f"possibly created without an answer (ambiguous) {requests['ambiguous']} · "
        f"re-paid after the API forgot a task {requests['repaid']} · possibly paid twice {requests['possibly_paid_twice']}"
    )


def _e(value: Any) -> str:
    return html.escape(redact(str(value)), quote=True)


def _media(job: dict[str, Any]) -> str:
    path = job["path"] or ""
    src = _href(path)
    ext = path.rsplit(".", 1)[-1].lower()
    alt = _e(job["prompt"][:120])
    if ext in _IMAGE:
        return f'<img src="{src}" alt="{alt}" loading="lazy">'
    if ext in _VIDEO:
        return f'<video src="{src}" controls muted loop playsinline preload="metadata"></video>'
    if ext in _AUDIO:
        return f'<audio src="{src}" controls preload="none"></audio>'
    return f'<a class="file" href="{src}">{_e(path)}</a>'


def _href(path: str) -> str:
    """A relative, URL-quoted, HTML-escaped link to a file under the output folder."""
    return _e("/".join(quote(segment) for segment in path.split("/")))


class Gallery:
    """The HTML page: summary, results grouped by ``group_var``, failures with reasons, a model filter."""

    def __init__(self, summary: dict[str, Any], group_var: str | None) -> None:
        self.summary, self.group_var = summary, group_var
        self.groups: dict[str, list[dict[str, Any]]] = {}
        self.failed: list[dict[str, Any]] = []
        self.done = self.failures = 0

    def add(self, job: dict[str, Any]) -> None:
        if job["state"] == "done" and job["path"]:
            self.done += 1
            if self.done <= GALLERY_LIMIT:
                key = str(job["vars"].get(self.group_var, "—")) if self.group_var else "all results"
                self.groups.setdefault(key, []).append(job)
        elif job["state"] == "failed":
            self.failures += 1
            if self.failures <= GALLERY_LIMIT:
                self.failed.append(job)

    def render(self) -> str:
        summary, group_var = self.summary, self.group_var
        credits = summary["credits"]
        planned = " (some prices unknown)" if credits["planned"] is None else f" of {credits['planned']:g} planned"
        counts = " · ".join(f"<b>{n}</b> {_e(state)}" for state, n in sorted(summary["counts"].items())) or "no jobs"
        models = summary["models"]
        options = "".join(f'<option value="{_e(m)}">{_e(m)}</option>' for m in models)
        parts = [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            f"<title>{_e(summary['campaign'] or 'batchrunner')} — report</title>",
            f"<style>{CSS}</style></head><body>",
            f"<header><h1>{_e(summary['campaign'] or 'batchrunner')}</h1>",
            f"<p class=counts>{counts}</p>",
            f"<p>{summary['jobs']} jobs · outcome <b>{_e(summary['outcome'] or '—')}</b>"
            f" · credits spent {credits['spent']:g}{planned}"
            f" · wall time {_e(summary['wall_s'] if summary['wall_s'] is not None else '—')} s"
            f"</p><p>{_requests_line(summary['requests'])}</p>",
            f"<p>models: {_e(', '.join(models))}</p>",
            f'<p class=filters><label>model <select id=fmodel><option value="">all</option>{options}</select></label></p>',
            "</header><main>",
        ]
        if summary.get("error"):
            parts.append(f"<p class=error>run stopped: {_e(summary['error'])}</p>")
        if self.done > GALLERY_LIMIT:
            parts.append(f"<p>showing the first {GALLERY_LIMIT} of {self.done} results — report.csv lists them all</p>")
        for key, members in self.groups.items():
            parts.append(f"<section><h2>{_e(group_var or '')} {_e(key)} <small>({len(members)})</small></h2><div class=grid>")
            for job in members:
                params = ", ".join(f"{_e(k)}={_e(v)}" for k, v in job["parameters"].items())
                parts.append(
                    f'<figure class=card data-model="{_e(job["model"])}">{_media(job)}<figcaption>'
                    f"<p class=prompt>{_e(job['prompt'])}</p><p><b>{_e(job['model'])}</b> {params}</p>"
                    f'<p class=path><a href="{_href(job["path"])}">{_e(job["path"])}</a></p></figcaption></figure>'
                )
            parts.append("</div></section>")
        if self.failed:
            more = f" (the first {GALLERY_LIMIT} of {self.failures}; report.csv lists them all)" if self.failures > GALLERY_LIMIT else ""
            parts.append(f"<section><h2>failed{more}</h2><table><tr><th>job</th><th>model</th><th>prompt</th><th>reason</th></tr>")
            for job in self.failed:
                parts.append(
                    f'<tr class=card data-model="{_e(job["model"])}"><td>{_e(job["id"])}</td><td>{_e(job["model"])}</td>'
                    f"<td>{_e(job['prompt'])}</td><td>{_e(job['error'] or '')}</td></tr>"
                )
            parts.append("</table></section>")
        pending = summary["jobs"] - self.done - self.failures
        if pending:
            parts.append(f"<p>{pending} jobs not finished yet — run the same command again to resume.</p>")
        parts.append(f"</main><script>{SCRIPT}</script></body></html>")
        return "\n".join(parts)


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#1d3557;color:#fff;padding:16px 24px}header h1{margin:0 0 6px}
main{padding:16px 24px}h2{border-bottom:1px solid #ccc;padding-bottom:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
figure{margin:0;background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;overflow:hidden}
figure img,figure video{width:100%;aspect-ratio:1;object-fit:cover;background:#ddd;display:block}
figure audio{width:100%;margin:12px 0}figcaption{padding:8px 10px}figcaption p{margin:2px 0}
.prompt{font-style:italic}.path{font-family:monospace;font-size:12px;word-break:break-all}
table{border-collapse:collapse;width:100%;background:#fff}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
.error{color:#b00020;font-weight:bold}.filters select{margin-left:4px}
"""
SCRIPT = """
document.getElementById('fmodel').addEventListener('change', function (e) {
  var m = e.target.value;
  document.querySelectorAll('.card').forEach(function (c) { c.style.display = (!m || c.dataset.model === m) ? '' : 'none'; });
});
"""
