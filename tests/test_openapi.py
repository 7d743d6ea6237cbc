"""The published OpenAPI document covers every implemented /api/v1 route, and only those; it is valid OpenAPI 3.1
and real responses match it with no undocumented field anywhere."""
from __future__ import annotations

from openapi_spec_validator import validate

from tests.contract_support import Published, spec_path

PUBLIC = {"/api/v1/auth/login", "/api/v1/pay/notify", "/api/v1/pay/refund-notify", "/api/v1/wechat/push",
          "/api/v1/openapi.json", "/api/v1/templates/{template_id}/preview", "/api/v1/disclosure",
          "/api/v1/media/{token}"}


def test_every_api_route_is_in_the_spec_and_every_spec_path_is_served(client, app):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.")
    served = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1"):
            methods = {m.lower() for m in rule.methods} - {"head", "options"}
            served.setdefault(spec_path(rule.rule), set()).update(methods)
    documented = {path: set(ops) for path, ops in spec["paths"].items()}
    assert served == documented


def test_every_operation_documents_its_errors_with_the_envelope(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    published = Published(spec, tighten=False)
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["security"] == [{"bearer": []}]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = published.resolve(response["content"]["application/json"]["schema"])
                    assert schema["required"] == ["error"], (method, path, status)
                    error = published.resolve(schema["properties"]["error"])
                    assert set(error["required"]) == {"code", "message", "details", "request_id"}, (method, path, status)
            public = operation.get("security") == []
            assert public == (path in PUBLIC), path
            assert public or "401" in operation["responses"], path


def test_the_spec_is_valid_openapi(client):
    validate(client.get("/api/v1/openapi.json").get_json())


def test_response_schemas_allow_no_undocumented_field(client):
    """Every object a response can hold lists its fields and forbids others (maps say what their values are)."""
    spec = client.get("/api/v1/openapi.json").get_json()
    published = Published(spec, tighten=False)
    seen = set()

    def walk(schema, where):
        if isinstance(schema, dict) and "$ref" in schema:
            if schema["$ref"] in seen:
                return
            seen.add(schema["$ref"])
            schema, where = published.resolve(schema), schema["$ref"]
        if not isinstance(schema, dict):
            return
        if schema.get("type") == "object" and "properties" in schema:
            assert schema.get("additionalProperties") is False, where
        for key in ("properties", "$defs"):
            for name, sub in schema.get(key, {}).items():
                walk(sub, f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            walk(schema.get(key), f"{where}[]")
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in schema.get(key, []):
                walk(sub, where)

    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    if "schema" in media:
                        walk(media["schema"], f"{method} {path} {status}")


def _validate(published: Published, path: str, method: str, status: str, body):
    published.validate(published.response_schema(path, method, status), body)


def test_real_responses_match_the_published_schemas(paid_avatar, drain, client):
    published = Published(client.get("/api/v1/openapi.json").get_json())
    api, avatar, order = paid_avatar()
    _validate(published, "/api/v1/orders", "post", "201", order)
    _validate(published, "/api/v1/avatars/{avatar_id}", "get", "200",
              api.get(f"/api/v1/avatars/{avatar['id']}").get_json())
    _validate(published, "/api/v1/avatars/{avatar_id}/queue", "get", "200",
              api.get(f"/api/v1/avatars/{avatar['id']}/queue").get_json())
    drain()
    _validate(published, "/api/v1/templates", "get", "200", api.get("/api/v1/templates").get_json())
    template = api.get("/api/v1/templates?gender=female").get_json()[0]["id"]
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template}).get_json()
    _validate(published, "/api/v1/renders", "post", "201", render)
    drain()
    done = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert done["images"]
    _validate(published, "/api/v1/renders/{render_id}", "get", "200", done)
    _validate(published, "/api/v1/orders/{order_id}", "get", "200",
              api.get(f"/api/v1/orders/{order['id']}").get_json())
    _validate(published, "/api/v1/consents", "get", "200", api.get("/api/v1/consents").get_json())
    _validate(published, "/api/v1/me/export", "get", "200", api.get("/api/v1/me/export").get_json())
    error = api.get("/api/v1/avatars/av_missing").get_json()
    _validate(published, "/api/v1/avatars/{avatar_id}", "get", "404", error)
