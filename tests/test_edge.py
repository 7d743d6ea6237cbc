"""The edge holds against bad input from outside (issue 13): bodies over their route's limit refused unread, JSON
nested too deep or fields too long refused before any work, and the security headers on every response, the
console's mount included."""
from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pytest

from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from miniapp_api.bodies import UPLOAD_FRAMING_BYTES, nesting_depth
from models import sample_photos
from tests.console_support import client_login, make_operator
from tests.test_api import assert_error

JSON_ROUTES = [("post", "/api/v1/auth/login"), ("post", "/api/v1/avatars"), ("post", "/api/v1/orders"),
               ("post", "/api/v1/consents"), ("post", "/api/v1/renders"), ("post", "/api/v1/subscriptions")]
CALLBACKS = ["/api/v1/pay/notify", "/api/v1/pay/refund-notify"]  # their bodies too are limited
CONSOLE_TEMPLATES = Path(__file__).resolve().parent.parent / "miniapp_api" / "console" / "templates"


class Unreadable(io.RawIOBase):
    """A request body that fails the test if the server reads a byte of it."""

    def readable(self):
        return True

    def readinto(self, buffer):
        raise AssertionError("the body was read")


class Endless(io.RawIOBase):
    """A chunked body (no Content-Length) that never ends; counts what the server read."""

    def __init__(self):
        self.read_bytes = 0

    def readable(self):
        return True

    def readinto(self, buffer):
        buffer[:] = b" " * len(buffer)
        self.read_bytes += len(buffer)
        return len(buffer)


def send_stream(app, path: str, stream, headers: dict, content_length: int | None) -> Response:
    """POST a body the way a server hands it over: from a stream, with the Content-Length given or none (chunked:
    the server says the stream ends by itself)."""
    environ = EnvironBuilder(path=path, method="POST", headers=headers).get_environ()
    environ["wsgi.input"] = stream
    if content_length is None:
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(content_length)
    body, status, response_headers = run_wsgi_app(app, environ, buffered=True)
    return Response(b"".join(body), status=status, headers=response_headers)


# ------------------------------------------------------------------------------------------------ body size

@pytest.mark.parametrize("method, path", JSON_ROUTES + [("post", path) for path in CALLBACKS])
def test_a_body_over_the_json_limit_is_refused_from_its_content_length_unread(app, login, services, method, path):
    api = login("ann", consent=False)
    size = services.settings.max_json_body_bytes + 1
    response = send_stream(app, path, Unreadable(), api._headers({"Content-Type": "application/json"}), size)
    assert_error(response, 413, "body_too_large")
    assert response.get_json()["error"]["details"] == {"max_bytes": services.settings.max_json_body_bytes}


def test_a_chunked_body_is_refused_once_past_the_limit_not_read_to_its_end(app, services):
    stream = Endless()
    response = send_stream(app, "/api/v1/auth/login", stream, {"Content-Type": "application/json"}, None)
    assert_error(response, 413, "body_too_large")
    assert stream.read_bytes <= services.settings.max_json_body_bytes + 64 * 1024


def test_the_photo_upload_keeps_its_own_larger_limit(app, login, services):
    api = login("bea")
    avatar = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    photo = sample_photos.encode(sample_photos.astronaut_image().resize((1600, 1600)), quality=97)
    assert len(photo) > services.settings.max_json_body_bytes
    assert api.upload(avatar["id"], photo).status_code == 201
    too_big = services.settings.max_upload_bytes + UPLOAD_FRAMING_BYTES + 1
    response = send_stream(app, f"/api/v1/avatars/{avatar['id']}/photos", Unreadable(),
                           api._headers({"Content-Type": "multipart/form-data; boundary=x"}), too_big)
    assert_error(response, 413, "body_too_large")


# ---------------------------------------------------------------------------------------------- JSON shape

def nested(depth: int, leaf="x") -> str:
    return "[" * depth + json.dumps(leaf) + "]" * depth


@pytest.mark.parametrize("settings_overrides", [{"max_json_body_bytes": 256 * 1024}])  # 50,000 levels: 100 KB
@pytest.mark.parametrize("method, path", JSON_ROUTES)
def test_json_nested_50000_deep_answers_400_without_a_traceback(login, caplog, method, path):
    api = login("cat", consent=False)
    for body in (nested(50_000), "[" * 50_000, '{"code": ' + nested(30_000) + "}"):
        with caplog.at_level(logging.WARNING):
            response = api.client.open(path, method=method.upper(), data=body, content_type="application/json",
                                       headers=api._headers())
        assert_error(response, 400, "json_too_deep")
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_50000_levels_at_the_default_body_limit_are_refused_by_size(client):
    assert_error(client.post("/api/v1/auth/login", data=nested(50_000), content_type="application/json"), 413,
                 "body_too_large")


def test_the_nesting_limit_is_the_setting(client, services):
    limit = services.settings.max_json_depth
    at_limit = '{"code": ' + nested(limit - 1) + "}"  # the object itself is one level
    assert nesting_depth(json.loads(at_limit)) == limit
    assert_error(client.post("/api/v1/auth/login", data=at_limit, content_type="application/json"), 400,
                 "invalid_fields")
    over = '{"code": ' + nested(limit) + "}"
    assert_error(client.post("/api/v1/auth/login", data=over, content_type="application/json"), 400,
                 "json_too_deep")


def test_malformed_json_keeps_its_code(client):
    assert_error(client.post("/api/v1/auth/login", data='{"code": [', content_type="application/json"), 400,
                 "malformed_json")


def test_a_login_code_too_long_is_refused_before_wechat_is_called(client, sim):
    sim.set_fault("/sns/jscode2session", "5xx", count=10)  # were WeChat called, this would answer 503
    response = client.post("/api/v1/auth/login", json={"code": "c" * 129})
    assert_error(response, 400, "field_too_long")
    assert response.get_json()["error"]["details"] == {"fields": {"code": "at most 128 characters"}}
    assert_error(client.post("/api/v1/auth/login", json={"code": "c" * 100_000}), 413, "body_too_large")


# ------------------------------------------------------------------------------------------------ headers

def test_private_answers_are_never_stored_and_nothing_is_sniffed(ready_avatar, client):
    api, avatar = ready_avatar("dot")
    order = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}).get_json()
    login = client.post("/api/v1/auth/login", json={"code": "never-issued"})
    for response in [api.get("/api/v1/me/export"), api.get(f"/api/v1/orders/{order['id']}"),
                     api.get(f"/api/v1/avatars/{avatar['id']}"), api.get(f"/api/v1/avatars/{avatar['id']}/queue"),
                     api.get("/api/v1/consents"), api.get("/api/v1/orders/nope"), login,
                     client.get("/api/v1/me/export")]:
        assert response.headers["Cache-Control"] == "no-store", response.request.path
        assert response.headers["X-Content-Type-Options"] == "nosniff", response.request.path
    template = api.get("/api/v1/templates").get_json()[0]
    preview = client.get(template["preview_url"])
    assert "public" in preview.headers["Cache-Control"] and preview.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/healthz", "/api/v1/disclosure", "/console/login", "/nowhere"):
        assert client.get(path).headers["X-Content-Type-Options"] == "nosniff", path


def test_console_pages_have_a_strict_csp_their_templates_do_not_break(client):
    csp = client.get("/console/login").headers["Content-Security-Policy"]
    assert "script-src 'none'" in csp and "style-src 'self'" in csp and "'unsafe-inline'" not in csp
    inline = re.compile(r"<script|<style|\sstyle\s*=|\son[a-z]+\s*=|javascript:", re.IGNORECASE)
    offenders = [(path.name, match.group(0)) for path in CONSOLE_TEMPLATES.rglob("*.html")
                 for match in inline.finditer(path.read_text(encoding="utf-8"))]
    assert offenders == []


# ------------------------------------------------------------------------------------------- console mount

@pytest.mark.parametrize("settings_overrides", [{"console_url_prefix": "/ops/", "console_secure_cookies": False}])
def test_the_console_is_served_under_its_prefix_only(client, services):
    make_operator(services, "ada", "admin")
    assert client.get("/console/login").status_code == 404
    page = client.get("/ops/login")
    assert page.status_code == 200 and 'href="/ops/static/console.css"' in page.get_data(as_text=True)
    login_page = client.get("/ops/")
    assert login_page.status_code == 302 and login_page.headers["Location"].startswith("/ops/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    done = client.post("/ops/login", data={"name": "ada", "password": "correct horse battery",
                                           "csrf_token": token, "next": "/console/orders"})
    assert done.status_code == 302 and done.headers["Location"] == "/ops/"  # a next outside the console: ignored
    assert "Path=/ops" in done.headers["Set-Cookie"]
    assert client.get("/ops/orders").status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"console_host": "ops.example.test", "console_url_prefix": "",
                                                 "console_secure_cookies": False}])
def test_the_console_answers_on_its_own_host_only(client, services):
    make_operator(services, "ada", "admin")
    assert client.get("/login").status_code == 404  # the public API's host
    assert client.get("/console/login").status_code == 404
    on_host = client.get("/login", base_url="http://ops.example.test")
    assert on_host.status_code == 200 and "Content-Security-Policy" in on_host.headers
    assert client.get("/healthz").status_code == 200


def test_the_console_defaults_to_console_on_every_host(app, services, client):
    make_operator(services, "ada", "admin")
    assert client.get("/console/login").status_code == 200
    assert client.get("/console/login", base_url="http://elsewhere.test").status_code == 200
