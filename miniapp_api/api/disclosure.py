"""GET /api/v1/disclosure: the filing numbers, the model and the AIGC label policy, for every AI page (public)."""
from __future__ import annotations

from flask import Blueprint

from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.schemas import Disclosure
from portraits.disclosure import disclosure

bp = Blueprint("disclosure", __name__, url_prefix="/api/v1/disclosure")


@bp.get("")
@endpoint(ok={200: Disclosure}, public=True)
def get_disclosure():
    """The algorithm filing number, the generative-AI filing or registration number, the model and its provider,
    and how generated images are labelled (GB 45438-2025). `placeholder` is true while any of them is the
    development placeholder EMBEDDED puts in (never in production: they are required settings there)."""
    return disclosure(services().settings)
