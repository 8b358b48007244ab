"""The engine's parts on their own: group commit, the file finisher, the poll schedule (real SQLite, real files)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import anyio
import pytest

from batchrunner.client import Client
from batchrunner.download import Finisher
from batchrunner.errors import ResultWriteError, StateError
from batchrunner.runner import Durations, Runner, poll_delay, run_campaign
from batchrunner.sandbox import serve
from batchrunner.store import JobState, Store

from .test_run import KEY, ROOT, cfg, plan_of, sandbox


def committed_states(out: Path) -> dict[str, int]:
    """What another process (``batchrunner status``) sees: committed rows only."""
    conn = sqlite3.connect(out / ".batchrunner" / "state.sqlite")
    try:
        return dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    finally:
        conn.close()


async def test_one_commit_serves_every_job_that_asks_together(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.sync(plan_of(ROOT / "manifests/demo.yaml").specs)
    commits = store.commits
    jobs = list(store.work())

    async def submit(job):  # type: ignore[no-untyped-def]
        store.transition(job, JobState.SUBMITTING)
        assert committed_states(tmp_path).get("submitting", 0) < len(jobs)  # not on disk before durable()
        await store.durable()
        assert committed_states(tmp_path).get("submitting", 0) == len(jobs)  # on disk for everyone after

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(submit, job)
    assert len(jobs) == 18 and store.commits - commits == 1
    store.close()


async def test_transitions_nobody_waits_for_are_committed_by_close(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.sync(plan_of(ROOT / "manifests/demo.csv").specs)
    for job in store.work():
        store.transition(job, JobState.SUBMITTING)
    assert committed_states(tmp_path) == {"pending": 4}
    store.close()
    assert committed_states(tmp_path) == {"submitting": 4}


async def test_finisher_puts_files_in_place_and_one_failure_spoils_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a folder should be")
    work = [(f"d{n}/.f{n}.tmp", f"bytes {n}".encode(), f"d{n}/f{n}.png", f'{{"n": {n}}}\n') for n in range(5)]
    work.append(("blocked/.x.tmp", b"never", "blocked/x.png", "{}\n"))
    finisher = Finisher(tmp_path)
    outcomes = []

    async def finish(item):  # type: ignore[no-untyped-def]
        try:
            await finisher.finish(*item)
            outcomes.append("ok")
        except ResultWriteError as exc:
            outcomes.append(exc.message)

    async with anyio.create_task_group() as tg:
        for item in work:
            tg.start_soon(finish, item)
    finisher.close()
    assert sorted(outcomes) == ["blocked is a file where a folder is needed (move it away)"] + ["ok"] * 5
    for n in range(5):
        assert (tmp_path / f"d{n}" / f"f{n}.png").read_bytes() == f"bytes {n}".encode()
        assert (tmp_path / f"d{n}" / f"f{n}.png.json").read_text() == f'{{"n": {n}}}\n'
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_poll_schedule_first_when_told_then_at_most_15_percent_of_age() -> None:
    rng = random.Random(7)
    assert poll_delay(0, first_s=10.0, elapsed_s=0.0, cap_s=60.0, rng=rng) == 10.0
    for age in (10.0, 40.0, 100.0):
        steps = [poll_delay(3, first_s=10.0, elapsed_s=age, cap_s=60.0, rng=rng) for _ in range(200)]
        assert 0.8 * 0.15 * age <= min(steps) and max(steps) <= 0.15 * age + 1e-9
    assert poll_delay(3, first_s=10.0, elapsed_s=10_000.0, cap_s=60.0, rng=rng) <= 60.0


def test_first_poll_at_half_the_default_until_learned_then_at_the_30th_percentile() -> None:
    durations = Durations({"image": 10.0, "unknown": 30.0})
    assert durations.first_poll("flux-2", "image") == 5.0
    for seconds in range(100, 111):
        durations.observe("flux-2", float(seconds))
    assert durations.first_poll("flux-2", "image") == 103.0
    assert Durations({"unknown": 30.0}, history=[("m", 4.0), ("m", 2.0), ("m", 3.0)]).first_poll("m", "video") == 2.0
    assert Durations.estimate(8.0, 10.0) == 9.0 and Durations.estimate(None, 10.0) == 9.0


async def test_a_state_file_that_cannot_be_written_stops_the_run_with_a_plain_error(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.yaml")
    store = Store.open(tmp_path)
    store.sync(plan.specs)
    conn = store._conn  # SQLite's own page limit stands in for a full disk (tests/test_hostile_state.py fills a real one)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from now on
    async with serve(sandbox()) as (_, url), Client(api_key=KEY, base_url=url) as client:
        runner = Runner(cfg(tmp_path), store, client)
        with pytest.raises(StateError, match="cannot write the state file"):
            await runner.run(store.work())
    conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    with pytest.raises(StateError):  # nothing more is written once a write failed
        store.flush()


async def test_temp_files_left_by_a_hard_kill_are_taken_over_by_the_retry(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.csv")
    for spec in plan.specs:  # what a kill between writing a result and renaming it leaves behind
        draft = tmp_path / spec.path.replace("{ext}", "part")
        draft.parent.mkdir(parents=True, exist_ok=True)
        draft.with_name(f".{draft.name}.tmp").write_bytes(b"half a fi")
    async with serve(sandbox()) as (_, url):
        result = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
    assert result.counts == {"done": 4}
    assert not list(tmp_path.rglob("*.tmp"))


async def test_a_result_deleted_after_the_run_is_made_again_and_only_it(tmp_path: Path) -> None:
    plan = plan_of(ROOT / "manifests/demo.yaml")
    async with serve(sandbox()) as (sb, url):
        first = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
        gone = sorted(p for p in tmp_path.rglob("*.png"))[:2]
        for path in gone:
            path.unlink()
        again = await run_campaign(plan, cfg(tmp_path), api_key=KEY, base_url=url)
    assert first.counts == again.counts == {"done": 18}
    assert sb.stats.tasks_created == 18 + 2 and all(p.is_file() for p in gone)
