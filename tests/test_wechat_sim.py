"""The WeChat simulator and the app's WeChatGateway (wechatpy) against it, over real HTTP on localhost."""
from __future__ import annotations

import io
import json
import os
import stat
import threading
import time

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from PIL import Image

from portraits.store.redis_client import start_embedded, stop_embedded
from portraits.gateways.wechat import (PhoneCodeRefused, SubscribeRefused, WeChatGateway, WeChatLoginError,
                                       WeChatUnavailable)
import wechat_sim.server
import wechat_sim.simulator
from wechat_sim import signing
from wechat_sim.client import SimulatorClient
from wechat_sim.keys import generate_credentials, load_or_create_credentials
from wechat_sim.runner import start_simulator
from tests.qr_support import decode_qr


@pytest.fixture(scope="module")
def creds():
    return generate_credentials()


@pytest.fixture(scope="module")
def simulator(creds):
    running = start_simulator(creds)
    yield running
    running.stop()


@pytest.fixture
def sim(simulator):
    client = SimulatorClient(simulator.base_url)
    client.reset()
    return client


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    client = start_embedded(tmp_path_factory.mktemp("redis") / "wechat.db")
    yield client
    stop_embedded(client)


@pytest.fixture
def redis(redis_server):
    redis_server.flushall()
    return redis_server


@pytest.fixture
def make_gateway(simulator, creds, redis):
    def make(**overrides):
        options = dict(appid=creds.appid, secret=creds.app_secret, api_base_url=simulator.base_url, redis=redis)
        options.update(overrides)
        return WeChatGateway(**options)

    return make


# ---------------------------------------------------------------- credentials


def test_credentials_persist_privately_and_survive_restart(tmp_path):
    first = load_or_create_credentials(tmp_path / "sim")
    second = load_or_create_credentials(tmp_path / "sim")
    assert first == second
    files = list((tmp_path / "sim").iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
    assert first.platform_public_key_id.startswith("PUB_KEY_ID_")
    assert len(first.apiv3_key) == 32 and first.apiv3_key.isascii()
    key = serialization.load_pem_private_key(first.merchant_private_key_pem.encode(), password=None)
    assert key.key_size == 2048


# ---------------------------------------------------------------- login


def test_code_to_openid_is_stable_per_user_and_not_the_name(sim, make_gateway):
    gateway = make_gateway()
    first = gateway.code_to_openid(sim.login_code("alice"))
    again = gateway.code_to_openid(sim.login_code("alice"))
    other = gateway.code_to_openid(sim.login_code("bob"))
    assert first == again
    assert first != other
    assert "alice" not in first and first.startswith("o")


def test_unknown_code_is_a_login_error(sim, make_gateway):
    with pytest.raises(WeChatLoginError) as caught:
        make_gateway().code_to_openid("not-a-code")
    assert caught.value.code == "invalid_login_code"
    assert caught.value.errcode == 40029


def test_code_is_single_use(sim, make_gateway):
    gateway = make_gateway()
    code = sim.login_code("alice")
    gateway.code_to_openid(code)
    with pytest.raises(WeChatLoginError):
        gateway.code_to_openid(code)


def test_expired_code_is_a_login_error(sim, make_gateway, monkeypatch):
    code = sim.login_code("alice")
    monkeypatch.setattr(wechat_sim.server, "LOGIN_CODE_TTL_S", -1)
    with pytest.raises(WeChatLoginError):
        make_gateway().code_to_openid(code)


def test_jscode2session_rejects_a_wrong_secret(sim, simulator, creds, make_gateway):
    answer = requests.get(f"{simulator.base_url}/sns/jscode2session", params={
        "appid": creds.appid, "secret": "wrong", "js_code": sim.login_code("alice"),
        "grant_type": "authorization_code"}, timeout=5).json()
    assert answer["errcode"] == 40125
    with pytest.raises(WeChatUnavailable):
        make_gateway(secret="wrong").code_to_openid(sim.login_code("alice"))


# ---------------------------------------------------------------- access token


def test_access_token_is_shared_through_redis(sim, make_gateway):
    one, two = make_gateway(), make_gateway()
    one.code_to_openid(sim.login_code("alice"))
    two.code_to_openid(sim.login_code("bob"))
    assert sim.token_issued_count() == 1


def test_concurrent_processes_refresh_the_token_once(sim, make_gateway):
    gateways = [make_gateway() for _ in range(6)]
    codes = [sim.login_code(f"user{i}") for i in range(6)]
    barrier = threading.Barrier(len(gateways))
    openids, errors = [], []

    def login(gateway, code):
        barrier.wait()
        try:
            openids.append(gateway.code_to_openid(code))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=login, args=pair) for pair in zip(gateways, codes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(openids)) == 6
    assert sim.token_issued_count() == 1


def test_token_stored_between_look_and_lock_is_reused(sim, make_gateway):
    """The interleaving behind a rare double issuance: B finds no token, A stores one, then B takes the lock."""
    first, second = make_gateway(), make_gateway()
    storage = second._client.session
    real_get, looks = storage.get, []

    def get_as_if_looked_before_first_stored(key, default=None):
        looks.append(key)
        return None if len(looks) == 1 else real_get(key, default)

    storage.get = get_as_if_looked_before_first_stored
    first.code_to_openid(sim.login_code("alice"))
    second.code_to_openid(sim.login_code("bob"))
    assert len(looks) >= 2
    assert sim.token_issued_count() == 1


def test_revoked_token_is_refreshed_once_and_the_call_succeeds(sim, make_gateway):
    gateway = make_gateway()
    openid = gateway.code_to_openid(sim.login_code("alice"))
    sim.revoke_tokens()
    sim.grant_subscription(openid, "tmpl_ready")
    gateway.send_subscribe_message(openid, "tmpl_ready", {"thing1": "done"}, page="pages/index/index")
    assert sim.token_issued_count() == 2
    assert len(sim.messages()) == 1


# ---------------------------------------------------------------- subscribe messages


def test_subscribe_message_consumes_a_grant_then_is_refused(sim, make_gateway):
    gateway = make_gateway()
    openid = gateway.code_to_openid(sim.login_code("alice"))
    sim.grant_subscription(openid, "tmpl_ready", count=1)
    gateway.send_subscribe_message(openid, "tmpl_ready", {"thing1": "头像已生成", "time2": {"value": "12:00"}},
                                   page="pages/avatar/index?id=1")
    [message] = sim.messages()
    assert message["touser"] == openid
    assert message["data"] == {"thing1": {"value": "头像已生成"}, "time2": {"value": "12:00"}}
    assert message["page"] == "pages/avatar/index?id=1"
    with pytest.raises(SubscribeRefused) as caught:
        gateway.send_subscribe_message(openid, "tmpl_ready", {"thing1": "again"}, page=None)
    assert caught.value.errcode == 43101
    assert len(sim.messages()) == 1


def test_subscribe_message_to_unknown_openid_is_refused(sim, make_gateway):
    with pytest.raises(SubscribeRefused) as caught:
        make_gateway().send_subscribe_message("o-nobody", "tmpl_ready", {"thing1": "x"}, page=None)
    assert caught.value.errcode == 40003


# ---------------------------------------------------------------- mini-program code


def test_unlimited_wxa_code_is_a_scannable_png(sim, make_gateway):
    png = make_gateway().unlimited_wxa_code("img=abc123", "pages/share/index", width=430)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (430, 430)
    decoded = decode_qr(image)
    assert decoded == "pages/share/index?scene=img=abc123"


def test_wxa_code_with_bad_token_answers_json_error(simulator):
    answer = requests.post(f"{simulator.base_url}/wxa/getwxacodeunlimit", params={"access_token": "bogus"},
                           data=json.dumps({"scene": "a=1"}), timeout=5)
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["errcode"] == 40001


def test_phone_number_comes_once_per_code_with_this_apps_watermark(sim, make_gateway, creds):
    gateway = make_gateway()
    code = sim.phone_code("alice", "13800138000")
    assert gateway.user_phone_number(code) == {"phone_number": "13800138000", "pure_phone_number": "13800138000",
                                               "country_code": "86"}
    with pytest.raises(PhoneCodeRefused) as used:
        gateway.user_phone_number(code)
    assert used.value.errcode == 40029
    abroad = gateway.user_phone_number(sim.phone_code("bob", "91234567", country_code="65"))
    assert abroad == {"phone_number": "+65 91234567", "pure_phone_number": "91234567", "country_code": "65"}


def test_expired_phone_code_and_bad_token_are_refused(sim, simulator, make_gateway, monkeypatch):
    code = sim.phone_code("alice", "13800138000")
    monkeypatch.setattr(wechat_sim.simulator, "PHONE_CODE_TTL_S", -1)
    with pytest.raises(PhoneCodeRefused):
        make_gateway().user_phone_number(code)
    answer = requests.post(f"{simulator.base_url}/wxa/business/getuserphonenumber", params={"access_token": "bogus"},
                           data=json.dumps({"code": code}), timeout=5)
    assert answer.json()["errcode"] == 40001


# ---------------------------------------------------------------- faults


def test_server_error_fault_is_unavailable(sim, make_gateway):
    sim.set_fault("/sns/jscode2session", "5xx", count=1)
    gateway = make_gateway()
    code = sim.login_code("alice")
    with pytest.raises(WeChatUnavailable):
        gateway.code_to_openid(code)
    assert gateway.code_to_openid(code)  # the fault was not processed, so the code is still unused


def test_timeout_fault_is_unavailable(sim, make_gateway):
    gateway = make_gateway(timeout=1.0)
    gateway.code_to_openid(sim.login_code("warmup"))  # fetch the token before the fault is armed
    sim.set_fault("/sns/", "timeout", count=1, delay_s=3.0)
    with pytest.raises(WeChatUnavailable):
        gateway.code_to_openid(sim.login_code("alice"))


# ---------------------------------------------------------------- WeChat Pay request authentication (raw protocol)


def test_pay_api_rejects_a_request_signed_with_another_key(simulator, creds):
    forger = signing.load_private_key(generate_credentials().merchant_private_key_pem)
    path = f"/v3/pay/transactions/out-trade-no/x1?mchid={creds.mchid}"
    timestamp, nonce = str(int(time.time())), "N" * 32
    signature = signing.sign(forger, signing.request_message("GET", path, timestamp, nonce, ""))
    authorization = (f'WECHATPAY2-SHA256-RSA2048 mchid="{creds.mchid}",nonce_str="{nonce}",'
                     f'signature="{signature}",timestamp="{timestamp}",serial_no="{creds.merchant_cert_serial_no}"')
    answer = requests.get(simulator.base_url + path, headers={"Authorization": authorization}, timeout=5)
    assert answer.status_code == 401
    assert answer.json()["code"] == "SIGN_ERROR"
    unsigned = requests.get(simulator.base_url + path, timeout=5)
    assert unsigned.status_code == 401
