"""Fault drills (issue 11, "Prove it"): every write point of the whole flow, found by recording a clean run, is
faulted in a fresh run of the flow; the world then heals and the promise is checked for every order paid.

How: tests/drill_support.py. A Recorder wraps this flow's MongoDB collections (every write method) and its Redis
client (every write command and pipeline, RQ's included), naming each write by store, operation, call site and
occurrence. Three scenarios: `delivered` (trained, one render delivered: fulfilled), `training_fails` (every
training attempt fails: refunded, photos purged), `render_fails` (every render fails: its credit back, then the order
refunded). Three faults, at one write point per run:
- fail_once: the write raises instead of happening (a store error);
- crash: the process dies right there. Workers run in this thread (jobs.worker.drain) because the in-process
  mongomock database cannot be shared with another process, so the kill is modelled, not sent: Crash is a
  BaseException no `except Exception` stops, and after it every write of any thread raises Crash too until the
  drill "restarts" (nothing the dying process would still have done reaches a store). A real SIGKILLed worker
  process on the shared Redis is tests/test_workers.py's business;
- redis_flush: Redis loses everything (FLUSHALL) just before the write.
Then healing rounds (time passes an hour, WeChat Pay redelivers and settles, every periodic job of
jobs.periodic.PERIODIC runs: expiry, reconciliation, the reaper, the sweep; the workers drain; the user carries on)
until a round changes nothing. Every order WeChat Pay took money for must end `fulfilled` with its portraits stored,
or `refunded` with exactly one successful refund of its amount at WeChat Pay; photos are purged as promised; render
credits are neither doubled nor lost.

Budget: the tiny model trains and renders for real in the clean runs, then its results are replayed (the drills are
about the stores). The default plan (drill_support.plan_drills) gives every write point of our code `crash` and
`redis_flush` and a deterministic third of them `fail_once`, and samples RQ's own bookkeeping; DRILLS_FULL=1 drills
every write point with every fault. Each (scenario, fault) is drilled in DRILL_PARTS parts (every n-th point of
its plan), so that `pytest -n` spreads them over processes; each part saves its row (drill_support.save_row) and
the session's end prints the table of every (scenario, fault) and writes it to test-artifacts/drills.txt
(tests/conftest.py, pytest_terminal_summary), whichever process ran which part.
"""
from __future__ import annotations

import os
import time

import pytest

from tests import drill_support as drills

FULL = os.environ.get("DRILLS_FULL") == "1"
PARTS = int(os.environ.get("DRILL_PARTS", "4"))
_clean: dict[str, list[drills.WritePoint]] = {}


@pytest.fixture
def env(simulator, sim, http_server, redis_server, tiny_pipeline, face_analyzer, tmp_path, monkeypatch):
    drills.install(monkeypatch, tiny_pipeline)
    yield drills.Env(simulator=simulator, sim=sim, http_server=http_server, redis=redis_server,
                     pipeline=tiny_pipeline, analyzer=face_analyzer, tmp=tmp_path, clock=drills.Clock(monkeypatch))
    drills.uninstall()


def clean_points(env, scenario: str) -> list[drills.WritePoint]:
    if scenario not in _clean:
        if not _clean:
            drills.clean_run(env, scenario)  # the session's first flow fetches WeChat's access token twice
        flow, verdict, _ = drills.clean_run(env, scenario)
        assert verdict.paid == 1 and not (verdict.stuck or verdict.doubled or verdict.photos_kept), verdict
        _clean[scenario] = list(flow.recorder.points)
    return _clean[scenario]


def the_plan(env) -> dict:
    return drills.plan_drills({scenario: clean_points(env, scenario) for scenario in drills.SCENARIOS}, full=FULL)


@pytest.mark.parametrize("scenario", list(drills.SCENARIOS))
def test_a_clean_run_delivers_heals_nothing_and_lists_the_same_write_points_each_time(env, scenario):
    listed = clean_points(env, scenario)
    flow, verdict, rounds = drills.clean_run(env, scenario)
    assert verdict.paid == 1 and verdict.fulfilled + verdict.refunded == 1, verdict
    assert not (verdict.stuck or verdict.doubled or verdict.photos_kept or verdict.credits_lost), verdict
    assert rounds == 1  # the healing round found nothing to do
    assert flow.errors == []
    points = list(flow.recorder.points)
    assert points == listed  # deterministic: the n-th write point is the same write each time
    ours = [p for p in points if not p.by_rq]
    print(f"\n{scenario}: {len(points)} write points, {len(ours)} of our code "
          f"({sum(p.store == 'mongo' for p in ours)} MongoDB, {sum(p.store == 'redis' for p in ours)} Redis), "
          f"{len(points) - len(ours)} of RQ's bookkeeping")


def test_the_drill_sees_a_paid_order_left_stuck(env, monkeypatch):
    """The judge has teeth: without the sweep, the process dying between the payment and the training start leaves
    the order paid and the avatar ready for ever (WeChat Pay's redelivery finds the order paid already)."""
    from portraits import sweeper

    point = next(p for p in clean_points(env, "delivered")
                 if p.target == "avatars" and "avatars.py:start_training" in p.site)
    monkeypatch.setattr(sweeper, "sweep", lambda services: {})
    drill = drills.drill(env, "delivered", point, "crash")
    assert drill.fired and drill.verdict.paid == 1 and len(drill.verdict.stuck) == 1, drill.verdict


@pytest.mark.parametrize("part", range(PARTS), ids=lambda part: f"part{part + 1}of{PARTS}")
@pytest.mark.parametrize("kind", drills.FAULT_KINDS)
@pytest.mark.parametrize("scenario", list(drills.SCENARIOS))
def test_every_write_point_faulted_heals_to_fulfilled_or_refunded_once(env, scenario, kind, part):
    started = time.monotonic()
    points = the_plan(env)[(scenario, kind)][part::PARTS]
    results = [drills.drill(env, scenario, point, kind) for point in points]
    row = {"write points": len(points), "faults injected": sum(d.fired for d in results),
           "paid orders": sum(d.verdict.paid for d in results),
           "fulfilled": sum(d.verdict.fulfilled for d in results),
           "refunded": sum(d.verdict.refunded for d in results),
           "stuck": sum(len(d.verdict.stuck) for d in results),
           "doubled": sum(len(d.verdict.doubled) for d in results),
           "photos kept": sum(len(d.verdict.photos_kept) for d in results),
           "credits lost": sum(len(d.verdict.credits_lost) for d in results),
           "seconds": time.monotonic() - started}
    drills.save_row(scenario, kind, part, row, enumerated=enumeration(env))
    print(drills.table({(scenario, kind): row}))
    failures = [d for d in results if d.failed or d.verdict.credits_lost or not d.fired]
    for d in failures:
        print(f"  {kind} at {d.point.short()} [{d.point.phase}]: fired={d.fired} stuck={d.verdict.stuck} "
              f"doubled={d.verdict.doubled} photos_kept={d.verdict.photos_kept} "
              f"credits_lost={d.verdict.credits_lost} errors={d.errors}")
    summary = {"stuck": row["stuck"], "doubled": row["doubled"], "photos kept": row["photos kept"],
               "not injected": row["write points"] - row["faults injected"],
               "paid orders not settled": row["paid orders"] - row["fulfilled"] - row["refunded"]}
    assert summary == {"stuck": 0, "doubled": 0, "photos kept": 0, "not injected": 0,
                       "paid orders not settled": 0}


def enumeration(env) -> str:
    listed = {scenario: clean_points(env, scenario) for scenario in drills.SCENARIOS}
    unique = [p for points in drills.unique_points(listed).values() for p in points]
    return (f"write points enumerated: {sum(map(len, listed.values()))} in {len(listed)} scenarios, {len(unique)} "
            f"once their shared beginnings are counted once ({sum(not p.by_rq for p in unique)} of our code, "
            f"{sum(p.by_rq for p in unique)} of RQ's bookkeeping); "
            f"{'every one drilled with every fault' if FULL else 'drilled as drill_support.plan_drills says'}, "
            f"in {PARTS} parts each")
