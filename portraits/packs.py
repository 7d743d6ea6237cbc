"""Packs: a product with a render plan (portraits.products), such as Meitu Xiuxiu's 100 avatars for 9.9 RMB.

Once its avatar is trained, an order with a plan of N images owes N portraits, one per *slot* 0..N-1, each slot
drawn with its own template: the catalog's templates for the avatar's gender, taken category by category in turn so
every batch mixes styles and every template is used as often as any other (give or take one). The slots are
rendered `batch` at a time; each batch is a render document (the render state machine, its RQ job, its retries,
content checks and labels: portraits.renders) that names the slots it owes (`pack_slots`) and their templates
(`pack_templates`). Batch ids are derived from the order, so writing the batches again writes none twice, and the
sweep writes those a crash left unwritten.

What a batch cannot deliver (it failed after its retries, or some of its images were refused by the content check
or had no usable face) is drawn again once, free, as a *redraw* batch of just those slots; what a redraw cannot
deliver is refunded: each slot is worth its share of the price (floor(amount * (slot + 1) / N) - floor(amount *
slot / N), so the shares of all N slots add up to the amount exactly), one refund per batch, its number derived from the batch (portraits.billing.refunds.batch_refund_number).
"""
from __future__ import annotations

import hashlib

from portraits import content_checks


def spread(catalog, gender: str, images: int) -> list[str]:
    """The template of each slot: the gender's templates interleaved across categories (the first of each
    category, then the second of each, ...), repeated as often as the plan needs."""
    by_category: dict[str, list[str]] = {}
    for template in catalog.filter(gender=gender):
        by_category.setdefault(template.category, []).append(template.id)
    columns = list(by_category.values())
    interleaved = [column[row] for row in range(max(map(len, columns), default=0)) for column in columns
                   if row < len(column)]
    if not interleaved:
        raise ValueError(f"the catalog has no template for {gender}")
    return in_turn(interleaved, images)


def in_turn(template_ids: list[str], images: int) -> list[str]:
    """The template of each of `images` slots: the ids one after another, from the first again once all are used
    (spread's interleaving, an album's templates: portraits.albums.templates_for)."""
    return [template_ids[slot % len(template_ids)] for slot in range(images)]


def batches(plan: dict) -> list[list[int]]:
    """The slots of each batch, in order."""
    return [list(range(start, min(start + plan["batch"], plan["images"])))
            for start in range(0, plan["images"], plan["batch"])]


def _derived_id(*parts: str) -> str:
    return "rd_" + hashlib.sha256(":".join(("pack", *parts)).encode()).hexdigest()[:20]


def batch_id(order_id: str, index: int) -> str:
    return _derived_id(order_id, str(index))


def redraw_id(batch: str) -> str:
    return _derived_id(batch, "redraw")


def batch_fields(index: int, slots: list[int], templates: list[str], redraw_of: str | None = None) -> dict:
    """What marks a render document as a pack's batch."""
    fields = {"pack_index": index, "pack_slots": list(slots), "pack_templates": list(templates)}
    if redraw_of:
        fields["pack_redraw_of"] = redraw_of
    return fields


def slots_amount(amount: int, images: int, slots) -> int:
    """The share of the price (fen) of these slots of a plan of `images`."""
    return sum(amount * (slot + 1) // images - amount * slot // images for slot in slots)



def progress(services, order: dict) -> dict:
    """Where a pack stands: its phase (states.PACK_PHASES), its batches (done, pending), the images delivered, waiting for their
    content check, and refunded so far."""
    plan = order["render_plan"]
    docs = sorted(services.db.renders.find({"order_id": order["_id"], "pack_slots": {"$exists": True}}),
                  key=lambda r: (r["pack_index"], bool(r.get("pack_redraw_of"))))
    image_ids = [i for doc in docs for i in doc.get("image_ids", [])]
    images = {i["_id"]: i for i in services.db.images.find({"_id": {"$in": image_ids}})}
    shown = sorted((i for i in images.values() if i.get("content_check") != "refused"),
                   key=lambda i: i.get("pack_slot", 0))
    refunded_slots = sorted(slot for doc in docs for slot in doc.get("pack_refunded_slots", []))
    settled = [doc for doc in docs if doc.get("settled_at")]
    if order["state"] == "refunded" and not docs:
        phase = "refunded"
    elif not order.get("pack_started_at"):
        phase = "training"
    elif len(settled) < len(docs):
        phase = "rendering"
    else:
        phase = "done"
    return {"phase": phase, "plan": plan, "batches": docs, "images": shown,
            "delivered": [i for i in shown if content_checks.image_delivered(i)],
            "pending_check": [i for i in shown if i.get("content_check") == "pending"],
            "refunded_slots": refunded_slots}


def delivered_images(services, order_id: str) -> list[dict]:
    """The pack's portraits that passed the content check (what the archive holds), in slot order."""
    batch_ids = [r["_id"] for r in services.db.renders.find({"order_id": order_id, "pack_slots": {"$exists": True}},
                                                             {"_id": 1})]
    found = services.db.images.find({"render_id": {"$in": batch_ids}, "pack_slot": {"$exists": True},
                                     **content_checks.DELIVERED_IMAGE})
    return sorted(found, key=lambda i: i["pack_slot"])
