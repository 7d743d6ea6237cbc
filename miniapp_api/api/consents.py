"""Face-processing consent: read the texts, give, withdraw (rules: portraits.consents, portraits.privacy)."""
from __future__ import annotations

from flask import Blueprint, g, request

from miniapp_api.api.auth import consents_json, login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.schemas import ConsentRequest, ConsentState, ConsentText, Withdrawal
from portraits import consents, privacy

bp = Blueprint("consents", __name__, url_prefix="/api/v1/consents")


@bp.get("")
@login_required
@endpoint(ok={200: list[ConsentText]})
def list_consents():
    """The consent texts in force."""
    return consents.consent_texts(services().settings)


@bp.post("")
@login_required
@endpoint(ok={201: ConsentState}, errors=[403, 409])
def give_consent(json: ConsentRequest):
    """Give face-processing consent to the text of that version."""
    user = consents.give_consent(services(), g.user, kind=json.kind, version=json.version,
                                 age_14_or_over=json.age_14_or_over, own_face=json.own_face, ip=request.remote_addr)
    return consents_json(user), 201


@bp.delete("/face_processing")
@login_required
@endpoint(ok={200: Withdrawal})
def withdraw():
    """Withdraw face-processing consent; deletes photos, avatars, weights, renders and images."""
    erased = privacy.withdraw_face_consent(services(), g.user)
    user = services().db.users.find_one({"_id": g.user["_id"]})
    return {"consents": consents_json(user), "deleted": erased}
