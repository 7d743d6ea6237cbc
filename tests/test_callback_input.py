"""Signed WeChat Pay callbacks whose envelope is malformed (issue 13, item 8) answer 4xx in WeChat Pay's failure
body, never 500 (which WeChat Pay would redeliver for 24 hours), on both callbacks."""
from __future__ import annotations

import json

import pytest

from wechat_sim import signing

CALLBACKS = ["/api/v1/pay/notify", "/api/v1/pay/refund-notify"]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _signed(creds, envelope) -> tuple[dict, bytes]:
    body = json.dumps(envelope)
    headers = signing.signed_headers(signing.load_private_key(creds.platform_private_key_pem),
                                     creds.platform_public_key_id, body)
    return {**headers, "Content-Type": "application/json"}, body.encode()


def _envelope(**resource_changes):
    resource = {"algorithm": "AEAD_AES_256_GCM", "ciphertext": "AAAA", "associated_data": "transaction",
                "nonce": "abcdefghijkl", "original_type": "transaction"}
    return {"id": "n-1", "create_time": "2026-11-26T12:00:00+08:00", "event_type": "TRANSACTION.SUCCESS",
            "resource_type": "encrypt-resource", "summary": "x", "resource": {**resource, **resource_changes}}


MALFORMED = {
    "nonce not a string": _envelope(nonce=12),
    "nonce missing": {**_envelope(), "resource": {k: v for k, v in _envelope()["resource"].items() if k != "nonce"}},
    "associated_data not a string": _envelope(associated_data=["transaction"]),
    "associated_data null": _envelope(associated_data=None),
    "ciphertext not a string": _envelope(ciphertext={"a": 1}),
    "ciphertext not base64": _envelope(ciphertext="***"),
    "nonce empty": _envelope(nonce=""),
    "resource not an object": {**_envelope(), "resource": "x"},
    "id not a string": {**_envelope(), "id": {"x": 1}},
    "event_type not a string": {**_envelope(), "event_type": 5},
    "not an object": [1, 2],
    "nested deep": {**_envelope(), "summary": json.loads(nested(900))},
}


@pytest.mark.parametrize("path", CALLBACKS)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_signed_callback_answers_4xx_in_wechat_pays_failure_body(client, simulator, path, case):
    headers, body = _signed(simulator.creds, MALFORMED[case])
    response = client.post(path, data=body, headers=headers)
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)
    answer = response.get_json()
    assert answer["code"] == "FAIL" and answer["error"]["code"] in ("bad_body", "bad_ciphertext")


@pytest.mark.parametrize("settings_overrides", [{"max_json_body_bytes": 256 * 1024}])
def test_a_deeply_nested_signed_callback_body_answers_4xx(client, simulator):
    body = nested(50_000)
    headers = signing.signed_headers(signing.load_private_key(simulator.creds.platform_private_key_pem),
                                     simulator.creds.platform_public_key_id, body)
    response = client.post(CALLBACKS[0], data=body, headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "bad_body"
