"""Virtual payment (xpay) as a second payment rail, end to end against the simulator's xpay: the signed client
parameters the order gives (verified by the simulator's own implementation of paySig and signature), the
goods-deliver and refund pushes over the real push endpoint, refund_order / query_order with pay_sig, Android
refunds exactly once and the iOS make-good exactly once, forged pushes and signatures refused, reconciliation."""
from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
import requests
from flask import Flask, request
from werkzeug.serving import make_server

from portraits import avatars
from portraits.billing import orders, reconcile, refunds
from portraits.gateways.wechatpay import PaymentGatewayError
from portraits.gateways.xpay import XPayGateway
from portraits.push_events import PUSH_PATH
from tests.money_support import (add_user_and_avatar, history_targets, run_default_jobs, signed_notification,
                                 transaction_for)
from wechat_sim.client import SimulatorClient
from wechat_sim.keys import generate_credentials
from wechat_sim.push import PushConfig, signed_push as wechat_signed_push
from wechat_sim.runner import start_simulator
from wechat_sim.simulator import push_query
from wechat_sim.xpay import hmac_hex
from tests.waiting import wait_for

XPAY_RAIL = {"payment_rail": "xpay"}


@pytest.fixture
def settings_overrides():
    return dict(XPAY_RAIL)


@pytest.fixture
def pushes(sim, app, services):
    """The simulator pushes to this app's message-push endpoint (as the mini-program's console would say)."""
    sim.set_push_url(services.settings.public_base_url + PUSH_PATH)
    yield
    sim.set_push_url(None)


def buy(api, avatar_id: str, platform: str, **extra) -> dict:
    response = api.post("/api/v1/orders", json={"avatar_id": avatar_id, "sku": "avatar_pack", "platform": platform,
                                                **extra})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def android_order(login, services, sim) -> tuple[object, dict, dict, dict]:
    """Alice, an avatar of hers and its unpaid order on the Android virtual-payment rail."""
    api = login("alice")
    user = services.db.users.find_one({"_id": api.user_id})
    _, avatar = add_user_and_avatar(services, sim, user=user)
    return api, user, avatar, buy(api, avatar["_id"], "android")


def pay(sim, services, api, order: dict, platform: str, deliver: bool = True) -> dict:
    openid = services.db.users.find_one({"_id": api.user_id})["openid"]
    paid = sim.xpay_pay(openid, order["xpay_params"], platform=platform, deliver=deliver)
    if deliver:
        assert paid["delivered"], paid
        assert paid["reply"] == {"ErrCode": 0, "ErrMsg": "success"}
    return paid


def goods_push(openid: str, order_id: str) -> dict:
    """An xpay_goods_deliver_notify as WeChat would push it for a 9.9 yuan avatar pack."""
    return {"ToUserName": "gh_x", "FromUserName": openid, "CreateTime": 1, "MsgType": "event",
            "Event": "xpay_goods_deliver_notify", "OpenId": openid, "OutTradeNo": order_id, "Env": 0,
            "WeChatPayInfo": {"MchOrderNo": "m1", "TransactionId": "t1", "PaidTime": 1},
            "GoodsInfo": {"ProductId": "avatar_pack", "Quantity": 1, "OrigPrice": 990, "ActualPrice": 990,
                          "Attach": ""}}


def signed_push(client, services, message: dict, *, token: str | None = None, **signing):
    """A push as WeChat sends it in the configured mode (safe: encrypted), signed with `token` (ours unless given);
    `signing` (timestamp, nonce) to sign an old one."""
    settings = services.settings
    config = PushConfig(url=None, token=token or settings.wechat_push_token, aes_key=settings.wechat_push_aes_key,
                        mode=settings.wechat_push_mode)
    params, body, content_type = wechat_signed_push(config, settings.wechat_appid, message["ToUserName"], message,
                                                    **signing)
    return client.post(PUSH_PATH, query_string=params, data=body, content_type=content_type)


# --------------------------------------------------------------------------------------------- the happy path


def test_an_order_paid_through_xpay_trains_and_fulfils(ready_avatar, drain, services, sim, pushes):
    api, avatar = ready_avatar()
    order = buy(api, avatar["id"], "android")
    assert order["rail"] == "xpay" and order["state"] == "created" and "pay_params" not in order
    params = order["xpay_params"]
    assert params["mode"] == "short_series_goods"
    sign_data = json.loads(params["signData"])
    assert sign_data == {"offerId": services.settings.xpay_offer_id, "buyQuantity": 1, "env": 0,
                         "currencyType": "CNY", "productId": "avatar_pack", "goodsPrice": 990,
                         "outTradeNo": order["id"], "attach": avatar["id"]}
    assert "ios_make_good" not in order

    paid = pay(sim, services, api, order, "android")
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "paid"
    assert [o["status"] for o in sim.xpay_orders()] == [4]  # the acknowledged push marks the goods delivered
    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
    template = next(t for t in api.get("/api/v1/templates?gender=female").get_json() if t["category"] == "urban")
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template["id"]})
    assert render.status_code == 201, render.get_json()
    drain()
    final = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert final["state"] == "fulfilled" and final["refunds"] == []
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["transaction_id"] == sim.xpay_orders()[0]["wxpay_order_id"]
    assert paid["notification_id"]


# --------------------------------------------------------------------------------- Android: refunded once


@pytest.mark.parametrize("settings_overrides", [{**XPAY_RAIL, "fault_train_failures": 99, "train_retries": 0}])
def test_a_failed_android_order_is_refunded_once_however_often_pushes_come(ready_avatar, drain, services, sim,
                                                                           pushes):
    api, avatar = ready_avatar()
    order = buy(api, avatar["id"], "android")
    paid = pay(sim, services, api, order, "android")
    again = sim.redeliver(paid["notification_id"], copies=3)
    assert all(d["delivered"] for d in again["deliveries"])
    assert history_targets(services, order["id"]).count("paid") == 1

    drain()  # the training fails, the refund is asked of xpay/refund_order
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "failed"
    refunding = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert refunding["state"] == "refunding"
    number = f"R{order['id']}-1"
    assert [r["out_refund_no"] for r in refunding["refunds"]] == [number]
    assert refunding["refunds"][0]["state"] == "PROCESSING"

    # The refund job run again asks for the same refund number, which xpay answers as a duplicate.
    refunds.submit(services, order["id"], number)
    settled = sim.xpay_settle_refunds()
    assert settled["settled"] == [number] and settled["deliveries"][0]["delivered"]
    refunded = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert refunded["state"] == "refunded" and refunded["refunds"][0]["state"] == "SUCCESS"

    refund_push = sim.xpay_refunds()["refunds"][0]["notification_ids"][0]
    assert all(d["delivered"] for d in sim.redeliver(refund_push, copies=3)["deliveries"])
    seen = sim.xpay_refunds()
    assert [(r["order_id"], r["refund_fee"], r["status"]) for r in seen["refunds"]] == [(number, 990, 5)]
    assert seen["calls"] == 2  # the first ask and the repeated one, refused as a duplicate
    assert history_targets(services, order["id"]) == ["created", "paid", "refunding", "refunded"]
    assert [o["status"] for o in sim.xpay_orders()] == [5]


# ------------------------------------------------------------------------------------- iOS: made good once


@pytest.mark.parametrize("settings_overrides", [{**XPAY_RAIL, "fault_train_failures": 1, "train_retries": 0}])
def test_a_failed_ios_order_is_made_good_once_and_never_refunded(ready_avatar, drain, services, sim, pushes):
    api, avatar = ready_avatar()
    order = buy(api, avatar["id"], "ios")
    assert order["ios_make_good"] == services.settings.xpay_ios_make_good
    pay(sim, services, api, order, "ios")
    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "failed"
    made_good = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert made_good["state"] == "made_good" and made_good["refunds"] == []
    user = services.db.users.find_one({"_id": api.user_id})
    assert [(c["order_id"], c["sku"], c["used_by"]) for c in user["make_good_credits"]] == \
        [(order["id"], "avatar_pack", None)]

    # Every other path that would refund it changes nothing more.
    assert avatars.fail_training(services, avatar["id"], "again") == "already_handled"
    assert refunds.request_refund(services, order["id"], reason="again") is None
    with pytest.raises(refunds.RefundRefused) as refused:
        refunds.request_refund(services, order["id"], reason="operator", expect=("made_good",))
    assert refused.value.code == "refund_impossible"
    run_default_jobs(services)
    reconcile.reconcile_with_gateway(services)
    assert len(services.db.users.find_one({"_id": api.user_id})["make_good_credits"]) == 1
    assert sim.xpay_refunds() == {"calls": 0, "refunds": []}
    assert history_targets(services, order["id"]) == ["created", "paid", "made_good"]

    exported = api.get("/api/v1/me/export").get_json()["user"]["make_good_credits"]
    assert [(c["order_id"], c["used_by"]) for c in exported] == [(order["id"], None)]
    products = api.get("/api/v1/products?platform=ios").get_json()
    assert products[0]["credits"] == 1 and products[0]["ios_make_good"] == services.settings.xpay_ios_make_good

    # The credit pays the redo (the second training works: only the first attempt was made to fail).
    redo_avatar = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    services.db.avatars.update_one({"_id": redo_avatar["id"]}, {"$set": {"state": "ready"}})
    redo = buy(api, redo_avatar["id"], "ios", use_credit=True)
    assert redo["rail"] == "credit" and redo["state"] == "paid" and redo["amount"] == 0
    assert services.db.avatars.find_one({"_id": redo_avatar["id"]})["state"] == "queued"
    _, another = add_user_and_avatar(services, sim, user=services.db.users.find_one({"_id": api.user_id}))
    spent = api.post("/api/v1/orders", json={"avatar_id": another["_id"], "sku": "avatar_pack", "use_credit": True})
    assert spent.status_code == 402 and spent.get_json()["error"]["code"] == "no_make_good_credit"


# --------------------------------------------------------------------------------------------- forgeries


def test_forged_pushes_and_signatures_are_refused_and_change_nothing(login, client, services, sim, pushes):
    api, user, avatar, order = android_order(login, services, sim)
    params = order["xpay_params"]
    genuine = goods_push(user["openid"], order["id"])

    forged = signed_push(client, services, genuine, token="not-our-token")
    assert forged.status_code == 403 and forged.get_json()["error"]["code"] == "push_signature_invalid"
    unsigned = client.post(PUSH_PATH, data=json.dumps(genuine), content_type="application/json")
    assert unsigned.status_code == 403 and unsigned.get_json()["error"]["code"] == "push_signature_invalid"
    stale = signed_push(client, services, genuine, timestamp=1000, nonce="7")
    assert stale.status_code == 403 and stale.get_json()["error"]["code"] == "push_expired"
    cheap = signed_push(client, services, {**genuine, "GoodsInfo": {**genuine["GoodsInfo"], "ActualPrice": 1}})
    assert cheap.status_code == 200 and cheap.get_json() == {"ErrCode": 1, "ErrMsg": "amount_mismatch"}
    other_env = signed_push(client, services, {**genuine, "Env": 1})
    assert other_env.get_json() == {"ErrCode": 1, "ErrMsg": "env_mismatch"}
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "created"
    assert services.db.payment_alerts.count_documents({"order_id": order["id"]}) == 2

    # The simulator (WeChat) refuses client parameters whose paySig or signature we did not make.
    tampered = params["signData"].replace('"goodsPrice":990', '"goodsPrice":1')
    payload = {"openid": user["openid"], "sign_data": tampered, "pay_sig": params["paySig"],
               "signature": params["signature"], "mode": params["mode"]}
    assert sim.xpay_pay_response(payload).json() == {"error": "pay_sig_invalid"}
    wrong_session = {"openid": user["openid"], "sign_data": params["signData"], "pay_sig": params["paySig"],
                     "signature": hmac_hex("another-session-key", params["signData"]), "mode": params["mode"]}
    assert sim.xpay_pay_response(wrong_session).json() == {"error": "signature_invalid"}

    # After a new login the session key changes: the order's parameters are signed again with the new one.
    client.post("/api/v1/auth/login", json={"code": sim.login_code("alice")})
    stale_signature = {**wrong_session, "signature": params["signature"]}
    assert sim.xpay_pay_response(stale_signature).json() == {"error": "signature_invalid"}
    fresh = api.get(f"/api/v1/orders/{order['id']}").get_json()["xpay_params"]
    assert fresh["signature"] != params["signature"]
    pay(sim, services, api, {"xpay_params": fresh}, "android")
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "paid"


def test_a_wechat_pay_callback_cannot_pay_an_xpay_order(login, client, services, sim, simulator, pushes):
    api, user, avatar, xpay_order = android_order(login, services, sim)
    stored = services.db.orders.find_one({"_id": xpay_order["id"]})
    headers, body = signed_notification(simulator.creds, transaction_for(stored, simulator.creds))
    refused = client.post("/api/v1/pay/notify", data=body, headers=headers)
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "rail_mismatch"
    assert services.db.orders.find_one({"_id": xpay_order["id"]})["state"] == "created"


def test_the_push_url_verification_answers_echostr_only_to_our_signature(client, services):
    token = services.settings.wechat_push_token
    ours = client.get(PUSH_PATH, query_string={**push_query(token), "echostr": "challenge-42"})
    assert ours.status_code == 200 and ours.get_data(as_text=True) == "challenge-42"
    theirs = client.get(PUSH_PATH, query_string={**push_query("guess"), "echostr": "challenge-42"})
    assert theirs.status_code == 403 and "challenge-42" not in theirs.get_data(as_text=True)


def test_server_api_pay_sig_is_checked_by_the_simulator(services, sim, login):
    api = login("alice")
    openid = services.db.users.find_one({"_id": api.user_id})["openid"]
    assert services.xpay.query_order(openid, "P-none") is None  # a correctly signed query of an unknown order
    wrong_key = XPayGateway(wechat=services.wechat, offer_id=services.settings.xpay_offer_id, app_key="not-it",
                            env=0, api_base_url=services.settings.wechat_api_base)
    with pytest.raises(PaymentGatewayError) as refused:
        wrong_key.query_order(openid, "P-none")
    assert refused.value.code == "pay_sig_invalid" and not refused.value.retryable
    # Signed with the query string in the uri (a known way to get it wrong), WeChat refuses too.
    token = services.wechat.access_token()
    body = json.dumps({"openid": openid, "env": 0, "order_id": "P-none"})
    bad = requests.post(f"{services.settings.wechat_api_base}/xpay/query_order", data=body, params={
        "access_token": token,
        "pay_sig": hmac_hex(services.settings.xpay_app_key, f"/xpay/query_order?access_token={token}&" + body)})
    assert bad.json()["errcode"] == 268490003


def test_an_xpay_refund_that_fails_leaves_the_order_refund_failed_with_an_alert(login, services, sim, pushes):
    api, user, avatar, order = android_order(login, services, sim)
    pay(sim, services, api, order, "android")
    services.db.avatars.update_one({"_id": avatar["_id"]}, {"$set": {"state": "failed"}})
    assert refunds.request_refund(services, order["id"], reason="training_failed")["state"] == "refunding"
    run_default_jobs(services)
    sim.set_fault("/xpay/refund_order", "xpay_refund_failed")
    assert sim.xpay_settle_refunds()["deliveries"][0]["delivered"]
    failed = services.db.orders.find_one({"_id": order["id"]})
    assert failed["state"] == "refund_failed" and failed["refunds"][0]["state"] == "ABNORMAL"
    assert services.db.payment_alerts.find_one({"order_id": order["id"], "kind": "refund_abnormal"}) is not None
    assert [o["left_fee"] for o in sim.xpay_orders()] == [990]  # nothing left WeChat


# ------------------------------------------------------------------------------------------ reconciliation


def test_reconciliation_finds_a_paid_xpay_order_whose_push_was_lost(login, services, sim, pushes):
    api, user, avatar, order = android_order(login, services, sim)
    pay(sim, services, api, order, "android", deliver=False)
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "created"
    later = services.db.orders.find_one({"_id": order["id"]})["created_at"] + timedelta(
        seconds=services.settings.reconcile_grace_s + 1)
    outcomes = reconcile.reconcile_with_gateway(services, now=later)
    assert outcomes == {"payment:paid": 1}
    stored = services.db.orders.find_one({"_id": order["id"]})
    assert stored["state"] == "paid"
    assert services.db.avatars.find_one({"_id": avatar["_id"]})["state"] == "queued"


def test_reconciliation_settles_an_xpay_refund_whose_push_was_lost(login, services, sim, pushes):
    api, user, avatar, order = android_order(login, services, sim)
    pay(sim, services, api, order, "android")
    services.db.avatars.update_one({"_id": avatar["_id"]}, {"$set": {"state": "failed"}})
    refunds.request_refund(services, order["id"], reason="training_failed")
    run_default_jobs(services)
    sim.set_push_url(None)  # the refund push is lost
    sim.xpay_settle_refunds()
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "refunding"
    later = services.db.orders.find_one({"_id": order["id"]})["refunds"][0]["requested_at"] + timedelta(
        seconds=services.settings.reconcile_grace_s + 1)
    assert reconcile.reconcile_with_gateway(services, now=later) == {"refund:success": 1}
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "refunded"


def test_an_unpaid_xpay_order_expires_here_and_one_paid_meanwhile_is_applied(login, services, sim, pushes):
    api = login("alice")
    user = services.db.users.find_one({"_id": api.user_id})
    _, first_avatar = add_user_and_avatar(services, sim, user=user)
    unpaid = buy(api, first_avatar["_id"], "android")
    assert orders.expire_order(services, unpaid["id"], by="test") == "closed"
    _, second_avatar = add_user_and_avatar(services, sim, user=user)
    paid_meanwhile = buy(api, second_avatar["_id"], "android")
    pay(sim, services, api, paid_meanwhile, "android", deliver=False)
    assert orders.expire_order(services, paid_meanwhile["id"], by="test") == "paid"
    assert services.db.orders.find_one({"_id": paid_meanwhile["id"]})["state"] == "paid"


def test_products_say_the_rail_and_the_ios_make_good_rule(login, services):
    api = login("alice")
    listed = api.get("/api/v1/products?platform=ios").get_json()
    by_sku = {p["sku"]: p for p in listed}
    assert set(by_sku) == set(services.settings.skus)
    assert [(p["amount"], p["rail"], p["credits"]) for p in [by_sku["avatar_pack"]]] == [(990, "xpay", 0)]
    assert {p["rail"] for p in listed} == {"xpay"}
    assert by_sku["avatar_pack"]["ios_make_good"] == services.settings.xpay_ios_make_good


@pytest.mark.parametrize("settings_overrides", [{"payment_rail": "by_platform", "xpay_platforms": ("ios",)}])
def test_by_platform_picks_the_rail_from_the_client_platform(login, client, services, sim):
    api = login("alice")
    user = services.db.users.find_one({"_id": api.user_id})
    _, ios_avatar = add_user_and_avatar(services, sim, user=user)
    _, android_avatar = add_user_and_avatar(services, sim, user=user)
    assert buy(api, ios_avatar["_id"], "ios")["rail"] == "xpay"
    android = buy(api, android_avatar["_id"], "android")
    assert android["rail"] == "jsapi" and "pay_params" in android and "xpay_params" not in android
    # A virtual-payment push cannot pay a WeChat Pay order.
    answer = signed_push(client, services, goods_push(user["openid"], android["id"]))
    answer = answer.get_json()
    assert answer == {"ErrCode": 1, "ErrMsg": "rail_mismatch"}
    assert services.db.orders.find_one({"_id": android["id"]})["state"] == "created"


# ---------------------------------------------------------------------- the simulator's push redelivery


class PushReceiver:
    """A push endpoint that refuses (ErrCode 1) the first `refuse` pushes, then acknowledges."""

    def __init__(self, refuse: int):
        self.refuse = refuse
        self.received: list[dict] = []
        self.lock = threading.Lock()
        app = Flask("push-receiver")

        @app.post("/push")
        def push():
            with self.lock:
                self.received.append({"args": request.args.to_dict(), "body": request.get_json()})
                count = len(self.received)
            return {"ErrCode": 1 if count <= self.refuse else 0, "ErrMsg": "later" if count <= self.refuse else "ok"}

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/push"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_simulator_pushes_goods_delivery_again_until_answered_errcode_0():
    receiver = PushReceiver(refuse=2)
    creds = generate_credentials()
    running = start_simulator(creds, redelivery_scale=0.001, push_url=receiver.url, push_mode="plaintext")
    try:
        client = SimulatorClient(running.base_url)
        openid = client.openid_of("alice")
        session_key = requests.get(f"{running.base_url}/sns/jscode2session", params={
            "appid": creds.appid, "secret": creds.app_secret, "js_code": client.login_code("alice"),
            "grant_type": "authorization_code"}).json()["session_key"]
        sign_data = json.dumps({"offerId": creds.xpay_offer_id, "buyQuantity": 1, "env": 0, "currencyType": "CNY",
                                "productId": "avatar_pack", "goodsPrice": 990, "outTradeNo": "P1", "attach": ""})
        first = client.xpay_pay(openid, {"mode": "short_series_goods", "signData": sign_data,
                                         "paySig": hmac_hex(creds.xpay_app_key, "requestVirtualPayment&" + sign_data),
                                         "signature": hmac_hex(session_key, sign_data)})
        assert first["delivered"] is False and first["reply"] == {"ErrCode": 1, "ErrMsg": "later"}
        wait_for(lambda: len(receiver.received) == 3 or None, 30, "two redeliveries")
        wait_for(lambda: client.xpay_orders()[0]["status"] == 4 or None, 30, "the goods marked delivered")
        bodies = [entry["body"] for entry in receiver.received]
        assert all(body == bodies[0] for body in bodies)
        assert bodies[0]["Event"] == "xpay_goods_deliver_notify" and bodies[0]["OutTradeNo"] == "P1"
        assert len({entry["args"]["nonce"] for entry in receiver.received}) == 3  # each push freshly signed
        deliveries = client.deliveries(first["notification_id"])
        assert [d["trigger"] for d in deliveries] == ["initial", "redelivery", "redelivery"]
    finally:
        running.stop()
        receiver.server.shutdown()
