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
