"""Fault drills: record every write of a flow, then replay the flow with one write faulted, heal, and judge.

A `Recorder` sits in front of MongoDB (mongomock's Collection write methods, for this flow's database only) and Redis
(every write command and pipeline sent through this flow's connection pool, RQ's own included). Each write is named
by a `WritePoint`: the store, the collection (or `cmd`/`pipeline` for Redis), the operation, the call site (the
innermost frames inside portraits/, jobs/ or miniapp_api/, with their lines) and its occurrence (the n-th time that
very site wrote in the run). A clean run of a scenario lists its write points in order; a drill replays the scenario
with one of them faulted:

- `fail_once`: the write raises InjectedWriteError instead of happening (the store answered an error, once);
- `crash`: the write raises Crash, a BaseException no `except Exception` stops, and from then on every write of any
  thread raises Crash too, until the driver "restarts the process": the process died right there, and nothing
  after that point (no cleanup handler, no `finally` that writes) reaches a store;
- `redis_flush`: Redis loses all its data (FLUSHALL) just before the write, which then goes ahead.

Then healing: time passes (the domain's clock, `portraits.states.now`, moves an hour on, and Redis forgets what
would have expired meanwhile: short-lived keys such as order locks, and the executions of jobs whose worker stopped
beating), WeChat Pay redelivers callbacks nobody acknowledged and settles refunds, every periodic job of
jobs.periodic.PERIODIC runs (expiry, reconciliation, the reaper, the sweep...), the workers drain the queues, and
the user comes back and carries on. Rounds repeat until a round changes nothing while no refund is still pending.
`judge` then checks the promise for every order WeChat Pay took money for.
"""
from __future__ import annotations

import hashlib
import io
import json
import secrets
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROJECT_DIRS = tuple(str(ROOT / name) + "/" for name in ("portraits", "jobs", "miniapp_api"))
SITE_DEPTH = 3  # project frames naming a call site, innermost first

FAULT_KINDS = ("fail_once", "crash", "redis_flush")
MONGO_WRITES = ("insert_one", "insert_many", "update_one", "update_many", "replace_one", "delete_one",
                "delete_many", "find_one_and_update", "find_one_and_replace", "find_one_and_delete", "bulk_write")
# Redis commands that change nothing; every other command counts as a write (Lua scripts included).
REDIS_READS = frozenset("""
GET MGET EXISTS TYPE TTL PTTL STRLEN GETRANGE HGET HGETALL HMGET HKEYS HVALS HLEN HEXISTS HSTRLEN HSCAN LRANGE LLEN
LINDEX LPOS SMEMBERS SISMEMBER SMISMEMBER SCARD SSCAN SRANDMEMBER ZRANGE ZRANGEBYSCORE ZREVRANGE ZREVRANGEBYSCORE
ZRANK ZREVRANK ZSCORE ZMSCORE ZCARD ZCOUNT ZLEXCOUNT ZSCAN ZRANGEBYLEX ZREVRANGEBYLEX KEYS SCAN INFO PING ECHO
TIME DBSIZE CLIENT SCRIPT WAIT MULTI EXEC DISCARD WATCH UNWATCH SELECT COMMAND CONFIG MEMORY OBJECT XLEN XRANGE
XREVRANGE PUBSUB HELLO AUTH READONLY LASTSAVE ROLE
""".split())
HOUR = timedelta(hours=1)


class Crash(BaseException):
    """The process dying at this point: nothing after it happens (a BaseException, as SIGKILL is no exception)."""


class InjectedWriteError(RuntimeError):
    """A write that failed once (the store answered an error)."""


@dataclass(frozen=True)
class WritePoint:
    store: str  # mongo | redis
    target: str  # the collection, or cmd / pipeline
    op: str  # the method or the command
    site: str  # innermost project frames, "path:function:line < ..."
    occurrence: int  # the n-th write at this very (store, target, op, site) in the run
    phase: str = field(default="", compare=False)  # the kind of the job a worker last took (train, render, ...)

    def short(self) -> str:
        return f"{self.store}.{self.target}.{self.op}#{self.occurrence} @ {self.site}"

    @property
    def by_rq(self) -> bool:
        """Written by RQ's own bookkeeping inside a worker (taking, finishing, failing a job; registering itself)
        rather than by our code: the only project frames on the stack are the worker's."""
        return all(frame.startswith(("rq/", "jobs/worker.py")) for frame in self.site.split(" < "))


RQ_DIR = "/site-packages/rq/"


def call_site() -> str | None:
    """The innermost project frames of the current stack; RQ's own innermost frame leads when RQ does the writing
    (its bookkeeping inside a worker). None when no project code is on the stack (the drill's own writes)."""
    frames = []
    rq_frame = None
    frame = sys._getframe(2)
    while frame is not None and len(frames) < SITE_DEPTH:
        filename = frame.f_code.co_filename
        if filename.startswith(PROJECT_DIRS):
            frames.append(f"{filename[len(str(ROOT)) + 1:]}:{frame.f_code.co_name}:{frame.f_lineno}")
        elif rq_frame is None and not frames and RQ_DIR in filename:
            rq_frame = f"rq/{filename.split(RQ_DIR, 1)[1]}:{frame.f_code.co_name}"
        frame = frame.f_back
    if not frames:
        return None
    return " < ".join(([rq_frame] if rq_frame else []) + frames)


_active: list = [None]  # the Recorder the patched write methods report to


class Recorder:
    """Names every write of one flow's stores and, given a plan, faults one of them."""

    def __init__(self, services, plan: tuple[WritePoint, str] | None = None):
        self.services = services
        self.db = services.db
        self.pool = services.redis.connection_pool
        self.plan = plan
        self.points: list[WritePoint] = []
        self.fired: WritePoint | None = None
        self.dead = False
        self.crashes = 0
        self.phase = ""
        self._counts = Counter()
        self._lock = threading.RLock()
        self._local = threading.local()

    # ------------------------------------------------------------------ hooks

    def mine_mongo(self, collection) -> bool:
        return collection.database is self.db

    def mine_redis(self, client) -> bool:
        return getattr(client, "connection_pool", None) is self.pool

    @contextmanager
    def inside(self):
        """One store call: writes it makes internally are not writes of their own."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield depth == 0 and not getattr(self._local, "paused", False)
        finally:
            self._local.depth = depth

    @contextmanager
    def paused(self):
        """Writes of the drill itself (test setup, the injected FLUSHALL) are nobody's write points."""
        before = getattr(self._local, "paused", False)
        self._local.paused = True
        try:
            yield
        finally:
            self._local.paused = before

    def on_write(self, store: str, target: str, op: str) -> None:
        """Called just before a write goes to its store."""
        if self.dead:
            raise Crash("the process is dead")
        site = call_site()
        if site is None:  # the drill's own setup and inspection
            return
        with self._lock:
            key = (store, target, op, site)
            self._counts[key] += 1
            point = WritePoint(store, target, op, site, self._counts[key], self.phase)
            self.points.append(point)
            fire = self.plan is not None and self.fired is None and point == self.plan[0]
            if fire:
                self.fired = point
        if not fire:
            return
        kind = self.plan[1]
        if kind == "fail_once":
            raise InjectedWriteError(f"injected: {point.short()}")
        if kind == "crash":
            self.dead = True
            self.crashes += 1
            raise Crash(f"injected: {point.short()}")
        if kind == "redis_flush":
            with self.paused():
                self.services.redis.flushall()
            return
        raise ValueError(kind)

    def restart(self) -> None:
        """The dead process is replaced by a fresh one."""
        self.dead = False


def _patch(monkeypatch) -> None:
    """Route the write methods of mongomock's Collection and of redis-py's client and pipeline through the active
    Recorder. Reads pass untouched."""
    from mongomock.collection import Collection
    from redis.client import Pipeline, Redis

    for name in MONGO_WRITES:
        original = getattr(Collection, name)

        def write(self, *args, __original=original, __name=name, **kwargs):
            recorder = _active[0]
            if recorder is None or not recorder.mine_mongo(self):
                return __original(self, *args, **kwargs)
            with recorder.inside() as outermost:
                if outermost:
                    recorder.on_write("mongo", self.name, __name)
                return __original(self, *args, **kwargs)

        monkeypatch.setattr(Collection, name, write)

    def redis_command(original, target):
        def command(self, *args, **options):
            recorder = _active[0]
            if recorder is None or not recorder.mine_redis(self) or not args:
                return original(self, *args, **options)
            name = str(args[0]).split()[0].upper()
            with recorder.inside() as outermost:
                if outermost and name not in REDIS_READS:
                    recorder.on_write("redis", target, name)
                result = original(self, *args, **options)
            if name == "LPOP" and isinstance(result, bytes):  # a worker took a job: what follows is about it
                prefix = result.decode().split("-", 1)[0]
                recorder.phase = prefix if prefix in ("train", "render", "refund") else "default"
            return result

        return command

    monkeypatch.setattr(Redis, "execute_command", redis_command(Redis.execute_command, "cmd"))
    monkeypatch.setattr(Pipeline, "immediate_execute_command",
                        redis_command(Pipeline.immediate_execute_command, "cmd"))
    original_execute = Pipeline.execute

    def execute(self, *args, **kwargs):
        recorder = _active[0]
        if recorder is None or not recorder.mine_redis(self):
            return original_execute(self, *args, **kwargs)
        names = [str(c[0][0]).split()[0].upper() for c in self.command_stack if c[0]]
        with recorder.inside() as outermost:
            if outermost and any(n not in REDIS_READS for n in names):
                recorder.on_write("redis", "pipeline", "exec")
            return original_execute(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", execute)


# --------------------------------------------------------------------------------------------------- the clock


class Clock:
    """The domain's clock (portraits.states.now, which every timestamp and cutoff goes through), moved on at will."""

    def __init__(self, monkeypatch):
        from portraits import states

        self.offset = timedelta(0)
        real = states.now
        monkeypatch.setattr(states, "now", lambda: real() + self.offset)

    def advance(self, by: timedelta = HOUR) -> None:
        self.offset += by


# --------------------------------------------------------------------------------------------------- the models


class ModelMemo:
    """The tiny model's work, done for real the first time (each scenario's clean run), then replayed: a drill is
    about the stores, and the same LoRA and candidates come back without minutes of CPU. The replay keeps what
    the domain sees: the training reports every step's progress, the renderer returns fresh copies of the images."""

    def __init__(self, pipeline):
        from models.render import Renderer

        self.renderer = Renderer(pipeline)
        self.lora: bytes | None = None
        self.candidates: dict = {}

    def train_lora(self, pipe, images, caption, config, progress=None, *args, **kwargs):
        from models.train import train_lora

        if self.lora is None:
            self.lora = train_lora(pipe, images, caption, config, progress, *args, **kwargs)
            return self.lora
        for step in range(1, config.steps + 1):
            if progress is not None:
                progress(step, config.steps)
        return self.lora

    def render(self, *, on_images=None, **kwargs):
        key = (kwargs.get("num_images"), kwargs.get("width"), kwargs.get("height"), kwargs.get("init_image") is None)
        if key not in self.candidates:
            self.candidates[key] = self.renderer.render(**kwargs)
        images = [image.copy() for image in self.candidates[key]]
        if on_images is not None:
            on_images(images)  # the job ranks what on_images hands it, as a batch of the real renderer
        return images


class MemoAnalyzer:
    """The face analyzer, its `faces` answers remembered per image (the replayed candidates are always the same)."""

    def __init__(self, analyzer):
        self._analyzer = analyzer
        self._faces: dict = {}

    def faces(self, rgb, min_area_ratio: float = 0.0):
        key = (hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest(), rgb.shape, min_area_ratio)
        if key not in self._faces:
            self._faces[key] = self._analyzer.faces(rgb, min_area_ratio=min_area_ratio)
        return self._faces[key]

    def __getattr__(self, name):
        return getattr(self._analyzer, name)


_memo: dict = {}


def model_memo(pipeline) -> ModelMemo:
    if "models" not in _memo:
        _memo["models"] = ModelMemo(pipeline)
    return _memo["models"]


def analyzer_memo(analyzer) -> MemoAnalyzer:
    if "faces" not in _memo:
        _memo["faces"] = MemoAnalyzer(analyzer)
    return _memo["faces"]


def judge_memo(analyzer: MemoAnalyzer):
    """One judging thread for every drill, scoring with the remembered analyzer (drills run one at a time)."""
    if "judge" not in _memo:
        from models.ranking import CandidateJudge

        _memo["judge"] = CandidateJudge(lambda: analyzer)
    return _memo["judge"]


# --------------------------------------------------------------------------------------------------- scenarios

FAST = dict(min_photos=2, train_steps=1, train_resolution=64, render_max_steps=1, render_max_candidates=1,
            refund_backoff_s=(0,))
SCENARIOS = {
    # Trained, one render delivered: the order ends fulfilled.
    "delivered": {},
    # Training fails on every attempt (one retry): the order is refunded and the photos purged.
    "training_fails": {"fault_train_failures": 99, "train_retries": 1},
    # Every render fails: its credit comes back and, one failure being enough here, the order is refunded.
    "render_fails": {"fault_render_failures": 99, "render_retries": 0, "undeliverable_failed_renders": 1},
}
PAID_AT_WECHAT = ("SUCCESS", "REFUND")
MAX_FLOW_STEPS = 12
MAX_HEAL_ROUNDS = 8
MAX_TAPS = 8
MAX_TAPS_EACH = 4


@dataclass
class Env:
    """The session's shared pieces (fixtures) a flow is built from."""

    simulator: object
    sim: object
    http_server: object
    redis: object
    pipeline: object
    analyzer: object
    tmp: Path
    clock: Clock


@dataclass
class Flow:
    scenario: str
    services: object
    client: object
    sim: object
    recorder: Recorder
    clock: Clock
    name: str
    api: object = None
    avatar_id: str | None = None
    errors: list = field(default_factory=list)  # what the user or a worker saw go wrong (kinds, for the report)
    taps: Counter = field(default_factory=Counter)


def build_flow(env: Env, scenario: str, plan=None) -> Flow:
    """A fresh world: its own database, an empty Redis, a reset simulator, and the app behind the HTTP server."""
    from jobs import context
    from miniapp_api import create_app
    from portraits.services import build_services
    from tests.conftest import make_settings

    env.sim.reset()
    # Every content-check verdict waits until the drill's WeChat pushes it (wechat_acts), so that the write points
    # come in the same order in every run, not when a timer thread happens to fire.
    env.sim.media_check_rule("pass", hold=True)
    env.sim.configure_media_checks(push_retry_interval_s=0)
    env.redis.flushall()
    instance = env.tmp / secrets.token_hex(4)
    # Always mongomock, even under MONGO_URI: the Recorder taps mongomock's Collection (the real-process versions
    # of these drills, on a database server, are tests/test_topology.py).
    settings = make_settings(instance, env.simulator, env.http_server, mongo_db="d" + secrets.token_hex(4),
                             **{**FAST, **SCENARIOS[scenario], "mongo_uri": None})
    services = build_services(settings, redis=env.redis)
    services._pipeline = env.pipeline
    services._analyzer = analyzer_memo(env.analyzer)
    services._judge = judge_memo(services._analyzer)
    services._renderer = model_memo(env.pipeline)
    context.install(services)
    app = create_app(services=services)
    app.config["TESTING"] = True
    env.http_server.app.target = app
    recorder = Recorder(services, plan)
    _active[0] = recorder
    env.clock.offset = timedelta(0)
    return Flow(scenario=scenario, services=services, client=app.test_client(), sim=env.sim, recorder=recorder,
                clock=env.clock, name="u" + secrets.token_hex(3))


def install(monkeypatch, pipeline) -> None:
    import jobs.training
    import jobs.worker
    from portraits.billing import locks

    _patch(monkeypatch)
    monkeypatch.setattr(jobs.training, "train_lora", model_memo(pipeline).train_lora)
    # The worker's pubsub channel only carries RQ's stop-job commands, which drills never send; listening costs a
    # thread joined at every burst's end (a tenth of a second each, most of a flow's time).
    monkeypatch.setattr(jobs.worker.EmbeddedWorker, "subscribe", lambda self: None)
    monkeypatch.setattr(jobs.worker.EmbeddedWorker, "unsubscribe", lambda self: None)
    # Every flow builds its Services, and so parses the merchant's private key again: once is enough.
    import wechatpayv3.core
    from functools import lru_cache

    monkeypatch.setattr(wechatpayv3.core, "load_private_key", lru_cache(maxsize=4)(wechatpayv3.core.load_private_key))
    # An order lock whose release failed (or whose holder died) is waited for 2 s, not 20, before OrderBusy: what
    # matters is what happens when the wait runs out; the lock itself still lives its 30 s, until time passes.
    monkeypatch.setattr(locks, "ORDER_LOCK_WAIT_S", 2)
    monkeypatch.setattr(threading, "excepthook", _quiet_crashes(threading.excepthook))


def uninstall() -> None:
    _active[0] = None


def _quiet_crashes(hook):
    """A Crash in a server thread (a callback being handled) ends that thread, as the process dying would."""

    def excepthook(args):
        if isinstance(args.exc_value, Crash):
            return
        hook(args)

    return excepthook


# --------------------------------------------------------------------------------------------------- the user


def _guard(flow: Flow, what: str, action) -> bool | None:
    """Run one user action or worker pass; False when it went wrong (the user sees an error and retries later)."""
    try:
        result = action()
    except Crash:
        flow.recorder.dead = True  # whoever raised it, the process is gone
        return False
    except Exception as error:  # noqa: BLE001 - an error page, a failed worker pass
        flow.errors.append(f"{what}:{type(error).__name__}")
        return False
    return result


def _setup_avatar(flow: Flow) -> None:
    """A ready avatar with its (sealed) photos, written straight to the stores: intake is not drilled here."""
    services, user_id = flow.services, flow.api.user_id
    from portraits import states

    rng = np.random.default_rng(7)
    avatar_id = "av_" + secrets.token_hex(10)
    photos = []
    with flow.recorder.paused():
        for index in range(services.settings.min_photos):
            crop = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(crop, format="PNG")
            base = f"users/{user_id}/avatars/{avatar_id}/photos/ph{index}"
            services.sealed.put(user_id, base + ".png", crop.getvalue())
            services.sealed.put(user_id, base + ".emb", rng.normal(size=128).astype(np.float64).tobytes())
            photos.append({"id": f"ph{index}", "role": "front" if index == 0 else "extra", "accepted": True,
                           "reasons": [], "crop_key": base + ".png", "embedding_key": base + ".emb", "phash": "0"})
        at = states.now()
        services.db.avatars.insert_one({"_id": avatar_id, "user_id": user_id, "gender": "female", "state": "ready",
                                        "photos": photos, "train_attempts": 0, "created_at": at, "updated_at": at,
                                        "history": states.initial_history("ready", "drill")})
    flow.avatar_id = avatar_id


def _login(flow: Flow) -> None:
    from tests.conftest import Api, phone_for

    response = flow.client.post("/api/v1/auth/login", json={"code": flow.sim.login_code(flow.name)})
    if response.status_code != 200:
        raise RuntimeError(f"login answered {response.status_code}")
    body = response.get_json()
    api = Api(flow.client, body["token"], body["user"]["id"])
    bound = api.post("/api/v1/me/phone", json={"code": flow.sim.phone_code(flow.name, phone_for(flow.name))})
    if bound.status_code != 200:
        raise RuntimeError(f"phone binding answered {bound.status_code}")
    version = api.get("/api/v1/consents").get_json()[0]["version"]
    given = api.post("/api/v1/consents", json={"kind": "face_processing", "version": version,
                                               "age_14_or_over": True, "own_face": True})
    if given.status_code != 201:
        raise RuntimeError(f"consent answered {given.status_code}")
    flow.api = api


def _wechat_orders(flow: Flow) -> dict[str, dict]:
    return {o["out_trade_no"]: o for o in flow.sim.orders()}


def next_tap(flow: Flow):
    """What the user does next, as a (name, action), or None when there is nothing for them to do (they wait, or
    they are done: portraits delivered or money back)."""
    if flow.api is None:
        return "login", lambda: _login(flow)
    if flow.avatar_id is None:
        return "photos", lambda: _setup_avatar(flow)
    db = flow.services.db
    avatar = db.avatars.find_one({"_id": flow.avatar_id})
    if avatar is None:
        return None
    mine = list(db.orders.find({"avatar_id": flow.avatar_id}).sort("created_at", 1))
    at_wechat = _wechat_orders(flow)
    paid = [o for o in mine if at_wechat.get(o["_id"], {}).get("trade_state") in PAID_AT_WECHAT]
    if any(o["state"] in ("refunding", "refund_failed", "refunded") for o in paid):
        return None  # the money is on its way back
    if avatar["state"] == "ready" and not paid:
        payable = [o for o in mine if o["state"] == "created" and o.get("prepay_id")]
        if payable:  # the app showed wx.requestPayment: the user pays
            order_id = payable[-1]["_id"]
            return "pay", lambda: flow.sim.pay(order_id)
        if not any(o["state"] == "created" for o in mine):  # an order the app never got pay params for waits
            return "order", lambda: _order(flow)
        return None
    if avatar["state"] == "trained" and avatar.get("order_id"):
        order = db.orders.find_one({"_id": avatar["order_id"]})
        renders = list(db.renders.find({"order_id": order["_id"]}))
        if (order["state"] in ("paid", "fulfilled") and order.get("render_credits", 0) > 0
                and not any(r["state"] in ("queued", "rendering", "done") for r in renders)):
            return "render", lambda: _render(flow, avatar)
    return None


def _order(flow: Flow) -> None:
    response = flow.api.post("/api/v1/orders", json={"avatar_id": flow.avatar_id, "sku": "avatar_pack"})
    if response.status_code != 201:
        raise RuntimeError(f"order answered {response.status_code}")


def _render(flow: Flow, avatar: dict) -> None:
    template = next(t for t in flow.services.catalog if t.gender == avatar["gender"])
    response = flow.api.post("/api/v1/renders", json={"avatar_id": avatar["_id"], "template_id": template.id})
    if response.status_code != 201:
        raise RuntimeError(f"render answered {response.status_code}")


def user_acts(flow: Flow) -> bool:
    acted = False
    for _ in range(MAX_TAPS):
        if flow.recorder.dead:
            break
        tap = _guard(flow, "read", lambda: next_tap(flow))
        if not tap:
            break
        name, action = tap
        if flow.taps[name] >= MAX_TAPS_EACH:  # the user gives up on what keeps failing
            break
        flow.taps[name] += 1
        acted = True
        if _guard(flow, name, action) is False:
            break
    return acted


# --------------------------------------------------------------------------------------------------- the world


def wechat_acts(flow: Flow) -> bool:
    """WeChat's side: content-check verdicts are pushed; refunds are decided (and their callbacks sent); callbacks
    never acknowledged are sent again (WeChat retries for a day)."""
    acted = False
    sim = flow.sim
    for refund in sim.refunds():
        if refund["status"] == "PROCESSING":
            _guard(flow, "refund_settled", lambda: sim.settle_refunds(refund["out_refund_no"]))
            acted = True
    # WeChat's content checks: verdicts not pushed yet are pushed now (to the message-push endpoint).
    if not flow.recorder.dead and _guard(flow, "media_check_push",
                                         lambda: sim.flush_media_checks(include_held=True)["delivered"]):
        acted = True
    for notification in sim.notifications():
        if flow.recorder.dead:
            break
        if not any(d.get("delivered") for d in notification.get("deliveries", [])) and \
                len(notification.get("deliveries", [])) < 6:
            _guard(flow, "redelivery", lambda: sim.redeliver(notification["id"]))
            acted = True
    return acted


def drain(flow: Flow) -> bool:
    from jobs.worker import drain as drain_queues

    if flow.recorder.dead:
        return False
    return bool(_guard(flow, "worker", lambda: drain_queues(flow.services)))


def time_passes(flow: Flow) -> None:
    """An hour goes by: the domain's clock, and what Redis would have forgotten meanwhile."""
    from portraits import tasks

    flow.clock.advance()
    redis = flow.services.redis
    with flow.recorder.paused():
        for key in redis.scan_iter(count=1000):
            ttl = redis.pttl(key)
            if 0 < ttl <= 3_600_000:  # order locks, reaper claims, worker keys, ...
                redis.delete(key)
        for name in tasks.ALL_QUEUES:  # workers that stopped beating: their executions lapse
            tasks.queue(flow.services, name).started_job_registry.cleanup(timestamp=time.time() + 3600)


def run_periodic(flow: Flow) -> None:
    """Every periodic job once, as the clock would enqueue them, plus what a GPU worker does when it starts."""
    from jobs import context
    from jobs.periodic import PERIODIC

    context.install(flow.services)
    for func, _interval in PERIODIC:
        if flow.recorder.dead:
            return
        _guard(flow, func.__name__, func)


def fingerprint(flow: Flow) -> str:
    """What the drill watches for change between heal rounds (money, states, owed work; not timestamps)."""
    db = flow.services.db
    with flow.recorder.paused():
        view = {
            "orders": sorted((o["_id"], o["state"], o.get("render_credits"),
                              [(r["out_refund_no"], r["state"]) for r in o.get("refunds", [])])
                             for o in db.orders.find()),
            "avatars": sorted((a["_id"], a["state"], a.get("train_attempts"), bool(a.get("photos_purged_at")))
                              for a in db.avatars.find()),
            "renders": sorted((r["_id"], r["state"], r.get("attempts"), bool(r.get("settled_at")))
                              for r in db.renders.find()),
            "wechat": sorted((o["out_trade_no"], o.get("trade_state")) for o in flow.sim.orders()),
            "refunds": sorted((r["out_refund_no"], r["status"]) for r in flow.sim.refunds()),
            "queued": sorted(k.decode() for k in flow.services.redis.keys("rq:queue:*")),
            "taps": sorted(flow.taps.items()),
        }
    return hashlib.sha256(json.dumps(view, default=str).encode()).hexdigest()


def step(flow: Flow) -> bool:
    """One beat of the world: the user, WeChat Pay, the workers. True when any of them did anything."""
    acted = user_acts(flow)
    acted = wechat_acts(flow) or acted
    return drain(flow) or acted


def run_until_quiet(flow: Flow) -> None:
    for _ in range(MAX_FLOW_STEPS):
        if not step(flow) or flow.recorder.dead:
            return


def play(flow: Flow) -> int:
    """The flow as it happens (user, WeChat Pay, workers) until it is quiet or the process died; then healing
    rounds (a restart, an hour, every periodic job, and the flow going on) until one changes nothing. Returns how
    many healing rounds ran."""
    run_until_quiet(flow)
    last = None if flow.recorder.dead else fingerprint(flow)
    rounds = 0
    while rounds < MAX_HEAL_ROUNDS:
        rounds += 1
        flow.recorder.restart()
        time_passes(flow)
        run_periodic(flow)
        run_until_quiet(flow)
        if flow.recorder.dead:
            continue
        now = fingerprint(flow)
        if now == last and not money_owed(flow):
            break
        last = now
    return rounds


def money_owed(flow: Flow) -> bool:
    """A refund asked for and not settled yet: a round that changed nothing is not the end while one is (the next
    reconciliation retries what a transient WeChat Pay error left), up to MAX_HEAL_ROUNDS."""
    from portraits.billing import refunds

    with flow.recorder.paused():
        return flow.services.db.orders.count_documents(
            {"refunds": {"$elemMatch": {"state": {"$in": list(refunds.REFUND_PENDING)}}}}) > 0


# --------------------------------------------------------------------------------------------------- the verdict


@dataclass
class Verdict:
    paid: int = 0
    fulfilled: int = 0
    refunded: int = 0
    stuck: list = field(default_factory=list)
    doubled: list = field(default_factory=list)
    photos_kept: list = field(default_factory=list)
    credits_lost: list = field(default_factory=list)


def judge(flow: Flow) -> Verdict:
    """The promise, for every order WeChat Pay took money for: it ended `fulfilled` with its portraits stored, or
    `refunded` with exactly one successful refund of the whole amount at WeChat Pay (never both, never two);
    photos purged once the avatar is trained, or failed and refunded; render credits neither lost nor doubled."""
    from portraits import keys
    from portraits.renders import render_delivered

    services, db = flow.services, flow.services.db
    verdict = Verdict()
    with flow.recorder.paused():
        at_wechat = _wechat_orders(flow)
        refunds_at_wechat = flow.sim.refunds()
        sku_credits = {sku: int(p["render_sets"]) for sku, p in services.settings.skus.items()}
        for order in db.orders.find():
            wechat = at_wechat.get(order["_id"], {})
            if wechat.get("trade_state") not in PAID_AT_WECHAT:
                if order["state"] in ("paid", "fulfilled", "refunding", "refunded"):
                    verdict.doubled.append(f"{order['_id']}: {order['state']} here, unpaid at WeChat Pay")
                continue
            verdict.paid += 1
            ours = [r for r in refunds_at_wechat if r["out_trade_no"] == order["_id"]]
            succeeded = [r for r in ours if r["status"] == "SUCCESS"]
            refunded_fen = sum(r["amount"]["refund"] for r in succeeded)
            if len(succeeded) > 1 or refunded_fen > order["amount"]:
                verdict.doubled.append(f"{order['_id']}: {len(succeeded)} refunds, {refunded_fen} fen")
            renders = list(db.renders.find({"order_id": order["_id"]}))
            if order["state"] == "fulfilled":
                # What the user was given: the images WeChat's content check passed (a refused one is deleted and
                # its set drawn again or credited, portraits.renders.make_good_lost_images).
                delivered = [i for r in renders if render_delivered(r)
                             for i in (r.get("delivered_image_ids") if r.get("content_checked") else r["image_ids"])]
                stored = delivered and all(
                    db.images.find_one({"_id": i}) and services.blobs.exists(keys.image(order["user_id"], i))
                    for i in delivered)
                if succeeded:
                    verdict.doubled.append(f"{order['_id']}: fulfilled and refunded {refunded_fen} fen")
                elif not stored:
                    verdict.stuck.append(f"{order['_id']}: fulfilled without stored portraits")
                else:
                    verdict.fulfilled += 1
            elif order["state"] == "refunded":
                if len(succeeded) == 1 and refunded_fen == order["amount"]:
                    verdict.refunded += 1
                elif not succeeded:
                    verdict.stuck.append(f"{order['_id']}: refunded here, no refund at WeChat Pay")
            else:
                verdict.stuck.append(f"{order['_id']}: ended {order['state']} "
                                     f"(refunds {[(r['out_refund_no'], r['state']) for r in order['refunds']]})")
            charged = [r for r in renders if r.get("charged")]
            credited = [r for r in charged if r["_id"] in order.get("credited_renders", [])]
            expected = sku_credits[order["sku"]] - len(charged) + len(credited)
            if order.get("render_credits", 0) > expected:
                verdict.doubled.append(f"{order['_id']}: {order['render_credits']} render credits, {expected} due")
            elif order["state"] != "refunded" and order.get("render_credits", 0) < expected:
                verdict.credits_lost.append(f"{order['_id']}: {order['render_credits']} credits, {expected} due")
        for avatar in db.avatars.find({"state": {"$in": ["trained", "failed"]}}):
            order = db.orders.find_one({"_id": avatar.get("order_id")}) or {}
            if avatar["state"] == "failed" and order.get("state") != "refunded":
                continue  # kept until the refund settles, as the consent text says
            prefix = f"users/{avatar['user_id']}/avatars/{avatar['_id']}/photos/"
            left = list(services.blobs.keys(prefix))
            if not avatar.get("photos_purged_at") or left or any(
                    p.get("crop_key") or p.get("embedding_key") for p in avatar.get("photos", [])):
                verdict.photos_kept.append(f"{avatar['_id']}: {avatar['state']}, {len(left)} photo blobs left")
    return verdict


@dataclass
class Drill:
    scenario: str
    point: WritePoint
    kind: str
    fired: bool
    verdict: Verdict
    rounds: int
    errors: list
    seconds: float

    @property
    def failed(self) -> bool:
        return bool(self.verdict.stuck or self.verdict.doubled or self.verdict.photos_kept)


def clean_run(env: Env, scenario: str) -> tuple[Flow, Verdict, int]:
    flow = build_flow(env, scenario)
    rounds = play(flow)
    return flow, judge(flow), rounds


def drill(env: Env, scenario: str, point: WritePoint, kind: str) -> Drill:
    started = time.monotonic()
    flow = build_flow(env, scenario, plan=(point, kind))
    rounds = play(flow)
    verdict = judge(flow)
    return Drill(scenario, point, kind, flow.recorder.fired is not None, verdict, rounds, flow.errors,
                 time.monotonic() - started)


# --------------------------------------------------------------------------------------------------- the plan

FAIL_ONCE_STRIDE = 3  # by default `fail_once` drills every third write point of our code (crash and flush: all)
RQ_SAMPLE_STRIDE = 3  # and RQ's bookkeeping: crash on each distinct site per job kind, the other kinds on a third


def common_prefix(a: list[WritePoint], b: list[WritePoint]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def unique_points(clean: dict[str, list[WritePoint]]) -> dict[str, list[WritePoint]]:
    """Each scenario's write points past the beginning it shares with an earlier scenario (the same writes, with the
    same history before them: the same write points)."""
    order = list(clean)
    unique = {}
    for index, scenario in enumerate(order):
        points = clean[scenario]
        shared = max([common_prefix(points, clean[earlier]) for earlier in order[:index]], default=0)
        unique[scenario] = points[shared:]
    return unique


def plan_drills(clean: dict[str, list[WritePoint]], full: bool = False) -> dict[tuple[str, str], list[WritePoint]]:
    """Which write points each (scenario, fault kind) drills, from the clean runs' lists.

    A write point is drilled in the first scenario that reaches it: scenarios share their beginning (login, order,
    payment, ...), and a point in that shared prefix, with the same history before it, is the same write point.
    Full (DRILLS_FULL=1): every write point, ours and RQ's, with every fault kind. By default: every write point of
    our code (portraits/, jobs/, miniapp_api/, RQ's own writes inside our enqueue calls included) gets `crash` and
    `redis_flush`, one in FAIL_ONCE_STRIDE gets `fail_once`; RQ's bookkeeping inside the worker (taking, starting,
    finishing a job; registering the worker) repeats itself for every job, so each distinct site per job kind gets
    `crash`, and one in RQ_SAMPLE_STRIDE of those the other two kinds."""
    chosen: dict[tuple[str, str], list[WritePoint]] = {}
    seen_rq: set = set()
    for scenario, rest in unique_points(clean).items():
        ours = [p for p in rest if not p.by_rq]
        rq = [p for p in rest if p.by_rq]
        if full:
            for kind in FAULT_KINDS:
                chosen[(scenario, kind)] = list(rest)
            continue
        distinct_rq = []
        for p in rq:
            key = (p.store, p.target, p.op, p.site, p.phase)
            if key not in seen_rq:
                seen_rq.add(key)
                distinct_rq.append(p)
        sampled_rq = distinct_rq[::RQ_SAMPLE_STRIDE]
        chosen[(scenario, "crash")] = ours + distinct_rq
        chosen[(scenario, "redis_flush")] = ours + sampled_rq
        chosen[(scenario, "fail_once")] = ours[::FAIL_ONCE_STRIDE] + sampled_rq
    return chosen


# ------------------------------------------------------------------------------------------------------ the table

COLUMNS = ("write points", "faults injected", "paid orders", "fulfilled", "refunded", "stuck", "doubled",
           "photos kept", "credits lost")
ROWS_DIR = ROOT / "test-artifacts" / "drill-rows"
TABLE_FILE = ROOT / "test-artifacts" / "drills.txt"


def table(rows: dict[tuple[str, str], dict]) -> str:
    header = f"{'scenario':<15}{'fault':<13}" + "".join(f"{c:>16}" for c in COLUMNS) + f"{'seconds':>10}"
    lines = ["", header, "-" * len(header)]
    for (scenario, kind), row in rows.items():
        lines.append(f"{scenario:<15}{kind:<13}" + "".join(f"{row[c]:>16}" for c in COLUMNS)
                     + f"{row['seconds']:>10.1f}")
    if len(rows) > 1:
        total = {c: sum(row[c] for row in rows.values()) for c in (*COLUMNS, "seconds")}
        lines += ["-" * len(header),
                  f"{'all':<28}" + "".join(f"{total[c]:>16}" for c in COLUMNS) + f"{total['seconds']:>10.1f}"]
    return "\n".join(lines)


def clear_rows() -> None:
    """A session starts with no saved row (called once, by the process that reports the session)."""
    for path in ROWS_DIR.glob("*.json"):
        path.unlink()


def save_row(scenario: str, kind: str, part: int, row: dict, enumerated: str) -> None:
    """One drill part's row, for the session's table, whichever process drilled it."""
    ROWS_DIR.mkdir(parents=True, exist_ok=True)
    path = ROWS_DIR / f"{scenario}.{kind}.{part}.json"
    path.write_text(json.dumps({"scenario": scenario, "kind": kind, "row": row, "enumerated": enumerated}))


def saved_table() -> str | None:
    """The saved parts summed per (scenario, fault), in the scenarios' and faults' order; None when no drill ran."""
    saved = [json.loads(path.read_text()) for path in sorted(ROWS_DIR.glob("*.json"))]
    if not saved:
        return None
    rows: dict[tuple[str, str], dict] = {}
    for scenario in SCENARIOS:
        for kind in FAULT_KINDS:
            parts = [s["row"] for s in saved if (s["scenario"], s["kind"]) == (scenario, kind)]
            if parts:
                rows[(scenario, kind)] = {c: sum(p[c] for p in parts) for c in (*COLUMNS, "seconds")}
    return saved[0]["enumerated"] + "\n" + table(rows) + "\n"
