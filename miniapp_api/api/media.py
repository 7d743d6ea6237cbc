"""The signed, expiring links WeChat fetches the media it checks from (security.mediaCheckAsync's media_url).

A link names one content check (portraits.content_checks.media_link) and serves that check's medium only, decrypted,
while the check waits for WeChat; it is refused when forged (403 media_link_invalid), expired (403
media_link_expired), or once its check is decided or its medium gone (404 media_not_found).
"""
from __future__ import annotations

from flask import Blueprint, Response

from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.schemas import JPEG, PNG
from models.labels import media_type
from portraits import content_checks
from portraits.errors import not_found
from portraits.store.blobs import BlobNotFound
from portraits.store.vault import KeyShredded

bp = Blueprint("media", __name__, url_prefix="/api/v1/media")


@bp.get("/<token>")
@endpoint(ok={200: PNG}, also_answers={200: JPEG}, errors=[403, 404], public=True)
def get_media(token):
    """One medium waiting for WeChat's content check (a photo's aligned crop, PNG, or a portrait, JPEG or PNG),
    for WeChat."""
    svc = services()
    check = content_checks.check_for_media_token(svc, token)
    try:
        data = svc.sealed.get(check["user_id"], check["blob_key"])
    except (BlobNotFound, KeyShredded):
        raise not_found("media") from None
    return Response(data, mimetype=media_type(data), headers={"Cache-Control": "private, no-store"})
