"""PaymentGateway (wechatpayv3, public-key mode) against the simulator: real RSA signatures and AES-GCM end to end,
with a small receiver playing the app's notify_url."""
from __future__ import annotations

import base64
import json
import secrets
import threading
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from flask import Flask, request
from werkzeug.serving import make_server

from portraits.gateways.wechatpay import CallbackRejected, PaymentGateway, PaymentGatewayError
from wechat_sim import signing
from wechat_sim.client import SimulatorClient
from wechat_sim.keys import generate_credentials
from wechat_sim.runner import start_simulator
from tests.waiting import wait_for


class Receiver:
    """The app's notify endpoints: parse every delivery with the gateway and keep what happened."""

    def __init__(self):
        self.gateway: PaymentGateway | None = None
        self.clock_ahead_s = 0.0  # how far the receiver's clock runs ahead of the sender's
        self.lock = threading.Lock()
        self.received: list[dict] = []
        app = Flask("receiver")

        @app.post("/notify")
        @app.post("/refund-notify")
        def notify():
            raw = {"path": request.path, "headers": dict(request.headers), "body": request.get_data()}
            try:
                notification = self.gateway.parse_callback(request.headers, request.get_data(),
                                                           now=time.time() + self.clock_ahead_s)
            except CallbackRejected as rejected:
                with self.lock:
                    self.received.append({**raw, "rejected": rejected.code})
                return {"code": "FAIL", "message": rejected.code}, 400
            with self.lock:
                self.received.append({**raw, "notification": notification})
            return "", 204

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, predicate, timeout_s: float = 30.0) -> dict:
        def first_match():
            with self.lock:
                return next((entry for entry in self.received if predicate(entry)), None)

        return wait_for(first_match, timeout_s, "the expected callback")


@pytest.fixture(scope="module")
def creds():
    return generate_credentials()


@pytest.fixture(scope="module")
def simulator(creds):
    running = start_simulator(creds, refund_settle_delay_s=0.05)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def receiver():
    running = Receiver()
    yield running
    running.server.shutdown()


@pytest.fixture
def sim(simulator):
    client = SimulatorClient(simulator.base_url)
    client.reset()
    return client


@pytest.fixture
def make_gateway(simulator, creds, receiver):
    def make(**overrides):
        options = dict(
            mchid=creds.mchid, appid=creds.appid, private_key_pem=creds.merchant_private_key_pem,
            cert_serial_no=creds.merchant_cert_serial_no, apiv3_key=creds.apiv3_key,
            public_key_pem=creds.platform_public_key_pem, public_key_id=creds.platform_public_key_id,
            api_base_url=simulator.base_url, notify_url=receiver.base_url + "/notify",
            refund_notify_url=receiver.base_url + "/refund-notify", timeout=5, callback_max_age_s=300)
        options.update(overrides)
        return PaymentGateway(**options)

    return make


@pytest.fixture
def gateway(make_gateway, receiver):
    receiver.gateway = make_gateway()
    with receiver.lock:
        receiver.received.clear()
    return receiver.gateway


def new_order_id() -> str:
    return "ord_" + secrets.token_hex(8)


def paid_order(sim, gateway, receiver, amount=990):
    order_id = new_order_id()
    gateway.prepay(order_id, amount, "数字分身 AI写真", sim.openid_of("alice"))
    result = sim.pay(order_id)
    delivery = receiver.wait_for(lambda e: e.get("notification") and e["notification"].id == result["notification_id"])
    return order_id, result, delivery


def platform_sign(creds, timestamp: str, nonce: str, body: str) -> str:
    return signing.sign(signing.load_private_key(creds.platform_private_key_pem),
                        signing.platform_message(timestamp, nonce, body))


# ---------------------------------------------------------------- prepay


def test_prepay_and_pay_params_signed_with_the_merchant_key(sim, gateway, creds):
    order_id = new_order_id()
    prepay_id = gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    assert prepay_id.startswith("wx")
    assert gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice")) == prepay_id
    params = gateway.pay_params(prepay_id)
    assert params["appId"] == creds.appid and params["signType"] == "RSA"
    assert params["package"] == f"prepay_id={prepay_id}"
    message = f"{params['appId']}\n{params['timeStamp']}\n{params['nonceStr']}\n{params['package']}\n"
    public_key = serialization.load_pem_public_key(creds.merchant_public_key_pem.encode())
    public_key.verify(base64.b64decode(params["paySign"]), message.encode(), padding.PKCS1v15(), hashes.SHA256())
    tampered = message.replace(prepay_id, prepay_id + "x")
    with pytest.raises(Exception):
        public_key.verify(base64.b64decode(params["paySign"]), tampered.encode(), padding.PKCS1v15(),
                          hashes.SHA256())
    order = gateway.query_order(order_id)
    assert order["trade_state"] == "NOTPAY" and order["amount"]["total"] == 990


def test_prepay_with_another_amount_for_the_same_order_is_rejected(sim, gateway):
    order_id = new_order_id()
    gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    with pytest.raises(PaymentGatewayError) as caught:
        gateway.prepay(order_id, 1990, "数字分身", sim.openid_of("alice"))
    assert caught.value.code == "invalid_request" and caught.value.retryable is False


def test_unknown_order_queries_as_none(sim, gateway):
    assert gateway.query_order(new_order_id()) is None


def test_request_signed_with_a_foreign_merchant_key_is_refused(sim, make_gateway):
    impostor = make_gateway(private_key_pem=generate_credentials().merchant_private_key_pem)
    with pytest.raises(PaymentGatewayError) as caught:
        impostor.query_order(new_order_id())
    assert caught.value.code == "sign_error" and caught.value.retryable is False


def test_response_not_signed_by_the_configured_platform_key_is_refused(sim, make_gateway):
    misconfigured = make_gateway(public_key_pem=generate_credentials().platform_public_key_pem)
    with pytest.raises(PaymentGatewayError) as caught:
        misconfigured.prepay(new_order_id(), 990, "数字分身", sim.openid_of("alice"))
    assert caught.value.code == "bad_response_signature"


def test_close_unpaid_order_and_refuse_to_close_a_paid_one(sim, gateway, receiver):
    order_id = new_order_id()
    gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    gateway.close_order(order_id)
    assert gateway.query_order(order_id)["trade_state"] == "CLOSED"
    paid_id, _, _ = paid_order(sim, gateway, receiver)
    with pytest.raises(PaymentGatewayError) as caught:
        gateway.close_order(paid_id)
    assert caught.value.code == "orderpaid" and not caught.value.retryable


# ---------------------------------------------------------------- payment callback


def test_payment_callback_is_verified_and_decrypted(sim, gateway, receiver, creds):
    order_id, result, delivery = paid_order(sim, gateway, receiver)
    assert result["status_code"] == 204 and result["delivered"] is True
    notification = delivery["notification"]
    assert notification.event_type == "TRANSACTION.SUCCESS"
    assert notification.resource["out_trade_no"] == order_id
    assert notification.resource["trade_state"] == "SUCCESS"
    assert notification.resource["amount"]["total"] == 990
    assert notification.resource["payer"]["openid"] == sim.openid_of("alice")
    assert notification.resource["mchid"] == creds.mchid
    order = gateway.query_order(order_id)
    assert order["trade_state"] == "SUCCESS" and order["transaction_id"] == result["transaction_id"]
    with pytest.raises(PaymentGatewayError) as caught:
        gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    assert caught.value.code == "orderpaid"


def test_redelivery_is_the_same_notification_freshly_signed(sim, gateway, receiver):
    _, result, first = paid_order(sim, gateway, receiver)
    again = sim.redeliver(result["notification_id"])
    assert again["status_code"] == 204
    burst = sim.redeliver(result["notification_id"], copies=20)
    assert [d["status_code"] for d in burst["deliveries"]] == [204] * 20
    with receiver.lock:
        deliveries = [e for e in receiver.received if e.get("notification")
                      and e["notification"].id == result["notification_id"]]
    assert len(deliveries) == 22
    assert {e["body"] for e in deliveries} == {first["body"]}
    assert len({e["headers"]["Wechatpay-Nonce"] for e in deliveries}) == 22


def test_forged_tampered_stale_and_foreign_callbacks_are_rejected(sim, gateway, receiver, creds):
    _, _, delivery = paid_order(sim, gateway, receiver)
    headers, body = delivery["headers"], delivery["body"]
    gateway.parse_callback(headers, body)  # the genuine one passes

    def rejection(new_headers, new_body, **kwargs):
        with pytest.raises(CallbackRejected) as caught:
            gateway.parse_callback(new_headers, new_body, **kwargs)
        return caught.value.code

    forged = dict(headers, **{"Wechatpay-Signature": platform_sign(generate_credentials(), headers[
        "Wechatpay-Timestamp"], headers["Wechatpay-Nonce"], body.decode())})
    assert rejection(forged, body) == "bad_signature"
    assert rejection(headers, body.replace(b"TRANSACTION.SUCCESS", b"TRANSACTION.SUCCEED")) == "bad_signature"
    assert rejection(headers, body, now=int(headers["Wechatpay-Timestamp"]) + 301) == "stale_timestamp"
    assert rejection(dict(headers, **{"Wechatpay-Serial": "PUB_KEY_ID_0000"}), body) == "unknown_serial"
    without_signature = {k: v for k, v in headers.items() if k != "Wechatpay-Signature"}
    assert rejection(without_signature, body) == "missing_headers"

    def resealed(apiv3_key: bytes, plaintext: bytes):  # correctly signed around a resource sealed as given
        envelope = json.loads(body)
        nonce = "abcdefghijkl"
        envelope["resource"].update(nonce=nonce, ciphertext=base64.b64encode(AESGCM(apiv3_key).encrypt(
            nonce.encode(), plaintext, b"transaction")).decode())
        text = json.dumps(envelope)
        stamp = str(int(time.time()))
        return dict(headers, **{"Wechatpay-Timestamp": stamp, "Wechatpay-Signature": platform_sign(
            creds, stamp, headers["Wechatpay-Nonce"], text)}), text.encode()

    assert rejection(*resealed(b"k" * 32, b"{}")) == "bad_ciphertext"  # another APIv3 key
    assert rejection(*resealed(creds.apiv3_key.encode(), b"[1, 2]")) == "bad_ciphertext"  # JSON, not an object
    timestamp = str(int(time.time()))
    garbage_signed = dict(headers, **{"Wechatpay-Timestamp": timestamp, "Wechatpay-Signature": platform_sign(
        creds, timestamp, headers["Wechatpay-Nonce"], "not json")})
    assert rejection(garbage_signed, b"not json") == "bad_body"


def test_lowercase_header_mapping_is_accepted(sim, gateway, receiver):
    _, result, delivery = paid_order(sim, gateway, receiver)
    lowered = {key.lower(): value for key, value in delivery["headers"].items()}
    assert gateway.parse_callback(lowered, delivery["body"]).id == result["notification_id"]


def test_replayed_old_delivery_is_stale_at_the_receiver(sim, gateway, receiver):
    """Signed timestamps have whole-second resolution, so the test moves the receiver's clock instead of sleeping
    out a short window (with a 1 s window a fresh delivery signed late in its second was already stale)."""
    order_id = new_order_id()
    gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    result = sim.pay(order_id)
    assert result["status_code"] == 204
    try:
        receiver.clock_ahead_s = 301.0  # the default window is 300 s
        replay = sim.redeliver(result["notification_id"], resign=False)
        assert replay["status_code"] == 400
        entry = receiver.wait_for(lambda e: e.get("rejected") == "stale_timestamp")
        assert entry["path"] == "/notify"
    finally:
        receiver.clock_ahead_s = 0.0
    assert sim.redeliver(result["notification_id"])["status_code"] == 204


# ---------------------------------------------------------------- refunds


def test_refund_settles_with_a_refund_success_callback(sim, gateway, receiver):
    order_id, _, _ = paid_order(sim, gateway, receiver)
    refund = gateway.refund(order_id, f"{order_id}-r1", 990, 990, "training failed")
    assert refund["status"] == "PROCESSING" and refund["out_refund_no"] == f"{order_id}-r1"
    delivery = receiver.wait_for(lambda e: e.get("notification") and e["notification"].event_type.startswith("REFUND"))
    assert delivery["path"] == "/refund-notify"
    resource = delivery["notification"].resource
    assert delivery["notification"].event_type == "REFUND.SUCCESS"
    assert resource["refund_status"] == "SUCCESS" and resource["out_refund_no"] == f"{order_id}-r1"
    assert resource["amount"]["refund"] == 990
    assert gateway.query_refund(f"{order_id}-r1")["status"] == "SUCCESS"
    assert gateway.query_order(order_id)["trade_state"] == "REFUND"


def test_refund_is_idempotent_on_out_refund_no_and_never_exceeds_the_payment(sim, gateway, receiver):
    order_id, _, _ = paid_order(sim, gateway, receiver)
    first = gateway.refund(order_id, f"{order_id}-r1", 990, 990, "training failed")
    second = gateway.refund(order_id, f"{order_id}-r1", 990, 990, "training failed")
    assert first["refund_id"] == second["refund_id"]
    assert len([r for r in sim.refunds() if r["out_trade_no"] == order_id]) == 1
    with pytest.raises(PaymentGatewayError) as caught:
        gateway.refund(order_id, f"{order_id}-r2", 1, 990, "again")
    assert caught.value.code == "invalid_request" and not caught.value.retryable


def test_abnormal_refund_fault_is_reported_by_callback_and_query(sim, gateway, receiver):
    order_id, _, _ = paid_order(sim, gateway, receiver)
    sim.settle_refunds()  # refunds of earlier tests settling now would take the fault
    sim.set_fault("/", "refund_abnormal", count=1)
    gateway.refund(order_id, f"{order_id}-r1", 990, 990, "training failed")
    delivery = receiver.wait_for(lambda e: e.get("notification")
                                 and e["notification"].event_type.startswith("REFUND")
                                 and e["notification"].resource.get("out_refund_no") == f"{order_id}-r1")
    assert delivery["notification"].event_type == "REFUND.ABNORMAL"
    assert gateway.query_refund(f"{order_id}-r1")["status"] == "ABNORMAL"


# ---------------------------------------------------------------- faults


def test_server_error_is_retryable_and_retry_succeeds(sim, gateway):
    sim.set_fault("/v3/pay/transactions/jsapi", "5xx", count=1)
    order_id = new_order_id()
    with pytest.raises(PaymentGatewayError) as caught:
        gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    assert caught.value.retryable is True and caught.value.code == "system_error"
    assert gateway.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))


def test_timeout_is_retryable_and_the_retry_returns_the_same_prepay(sim, make_gateway):
    impatient = make_gateway(timeout=1.0)
    order_id = new_order_id()
    sim.set_fault("/v3/pay/transactions/jsapi", "timeout", count=1, delay_s=3.0)
    with pytest.raises(PaymentGatewayError) as caught:
        impatient.prepay(order_id, 990, "数字分身", sim.openid_of("alice"))
    assert caught.value.retryable is True and caught.value.code == "wechatpay_timeout"
    # The simulator still carries out the timed-out request, as WeChat may.
    [order] = wait_for(lambda: [o for o in sim.orders() if o["out_trade_no"] == order_id], 30,
                       "the timed-out prepay to land", step_s=0.05)
    assert make_gateway().prepay(order_id, 990, "数字分身", sim.openid_of("alice")) == order["prepay_id"]


def test_unreachable_wechat_is_retryable(make_gateway):
    unreachable = make_gateway(api_base_url="http://127.0.0.1:9", timeout=1)
    with pytest.raises(PaymentGatewayError) as caught:
        unreachable.query_order("anything")
    assert caught.value.retryable is True and caught.value.code == "wechatpay_unreachable"
