"""The portrait template catalog, filterable by category and gender, with preview images."""
from __future__ import annotations

from flask import Blueprint, request, send_file, url_for

from miniapp_api.api.auth import login_required
from portraits.catalog import template_to_json
from miniapp_api.errors import ApiError
from miniapp_api.api.requests import services

bp = Blueprint("catalog", __name__, url_prefix="/api/v1/templates")


@bp.get("")
@login_required
def list_templates():
    catalog = services().catalog
    category = request.args.get("category") or None
    gender = request.args.get("gender") or None
    if category is not None and category not in catalog.categories():
        raise ApiError(400, "unknown_category", "No such category.", {"categories": catalog.categories()})
    if gender is not None and gender not in ("female", "male"):
        raise ApiError(400, "invalid_fields", "gender must be female or male.", {"fields": {"gender": "female|male"}})
    return [{**template_to_json(t), "preview_url": url_for("catalog.preview", template_id=t.id)}
            for t in catalog.filter(category=category, gender=gender)]


@bp.get("/<template_id>/preview")
def preview(template_id):
    catalog = services().catalog
    if catalog.get(template_id) is None:
        raise ApiError(404, "template_not_found", "No such template.")
    return send_file(catalog.preview_path(template_id), mimetype="image/png", max_age=86400)
