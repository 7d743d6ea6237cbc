"""Face-processing consent: read the texts, give, withdraw (rules: portraits.consents, portraits.privacy)."""
from __future__ import annotations

from flask import Blueprint, g, request

from miniapp_api.api.auth import consents_json, login_required
from miniapp_api.api.requests import json_body, services
from portraits import consents, privacy

bp = Blueprint("consents", __name__, url_prefix="/api/v1/consents")


@bp.get("")
@login_required
def list_consents():
    return consents.consent_texts(services().settings)


@bp.post("")
@login_required
def give_consent():
    body = json_body({"kind": str, "version": str, "age_14_or_over": bool, "own_face": bool})
    user = consents.give_consent(services(), g.user, kind=body["kind"], version=body["version"],
                                 age_14_or_over=body["age_14_or_over"], own_face=body["own_face"],
                                 ip=request.remote_addr)
    return consents_json(user), 201


@bp.delete("/face_processing")
@login_required
def withdraw():
    erased = privacy.withdraw_face_consent(services(), g.user)
    user = services().db.users.find_one({"_id": g.user["_id"]})
    return {"consents": consents_json(user), "deleted": erased}
