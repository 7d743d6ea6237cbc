"""The operator console, driven in real headless Chromium against the app on a real port, plus the guard rails
(CSRF, roles, throttling, cookies, audit append-only, no photos) checked over the test client."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from portraits.billing import alerts
from tests.conftest import phone_for
from tests.console_support import (PASSWORD, client_login, csrf_from, insert_failed_render, insert_paid_order,
                                   launch_browser, make_operator, screenshot)

ROOT = Path(__file__).resolve().parent.parent
PHOTO_MARKERS = ("crop", "embedding", "lora", "/api/v1/images", ".png", "pivot", "<img", "/photos/")


@pytest.fixture
def settings_overrides():
    # The test server speaks plain http; production keeps Secure cookies (checked in its own test).
    return {"console_secure_cookies": False}


@pytest.fixture
def base_url(app, http_server):
    return f"http://127.0.0.1:{http_server.server_port}"


@pytest.fixture
def browser(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -r requirements-test.txt")
    with sync_playwright() as playwright:
        context = launch_browser(playwright, tmp_path)
        yield context
        context.close()


def browser_login(page, base_url, name):
    page.goto(f"{base_url}/console/")
    assert "/console/login" in page.url
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/console/")


def test_support_finds_an_order_refunds_part_of_it_and_the_admin_sees_the_audit_entry(
        app, services, base_url, browser, paid_avatar, drain, sim):
    runner = app.test_cli_runner()
    created = runner.invoke(args=["create-operator", "ada", "--role", "admin"],
                            env={"CONSOLE_OPERATOR_PASSWORD": PASSWORD})
    assert created.exit_code == 0, created.output
    assert services.db.operators.find_one({"_id": "ada"})["password_hash"].startswith("scrypt:")
    make_operator(services, "sam", "support")
    api, avatar, order = paid_avatar()
    drain()
    transaction_id = services.db.orders.find_one({"_id": order["id"]})["transaction_id"]

    page = browser.new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{base_url}/console/")
    screenshot(page, "01-login")
    browser_login(page, base_url, "sam")
    assert page.locator("#queues tr[data-queue=train]").count() == 1
    assert page.locator("#eta-new").inner_text().strip()
    screenshot(page, "02-dashboard")

    page.click("text=订单 Orders")
    page.fill("input[name=q]", transaction_id)
    page.click("form.search button")
    screenshot(page, "03-search")
    page.click(f"a:text('{order['id']}')")
    page.wait_for_url(f"{base_url}/console/orders/{order['id']}")
    assert page.locator("#refundable").inner_text() == "¥9.90"
    html = page.content()
    assert "trained" in html and "paid" in html
    screenshot(page, "04-order")

    page.click("a.button.danger")
    page.check("input[name=mode][value=partial]")
    page.fill("input[name=amount]", "10.00")
    page.fill("textarea[name=reason]", "用户反馈模板效果不满意")
    page.click("form[action$='/refund/review'] button")
    assert page.locator("[data-reason=amount_above_remaining]").count() == 1
    screenshot(page, "05-refund-refused-above-remaining")
    page.fill("input[name=amount]", "4.90")
    page.click("form[action$='/refund/review'] button")
    assert page.locator("#confirm-amount").inner_text() == "¥4.90"
    assert services.db.orders.find_one({"_id": order["id"]})["refunds"] == []  # nothing moves before confirming
    screenshot(page, "06-refund-confirm")
    page.click("button.danger")
    page.wait_for_url(f"{base_url}/console/orders/{order['id']}?done=refund")
    refunds = services.db.orders.find_one({"_id": order["id"]})["refunds"]
    assert [(r["amount"], r["requested_by"], r["reason"]) for r in refunds] == [(490, "operator:sam", "用户反馈模板效果不满意")]
    drain()
    sim.settle_refunds()
    page.reload()
    assert page.locator("#refunds").inner_text().count("¥4.90") == 1
    screenshot(page, "07-order-after-refund")

    page.click("text=退出 Log out")
    browser_login(page, base_url, "ada")
    page.goto(f"{base_url}/console/audit?action=refund_requested")
    row = page.locator("#audit tbody tr").first
    text = row.inner_text()
    assert "sam" in text and order["id"] in text and "amount=490" in text and "127.0.0.1" in text
    screenshot(page, "08-audit")
    page.goto(f"{base_url}/console/operators")
    assert page.locator("#operators").inner_text().count("scrypt") == 0
    screenshot(page, "09-operators")
    page.goto(f"{base_url}/console/users/{api.user_id}")
    screenshot(page, "10-user")

    phone = phone_for("alice")
    assert f"{phone[:3]}****{phone[-4:]}" in page.locator(".facts").inner_text(), "the phone, masked"
    for path in (f"/console/orders/{order['id']}", f"/console/users/{api.user_id}"):
        page.goto(base_url + path)
        html = page.content()
        leaked = [marker for marker in (*PHOTO_MARKERS, f"users/{api.user_id}/", phone) if marker in html]
        assert not leaked, (path, leaked)


def test_a_viewer_can_look_but_is_refused_a_refund(services, base_url, browser):
    make_operator(services, "vic", "viewer")
    order = insert_paid_order(services)
    page = browser.new_page()
    page.set_default_timeout(15_000)
    browser_login(page, base_url, "vic")
    page.goto(f"{base_url}/console/orders/{order['_id']}")
    assert page.locator("a.button.danger").count() == 0  # no refund button for a viewer
    token = csrf_from(page.content())
    page.goto(f"{base_url}/console/orders/{order['_id']}/refund")
    assert page.locator("[data-reason=forbidden_role]").count() == 1
    screenshot(page, "11-viewer-refused")
    posted = page.request.post(f"{base_url}/console/orders/{order['_id']}/refund",
                               form={"csrf_token": token, "amount_fen": "990", "reason": "x", "confirmed": "yes"})
    assert posted.status == 403 and "forbidden_role" in posted.text()
    assert services.db.orders.find_one({"_id": order["_id"]})["refunds"] == []
    refused = services.db.operator_audit.find_one({"operator": "vic", "action": "forbidden"})
    assert refused["outcome"] == "refused" and refused["ip"] == "127.0.0.1"


def test_forms_without_the_csrf_token_are_refused(services, client):
    make_operator(services, "ada", "admin")
    order = insert_paid_order(services)
    no_token = client.post("/console/login", data={"name": "ada", "password": PASSWORD})
    assert no_token.status_code == 400 and "csrf_failed" in no_token.get_data(as_text=True)
    token = client_login(client, "ada")
    form = {"amount_fen": "990", "reason": "test", "confirmed": "yes"}
    assert client.post(f"/console/orders/{order['_id']}/refund", data=form).status_code == 400
    assert client.post(f"/console/orders/{order['_id']}/refund",
                       data={**form, "csrf_token": token[:-2] + "xx"}).status_code == 400
    assert services.db.orders.find_one({"_id": order["_id"]})["state"] == "paid"
    assert services.db.operator_audit.count_documents({"action": "csrf_rejected"}) == 3
    # The same form with the token goes through.
    done = client.post(f"/console/orders/{order['_id']}/refund", data={**form, "csrf_token": token})
    assert done.status_code == 302
    assert services.db.orders.find_one({"_id": order["_id"]})["state"] == "refunding"


def test_support_refunds_are_capped_per_order_and_admins_are_not(services, client, app):
    make_operator(services, "sam", "support")
    make_operator(services, "ada", "admin")
    order = insert_paid_order(services, amount=3000)
    token = client_login(client, "sam")
    form = {"csrf_token": token, "reason": "late delivery", "confirmed": "yes"}
    first = client.post(f"/console/orders/{order['_id']}/refund", data={**form, "amount_fen": "990"})
    assert first.status_code == 302
    # As if the first partial refund had settled: the order is back to paid with 9.90 committed by support.
    services.db.orders.update_one({"_id": order["_id"]}, {"$set": {"state": "paid"}})
    second = client.post(f"/console/orders/{order['_id']}/refund", data={**form, "amount_fen": "100"})
    assert second.status_code == 403 and "above_support_limit" in second.get_data(as_text=True)
    with app.test_client() as admin:
        admin_token = client_login(admin, "ada")
        review = admin.post(f"/console/orders/{order['_id']}/refund/review",
                            data={"csrf_token": admin_token, "mode": "full", "reason": "goodwill"})
        assert review.status_code == 200 and "¥20.10" in review.get_data(as_text=True)
        empty = admin.post(f"/console/orders/{order['_id']}/refund/review",
                           data={"csrf_token": admin_token, "mode": "full", "reason": "  "})
        assert empty.status_code == 400 and "reason_required" in empty.get_data(as_text=True)


def test_login_is_throttled_per_name_and_address(services, client):
    make_operator(services, "ada", "admin")
    token = csrf_from(client.get("/console/login").get_data(as_text=True))
    limit = services.settings.console_login_max_failures
    for _ in range(limit):
        wrong = client.post("/console/login", data={"name": "ada", "password": "wrong-password!", "csrf_token": token})
        assert wrong.status_code == 401
    locked = client.post("/console/login", data={"name": "ada", "password": PASSWORD, "csrf_token": token})
    assert locked.status_code == 429 and "login_locked" in locked.get_data(as_text=True)
    assert services.db.operator_audit.count_documents({"action": "login_failed", "operator": "ada"}) == limit
    assert services.redis.ttl(next(iter(services.redis.keys("portraits:console:login_failures:*")))) > 0


@pytest.mark.parametrize("settings_overrides", [{}])
def test_session_cookie_is_secure_http_only_and_same_site_by_default(services, client):
    make_operator(services, "ada", "admin")
    token = csrf_from(client.get("/console/login").get_data(as_text=True))
    response = client.post("/console/login", data={"name": "ada", "password": PASSWORD, "csrf_token": token})
    cookie = response.headers["Set-Cookie"]
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/console"):
        assert flag in cookie, cookie


def test_a_failed_render_is_retried_once_on_the_credit_its_failure_returned(services, client):
    order = insert_paid_order(services)
    render_id = insert_failed_render(services, order)
    make_operator(services, "sam", "support")
    token = client_login(client, "sam")
    page = client.get(f"/console/orders/{order['_id']}").get_data(as_text=True)
    assert f"/console/renders/{render_id}/retry" in page
    assert client.post(f"/console/renders/{render_id}/retry", data={"csrf_token": token}).status_code == 302
    retry = services.db.renders.find_one({"retry_of": render_id})
    assert retry["state"] == "queued" and retry["charged"] and retry["history"][0]["by"] == "operator:sam"
    assert services.db.orders.find_one({"_id": order["_id"]})["render_credits"] == 2
    assert services.redis.zcard("portraits:waiting:render") == 1  # queued for a GPU worker
    again = client.post(f"/console/renders/{render_id}/retry", data={"csrf_token": token})
    assert again.status_code == 409 and "render_not_retryable" in again.get_data(as_text=True)
    assert services.db.renders.count_documents({"retry_of": render_id}) == 1


def test_audit_log_is_append_only_and_no_console_route_serves_photos(app):
    console_rules = [rule for rule in app.url_map.iter_rules() if rule.rule.startswith("/console")]
    assert console_rules
    for rule in console_rules:
        if "audit" in rule.rule:
            assert rule.methods <= {"GET", "HEAD", "OPTIONS"}, rule
        assert not any(word in rule.rule for word in ("photo", "image", "blob", "crop")), rule
    # Only the audit module names the collection, and it only inserts and finds.
    writers = [path for package in ("miniapp_api", "jobs", "portraits") for path in ROOT.glob(f"{package}/**/*.py")
               if "operator_audit" in path.read_text()]
    assert [p.relative_to(ROOT).as_posix() for p in writers] == ["portraits/audit.py"]
    calls = {node.func.attr for node in ast.walk(ast.parse(writers[0].read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert calls & {"update_one", "update_many", "replace_one", "delete_one", "delete_many", "drop",
                    "find_one_and_update", "find_one_and_delete", "find_one_and_replace", "bulk_write"} == set()
    assert "insert_one" in calls


def test_unauthenticated_pages_redirect_to_login(client):
    for path in ("/console/", "/console/orders", "/console/audit", "/console/operators"):
        response = client.get(path)
        assert response.status_code == 302 and "/console/login" in response.headers["Location"], path


def test_payment_alerts_are_counted_on_the_dashboard_and_dated_on_the_order_page(services, client):
    make_operator(services, "vic", "viewer")
    order = insert_paid_order(services)
    alerts.alert(services, order["_id"], "amount_mismatch", "990", source="callback")
    alerts.alert(services, order["_id"], "amount_mismatch", "990", source="callback")  # seen again: still one
    client_login(client, "vic")
    dashboard = client.get("/console/").get_data(as_text=True)
    assert "支付告警 1" in dashboard
    page = client.get(f"/console/orders/{order['_id']}").get_data(as_text=True)
    stored = services.db.payment_alerts.find_one({"order_id": order["_id"]})
    assert stored["seen"] == 2
    line = next(line for line in page.splitlines() if "amount_mismatch" in line)
    assert "—" not in line and "×2" in line


def test_the_dashboard_shows_what_the_sweep_healed_and_what_only_people_can(services, client):
    from datetime import timedelta

    from portraits import states, sweeper

    make_operator(services, "wes", "viewer")
    healed = insert_paid_order(services)  # its avatar `queued` with no job: Redis lost it
    overdue = insert_paid_order(services)
    asked = states.now() - timedelta(days=2)
    services.db.orders.update_one({"_id": overdue["_id"]}, {"$set": {"state": "refunding", "refunds": [
        {"out_refund_no": "R" + overdue["_id"], "amount": 990, "state": "PROCESSING", "requested_at": asked,
         "error": "wechatpay_unavailable"}]}})
    refused = insert_paid_order(services)
    services.db.orders.update_one({"_id": refused["_id"]}, {"$set": {"state": "refund_failed"}})
    services.db.avatars.update_many({"_id": {"$in": [overdue["avatar_id"], refused["avatar_id"]]}},
                                    {"$set": {"state": "failed"}})
    services.redis.flushall()
    assert sweeper.sweep(services).get("training_requeued") == 1
    client_login(client, "wes")
    page = client.get("/console/").get_data(as_text=True)
    section = page[page.index('id="sweep"'):page.index("Refunds in the last 24 hours")]
    assert "training_requeued" in section
    needs = section[section.index('id="needs-people"'):]
    assert overdue["_id"] in needs and "refund_overdue" in needs and "wechatpay_unavailable" in needs
    assert refused["_id"] in needs and "refund_failed" in needs
    assert healed["_id"] not in needs
