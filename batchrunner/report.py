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
import stat
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .catalog import model_fields
from .download import create_new, write_error
from .errors import ReportError, StateError, redact
from .pipeline import chain as made_from
from .pipeline import readable
from .store import Store

CSV_COLUMNS = (
    "id", "state", "model", "modality", "path", "sha256", "bytes", "task_id", "sends", "submits", "ambiguous", "repaid", "error", "prompt",
    "review", "take",
)  # fmt: skip
GALLERY_LIMIT = 5000
_IMAGE = {"png", "jpg", "jpeg", "webp", "gif"}
_VIDEO = {"mp4", "webm", "mov"}
_AUDIO = {"wav", "mp3", "ogg", "flac"}


def _job_record(row: Any, store: Store | None = None) -> dict[str, Any]:
    spec = json.loads(row["spec"])
    fields = model_fields(spec["body"])
    record = {
        "id": row["id"], "state": row["state"], "model": row["model"], "modality": row["modality"],
        "path": row["path"], "sha256": row["sha256"], "bytes": row["bytes"], "task_id": row["task_id"],
        "sends": row["sends"], "submits": row["submits"], "ambiguous": row["ambiguous"], "repaid": row["repaid"], "error": row["error"],
        "prompt": str(fields.get("prompt", "")), "parameters": {k: v for k, v in fields.items() if k not in ("prompt", "model")},
        "vars": spec.get("vars", {}), "variant": spec.get("variant"),
        "review": row["review"], "take": row["take"], "intended_path": spec.get("path"),
    }  # fmt: skip
    if "step" in spec or "after" in spec:  # pipelines: its step, and what it was made from
        record |= {"step": spec.get("step") or row["model"], "inputs": made_from(store, spec) if store is not None else []}
        if store is not None:  # an upstream result by its path, not its token
            record["parameters"] = readable(record["parameters"], store)
    return record


class _Redacting:
    """A text file whose every write passes through :func:`redact`."""

    def __init__(self, file: TextIO) -> None:
        self.file = file

    def write(self, text: str) -> None:
        self.file.write(redact(text))


@contextlib.contextmanager
def _report_file(path: Path) -> Iterator[_Redacting]:
    """A report written to a new temp file beside its final name and renamed into place only when whole.

    As results are (:mod:`batchrunner.download`): the temp is created exclusively without
    following a link, and the rename replaces a link planted at either name, never writing
    through it. An ``OSError`` becomes a :class:`ResultWriteError` naming the report.
    """
    tmp = f".{path.name}.tmp"
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise write_error(exc, path.name) from None
    try:
        with open(create_new(folder, tmp), "w", encoding="utf-8", newline="") as f:
            yield _Redacting(f)
        os.rename(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError as exc:
        raise write_error(exc, path.name) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder)
        os.close(folder)


def requests(totals: dict[str, float]) -> dict[str, int]:
    """What was paid for, from :meth:`Store.totals`: generate requests sent, answered with a task id, possibly created
    without an answer (ambiguous), tasks re-paid after the API forgot them, and the sum that may have been paid twice."""
    keys = {"sent": "sends", "answered_with_task_id": "submits", "ambiguous": "ambiguous", "repaid": "repaid"}
    return {name: int(totals[key]) for name, key in keys.items()} | {"possibly_paid_twice": int(totals["possibly_paid_twice"])}


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
        "requests": requests(totals),
        "credits": {"spent": totals["credits_spent"], "planned": store.planned_credits()},
        "recovered": json.loads(recovered) if recovered else None,
        "wall_s": round(wall_s, 3) if wall_s is not None else None,
        "runs": len(store.runs()),
        "models": store.models(),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_reports(
    store: Store,
    *,
    wall_s: float | None = None,
    outcome: str | None = None,
    error: str | None = None,
    links: Mapping[str, str] | None = None,
    links_expire_at: float | None = None,
) -> dict[str, Any]:
    """Write the three reports into the store's directory; return the summary.

    ``links`` (result path → URL) points the gallery at results kept only in a bucket
    (presigned URLs, which expire at ``links_expire_at``; the page says when).

    Streamed: jobs are read from the store one at a time and written as they come, one
    JSON object per line of report.json, so a 100,000-job report costs little memory.
    Only the gallery's cards (at most :data:`GALLERY_LIMIT`) are held until the page is written.
    """
    summary = summarize(store, wall_s=wall_s, outcome=outcome, error=error)
    out = store.out_dir
    if outcome == "interrupted" and sum(summary["counts"].values()) > INTERRUPTED_REPORT_MAX:
        summary["reports"] = "not rewritten (interrupted): `batchrunner report DIR` or the next run writes them"
        return summary
    try:
        digest = store.rows_digest()
        if outcome is not None and not links and store.meta(REPORTS_META) == digest and _patch_summary(out / "report.json", summary):
            return summary  # a run that changed no job (a no-op re-run): only report.json's summary is rewritten
        _write(store, summary, links or {}, links_expire_at)
        with contextlib.suppress(StateError):  # a store opened read-only (`batchrunner report` beside a review): not remembered
            store.set_meta(REPORTS_META, digest)
    except OSError as exc:  # a full or read-only output folder
        out = store.out_dir
        raise ReportError(
            f"cannot write the reports in {out} ({exc.strerror or exc}) — free space or make the folder writable, "
            f"then run `batchrunner report {out}`"
        ) from exc
    return summary


def _write(store: Store, summary: dict[str, Any], links: Mapping[str, str], links_expire_at: float | None) -> None:
    out = store.out_dir
    with (
        _report_file(out / "report.json") as as_json,
        _report_file(out / "report.csv") as as_csv,
        _report_file(out / "report.html") as as_html,
    ):
        page = Gallery.for_store(store, summary, links=links, links_expire_at=links_expire_at)
        writer = csv.DictWriter(as_csv, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        as_json.write('{"jobs": [')
        for n, row in enumerate(store.rows()):
            job = _job_record(row, store)
            as_json.write((",\n" if n else "\n") + json.dumps(job, ensure_ascii=False, default=str))
            writer.writerow(job)
            page.add(job)
        as_json.write("\n],\n" + _SUMMARY + json.dumps(summary, ensure_ascii=False) + "}\n")
        as_html.write(page.render())


# report.json ends with the summary, on its own line: a run that changed no job rewrites only that
# line (REPORTS_META holds the digest of the rows the reports were last written from)
_SUMMARY = '"summary": '
REPORTS_META = "reports"
# An interrupted run of more jobs leaves the reports to `batchrunner report` or the next run: a stop is
# prompt (5,000 rows take about a second on a small machine; a million, minutes)
INTERRUPTED_REPORT_MAX = 5_000


def _patch_summary(path: Path, summary: dict[str, Any]) -> bool:
    """Rewrite the summary line at the end of ``path`` in place; False when a report is not as written (rewrite them all).

    Never through a link planted at the name (nor a second hard link), as :func:`_report_file` never writes through one.
    """
    if not all((path.parent / name).is_file() for name in ("report.csv", "report.html")):
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    with open(fd, "r+b") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return False
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 2**20))
        tail = f.read()
        at = tail.rfind(b"\n" + _SUMMARY.encode())
        if at < 0 or not tail.endswith(b"}\n"):
            return False
        f.seek(size - len(tail) + at + 1)
        f.write(redact(_SUMMARY + json.dumps(summary, ensure_ascii=False) + "}\n").encode("utf-8", "surrogatepass"))
        f.truncate()
    return True


def _requests_line(requests: dict[str, int]) -> str:
    """What was paid for, in words (the report page's header and ``batchrunner status``)."""
    return (
        f"generate requests sent {requests['sent']} · answered with a task id {requests['answered_with_task_id']} · "
        f"possibly created without an answer (ambiguous) {requests['ambiguous']} · "
        f"re-paid after the API forgot a task {requests['repaid']} · possibly paid twice {requests['possibly_paid_twice']}"
    )


def render_gallery(store: Store, *, review_token: str | None = None, page: int = 1) -> tuple[str, set[str]]:
    """The gallery of ``store`` as the review server serves it (one page), and every result path it may link to."""
    gallery = Gallery.for_store(store, summarize(store), review_token=review_token, page=page)
    files: set[str] = set()
    for row in store.rows():
        job = _job_record(row, store)
        gallery.add(job)
        if job["state"] == "done" and job["path"]:
            files.add(job["path"])
    return redact(gallery.render()), files


def _e(value: Any) -> str:
    return html.escape(redact(str(value)), quote=True)


def _label(value: Any) -> str:
    """A var's value as the filters compare it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _kind(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower()
    return "image" if ext in _IMAGE else "video" if ext in _VIDEO else "audio" if ext in _AUDIO else "file"


def _media(job: dict[str, Any], size: tuple[int, int] | None = None, src: str | None = None) -> str:
    path = job["path"] or ""
    src = src or _href(path)
    alt = _e(job["prompt"][:120])
    kind = _kind(path)
    if kind == "image":
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        return f'<img src="{src}" alt="{alt}" loading="lazy" decoding="async"{dims}>'
    if kind == "video":  # its src is set when it comes near the viewport: thousands of videos never load at once
        return f'<video data-src="{src}" controls muted loop playsinline preload="metadata"></video>'
    if kind == "audio":
        return f'<audio src="{src}" controls preload="none"></audio>'
    return f'<a class="file" href="{src}">{_e(path)}</a>'


def _step(label: str, href: str) -> str:
    """One step of a pipeline card's chain: a thumbnail of an image (named by its title), else its name."""
    if _kind(href) == "image" and "*" not in href:
        return f'<a href="{_href(href)}" title="{_e(label)}"><img class=thumb src="{_href(href)}" alt="{_e(label)}" loading=lazy></a>'
    return f'<a href="{_href(href)}">{_e(label)}</a>'


def _href(path: str) -> str:
    """A relative, URL-quoted, HTML-escaped link to a file under the output folder."""
    return _e("/".join(quote(segment) for segment in path.split("/")))


def image_size(out_dir: Path, path: str) -> tuple[int, int] | None:
    """(width, height) from the header of the image at ``path`` under ``out_dir``, never following a symlink; None if unknown.

    The page gives every picture its real shape before it loads: no crop, no jumping
    layout, and lazy loading only fetches what is near the screen.
    """
    try:
        fd = os.open(out_dir / path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        head = os.read(fd, 65536) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    return _dimensions(head)


def _dimensions(head: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF, WebP or JPEG from its first bytes."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            w, h = struct.unpack(">II", head[16:24])
        elif head[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack("<HH", head[6:10])
        elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            chunk = head[12:16]
            if chunk == b"VP8 ":
                w, h = (n & 0x3FFF for n in struct.unpack("<HH", head[26:30]))
            elif chunk == b"VP8L":
                bits = int.from_bytes(head[21:25], "little")
                w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            elif chunk == b"VP8X":
                w, h = int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
            else:
                return None
        elif head[:2] == b"\xff\xd8":
            i = 2
            while True:
                if head[i] != 0xFF:
                    return None
                marker = head[i + 1]
                if marker == 0xFF or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # fill byte, markers without a length
                    i += 1 if marker == 0xFF else 2
                    continue
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
                    h, w = struct.unpack(">HH", head[i + 5 : i + 9])
                    break
                i += 2 + int.from_bytes(head[i + 2 : i + 4], "big")
        else:
            return None
    except (struct.error, IndexError):
        return None
    return (w, h) if w > 0 and h > 0 else None


_BUILTIN_FILTERS = ("state", "review", "model", "variant", "step")
_WAITING = {
    "pending": "not made yet — run the same command again",
    "submitting": "being submitted",
    "submitted": "submitted; waiting for its result — run the same command again to collect it",
    "waiting": "waiting for its inputs (other jobs' results) — it runs once they are done",
}


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(at)) if at else "—"


class Gallery:
    """The HTML page: every job as a card in its group (results at their real shape, failed and waiting ones in place).

    Cards carry ``data-*`` attributes (job id, path, state, model, variant, review, vars)
    that the page's script filters on — by every var of the campaign, model, variant,
    state, review decision and pipeline step, combined and kept in the URL fragment — and
    that the review server's page acts on. At most :data:`GALLERY_LIMIT` cards a page
    (``page`` picks which); counts in the header cover every job. With ``review_token`` the
    page gets approve / reject buttons that post to the review server (see review.py).
    """

    def __init__(
        self,
        summary: dict[str, Any],
        group_var: str | None,
        *,
        out_dir: Path | None = None,
        run: dict[str, Any] | None = None,
        review_token: str | None = None,
        page: int = 1,
        links: Mapping[str, str] | None = None,
        links_expire_at: float | None = None,
    ) -> None:
        self.summary, self.group_var, self.out_dir, self.run = summary, group_var, out_dir, run or {}
        self.links, self.links_expire_at = links or {}, links_expire_at
        self.review_token, self.page = review_token, max(1, page)
        self.first = (self.page - 1) * GALLERY_LIMIT  # jobs before this page
        self.groups: dict[str, list[str]] = {}
        self.values: dict[str, dict[str, int]] = {key: {} for key in _BUILTIN_FILTERS}
        self.values["review"] = {"": 0, "approved": 0, "rejected": 0}  # offered from the start: decisions come while one looks
        self.reviews: dict[str, int] = {}
        self.seen = self.shown = 0

    @classmethod
    def for_store(cls, store: Store, summary: dict[str, Any], **options: Any) -> Gallery:
        """The page of ``store``'s campaign, dated by its last run."""
        runs = store.runs()
        return cls(summary, store.meta("group_var") or None, out_dir=store.out_dir, run=dict(runs[-1]) if runs else None, **options)

    def add(self, job: dict[str, Any]) -> None:
        """Count ``job``; make its card if it falls on this page."""
        self.seen += 1
        if job["state"] == "done":
            review = job.get("review") or ""
            self.reviews[review] = self.reviews.get(review, 0) + 1
        if not self.first < self.seen <= self.first + GALLERY_LIMIT:
            return
        self.shown += 1
        key = _label(job["vars"].get(self.group_var, "—")) if self.group_var else "all jobs"
        self.groups.setdefault(key, []).append(self._card(job))

    def _filters(self, job: dict[str, Any]) -> dict[str, str]:
        """The values this card is filtered by: the built-in facets, then each var (a var named like a facet gets ``var:``)."""
        done = job["state"] == "done"
        found = {
            "state": job["state"], "review": (job.get("review") or "") if done else "-", "model": job["model"],
            "variant": _label(job.get("variant") or ""), "step": _label(job.get("step") or ""),
        }  # fmt: skip
        for name, value in job["vars"].items():
            found[f"var:{name}" if name in _BUILTIN_FILTERS else str(name)] = _label(value)
        for key, value in found.items():
            counts = self.values.setdefault(key, {})
            counts[value] = counts.get(value, 0) + 1
        return found

    def _card(self, job: dict[str, Any]) -> str:
        facets = self._filters(job)
        done = job["state"] == "done" and bool(job["path"])
        path = job["path"] if done else str(job.get("intended_path") or "").replace("{ext}", "*")
        variables = json.dumps({str(k): _label(v) for k, v in job["vars"].items()}, ensure_ascii=False, separators=(",", ":"))
        attrs = (
            f'data-id="{_e(job["id"])}" data-path="{_e(path)}" data-state="{_e(job["state"])}" data-model="{_e(job["model"])}" '
            f'data-variant="{_e(facets["variant"])}" data-step="{_e(facets["step"])}" data-review="{_e(facets["review"])}" '
            f'data-take="{_e(job.get("take") or 1)}" data-vars="{_e(variables)}"'
        )
        if done:
            size = image_size(self.out_dir, path) if self.out_dir is not None and _kind(path) == "image" else None
            src = _e(self.links[path]) if path in self.links else _href(path)
            media = _media(job, size, src)
            where = f'<a href="{src}">{_e(path)}</a>'
        else:
            reason = job["error"] if job["state"] == "failed" and job["error"] else _WAITING.get(job["state"], job["state"])
            media = f'<div class="placeholder {_e(job["state"])}"><b>{_e(job["state"])}</b><span>{_e(reason)}</span></div>'
            where = _e(path)
        params = ", ".join(f"{_e(k)}={_e(v)}" for k, v in job["parameters"].items())
        take = f" · take {_e(job['take'])}" if (job.get("take") or 1) > 1 else ""
        chain = ""
        if job.get("inputs"):  # pipelines: what this job was made from, first step first (label, link)
            pairs = [(p, p) if isinstance(p, str) else p for p in job["inputs"]]  # a path, or (label, path)
            links = " → ".join(_step(str(label), str(href)) for label, href in pairs)
            chain = f"<p class=chain>{links} → <b>this</b></p>"
        buttons = ""
        if self.review_token is not None and done:
            buttons = (
                '<p class=decide><button type=button data-d=approved title="approve (a)">✓ approve</button>'
                '<button type=button data-d=rejected title="reject (r)">✗ reject</button></p>'
            )
        enlarge = "" if _kind(path) == "image" and done else '<button type=button class=enlarge title="enlarge (Enter)">⤢</button>'
        return (
            f"<figure class=card tabindex=0 {attrs}><div class=media>{media}</div>{enlarge}<figcaption>"
            f"<p class=prompt>{_e(job['prompt'])}</p><p><b>{_e(job['model'])}</b> {params}{take}</p>{chain}"
            f"<p class=path>{where}</p></figcaption>{buttons}</figure>"
        )

    def _header(self) -> list[str]:
        summary, run = self.summary, self.run
        credits = summary["credits"]
        planned = " (some prices unknown)" if credits["planned"] is None else f" of {credits['planned']:g} planned"
        wall = summary["wall_s"]
        if wall is None and run.get("ended_at") and run.get("started_at"):
            wall = round(run["ended_at"] - run["started_at"], 3)
        counts = " · ".join(f"<b>{n}</b> {_e(state)}" for state, n in sorted(summary["counts"].items())) or "no jobs"
        decided = [f"<b>{self.reviews[word]}</b> {word}" for word in ("approved", "rejected") if self.reviews.get(word)]
        review = " · ".join(decided) or "nothing reviewed yet"
        title = _e(summary["campaign"] or "batchrunner")
        return [
            f"<header><h1>{title}</h1>",
            f"<p class=run>run {self._run_number()}started {_e(_when(run.get('started_at')))} · wall time "
            f"{_e(wall if wall is not None else '—')} s · outcome <b>{_e(summary['outcome'] or run.get('outcome') or '—')}</b></p>",
            f"<p class=counts>{summary['jobs']} jobs: {counts}</p>",
            f"<p>credits spent {credits['spent']:g}{planned} · models: {_e(', '.join(summary['models']))}</p>",
            f"<p class=requests>{_requests_line(summary['requests'])}</p>",
            f"<p class=reviewed>review: {review} (of {sum(self.reviews.values())} results)</p></header>",
        ]

    def _links_note(self) -> list[str]:
        """For results kept only in the bucket: when the gallery's presigned links expire."""
        if not self.links:
            return []
        return [
            f"<p class=links>results are kept in the bucket only; their links expire {_e(_when(self.links_expire_at))} — "
            "run the same command again for fresh ones</p>"
        ]

    def _run_number(self) -> str:
        return f"{self.summary['runs']} " if self.summary.get("runs") else ""

    def _filter_bar(self) -> str:
        selects = []
        for key, counts in self.values.items():
            if len(counts) < 2 and key not in ("state", "review"):
                continue  # a facet with one value narrows nothing
            name = key.removeprefix("var:")
            options = "".join(
                f'<option value="={_e(v)}" data-label="{_e(self._option(key, v))}">{_e(self._option(key, v))} ({n})</option>'
                for v, n in sorted(counts.items())
            )
            selects.append(f'<label>{_e(name)} <select data-key="{_e(key)}"><option value="">all</option>{options}</select></label>')
        keys = "click or Enter: enlarge · ←/→: move · Esc: close"
        if self.review_token is not None:
            keys += " · a: approve · r: reject · u: undecide"
        else:
            keys += " · to approve or reject: batchrunner review DIR"
        return (
            f"<nav id=filters>{''.join(selects)}<button type=button id=clear>clear filters</button>"
            f"<span id=shown>{self.shown} shown</span><span class=keys>{keys}</span><span id=msg role=status></span></nav>"
        )

    @staticmethod
    def _option(key: str, value: str) -> str:
        if key == "review":
            return {"": "undecided", "-": "not reviewable"}.get(value, value)
        return value if value != "" else "(none)"

    def render(self) -> str:
        summary, group_var = self.summary, self.group_var
        title = _e(summary["campaign"] or "batchrunner")
        token = f'<meta name=batchrunner-token content="{_e(self.review_token)}">' if self.review_token is not None else ""
        parts = [
            "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width'>",
            f"<title>{title} — {'review' if self.review_token is not None else 'report'}</title>{token}",
            f"<style>{CSS}</style></head><body>",
            *self._header(),
            *self._links_note(),
            self._filter_bar(),
            "<main>",
        ]
        if summary.get("error"):
            parts.append(f"<p class=error>run stopped: {_e(summary['error'])}</p>")
        if self.shown < self.seen:
            last = self.first + self.shown
            more = (
                f' · <a href="?page={self.page + 1}">next page ›</a>'
                if self.review_token is not None and last < self.seen
                else " — `batchrunner review` pages through them all"
                if self.review_token is None
                else ""
            )
            back = f'<a href="?page={self.page - 1}">‹ previous page</a> · ' if self.review_token is not None and self.page > 1 else ""
            parts.append(
                f"<p class=more>{back}showing jobs {self.first + 1}–{last} of {self.seen}; filters apply to these — "
                f"report.csv lists them all{more}</p>"
            )
        for key, cards in self.groups.items():
            heading = f"{_e(group_var)} {_e(key)}" if group_var else _e(key)
            grid = "".join(cards)  # no text nodes between cards: thousands fewer nodes to parse
            parts.append(f"<section><h2>{heading} <small class=n>({len(cards)})</small></h2><div class=grid>{grid}</div></section>")
        parts.append(
            "</main><div id=lightbox hidden role=dialog aria-modal=true aria-label=enlarged tabindex=-1>"
            "<button type=button id=lb-close title='close (Esc)'>×</button><button type=button id=lb-prev title='previous (←)'>‹</button>"
            "<div id=lb-body></div><button type=button id=lb-next title='next (→)'>›</button><div id=lb-caption></div></div>"
            f"<script>{SCRIPT}</script></body></html>"
        )
        return "\n".join(parts)


CSS = """
*{box-sizing:border-box}[hidden]{display:none!important}
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
header{background:#1d3557;color:#fff;padding:14px 24px 8px}header h1{margin:0 0 4px}header p{margin:2px 0}
#filters{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;padding:8px 24px;
 background:#28476e;color:#fff}#filters select{margin-left:4px;max-width:16em}.keys{opacity:.75;font-size:12px}
#msg{font-weight:bold}#msg.bad{color:#ffb4a9}
main{padding:8px 24px 40px}h2{border-bottom:1px solid #ccc;padding-bottom:4px}.more{font-style:italic}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;align-items:start}
.card{margin:0;background:#fff;border-radius:8px;box-shadow:0 1px 3px #0002;overflow:hidden;position:relative;outline:none;
 content-visibility:auto;contain-intrinsic-size:auto 320px}
.card:focus-visible,.card.current{box-shadow:0 0 0 3px #e76f51}
.media img,.media video{display:block;width:100%;height:auto;background:#ddd}.media img{cursor:zoom-in}
.media audio{width:100%;margin:12px 0 0}.media .file{display:block;padding:12px}
.placeholder{aspect-ratio:4/3;display:flex;flex-direction:column;justify-content:center;align-items:center;gap:6px;padding:12px;
 text-align:center;background:repeating-linear-gradient(45deg,#eee 0 10px,#e6e6e6 10px 20px);color:#555}
.placeholder.failed{background:#fdecea;color:#b00020}
.enlarge{position:absolute;top:6px;right:6px;border:0;border-radius:4px;background:#000a;color:#fff;cursor:pointer}
.card[data-review=approved]::before,.card[data-review=rejected]::before{position:absolute;z-index:1;top:6px;left:6px;padding:1px 8px;
 border-radius:10px;font-size:12px;font-weight:bold;color:#fff}
.card[data-review=approved]::before{content:"✓ approved";background:#2a9d8f}
.card[data-review=rejected]::before{content:"✗ rejected";background:#b00020}.card[data-review=rejected] .media{opacity:.55}
figcaption{padding:8px 10px}figcaption p{margin:2px 0}.prompt{font-style:italic}
.path,.chain{font-family:monospace;font-size:12px;word-break:break-all}
.chain img.thumb{width:48px;height:48px;object-fit:cover;vertical-align:middle;border:1px solid #ccc;border-radius:3px}
.decide{display:flex;gap:6px;padding:0 10px 10px;margin:0}.decide button{flex:1;cursor:pointer;border:1px solid #bbb;border-radius:4px;
 background:#fff;padding:4px}.card[data-review=approved] [data-d=approved]{background:#2a9d8f;color:#fff}
.card[data-review=rejected] [data-d=rejected]{background:#b00020;color:#fff}
.error{color:#b00020;font-weight:bold}
#lightbox{position:fixed;inset:0;z-index:10;background:#000e;display:grid;grid-template:1fr auto/48px 1fr 48px;align-items:center;
 outline:none}#lb-body{grid-area:1/2;display:flex;justify-content:center;align-items:center;min-height:0;height:100%}
#lb-body img,#lb-body video{width:100%;height:100%;max-height:calc(100vh - 150px);object-fit:contain}
#lb-body .placeholder{width:min(90%,480px)}
#lb-body audio{width:min(90%,480px)}#lb-caption{grid-area:2/1/3/4;color:#eee;padding:8px 24px;max-height:140px;overflow:auto}
#lb-caption a{color:#9cf}#lb-caption .decide{padding:6px 0}#lb-caption .decide button{flex:0 0 9em}
#lightbox>button{background:none;border:0;color:#fff;font-size:34px;cursor:pointer}
#lb-close{position:absolute;top:4px;right:12px}#lb-prev{grid-area:1/1}#lb-next{grid-area:1/3}
#lightbox[data-review=approved] #lb-caption{border-top:4px solid #2a9d8f}
#lightbox[data-review=rejected] #lb-caption{border-top:4px solid #b00020}
"""

SCRIPT = r"""
(function () {
  'use strict';
  var FACETS = ['state', 'review', 'model', 'variant', 'step'];
  var KEYS = {a: 'approved', r: 'rejected', u: ''};
  var meta = document.querySelector('meta[name=batchrunner-token]');
  var token = meta ? meta.getAttribute('content') : null;
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var selects = Array.prototype.slice.call(document.querySelectorAll('#filters select'));
  var sections = Array.prototype.slice.call(document.querySelectorAll('main section'));
  var shownEl = document.getElementById('shown'), msg = document.getElementById('msg');
  var lb = document.getElementById('lightbox'), lbBody = document.getElementById('lb-body');
  var lbCaption = document.getElementById('lb-caption'), open = null;

  var items = cards.map(function (el) {
    var d = el.dataset, f = {state: d.state, review: d.review, model: d.model, variant: d.variant, step: d.step};
    var vars = JSON.parse(d.vars || '{}');
    Object.keys(vars).forEach(function (k) { f[FACETS.indexOf(k) >= 0 ? 'var:' + k : k] = vars[k]; });
    var it = {el: el, f: f, section: sections.indexOf(el.closest('section'))};
    el.brItem = it;
    return it;
  });

  function active() {
    var a = {};
    selects.forEach(function (s) { if (s.value !== '') a[s.dataset.key] = s.value.slice(1); });
    return a;
  }

  function apply(writeHash) {
    var act = active(), keys = Object.keys(act), shown = 0, counts = {}, perSection = sections.map(function () { return 0; });
    selects.forEach(function (s) { counts[s.dataset.key] = {}; });
    items.forEach(function (it) {
      var misses = 0, missed = null;
      for (var i = 0; i < keys.length && misses < 2; i++) {
        if ((it.f[keys[i]] || '') !== act[keys[i]]) { misses++; missed = keys[i]; }
      }
      if (it.el.hidden !== misses > 0) it.el.hidden = misses > 0;  // untouched cards cost no style work
      if (!misses) { shown++; perSection[it.section]++; }
      if (misses > 1) return;
      selects.forEach(function (s) {  // an option counts the items it would show with the other filters kept
        var k = s.dataset.key;
        if (!misses || missed === k) { var v = it.f[k] || ''; counts[k][v] = (counts[k][v] || 0) + 1; }
      });
    });
    selects.forEach(function (s) {
      var c = counts[s.dataset.key], total = 0;
      each(s.options, function (o) {
        if (!o.value) return;
        var n = c[o.value.slice(1)] || 0;
        total += n;
        o.textContent = o.dataset.label + ' (' + n + ')';
      });
      s.options[0].textContent = 'all (' + total + ')';
    });
    sections.forEach(function (sec, i) {
      if (sec.hidden !== (perSection[i] === 0)) sec.hidden = perSection[i] === 0;
      var n = sec.querySelector('.n');
      if (n) n.textContent = '(' + perSection[i] + (keys.length ? ' of ' + sec.querySelectorAll('.card').length : '') + ')';
    });
    shownEl.textContent = shown + ' of ' + items.length + ' shown';
    if (writeHash) {
      var p = new URLSearchParams();
      keys.forEach(function (k) { p.set(k, act[k]); });
      history.replaceState(null, '', location.href.split('#')[0] + '#' + p.toString());
    }
  }

  function fromHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    selects.forEach(function (s) {
      var k = s.dataset.key, want = p.has(k) ? '=' + p.get(k) : '';
      var known = Array.prototype.some.call(s.options, function (o) { return o.value === want; });
      if (!known) {  // a shared link may name a value this page does not hold: keep it, showing nothing
        var o = new Option(p.get(k), want);
        o.dataset.label = p.get(k);
        s.add(o);
      }
      s.value = want;
    });
    apply(false);
  }

  function say(text, bad) { msg.textContent = text; msg.className = bad ? 'bad' : ''; }

  function visible() { return cards.filter(function (c) { return !c.hidden; }); }

  function neighbour(card, step) {
    var v = visible(), i = v.indexOf(card);
    return i < 0 ? null : v[i + step] || null;
  }

  function show(card) {
    if (open) open.classList.remove('current');
    open = card;
    card.classList.add('current');
    lbBody.textContent = '';
    var m = card.querySelector('.media img, .media video, .media audio, .media .placeholder, .media .file'), node;
    if (m && m.tagName === 'IMG') {
      node = new Image();
      node.src = m.getAttribute('src');
      node.alt = m.alt;
    } else if (m && (m.tagName === 'VIDEO' || m.tagName === 'AUDIO')) {
      node = document.createElement(m.tagName.toLowerCase());
      node.src = m.getAttribute('src') || m.dataset.src;
      node.controls = true;
      node.loop = m.loop;
    } else {
      node = m ? m.cloneNode(true) : document.createElement('div');
    }
    lbBody.appendChild(node);
    lbCaption.textContent = '';
    lbCaption.appendChild(card.querySelector('figcaption').cloneNode(true));
    var decide = card.querySelector('.decide');
    if (decide) lbCaption.appendChild(decide.cloneNode(true));
    lb.dataset.review = card.dataset.review;
    lb.dataset.id = card.dataset.id;
    lb.hidden = false;
    lb.focus();
  }

  function close() {
    lb.hidden = true;
    lbBody.textContent = '';
    if (open) { open.classList.remove('current'); open.focus(); }
    open = null;
  }

  function move(step) {
    var next = open && neighbour(open, step);
    if (next) show(next);
  }

  function decide(card, decision, advance) {
    if (!token || !card || card.dataset.state !== 'done') return;
    var next = advance ? neighbour(card, 1) : null;
    fetch('/api/decision', {
      method: 'POST',
      headers: {'Content-Type': 'application/json', 'X-Batchrunner-Token': token},
      body: JSON.stringify({id: card.dataset.id, decision: decision || null})
    }).then(function (r) {
      return r.json().then(function (j) { if (!r.ok) throw new Error(j.error || r.statusText); return j; });
    }).then(function (j) {
      var review = j.review || '';
      card.dataset.review = review;
      card.brItem.f.review = review;
      say((review || 'undecided') + ': ' + card.dataset.path, false);
      apply(false);
      if (open === card) {
        lb.dataset.review = review;
        if (advance && next && review) show(next);
      }
    }).catch(function (err) { say('not saved: ' + err.message, true); });
  }

  selects.forEach(function (s) { s.addEventListener('change', function () { apply(true); }); });
  document.getElementById('clear').addEventListener('click', function () {
    selects.forEach(function (s) { s.value = ''; });
    apply(true);
  });
  window.addEventListener('hashchange', fromHash);

  document.querySelector('main').addEventListener('click', function (e) {
    var t = e.target, card = t.closest('.card');
    if (!card) return;
    if (t.closest('.decide button')) {
      var d = t.closest('button').dataset.d;
      decide(card, card.dataset.review === d ? '' : d, false);
    } else if (t.closest('.enlarge') || t.matches('.media img')) {
      show(card);
    }
  });
  lb.addEventListener('click', function (e) {
    var t = e.target;
    if (t === lb || t === lbBody || t.id === 'lb-close') close();
    else if (t.id === 'lb-prev') move(-1);
    else if (t.id === 'lb-next') move(1);
    else if (t.closest('.decide button') && open) {
      var d = t.closest('button').dataset.d;
      decide(open, open.dataset.review === d ? '' : d, false);
    }
  });

  document.addEventListener('keydown', function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target, tag = t && t.tagName;
    if (tag === 'SELECT' || tag === 'INPUT' || tag === 'TEXTAREA' || (t && t.isContentEditable)) return;
    var key = e.key;
    if (!lb.hidden) {
      if (key === 'Escape') close();
      else if (key === 'ArrowRight' || key === 'ArrowDown') move(1);
      else if (key === 'ArrowLeft' || key === 'ArrowUp') move(-1);
      else if (token && KEYS.hasOwnProperty(key)) decide(open, KEYS[key], true);
      else return;
      e.preventDefault();
      return;
    }
    var card = t && t.closest ? t.closest('.card') : null;
    if (!card) return;
    if (key === 'Enter' && t === card) show(card);
    else if (key === 'ArrowRight' || key === 'ArrowLeft') {
      var next = neighbour(card, key === 'ArrowRight' ? 1 : -1);
      if (next) next.focus();
    } else if (token && KEYS.hasOwnProperty(key)) decide(card, KEYS[key], false);
    else return;
    e.preventDefault();
  });

  var lazy = document.querySelectorAll('video[data-src]');
  if ('IntersectionObserver' in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (en) {
        if (en.isIntersecting) { en.target.src = en.target.dataset.src; io.unobserve(en.target); }
      });
    }, {rootMargin: '600px'});
    each(lazy, function (v) { io.observe(v); });
  } else {
    each(lazy, function (v) { v.src = v.dataset.src; });
  }
  fromHash();
})();
"""
