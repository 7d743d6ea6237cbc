"""The published contract cannot drift from what the server does.

- The drifts found before the document was generated stay fixed (grant answers, 503 order_busy, 403 on orders, 405).
- Every route is driven into the refusals every route of its kind has (401, 405 + Allow, 413, 415, 400) and those
  are documented; every value an enum lists is accepted, and a value outside it refused as the document says.
- Every status a handler can raise, walking the API and domain functions it calls (DomainError kinds, ApiError,
  callback failures), is documented for its route; every raise site's status is documented somewhere.
- Every /api/v1 exchange of the whole test session (tests.contract_support records them) has a documented status,
  a body matching its published schema, and, when accepted, a request the document allows.
"""
from __future__ import annotations

import ast
import io
import re
import secrets
from pathlib import Path

import pytest
from flask import Flask

from miniapp_api import bodies
from miniapp_api.api.openapi import endpoint
from miniapp_api.errors import DOMAIN_STATUS, register_error_handlers
from miniapp_api.schemas import Deleted
from portraits import keys
from portraits.billing import locks, refunds
from tests.contract_support import RECORDER, Published, RaiseSites, runs_last
from tests.money_support import paid_order, place_order, signed_notification, transaction_for

pytest_plugins = ["tests.contract_support"]

ROOT = Path(__file__).resolve().parent.parent
# Bodies verified by their signature, documented but not validated: WeChat Pay's callbacks, WeChat's message push.
CALLBACKS = {"/api/v1/pay/notify", "/api/v1/pay/refund-notify", "/api/v1/wechat/push"}


@pytest.fixture
def spec(client) -> dict:
    return client.get("/api/v1/openapi.json").get_json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def concrete(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "x", path)


def body_schema(spec: dict, operation: dict, media: str) -> dict | None:
    content = operation.get("requestBody", {}).get("content", {})
    return Published(spec, tighten=False).resolve(content[media]["schema"]) if media in content else None


def problems_of(response) -> tuple[int, str, dict]:
    body = response.get_json()
    assert set(body) >= {"error"}, body
    return response.status_code, body["error"]["code"], body["error"]["details"]


# ---------------------------------------------------------------------------------------- (a) the known drifts

def test_the_drifts_found_before_the_document_was_generated_stay_fixed(spec):
    grants = body_schema(spec, spec["paths"]["/api/v1/subscriptions"]["post"], "application/json")["properties"]
    assert grants["grants"]["additionalProperties"]["enum"] == ["accept", "reject", "ban", "filter"]
    for path in CALLBACKS:
        assert "503" in spec["paths"][path]["post"]["responses"], path
    assert "403" in spec["paths"]["/api/v1/orders"]["post"]["responses"]
    assert "503" in spec["paths"]["/api/v1/auth/login"]["post"]["responses"]
    for path, method, operation in operations(spec):
        assert operation["responses"]["405"]["headers"]["Allow"]["schema"] == {"type": "string"}, (method, path)
        assert "500" in operation["responses"], (method, path)
        if "requestBody" in operation:
            assert "413" in operation["responses"], (method, path)

    def enum(schema):
        return schema.get("enum") or schema.get("additionalProperties", {}).get("enum")

    avatar = body_schema(spec, spec["paths"]["/api/v1/avatars"]["post"], "application/json")["properties"]
    photo = body_schema(spec, spec["paths"]["/api/v1/avatars/{avatar_id}/photos"]["post"], "multipart/form-data")
    consent = body_schema(spec, spec["paths"]["/api/v1/consents"]["post"], "application/json")["properties"]
    query = {p["name"]: p for p in spec["paths"]["/api/v1/templates"]["get"]["parameters"]}
    assert enum(avatar["gender"]) == enum(query["gender"]["schema"]) == ["female", "male"]
    assert enum(photo["properties"]["role"]) == ["front", "extra"] and photo["required"] == ["photo"]
    assert enum(consent["kind"]) == ["face_processing"]
    assert consent["version"]["minLength"] == 1


def test_a_busy_order_answers_503_order_busy_on_both_callbacks(app, client, services, sim, simulator, monkeypatch):
    monkeypatch.setattr(locks, "ORDER_LOCK_WAIT_S", 0.1)
    _, _, created = place_order(services, sim, "busy")
    payment = signed_notification(simulator.creds, transaction_for(created, simulator.creds))
    paid = paid_order(services, sim, "busier")
    refund = refunds.request_refund(services, paid["_id"], reason="training_failed")["refunds"][0]
    refunded = signed_notification(simulator.creds, {
        "mchid": simulator.creds.mchid, "out_trade_no": paid["_id"], "transaction_id": paid["transaction_id"],
        "out_refund_no": refund["out_refund_no"], "refund_id": "50" + secrets.token_hex(8),
        "refund_status": "SUCCESS", "success_time": "2026-11-26T12:00:00+08:00",
        "user_received_account": "支付用户零钱",
        "amount": {"total": 990, "refund": 990, "payer_total": 990, "payer_refund": 990}},
        event_type="REFUND.SUCCESS", kind="refund")
    for path, order_id, (headers, body) in [("/api/v1/pay/notify", created["_id"], payment),
                                            ("/api/v1/pay/refund-notify", paid["_id"], refunded)]:
        holder = services.redis.lock(keys.order_lock(order_id), timeout=30)
        assert holder.acquire(blocking=False)
        try:
            answer = client.post(path, data=body, headers=headers)
        finally:
            holder.release()
        assert problems_of(answer)[:2] == (503, "order_busy"), path
        assert answer.get_json()["code"] == "FAIL"


def test_login_answers_503_when_wechat_does_not(client, sim):
    sim.set_fault("/sns/jscode2session", "5xx", count=10)
    assert problems_of(client.post("/api/v1/auth/login", json={"code": sim.login_code("zoe")}))[:2] == (
        503, "wechat_unavailable")


# ---------------------------------------------------------------- (b) every route, the refusals of its kind

def test_every_path_answers_another_method_405_with_allow(client, spec):
    for path, methods in spec["paths"].items():
        other = next(m for m in ("put", "patch", "delete", "post", "get") if m not in methods)
        response = client.open(concrete(path), method=other.upper())
        assert problems_of(response)[:2] == (405, "method_not_allowed"), path
        allowed = {m.strip().lower() for m in response.headers["Allow"].split(",")}
        assert allowed - {"head", "options"} == set(methods), path


def test_every_secured_operation_answers_401_without_a_token(client, spec):
    for path, method, operation in operations(spec):
        if operation.get("security") != []:
            assert problems_of(client.open(concrete(path), method=method.upper()))[:2] == (401, "missing_token"), (
                method, path)


def test_every_body_over_the_limit_answers_413(app, login, spec, services):
    api = login("tess", consent=False)
    for path, method, operation in operations(spec):
        for media in operation.get("requestBody", {}).get("content", {}):
            kind = getattr(app.view_functions[app.url_map.bind("").match(concrete(path), method.upper())[0]],
                           "body_kind", None)
            too_big = b"x" * (bodies.body_limit(services.settings, kind) + 1)
            response = api.client.open(concrete(path), method=method.upper(), data=too_big, content_type=media,
                                       headers=api._headers())
            assert problems_of(response)[:2] == (413, "body_too_large"), (method, path)


def test_every_json_body_is_refused_when_it_is_not_a_json_object(login, spec):
    api = login("uma", consent=False)
    validated = set()
    for path, method, operation in operations(spec):
        if body_schema(spec, operation, "application/json") is None:
            continue
        if "415" not in operation["responses"]:  # verified by its signature, not by its model
            assert path in CALLBACKS, path
            continue
        validated.add(path)
        for data, content_type, status, code in [
            ("code=abc", "application/x-www-form-urlencoded", 415, "json_required"),
            ("{}", "text/plain", 415, "json_required"),
            ("{not json", "application/json", 400, "malformed_json"),
            ("[1]", "application/json", 400, "json_object_required"),
        ]:
            response = api.client.open(concrete(path), method=method.upper(), data=data, content_type=content_type,
                                       headers=api._headers())
            assert problems_of(response)[:2] == (status, code), (method, path, data)
    assert validated


def test_the_preview_answers_conditional_and_range_requests_as_documented(client, spec):
    documented = set(spec["paths"]["/api/v1/templates/{template_id}/preview"]["get"]["responses"])
    template = next(iter(client.application.extensions["portraits"].catalog.filter()))
    path = f"/api/v1/templates/{template.id}/preview"
    whole = client.get(path)
    assert (whole.status_code, whole.mimetype) == (200, "image/png")
    assert client.get(path, headers={"If-None-Match": whole.headers["ETag"]}).status_code == 304
    part = client.get(path, headers={"Range": "bytes=0-9"})
    assert (part.status_code, part.data) == (206, whole.data[:10])
    outside = client.get(path, headers={"Range": f"bytes={len(whole.data) + 10}-"})
    assert problems_of(outside)[0] == 416 and outside.headers["Content-Range"] == f"bytes */{len(whole.data)}"
    assert problems_of(client.get("/api/v1/templates/nope/preview"))[:2] == (404, "template_not_found")
    assert {"200", "206", "304", "404", "416"} <= documented


# The refusal each kind of bad value gets: invalid_fields with this problem, or the field's own x-refusal.
def _expected(field: dict, situation: str, problem: str):
    refusal = field.get("x-refusal")
    if refusal and refusal["when"] == situation:
        return refusal["code"], None
    return "invalid_fields", problem


def _bad_values(name: str, field: dict, required: bool):
    """(value or MISSING, situation, invalid_fields problem) for one field of a request schema."""
    if required:
        yield MISSING, "missing", "missing"
    kind = field.get("type")
    if "enum" in field:
        yield "zz-not-listed", "outside_enum", "|".join(field["enum"])
    if kind == "string" and field.get("format") != "binary":
        yield 42, "wrong_type", "must be a non-empty string"
        yield "", "blank", "must be a non-empty string"
        yield "   ", "blank", "must be a non-empty string"
    if kind == "boolean":
        yield "yes", "wrong_type", "must be true or false"
    if kind == "object":
        yield "x", "wrong_type", "must be an object"
        if "enum" in field.get("additionalProperties", {}):
            yield {"k": "zz-not-listed"}, "outside_enum", None
            yield {"k": 42}, "outside_enum", None


MISSING = object()


def _example(field: dict):
    if "enum" in field:
        return field["enum"][0]
    return {"string": "x", "boolean": True, "integer": 1, "object": {}}[field["type"]]


def test_every_request_field_refuses_bad_values_as_documented(login, spec):
    """Missing, wrong type, blank, outside the enum: each answers 400 with invalid_fields naming the field and the
    problem json_body always gave ("missing", "must be ...", "a|b"), or the field's documented x-refusal code."""
    api = login("vera", consent=False)
    checked = 0
    for path, method, operation in operations(spec):
        if path in CALLBACKS:
            continue
        requests = []
        for media in ("application/json", "multipart/form-data"):
            schema = body_schema(spec, operation, media)
            if schema is not None:
                requests.append((media, schema["properties"], set(schema.get("required", []))))
        query = {p["name"]: p["schema"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if query:
            requests.append(("query", query, set()))
        for media, fields, required in requests:
            base = {name: _example(field) for name, field in fields.items()
                    if name in required and field.get("format") != "binary"}
            for name, field in fields.items():
                for value, situation, problem in _bad_values(name, field, name in required):
                    if media != "application/json" and not isinstance(value, str) and value is not MISSING:
                        continue  # query and form values are strings
                    if media == "query" and value == "":
                        continue  # an empty query parameter means no filter
                    sent = {k: v for k, v in base.items() if k != name}
                    if value is not MISSING:
                        sent[name] = value
                    if media == "query":
                        kwargs = {"query_string": sent}
                    elif media == "application/json":
                        kwargs = {"json": sent}
                    else:
                        files = {f: (io.BytesIO(b"not read"), "p.jpg") for f, s in fields.items()
                                 if s.get("format") == "binary" and f != name}
                        kwargs = {"data": {**sent, **files}, "content_type": media}
                    response = api.client.open(concrete(path), method=method.upper(), headers=api._headers(),
                                               **kwargs)
                    status, code, details = problems_of(response)
                    want_code, want_problem = _expected(field, situation, problem)
                    assert (status, code) == (400, want_code), (method, path, name, value, details)
                    if want_problem is not None:
                        assert details["fields"][name] == want_problem, (method, path, name, value, details)
                    checked += 1
    assert checked > 30


def _fields(spec: dict):
    """(path, method, name, schema) of every request input: body and form fields, query parameters."""
    for path, method, operation in operations(spec):
        for media in ("application/json", "multipart/form-data"):
            for name, field in (body_schema(spec, operation, media) or {}).get("properties", {}).items():
                yield path, method, name, field
        for parameter in operation.get("parameters", []):
            yield path, method, parameter["name"], parameter["schema"]


def _listed(field: dict) -> list | None:
    return field.get("enum") or field.get("additionalProperties", {}).get("enum")


# How to send one value of each enum input in an otherwise acceptable request.
SEND_ENUM = {
    ("/api/v1/avatars", "post", "gender"): lambda ctx, value: ctx.api.post("/api/v1/avatars", json={"gender": value}),
    ("/api/v1/avatars/{avatar_id}/photos", "post", "role"):
        lambda ctx, value: ctx.api.upload(ctx.avatar_id, ctx.photo, role=value),
    ("/api/v1/consents", "post", "kind"): lambda ctx, value: ctx.api.post("/api/v1/consents", json={
        "kind": value, "version": ctx.version, "age_14_or_over": True, "own_face": True}),
    ("/api/v1/subscriptions", "post", "grants"):
        lambda ctx, value: ctx.api.post("/api/v1/subscriptions", json={"grants": {ctx.template: value}}),
    ("/api/v1/templates", "get", "gender"):
        lambda ctx, value: ctx.api.get("/api/v1/templates", query_string={"gender": value}),
}


class EnumContext:
    def __init__(self, api, services, user_photos):
        self.api = api
        self.version = api.get("/api/v1/consents").get_json()[0]["version"]
        self.template = next(iter(services.settings.subscribe_templates.values()))
        self.avatar_id = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()["id"]
        self.photo = user_photos[0]


def test_every_value_an_enum_lists_is_accepted_and_no_other(login, services, user_photos, spec):
    inputs = [(path, method, name, field) for path, method, name, field in _fields(spec) if _listed(field)]
    assert {(path, method, name) for path, method, name, _ in inputs} == set(SEND_ENUM)
    ctx = EnumContext(login("wade"), services, user_photos)
    for path, method, name, field in inputs:
        send = SEND_ENUM[(path, method, name)]
        for value in _listed(field):
            response = send(ctx, value)
            assert 200 <= response.status_code < 300, (path, name, value, response.get_json())
        status, code, details = problems_of(send(ctx, "zz-not-listed"))
        assert (status, code) == (400, field.get("x-refusal", {}).get("code", "invalid_fields")), (path, name, details)


def test_a_response_its_model_refuses_fails_under_test_and_is_logged_in_production(caplog):
    app = Flask("contract_probe")
    register_error_handlers(app)

    @app.get("/probe")
    @endpoint(ok={200: Deleted}, public=True)
    def probe():
        return {"deleted": True, "undocumented": 1}

    app.config["TESTING"] = True
    assert problems_of(app.test_client().get("/probe"))[:2] == (500, "internal_error")
    app.config["TESTING"] = False
    answer = app.test_client().get("/probe")
    assert (answer.status_code, answer.get_json()) == (200, {"deleted": True, "undocumented": 1})
    assert "answered what its response model refuses" in caplog.text


# -------------------------------------------------------------------------- every raise site is documented

def test_every_status_a_handler_can_raise_is_documented_for_its_route(spec):
    """Statically: the refusals a handler reaches through the API and domain functions it calls (RaiseSites)."""
    sites = RaiseSites(ROOT, {kind.__name__: status for kind, status in DOMAIN_STATUS.items()})
    handlers = 0
    for module in sites.modules:
        for name in sites.functions(module) if module.startswith("miniapp_api.api.") else ():
            operation = next((op for _, _, op in operations(spec) if op["operationId"] == name), None)
            if operation is None:
                continue
            handlers += 1
            undocumented = sites.statuses(module, name) - {int(status) for status in operation["responses"]}
            assert not undocumented, (module, name, undocumented)
    assert handlers == sum(1 for _ in operations(spec))


def _raise_sites():
    """(file, status) of every refusal written in the API and domain code, wherever it is."""
    kinds = {kind.__name__: status for kind, status in DOMAIN_STATUS.items()}
    files = [*sorted((ROOT / "portraits").rglob("*.py")), *sorted((ROOT / "miniapp_api" / "api").glob("*.py"))]
    for file in files:
        if file.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in kinds:
                yield file, kinds[name]
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", getattr(node.func, "attr", None))
                if called in ("ApiError", "_fail") and isinstance(node.args[0], ast.Constant):
                    yield file, node.args[0].value
                if called == "CallbackRejected":
                    yield file, next((k.value.value for k in node.keywords if k.arg == "http_status"), 401)


def test_every_raise_site_status_is_documented_for_some_route(spec):
    """Also the refusals the walk above cannot attribute (behind a method call, as the callbacks' gateway)."""
    documented = {int(status) for _, _, operation in operations(spec) for status in operation["responses"]}
    sites = list(_raise_sites())
    assert {status for _, status in sites} >= {400, 401, 402, 403, 404, 409, 413, 415, 502, 503}
    for file, status in sites:
        assert status in documented, (file.name, status)


# ------------------------------------------------------------------------ (b) what the whole session saw

@runs_last
def test_every_exchange_of_the_session_is_as_documented():
    assert RECORDER.exchanges, "no /api/v1 exchange was recorded"
    problems = sorted({f"{e.method.upper()} {e.path} -> {e.status}: {problem}"
                       for e in list(RECORDER.exchanges) for problem in e.problems})
    assert not problems, "\n".join(problems)
