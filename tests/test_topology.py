"""The Procfile's topology in real processes: gunicorn (2 workers), a GPU worker, the default worker and the clock,
with the WeChat simulator, on the embedded Redis (TCP) and the database server (SecantusDB, or MONGO_URI's).

The real-process versions of the fault drills (tests/test_drills.py models the kills in one process on mongomock):
a GPU worker SIGKILLed mid-training, the database server restarted mid-flow. Every paid order must end fulfilled,
or refunded exactly once at WeChat Pay.
"""
from __future__ import annotations

import json
import os

import psutil
import pytest
import requests
from rq.cron import get_cron_job_ids

from jobs.periodic import PERIODIC
from models.sample_photos import astronaut_photos
from miniapp_api.dev.supervisor import PROCESSES, Topology, read_procfile
from portraits.store import db_server
from tests.conftest import MONGO_URI, phone_for
from tests.waiting import wait_for
from wechat_sim.client import SimulatorClient

pytestmark = pytest.mark.topology

# Small and quick: the tiny random-weight model, few photos, a fast reaper.
FAST = {"MIN_PHOTOS": "4", "TRAIN_STEPS": "4", "TRAIN_RESOLUTION": "64", "RENDER_MAX_STEPS": "2",
        "RENDER_MAX_CANDIDATES": "3", "WORKER_HEARTBEAT_S": "1", "WORKER_DEAD_AFTER_S": "3",
        "WORKER_STOP_GRACE_S": "0", "WECHATPAY_TIMEOUT_S": "5"}
FLOW_TIMEOUT_S = 300


@pytest.fixture
def start_topology(tmp_path):
    started = []

    def _start(processes=PROCESSES, **settings) -> Topology:
        topology = Topology(tmp_path / "instance", processes=processes,
                            environ={**os.environ, **FAST, **settings})
        started.append(topology)
        return topology.start()

    yield _start
    for topology in started:
        topology.stop()


class MiniProgram:
    """The mini-program over HTTP, tolerant of the moments a server restarts (a refused connection, a 5xx)."""

    def __init__(self, topology: Topology, user_photos, name: str = "alice"):
        self.base = topology.base_url + "/api/v1"
        self.sim = SimulatorClient(topology.simulator_url)
        self.http = requests.Session()
        self.photos = user_photos
        login = self.call("post", "/auth/login", json={"code": self.sim.login_code(name)})
        self.http.headers["Authorization"] = f"Bearer {login['token']}"
        self.call("post", "/me/phone", json={"code": self.sim.phone_code(name, phone_for(name))})

    def call(self, method: str, path: str, expect=(200, 201), **kwargs) -> dict:
        response = getattr(self.http, method)(self.base + path, timeout=60, **kwargs)
        assert response.status_code in expect, (response.status_code, response.text[:500])
        return response.json()

    def poll(self, path: str) -> dict:
        try:
            response = self.http.get(self.base + path, timeout=30)
        except requests.ConnectionError:
            return {}
        return response.json() if response.status_code == 200 else {}

    def paid_avatar(self) -> tuple[dict, dict]:
        version = self.call("get", "/consents")[0]["version"]
        self.call("post", "/consents", json={"kind": "face_processing", "version": version, "age_14_or_over": True,
                                             "own_face": True})
        avatar = self.call("post", "/avatars", json={"gender": "female"})
        for index, photo in enumerate(self.photos[:4]):
            verdict = self.call("post", f"/avatars/{avatar['id']}/photos",
                                files={"photo": (f"p{index}.jpg", photo, "image/jpeg")},
                                data={"role": "front" if index == 0 else "extra"})
            assert verdict["state"] == "judging", verdict
        # The intake worker judges the photos, then WeChat's content check of each is pushed to `web`.
        self.wait_avatar(avatar["id"], {"ready"})
        order = self.call("post", "/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
        assert self.sim.pay(order["id"])["delivered"]
        return avatar, order

    def wait_avatar(self, avatar_id: str, states: set[str]) -> dict:
        return wait_for(lambda: (lambda a: a if a.get("state") in states else None)(self.poll(f"/avatars/{avatar_id}")),
                        FLOW_TIMEOUT_S, f"avatar {avatar_id} to be {states}", step_s=0.25)

    def finish(self, avatar: dict, order: dict) -> dict:
        """Carry the order on to its end: render once trained (which fulfils it), or its refund; the order then."""
        ended = self.wait_avatar(avatar["id"], {"trained", "failed"})
        if ended["state"] == "trained":
            template = self.call("get", "/templates", params={"gender": "female"})[0]["id"]
            render = self.call("post", "/renders", json={"avatar_id": avatar["id"], "template_id": template})
            wait_for(lambda: self.poll(f"/renders/{render['id']}").get("state") in ("done", "failed"),
                     FLOW_TIMEOUT_S, "the render to end", step_s=0.25)
        return wait_for(lambda: (lambda o: o if o.get("state") in ("fulfilled", "refunded") else None)(
            self.poll(f"/orders/{order['id']}")), FLOW_TIMEOUT_S, "the order to end fulfilled or refunded",
            step_s=0.25)

    def assert_fulfilled_or_refunded_once(self, order: dict) -> str:
        ended = self.call("get", f"/orders/{order['id']}")
        refunds = [r for r in self.sim.refunds() if r.get("out_trade_no") == order["id"]]
        if ended["state"] == "fulfilled":
            assert refunds == [], refunds
        else:
            assert ended["state"] == "refunded" and len(refunds) == 1, (ended, refunds)
        return ended["state"]


@pytest.fixture(scope="module")
def user_photos():
    return astronaut_photos(4)


def test_the_paid_flow_runs_through_the_procfile_processes(start_topology, user_photos):
    topology = start_topology()
    assert set(topology.children) == {"wechat_sim", *PROCESSES}
    assert len(_children_of(topology.children["web"].pid)) >= 2  # gunicorn's workers
    app = MiniProgram(topology, user_photos)
    avatar, order = app.paid_avatar()
    assert app.finish(avatar, order)["state"] == "fulfilled"
    assert app.assert_fulfilled_or_refunded_once(order) == "fulfilled"

    instance = topology.instance_dir
    pids = [child.pid for child in topology.children.values()]
    topology.stop()
    assert not [pid for pid in pids if _alive(pid)]
    assert db_server.server_pid(instance) is None  # the last user left: the database server stopped
    assert not (instance / "redis.db.settings").exists() or not _redis_alive(instance)


def test_a_gpu_worker_sigkilled_mid_training_ends_fulfilled_or_refunded_once(start_topology, user_photos):
    # A training long enough to be caught running (a few seconds on the tiny model).
    topology = start_topology(TRAIN_STEPS="100")
    app = MiniProgram(topology, user_photos, "bob")
    avatar, order = app.paid_avatar()
    training = wait_for(lambda: (lambda q: q if q.get("progress", 0) > 0 else None)(
        app.poll(f"/avatars/{avatar['id']}/queue")), FLOW_TIMEOUT_S, "the training to be under way", step_s=0.05)
    assert training["state"] == "training", training  # caught mid-training, not after it
    killed = topology.children["gpu"].pid
    topology.restart("gpu")  # SIGKILL, then a new GPU worker process (it reaps at start; the clock reaps too)
    assert not _alive(killed)
    assert app.finish(avatar, order)["state"] in ("fulfilled", "refunded")
    app.assert_fulfilled_or_refunded_once(order)


@pytest.mark.skipif(bool(MONGO_URI), reason="restarts the embedded database server; MONGO_URI's is not ours")
def test_the_database_server_restarted_mid_flow_ends_fulfilled_or_refunded_once(start_topology, user_photos):
    topology = start_topology()
    app = MiniProgram(topology, user_photos, "carol")
    avatar, order = app.paid_avatar()
    before = db_server.server_pid(topology.instance_dir)
    uri = db_server.restart(topology.instance_dir)  # a clean stop and start on the same data and port
    assert uri == topology.env["MONGO_URI"] and db_server.server_pid(topology.instance_dir) != before
    assert app.finish(avatar, order)["state"] in ("fulfilled", "refunded")
    app.assert_fulfilled_or_refunded_once(order)


@pytest.mark.parametrize("name", list(read_procfile()))
def test_every_procfile_command_starts_as_its_own_process(start_topology, name):
    topology = start_topology(processes=(name,))  # waits until it has started, or fails with its log
    assert topology.has_started(name)
    if name == "clock":  # it enqueues every periodic job by name (it died at the first one, when one was __main__'s)
        connection = topology.shared_redis()
        wait_for(lambda: all(get_cron_job_ids(f"{func.__module__}.{func.__name__}", connection)
                             for func, _ in PERIODIC), 60, "the clock to enqueue every periodic job")
    assert topology.exited() == [], topology.log_tail(name)


def _children_of(pid: int) -> list:
    return psutil.Process(pid).children()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _redis_alive(instance) -> bool:
    try:
        pid = int(open(json.loads((instance / "redis.db.settings").read_text())["pidfile"]).read())
        return psutil.Process(pid).is_running()
    except (OSError, ValueError, KeyError, psutil.Error):
        return False
