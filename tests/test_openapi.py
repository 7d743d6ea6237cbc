"""The published OpenAPI document covers every implemented /api/v1 route, and only those."""
from __future__ import annotations

import re


def _spec_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def test_every_api_route_is_in_the_spec_and_every_spec_path_is_served(client, app):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            methods = {m.lower() for m in rule.methods} - {"head", "options"}
            served.setdefault(_spec_path(rule.rule), set()).update(methods)
    documented = {path: set(ops) for path, ops in spec["paths"].items()}
    assert served == documented


def test_every_operation_documents_its_errors_with_the_envelope(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema["required"] == ["error"], (method, path, status)
            public = operation.get("security") == []
            assert public == (path in {"/api/v1/auth/login", "/api/v1/pay/notify", "/api/v1/pay/refund-notify",
                                       "/api/v1/openapi.json", "/api/v1/templates/{template_id}/preview"}), path


def test_the_spec_is_valid_openapi(client):
    from openapi_spec_validator import validate

    validate(client.get("/api/v1/openapi.json").get_json())


def _strict(schema: dict) -> dict:
    """The published schema, with no undocumented field allowed anywhere."""
    if not isinstance(schema, dict):
        return schema
    strict = {key: (_strict(value) if isinstance(value, dict) else
                    [_strict(v) for v in value] if isinstance(value, list) else value)
              for key, value in schema.items()}
    if strict.get("type") == "object" and "properties" in strict:
        strict["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        strict["additionalProperties"] = False
    return strict


def _validate(spec: dict, path: str, method: str, status: str, body):
    from openapi_schema_validator import OAS30Validator

    schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    OAS30Validator(_strict(schema)).validate(body)


def test_real_responses_match_the_published_schemas(paid_avatar, drain, client):
    spec = client.get("/api/v1/openapi.json").get_json()
    api, avatar, order = paid_avatar()
    _validate(spec, "/api/v1/orders", "post", "201", order)
    _validate(spec, "/api/v1/avatars/{avatar_id}", "get", "200", api.get(f"/api/v1/avatars/{avatar['id']}").get_json())
    _validate(spec, "/api/v1/avatars/{avatar_id}/queue", "get", "200",
              api.get(f"/api/v1/avatars/{avatar['id']}/queue").get_json())
    drain()
    _validate(spec, "/api/v1/templates", "get", "200", api.get("/api/v1/templates").get_json())
    template = api.get("/api/v1/templates?gender=female").get_json()[0]["id"]
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template}).get_json()
    _validate(spec, "/api/v1/renders", "post", "201", render)
    drain()
    done = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert done["images"]
    _validate(spec, "/api/v1/renders/{render_id}", "get", "200", done)
    _validate(spec, "/api/v1/orders/{order_id}", "get", "200", api.get(f"/api/v1/orders/{order['id']}").get_json())
    _validate(spec, "/api/v1/consents", "get", "200", api.get("/api/v1/consents").get_json())
    error = api.get("/api/v1/avatars/av_missing").get_json()
    _validate(spec, "/api/v1/avatars/{avatar_id}", "get", "404", error)
