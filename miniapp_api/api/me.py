"""Access and deletion of one's personal data (GenAI Measures art. 11, PIPL art. 47)."""
from __future__ import annotations

from flask import Blueprint, g, url_for

from miniapp_api.api.auth import consents_json, login_required
from miniapp_api.api.avatars import avatar_json
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.orders import order_json
from miniapp_api.api.renders import render_json
from miniapp_api.api.requests import services
from miniapp_api.schemas import Deleted, Export, PhoneRequest, PhoneState, Profile
from portraits import albums, identity
from portraits.privacy import delete_user, user_ref

bp = Blueprint("me", __name__, url_prefix="/api/v1/me")


@bp.get("")
@login_required
@endpoint(ok={200: Profile})
def profile():
    """My account: the bound phone (masked) and my consents."""
    svc = services()
    user = g.user
    return {"id": user["_id"], "created_at": _iso(user["created_at"]),
            "phone": phone_json(identity.phone_of(svc, user)), "phone_required": svc.settings.require_phone,
            "consents": consents_json(user)}


@bp.post("/phone")
@login_required
@endpoint(ok={200: PhoneState}, errors=[400, 503])
def bind_phone(json: PhoneRequest):
    """Bind my phone number with the code of the getPhoneNumber button (400 invalid_phone_code when WeChat
    refuses it: used, expired or not this app's)."""
    svc = services()
    user = identity.bind_phone(svc, g.user, json.code)
    return phone_json(identity.phone_of(svc, user))


def phone_json(phone: dict | None) -> dict | None:
    if phone is None:
        return None
    return {"masked": identity.masked(phone), "country_code": phone["country_code"],
            "bound_at": _iso(phone["bound_at"])}


@bp.get("/export")
@login_required
@endpoint(ok={200: Export})
def export():
    """Everything held about me."""
    svc = services()
    user = g.user
    uid = user["_id"]
    return {
        "user": {"id": uid, "openid": user["openid"], "created_at": user["created_at"].isoformat(),
                 "phone": _exported_phone(identity.phone_of(svc, user)),
                 "consents": consents_json(user),
                 "consent_records": {k: {**v, "given_at": _iso(v.get("given_at")),
                                         "withdrawn_at": _iso(v.get("withdrawn_at"))}
                                     for k, v in (user.get("consents") or {}).items()},
                 "subscriptions": user.get("subscriptions", {}),
                 "make_good_credits": [{"order_id": c["order_id"], "sku": c["sku"], "reason": c.get("reason"),
                                        "granted_at": _iso(c.get("granted_at")), "used_by": c.get("used_by")}
                                       for c in user.get("make_good_credits", [])]},
        "avatars": [avatar_json(a) for a in svc.db.avatars.find({"user_id": uid})],
        "orders": [order_json(o) for o in svc.db.orders.find({"user_id": uid})],
        "renders": [render_json(r) for r in svc.db.renders.find({"user_id": uid})],
        "images": [{"id": i["_id"], "url": url_for("images.get_image", image_id=i["_id"]),
                    "content_id": i["content_id"], "created_at": _iso(i["created_at"])}
                   for i in svc.db.images.find({"$or": [{"user_id": uid},
                                                        {"album_id": {"$in": albums.accepted_ids_of(svc, uid)}}]})],
        "albums": [{"id": a["_id"], "role": (albums.member(a, uid) or {}).get("role", albums.INVITEE),
                    "state": a["state"], "sku": a["sku"], "created_at": _iso(a["created_at"]),
                    "accepted_at": _iso(a.get("accepted_at")), "withdrawn_at": _iso(a.get("withdrawn_at")),
                    "image_count": albums.image_count(svc, a["_id"])}
                   for a in svc.db.albums.find({"member_ids": uid})],
        # The AIGC label log names the user only by the one-way reference; these are the entries that refer to them.
        "label_log": [{"content_id": entry["content_id"], "created_at": _iso(entry["created_at"])}
                      for entry in svc.db.label_log.find({"user_ref": user_ref(svc, uid)})],
    }


@bp.delete("")
@login_required
@endpoint(ok={202: Deleted})
def delete_me():
    """Delete me and everything mine (paid, undelivered orders are refunded)."""
    delete_user(services(), g.user)
    return {"deleted": True}, 202


def _exported_phone(phone: dict | None) -> dict | None:
    return None if phone is None else {**phone, "bound_at": _iso(phone["bound_at"])}


def _iso(value):
    return value.isoformat().replace("+00:00", "Z") if value else None
