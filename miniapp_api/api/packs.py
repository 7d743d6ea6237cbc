"""Packs: what an order with a render plan (the 100-avatar pack) rendered so far, and its archive (rules:
portraits.packs, portraits.renders)."""
from __future__ import annotations

import zipfile

from flask import Blueprint, Response, url_for

from miniapp_api.api.auth import login_required
from miniapp_api.api.images import EXTENSIONS, image_json
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import ZIP, Pack
from models.labels import media_type
from portraits import keys, packs
from portraits.errors import Conflict, not_found

bp = Blueprint("packs", __name__, url_prefix="/api/v1/packs")


def pack_order(order_id: str) -> dict:
    """The user's order, if it bought a pack (any other order, or another user's, answers 404 pack_not_found)."""
    order = owned("orders", order_id, "pack")
    if not order.get("render_plan"):
        raise not_found("pack")
    return order


@bp.get("/<order_id>")
@login_required
@endpoint(ok={200: Pack}, errors=[404])
def get_pack(order_id):
    """A pack's progress: its batches (delivered as they finish), the portraits so far, and the archive once one
    is delivered."""
    order = pack_order(order_id)
    progress = packs.progress(services(), order)
    delivered_ids = {i["_id"] for i in progress["delivered"]}
    pending_ids = {i["_id"] for i in progress["pending_check"]}
    return {
        "order_id": order["_id"], "sku": order["sku"], "phase": progress["phase"],
        "images_planned": progress["plan"]["images"], "images_delivered": len(delivered_ids),
        "images_pending_check": len(pending_ids), "images_refunded": len(progress["refunded_slots"]),
        "batches_done": sum(1 for b in progress["batches"] if b.get("settled_at")),
        "batches_pending": sum(1 for b in progress["batches"] if not b.get("settled_at")),
        "batches": [{"id": b["_id"], "index": b["pack_index"], "state": b["state"],
                     "redraw_of": b.get("pack_redraw_of"), "images_owed": len(b["pack_slots"]),
                     "images_delivered": len(delivered_ids & set(b.get("image_ids", []))),
                     "images_pending_check": len(pending_ids & set(b.get("image_ids", []))),
                     "images_refunded": len(b.get("pack_refunded_slots", [])), "settled": bool(b.get("settled_at"))}
                    for b in progress["batches"]],
        "images": [image_json(i) for i in progress["images"]],
        "archive_url": url_for("packs.get_archive", order_id=order["_id"]) if delivered_ids else None,
    }


@bp.get("/<order_id>/archive")
@login_required
@endpoint(ok={200: ZIP}, errors=[404, 409])
def get_archive(order_id):
    """The delivered portraits as one zip (owner only), streamed: each labelled image (visible mark and metadata) as
    downloaded one by one (JPEG, or PNG for ID photos), named by its place in the plan and its template. 409 pack_nothing_delivered while no
    portrait has passed WeChat's content check."""
    svc = services()
    order = pack_order(order_id)
    images = packs.delivered_images(svc, order["_id"])
    if not images:
        raise Conflict("pack_nothing_delivered", "No portrait of this pack is delivered yet; try again later.",
                       {"images_planned": order["render_plan"]["images"]})
    # The sealed store is read while the body streams, after this function returns: what it needs is bound here.
    sealed, user_id = svc.sealed, order["user_id"]
    entries = [(f"{image['pack_slot'] + 1:03d}_{image.get('template_id', 'portrait')}", image["_id"])
               for image in images]

    def stream():
        sink = _Chunks()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:  # images are compressed already
            for name, image_id in entries:
                data = sealed.get(user_id, keys.image(user_id, image_id))
                archive.writestr(f"{name}.{EXTENSIONS[media_type(data)]}", data)
                yield sink.take()
        yield sink.take()

    return Response(stream(), mimetype=ZIP, headers={
        "Content-Disposition": f'attachment; filename="pack-{order["_id"]}.zip"', "Cache-Control": "private, no-store"})


class _Chunks:
    """A write-only, unseekable file for zipfile (which then writes data descriptors): what was written since the
    last take() is handed to the response."""

    def __init__(self):
        self._parts: list[bytes] = []
        self._written = 0

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data
