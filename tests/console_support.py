"""Helpers for the console tests: operators, a consistent paid order, a logged-in test client, a real browser."""
from __future__ import annotations

import re
import secrets
from datetime import timedelta
from pathlib import Path

import pytest

from portraits import states
from portraits import operators

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console"
PASSWORD = "correct horse battery"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_operator(services, name: str, role: str) -> dict:
    return operators.create(services.db, name, PASSWORD, role, by="test")


def insert_paid_order(services, amount: int = 990) -> dict:
    """An order exactly as billing leaves it after a verified payment (user, avatar queued, order paid)."""
    at = states.now()
    user_id = "u_" + secrets.token_hex(6)
    openid = "o" + secrets.token_hex(12)
    order_id = "P" + at.strftime("%Y%m%d") + secrets.token_hex(6).upper()
    avatar_id = "av_" + secrets.token_hex(6)
    services.db.users.insert_one({"_id": user_id, "openid": openid, "created_at": at})
    services.db.avatars.insert_one({
        "_id": avatar_id, "user_id": user_id, "gender": "female", "state": "queued", "order_id": order_id,
        "train_attempts": 0, "created_at": at, "updated_at": at,
        "photos": [{"id": "ph1", "role": "front", "accepted": True, "reasons": [],
                    "crop_key": f"users/{user_id}/avatars/{avatar_id}/photos/ph1.png",
                    "embedding_key": f"users/{user_id}/avatars/{avatar_id}/photos/ph1.emb"}],
        "history": states.initial_history("queued", f"order:{order_id}")})
    history = states.initial_history("created", f"user:{user_id}")
    history.append({"to": "paid", "at": at, "by": "callback", "reason": None})
    order = {"_id": order_id, "user_id": user_id, "openid": openid, "avatar_id": avatar_id, "sku": "avatar_pack",
             "amount": amount, "render_credits": 3, "state": "paid", "refunds": [], "created_at": at - timedelta(minutes=1),
             "updated_at": at, "expires_at": at + timedelta(minutes=29), "prepay_id": "wx" + secrets.token_hex(8),
             "transaction_id": "4200" + secrets.token_hex(10), "paid_at": at, "history": history}
    services.db.orders.insert_one(order)
    return order


def csrf_from(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def client_login(client, name: str, password: str = PASSWORD):
    """Log a Flask test client in through the form; returns the session's CSRF token."""
    token = csrf_from(client.get("/console/login").get_data(as_text=True))
    response = client.post("/console/login", data={"name": name, "password": password, "csrf_token": token})
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    return csrf_from(client.get("/console/orders").get_data(as_text=True))


def launch_browser(playwright, tmp_path):
    """Debian's Chromium, headless, with a fresh profile. Missing Chromium fails (CI installs it), never skips."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (make install does: apt-get install chromium)")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900}, locale="zh-CN")


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def insert_failed_render(services, order: dict) -> str:
    """A charged render that failed for good on a trained avatar; its failure gave the credit back (3 left)."""
    at = states.now()
    services.db.avatars.update_one({"_id": order["avatar_id"]},
                                   {"$set": {"state": "trained", "photos": [], "photos_purged_at": at,
                                             "lora_key": "sealed", "pivot_key": "sealed"}})
    render_id = "rd_" + secrets.token_hex(10)
    history = states.initial_history("queued", f"user:{order['user_id']}")
    history += [{"to": "rendering", "at": at, "by": "job:render-1", "reason": None},
                {"to": "failed", "at": at, "by": "system", "reason": "RuntimeError: CUDA out of memory"}]
    services.db.renders.insert_one({
        "_id": render_id, "user_id": order["user_id"], "avatar_id": order["avatar_id"], "order_id": order["_id"],
        "template_id": services.catalog.filter(gender="female")[0].id,
        "parent_id": None, "parent_likeness": None,
        "params": {"identity_strength": 1.0, "style_strength": 0.6, "candidates": 2, "images_to_keep": 1},
        "seed": 1, "charged": True, "state": "failed", "attempts": 2, "image_ids": [], "failure": history[-1]["reason"],
        "created_at": at, "updated_at": at, "history": history})
    return render_id
