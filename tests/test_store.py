"""The store on its own, on real SQLite files: it owns every statement, counts what was paid, upgrades old files,
keeps its reserve, and rebuilds from sidecars and from what a damaged file still holds."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from batchrunner.errors import StateDamaged, StateError
from batchrunner.runner import run_campaign
from batchrunner.sandbox import serve
from batchrunner.store import MIGRATIONS, RESERVE_BYTES, STATE_DIR, Job, JobState, Store, rebuild

from .test_run import KEY, ROOT, cfg, plan_of, sandbox


def test_nothing_but_the_store_sees_sql() -> None:
    for path in sorted((ROOT / "batchrunner").rglob("*.py")):
        if path.name != "store.py":
            text = path.read_text()
            assert not re.search(r"\bsqlite3\b|\.conn\b|\._conn\b", text), f"{path} reaches past the Store"


def test_a_store_is_a_context_manager_that_commits_and_releases_the_directory(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.csv")
    with Store.open(tmp_path) as store:
        store.sync(plan.specs)
        job = next(store.work())
        store.transition(job, JobState.SUBMITTING, sends=1)
        with pytest.raises(StateError, match="another batchrunner run"):
            Store.open(tmp_path)
    with Store.open(tmp_path) as again:  # the lock was released, the transition committed
        assert again.counts() == {"pending": 3, "submitting": 1}


def test_counters_add_up_through_transitions(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.csv")
    with Store.open(tmp_path) as store:
        store.sync(plan.specs)
        job = next(store.work())
        store.transition(job, JobState.SUBMITTING, sends=1)
        store.transition(job, JobState.PENDING, ambiguous=1)  # sent, no answer
        store.transition(job, JobState.SUBMITTING, sends=1)
        store.transition(job, JobState.SUBMITTED, task_id="a" * 28, submits=1)
        store.transition(job, JobState.FAILED, repaid=1, retryable=1)  # the API forgot the task
        totals = store.totals()
    assert (totals["sends"], totals["submits"], totals["ambiguous"], totals["repaid"], totals["possibly_paid_twice"]) == (2, 1, 1, 1, 2)


def test_a_version_2_state_is_upgraded_by_a_reader_too(tmp_path: Path) -> None:
    db = tmp_path / STATE_DIR / "state.sqlite"
    db.parent.mkdir()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        conn.executescript(f"BEGIN; {script}; PRAGMA user_version = {number}; COMMIT;")
    conn.execute(
        "INSERT INTO jobs (id, idx, model, modality, spec, state, submits, ambiguous, created_at, updated_at) "
        "VALUES ('j1', 0, 'flux-2', 'image', '{}', 'submitted', 1, 2, 0, 0)"
    )
    conn.close()
    with Store.open(tmp_path, lock=False, create=False) as reader:  # `status` on a state an older batchrunner wrote
        totals = reader.totals()
    assert totals["sends"] == 3 and totals["submits"] == 1  # at least the answered and the ambiguous ones were sent


def test_a_reserve_is_kept_beside_the_state_and_made_again(tmp_path: Path) -> None:
    reserve = tmp_path / STATE_DIR / "reserve"
    Store.open(tmp_path).close()
    assert reserve.stat().st_size == RESERVE_BYTES
    reserve.unlink()
    Store.open(tmp_path).close()
    assert reserve.stat().st_size == RESERVE_BYTES
    with Store.open(tmp_path, lock=False, create=False):  # a reader writes nothing
        pass


async def test_recover_on_a_sound_state_adds_only_what_it_did_not_record(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.yaml")
    async with serve(sandbox()) as (_, url):
        await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
    with Store.open(tmp_path) as store:  # a transition lost with a deleted -wal file, say
        job = next(j for j in _jobs(store) if j.state == JobState.DONE)
        store.transition(job, JobState.PENDING)
    done = rebuild(tmp_path)
    assert (done.problem, done.recovered, done.already_done, done.rejected, done.set_aside) == (None, 1, 17, [], [])
    with Store.open(tmp_path, lock=False, create=False) as store:
        assert store.counts() == {"done": 18} and store.meta("recovered") is None


def _jobs(store: Store) -> list[Job]:
    """Every job as a :class:`Job` (``work()`` lists only the ones left to do)."""
    return [Job(r["id"], r["model"], r["modality"], {}, "", {}, JobState(r["state"]), r["task_id"], None, None) for r in store.rows()]


def test_rebuild_keeps_the_task_ids_a_damaged_file_still_holds(tmp_path: Path, write) -> None:  # type: ignore[no-untyped-def]
    m = write(
        "m.yaml", "matrix: {i: [" + ",".join(map(str, range(300))) + "]}\njobs:\n  - {model: flux-2, prompt: 'a longer prompt {i}'}\n"
    )
    plan = plan_of(m)
    out = tmp_path / "out"
    with Store.open(out) as store:  # 300 paid tasks still running: nothing on disk proves them, only the state
        store.claim(plan.manifest.name)
        store.sync(plan.specs)
        for n, job in enumerate(store.work()):
            store.transition(job, JobState.SUBMITTING, sends=1)
            store.transition(job, JobState.SUBMITTED, task_id=f"{n:028x}", submits=1, submitted_at=1.0)
    db = out / STATE_DIR / "state.sqlite"
    inspect = sqlite3.connect(db)  # an outside tool, as a disk fault would: pick a leaf page of the jobs table
    leaves = [r[0] for r in inspect.execute("SELECT pageno FROM dbstat WHERE name = 'jobs' AND pagetype = 'leaf' ORDER BY pageno")]
    page_size = inspect.execute("PRAGMA page_size").fetchone()[0]
    inspect.close()
    assert len(leaves) >= 5
    with open(db, "r+b") as f:
        f.seek((leaves[len(leaves) // 2] - 1) * page_size)
        f.write(b"\xa5" * page_size)
    with pytest.raises(StateDamaged, match="is damaged"):
        Store.open(out)
    done = rebuild(out)
    assert done.problem == "damaged" and done.set_aside[0].name.startswith("state.sqlite.damaged-")
    assert 300 - 2 * (300 // len(leaves)) < done.kept < 300 and done.kept_submitted == done.kept  # one page lost, the rest kept
    with Store.open(out) as store:
        assert store.meta("campaign") == plan.manifest.name
        held = {r["id"]: r["task_id"] for r in store.rows()}
    expected = {spec.id: f"{n:028x}" for n, spec in enumerate(plan.specs)}
    assert held.items() <= expected.items() and len(held) == done.kept  # every kept task keeps its own id
