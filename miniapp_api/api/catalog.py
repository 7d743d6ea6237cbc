"""The portrait template catalog, filterable by category and gender, with preview images."""
from __future__ import annotations

from flask import Blueprint, send_file, url_for

from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.errors import ApiError
from miniapp_api.schemas import PNG, Template, TemplateFilter
from portraits.catalog import template_to_json

bp = Blueprint("catalog", __name__, url_prefix="/api/v1/templates")


@bp.get("")
@login_required
@endpoint(ok={200: list[Template]})
def list_templates(query: TemplateFilter):
    """The template catalog, by category and gender (unknown categories: 400 unknown_category)."""
    catalog = services().catalog
    if query.category is not None and query.category not in catalog.categories():
        raise ApiError(400, "unknown_category", "No such category.", {"categories": catalog.categories()})
    return [{**template_to_json(t), "preview_url": url_for("catalog.preview", template_id=t.id)}
            for t in catalog.filter(category=query.category, gender=query.gender)]


@bp.get("/<template_id>/preview")
@endpoint(ok={200: PNG, 206: PNG, 304: None}, errors=[404, 416], public=True)
def preview(template_id):
    """A template's preview card (cacheable; conditional and range requests are answered)."""
    catalog = services().catalog
    if catalog.get(template_id) is None:
        raise ApiError(404, "template_not_found", "No such template.")
    return send_file(catalog.preview_path(template_id), mimetype="image/png", max_age=86400)
