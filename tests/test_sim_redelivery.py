"""The simulator redelivers unacknowledged WeChat Pay callbacks on WeChat Pay's schedule, compressed by
redelivery_scale, until a 2xx; over real HTTP to a scripted receiver on 127.0.0.1.

Timing is only ever checked from below (a retry never goes out before its scaled interval): a slow machine makes
gaps longer, never shorter. Everything else is order and counts, with generous ceilings on the waits."""
from __future__ import annotations

import base64
import json
import secrets
import threading
import time

import pytest
import requests
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flask import Flask, Response, request
from werkzeug.serving import make_server

from wechat_sim import signing
from wechat_sim.client import SimulatorClient
from wechat_sim.keys import generate_credentials
from wechat_sim.redelivery import REDELIVERY_INTERVALS_S
from wechat_sim.runner import start_simulator
from wechat_sim.server import create_sim_app
from tests.waiting import wait_for

WAIT_S = 90.0  # ceiling for anything the simulator does by itself; tests end as soon as it is done


class ScriptedReceiver:
    """A notify_url that answers from a script: an int is a status to answer, ("hang", s) waits s seconds before
    answering 204 (long past the simulator's callback timeout). After the script, `then` for every request."""

    def __init__(self, script=(), then=204):
        self.script = list(script)
        self.then = then
        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.release = threading.Event()
        app = Flask("scripted_receiver")

        @app.post("/notify")
        def notify():
            entry = {"at": time.time(), "headers": dict(request.headers), "body": request.get_data(as_text=True)}
            with self.lock:
                self.received.append(entry)
                action = self.script.pop(0) if self.script else self.then
            if isinstance(action, tuple) and action[0] == "hang":
                self.release.wait(action[1])
                return Response(status=204)
            return Response(status=action)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/notify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def creds():
    return generate_credentials()


@pytest.fixture
def receivers():
    made: list[ScriptedReceiver] = []

    def make(script=(), then=204) -> ScriptedReceiver:
        made.append(ScriptedReceiver(script, then))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def simulators(creds):
    started = []

    def start(**options):
        started.append(start_simulator(creds, **options))
        return started[-1]

    yield start
    for running in started:
        running.stop()


def merchant_call(running, method: str, path: str, payload: dict) -> dict:
    """A WeChat Pay v3 request signed with the merchant key, as the app's gateway sends it."""
    creds = running.creds
    body = json.dumps(payload, ensure_ascii=False)
    timestamp, nonce = str(int(time.time())), secrets.token_hex(16)
    signature = signing.sign(signing.load_private_key(creds.merchant_private_key_pem),
                             signing.request_message(method, path, timestamp, nonce, body))
    authorization = (f'{signing.SIGNATURE_TYPE} mchid="{creds.mchid}",nonce_str="{nonce}",signature="{signature}",'
                     f'timestamp="{timestamp}",serial_no="{creds.merchant_cert_serial_no}"')
    response = requests.request(method, running.base_url + path, data=body.encode("utf-8"), timeout=30,
                                headers={"Authorization": authorization, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    return response.json()


def paid(running, notify_url: str) -> tuple[str, dict]:
    """An order paid by the simulated user: (out_trade_no, what /sim/pay answered after the first delivery)."""
    sim = SimulatorClient(running.base_url)
    out_trade_no = "ord_" + secrets.token_hex(8)
    merchant_call(running, "POST", "/v3/pay/transactions/jsapi", {
        "appid": running.creds.appid, "mchid": running.creds.mchid, "description": "数字分身",
        "out_trade_no": out_trade_no, "notify_url": notify_url, "amount": {"total": 990, "currency": "CNY"},
        "payer": {"openid": sim.openid_of("alice")}})
    return out_trade_no, sim.pay(out_trade_no)


def notification(running, notification_id: str) -> dict:
    return next(n for n in SimulatorClient(running.base_url).notifications() if n["id"] == notification_id)


def redelivery_settles(running, notification_id: str) -> dict:
    """The notification once its automatic redelivery is over (acknowledged or given up)."""
    return wait_for(lambda: (lambda n: n if n["redelivery"]["status"] in ("acknowledged", "gave_up") else None)(
        notification(running, notification_id)), WAIT_S, "redelivery to end")


def decrypt(creds, body: str) -> dict:
    resource = json.loads(body)["resource"]
    plain = AESGCM(creds.apiv3_key.encode()).decrypt(resource["nonce"].encode(),
                                                     base64.b64decode(resource["ciphertext"]),
                                                     resource["associated_data"].encode())
    return json.loads(plain)


def test_the_schedule_is_wechat_pays():
    minutes = 60
    assert REDELIVERY_INTERVALS_S == (15, 15, 30, 3 * minutes, 10 * minutes, 20 * minutes, 30 * minutes,
                                      30 * minutes, 30 * minutes, 60 * minutes, 180 * minutes, 180 * minutes,
                                      180 * minutes, 360 * minutes, 360 * minutes)
    assert sum(REDELIVERY_INTERVALS_S) == 24 * 3600 + 4 * minutes


def test_off_by_default_and_no_thread_until_a_retry_is_due(creds):
    assert create_sim_app(creds).extensions["wechat_sim"].redelivery is None  # one delivery per callback
    sim = create_sim_app(creds, redelivery_scale=1.0).extensions["wechat_sim"]
    assert sim.redelivery.scale == 1.0 and sim.redelivery._thread is None
    with pytest.raises(ValueError):
        create_sim_app(creds, redelivery_scale=-1)


def test_retries_follow_the_schedule_in_order_then_give_up_each_freshly_signed(simulators, receivers, creds):
    scale = 0.00005  # the whole day in about 4.3 s
    receiver = receivers(then=500)
    running = simulators(redelivery_scale=scale)
    out_trade_no, first = paid(running, receiver.url)
    assert first["status_code"] == 500 and first["delivered"] is False

    note = redelivery_settles(running, first["notification_id"])
    assert note["redelivery"]["status"] == "gave_up" and note["redelivery"]["retries"] == 15
    assert note["redelivery"]["next_attempt_at"] is None and note["redelivery"]["gave_up_at"]
    attempts = note["deliveries"]
    assert [(a["trigger"], a["retry"]) for a in attempts] == \
        [("initial", None)] + [("redelivery", n) for n in range(1, 16)]
    assert [a["status_code"] for a in attempts] == [500] * 16 and not any(a["delivered"] for a in attempts)
    for previous, attempt, interval in zip(attempts, attempts[1:], REDELIVERY_INTERVALS_S):
        assert attempt["at"] - previous["finished_at"] >= interval * scale - 0.005  # never early
    assert SimulatorClient(running.base_url).stats()["redelivery"]["queued"] == 0

    # It gave up: nothing more comes, and every attempt reached the receiver.
    assert receiver.count() == 16
    platform_key = signing.load_public_key(creds.platform_public_key_pem)
    with receiver.lock:
        received = list(receiver.received)
    for entry in received:
        headers = entry["headers"]
        assert headers["Wechatpay-Serial"] == creds.platform_public_key_id
        assert headers["Wechatpay-Signature-Type"] == signing.SIGNATURE_TYPE
        assert signing.verify(platform_key, signing.platform_message(
            headers["Wechatpay-Timestamp"], headers["Wechatpay-Nonce"], entry["body"]), headers["Wechatpay-Signature"])
        assert int(headers["Wechatpay-Timestamp"]) <= entry["at"]  # signed for this delivery, not before it
        assert json.loads(entry["body"])["id"] == first["notification_id"]
        assert decrypt(creds, entry["body"])["out_trade_no"] == out_trade_no
    assert {entry["body"] for entry in received} == {received[0]["body"]}  # the same notification every time
    assert len({entry["headers"]["Wechatpay-Nonce"] for entry in received}) == 16
    stamps = [int(entry["headers"]["Wechatpay-Timestamp"]) for entry in received]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]  # the day took > 1 s even compressed


def test_a_2xx_ends_the_schedule(simulators, receivers):
    receiver = receivers([500, 500], then=204)
    running = simulators(redelivery_scale=0.001)
    _, first = paid(running, receiver.url)
    assert first["status_code"] == 500

    note = redelivery_settles(running, first["notification_id"])
    assert note["redelivery"]["status"] == "acknowledged" and note["redelivery"]["retries"] == 2
    assert [(a["trigger"], a["retry"], a["status_code"], a["delivered"]) for a in note["deliveries"]] == [
        ("initial", None, 500, False), ("redelivery", 1, 500, False), ("redelivery", 2, 204, True)]
    sim = SimulatorClient(running.base_url)
    stats = sim.stats()
    assert stats["redelivery"]["queued"] == 0  # nothing left that could go out
    assert stats["redelivery"]["notifications"] == {"acknowledged": 1} and stats["deliveries"] == 3
    assert receiver.count() == 3
    flat = sim.deliveries()
    assert [(d["notification_id"], d["trigger"], d["status_code"]) for d in flat] == [
        (first["notification_id"], "initial", 500), (first["notification_id"], "redelivery", 500),
        (first["notification_id"], "redelivery", 204)]
    assert flat[0]["event_type"] == "TRANSACTION.SUCCESS" and flat[0]["url"] == receiver.url
    assert sim.deliveries(first["notification_id"]) == flat and sim.deliveries("nope") == []


def test_timeouts_and_connection_errors_are_unacknowledged(simulators, receivers):
    receiver = receivers([("hang", 30), ("hang", 30)], then=204)
    running = simulators(redelivery_scale=0.001, callback_timeout_s=0.5)
    _, first = paid(running, receiver.url)
    assert first["error"] == "timeout" and first["delivered"] is False
    note = redelivery_settles(running, first["notification_id"])
    attempts = note["deliveries"]
    assert note["redelivery"]["status"] == "acknowledged"
    assert [a["error"] for a in attempts[:2]] == ["timeout", "timeout"]
    assert not any(a["delivered"] for a in attempts[:-1]) and attempts[-1]["status_code"] == 204

    gone = receivers()
    gone.stop()  # nothing listens on its port any more
    quick = simulators(redelivery_scale=0.00002)  # the whole day in about 1.7 s
    _, refused = paid(quick, gone.url)
    assert refused["error"].startswith("connection_error")
    note = redelivery_settles(quick, refused["notification_id"])
    assert note["redelivery"]["status"] == "gave_up" and len(note["deliveries"]) == 16
    assert all(a["error"].startswith("connection_error") for a in note["deliveries"])


def test_refund_callbacks_are_redelivered_too(simulators, receivers):
    receiver = receivers([503], then=204)
    running = simulators(redelivery_scale=0.001)
    out_trade_no, first = paid(running, receiver.url)
    assert first["status_code"] == 503
    redelivery_settles(running, first["notification_id"])
    merchant_call(running, "POST", "/v3/refund/domestic/refunds", {
        "out_trade_no": out_trade_no, "out_refund_no": out_trade_no + "-r1", "reason": "test",
        "notify_url": receiver.url, "amount": {"refund": 990, "total": 990, "currency": "CNY"}})
    with receiver.lock:
        receiver.script.append(500)
    settled = SimulatorClient(running.base_url).settle_refunds(out_trade_no + "-r1")
    assert [d["status_code"] for d in settled["deliveries"]] == [500]
    note = redelivery_settles(running, settled["deliveries"][0]["notification_id"])
    assert note["event_type"] == "REFUND.SUCCESS" and note["redelivery"]["status"] == "acknowledged"
    assert [(a["trigger"], a["status_code"]) for a in note["deliveries"]] == [("initial", 500), ("redelivery", 204)]


def test_no_redelivery_when_switched_off(simulators, receivers):
    off_receiver, on_receiver = receivers(then=500), receivers(then=500)
    off = simulators()  # the default
    on = simulators(redelivery_scale=0.00002)  # the same day, about 1.7 s
    _, off_first = paid(off, off_receiver.url)
    _, on_first = paid(on, on_receiver.url)
    assert off_first["status_code"] == on_first["status_code"] == 500
    redelivery_settles(on, on_first["notification_id"])  # every retry the other would make is long due by now
    assert on_receiver.count() == 16

    note = notification(off, off_first["notification_id"])
    assert note["redelivery"]["status"] == "not_scheduled" and len(note["deliveries"]) == 1
    assert SimulatorClient(off.base_url).stats()["redelivery"] == {
        "enabled": False, "scale": None, "intervals_s": list(REDELIVERY_INTERVALS_S), "queued": 0,
        "notifications": {"not_scheduled": 1}}
    assert off.simulator.redelivery is None and off_receiver.count() == 1
    # /sim/redeliver still works, once per call.
    assert SimulatorClient(off.base_url).redeliver(off_first["notification_id"])["status_code"] == 500
    assert [a["trigger"] for a in notification(off, off_first["notification_id"])["deliveries"]] == [
        "initial", "manual"]
    assert off_receiver.count() == 2


def test_a_manual_2xx_acknowledges_and_reset_or_stop_drop_pending_retries(simulators, receivers):
    receiver = receivers([500], then=204)
    running = simulators(redelivery_scale=1.0)  # the real pace: the first retry would come 15 s later
    sim = SimulatorClient(running.base_url)
    _, first = paid(running, receiver.url)
    pending = notification(running, first["notification_id"])["redelivery"]
    assert pending["status"] == "pending" and pending["next_retry"] == 0
    assert pending["next_attempt_at"] >= notification(running, first["notification_id"])["deliveries"][0][
        "finished_at"] + 15 - 0.005
    assert sim.redeliver(first["notification_id"])["status_code"] == 204
    acknowledged = notification(running, first["notification_id"])["redelivery"]
    assert acknowledged["status"] == "acknowledged" and acknowledged["next_attempt_at"] is None
    # The queued retry is skipped when it falls due.
    assert running.simulator.redeliver_due(first["notification_id"], 0) is None
    assert receiver.count() == 2

    with receiver.lock:
        receiver.script.append(500)
    _, second = paid(running, receiver.url)
    assert notification(running, second["notification_id"])["redelivery"]["status"] == "pending"
    sim.reset()
    assert sim.stats()["redelivery"]["queued"] == 0 and sim.notifications() == []

    with receiver.lock:
        receiver.script.append(500)
    _, third = paid(running, receiver.url)
    assert sim.stats()["redelivery"]["queued"] == 1
    scheduler = running.simulator.redelivery
    running.stop()
    assert scheduler.pending() == 0 and not scheduler._thread.is_alive()
    assert receiver.count() == 4  # pay, manual, pay after the first, pay after the reset: no retry went out
