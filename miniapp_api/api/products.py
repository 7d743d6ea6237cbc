"""The products on sale, as this client pays for them."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import services
from miniapp_api.schemas import Product, ProductQuery
from portraits import products
from portraits.billing import makegood, rails
from portraits.queue import lanes

bp = Blueprint("products", __name__, url_prefix="/api/v1/products")


@bp.get("")
@login_required
@endpoint(ok={200: list[Product]})
def list_products(query: ProductQuery):
    """Every sku with its price, the rail this client's platform pays on, the iOS make-good rule (stated before
    paying) and the user's free redo credits for it."""
    settings = services().settings
    credits = makegood.unused_credits(g.user)
    return [{"sku": sku, "amount": int(product["amount"]), "render_sets": int(product["render_sets"]),
             "min_photos": products.min_photos(settings, sku), "render_plan": products.render_plan(settings, sku),
             "description": product["description"], "rail": rails.rail_for(settings, query.platform),
             "ios_make_good": settings.xpay_ios_make_good,
             "credits": sum(1 for credit in credits if credit["sku"] == sku), "lane": lanes.lane_of(product),
             **({"promised_wait_s": int(product["promised_wait_s"])} if "promised_wait_s" in product else {}),
             **({"album": {"people": products.album_people(settings, sku)}} if "album" in product else {})}
            for sku, product in sorted(settings.skus.items())]
