"""What each product (a sku of SKUS) asks of an avatar and owes after training.

A sku may carry its own photo minimum (`min_photos`; without it MIN_PHOTOS, as before) and a render plan
(`render_plan: {images, batch}`: that many images spread over the catalog's templates for the avatar's gender,
rendered `batch` at a time, see portraits.packs), and an album (`album: {people}`: the buyer invites people - 1 others,
each with their own trained avatar, and the plan draws them together, see portraits.albums). Products without a plan sell render sets the user picks
(`render_sets`).

The avatar learns its product before an order exists from the client (`POST /api/v1/avatars {sku}`), and an order
sets it to the order's sku (portraits.billing.orders.create_order): `missing` and readiness follow that product.
"""
from __future__ import annotations

LANES = ("standard", "express")


def min_photos(settings, sku: str | None) -> int:
    """Accepted photos an avatar collecting for `sku` needs (MIN_PHOTOS for an unknown sku or none)."""
    product = settings.skus.get(sku) if sku else None
    return int((product or {}).get("min_photos", settings.min_photos))


def render_plan(settings, sku: str | None) -> dict | None:
    """{images, batch} for a sku that renders a plan after training, else None."""
    product = settings.skus.get(sku) if sku else None
    plan = (product or {}).get("render_plan")
    return {"images": int(plan["images"]), "batch": int(plan["batch"])} if plan else None


def problems(skus: dict) -> list[str]:
    """What is wrong with a SKUS value (config validation): the new optional fields, checked where present."""
    found = []
    for sku, product in skus.items():
        if not isinstance(product, dict):
            found.append(f"{sku}: must be an object")
            continue
        found.extend(lane_problems(skus, sku, product))
        minimum = product.get("min_photos")
        if minimum is not None and (isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1):
            found.append(f"{sku}.min_photos: must be a whole number of at least 1")
        found.extend(album_problems(sku, product))
        plan = product.get("render_plan")
        if plan is None:
            continue
        if not isinstance(plan, dict) or set(plan) != {"images", "batch"} or any(
                isinstance(plan[k], bool) or not isinstance(plan[k], int) or plan[k] < 1 for k in plan):
            found.append(f"{sku}.render_plan: must be {{\"images\": n, \"batch\": m}} with whole numbers of at "
                         "least 1")
    return found


def album_people(settings, sku: str | None) -> int | None:
    """How many people an album sku is for (the buyer included), else None."""
    product = settings.skus.get(sku) if sku else None
    album = (product or {}).get("album")
    return int(album["people"]) if album else None


def album_problems(sku: str, product: dict) -> list[str]:
    """An album sku is for 2 or 3 people (the catalog's couple and family templates) and renders a plan."""
    album = product.get("album")
    if album is None:
        return []
    people = album.get("people") if isinstance(album, dict) else None
    if not isinstance(album, dict) or set(album) != {"people"} or isinstance(people, bool) or people not in (2, 3):
        return [f"{sku}.album: must be {{\"people\": 2}} or {{\"people\": 3}}"]
    if product.get("render_plan") is None:
        return [f"{sku}: an album sku renders a plan (render_plan)"]
    return []


def lane_problems(skus: dict, sku: str, product: dict) -> list[str]:
    """An express sku names the standard sku its price difference is against, costs no less, and promises a wait."""
    lane = product.get("lane", "standard")
    if lane not in LANES:
        return [f"{sku}: lane must be one of {', '.join(LANES)}"]
    if lane != "express":
        return []
    standard = skus.get(product.get("standard_sku"))
    if not isinstance(standard, dict) or standard.get("lane", "standard") != "standard":
        return [f"{sku}: an express sku names the standard sku its price difference is against (standard_sku)"]
    found = []
    if int(standard["amount"]) > int(product["amount"]):
        found.append(f"{sku}: costs less than its standard sku {product['standard_sku']}")
    if not isinstance(product.get("promised_wait_s"), int) or product["promised_wait_s"] <= 0:
        found.append(f"{sku}: an express sku promises a wait (promised_wait_s, whole seconds)")
    return found
