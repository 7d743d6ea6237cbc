"""Couple and family albums over the API: buy one, invite with a share card, accept or decline an invitation,
follow it, withdraw from it (rules: portraits.albums)."""
from __future__ import annotations

from flask import Blueprint, Response, g, url_for
from PIL import Image

from miniapp_api.api.auth import login_required
from miniapp_api.api.images import image_json
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.orders import client_order_json
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import PNG, Album, AlbumPurchase, AlbumRequest
from models.labels import find_cjk_font
from models.posters import make_poster
from portraits import albums, sharing
from portraits.errors import Conflict, NotFound, Unavailable
from portraits.gateways.wechat import WeChatUnavailable

bp = Blueprint("albums", __name__, url_prefix="/api/v1/albums")

INVITE_CAPTION = {2: "邀请你一起拍双人写真", 3: "邀请你一起拍全家福写真"}


@bp.post("")
@login_required
@endpoint(ok={201: AlbumPurchase}, errors=[402, 403, 404, 409, 502], rate_limit="rate_limit_orders")
def create_album(json: AlbumRequest):
    """Buy an album with my trained avatar: the album (awaiting_payment) and its order, paid as any order. Once paid
    its seats invite (share each seat's invite card). use_credit pays with a free redo credit for the album sku
    (an iOS album that expired or was declined was made good with one): paid and inviting at once. 403
    consent_required, 409 avatar_not_trained, 402 no_make_good_credit."""
    avatar = owned("avatars", json.avatar_id, "avatar")
    album, order = albums.create_album(services(), g.user, avatar, json.sku, nickname=json.nickname,
                                       platform=json.platform, use_credit=json.use_credit)
    return {"album": album_json(album), "order": client_order_json(order)}, 201


@bp.get("")
@login_required
@endpoint(ok={200: list[Album]})
def list_albums():
    """The albums I am in (or was), as inviter or invitee, newest first."""
    found = services().db.albums.find({"member_ids": g.user["_id"]}).sort("created_at", -1)
    return [album_json(album) for album in found]


@bp.get("/<album_id>")
@login_required
@endpoint(ok={200: Album}, errors=[404])
def get_album(album_id):
    """An album of mine: its members (role, nickname, avatar gender), seats, progress and delivered images."""
    return album_json(albums.of_member(services(), album_id, g.user["_id"]))


@bp.get("/<album_id>/invite-card")
@login_required
@endpoint(ok={200: PNG}, errors=[404, 409, 503])
def get_invite_card(album_id):
    """The share card of the album's first open seat (the only one of a couple album): a 750x1334 PNG with the
    mini-program code whose scene carries the seat's token (a=<token>). 409 invite_not_open unless the album is
    inviting with a seat open, not_inviter for another member; 503 wechat_unavailable when WeChat cannot draw the
    code now (ask again)."""
    album = albums.of_member(services(), album_id, g.user["_id"])
    seat = next((s for s in album["seats"] if s["state"] == albums.OPEN), album["seats"][0])
    return _invite_card(album, seat)


@bp.get("/<album_id>/seats/<index>/invite-card")
@login_required
@endpoint(ok={200: PNG}, errors=[404, 409, 503])
def get_seat_invite_card(album_id, index):
    """The share card of one seat (a family album has two, each for its own invitee); as /invite-card otherwise.
    404 seat_not_found."""
    album = albums.of_member(services(), album_id, g.user["_id"])
    seat = next((s for s in album["seats"] if str(s["index"]) == index), None)
    if seat is None:
        raise NotFound("seat_not_found", "No such seat in this album.", {"seats": len(album["seats"])})
    return _invite_card(album, seat)


def _invite_card(album: dict, seat: dict) -> Response:
    svc = services()
    if album["user_id"] != g.user["_id"]:
        raise Conflict("not_inviter", "Only the inviter shares the album's invitations.")
    if album["state"] != "inviting" or seat["state"] != albums.OPEN:
        raise Conflict("invite_not_open", "This seat has no open invitation.",
                       {"state": album["state"], "seat_state": seat["state"]})
    try:
        code = svc.wechat.unlimited_wxa_code(scene=albums.scene(seat["token"]), page=sharing.SHARE_PAGE,
                                             width=sharing.APP_CODE_WIDTH)
    except WeChatUnavailable as error:
        raise Unavailable("wechat_unavailable", "WeChat cannot draw the invitation's code now; try again.",
                          {"errcode": getattr(error, "errcode", None)})
    template = svc.catalog.album_templates(album["people"])[0]
    picture = Image.open(svc.catalog.asset_path(template.preview)).convert("RGB")
    card = make_poster(picture, caption_zh=INVITE_CAPTION.get(album["people"], INVITE_CAPTION[2]), app_code_png=code,
                       font_path=find_cjk_font(svc.settings.cjk_font_path))
    return Response(card, mimetype=PNG, headers={"Cache-Control": "private, no-store"})


@bp.post("/<album_id>/withdraw")
@login_required
@endpoint(ok={200: Album}, errors=[404, 409])
def withdraw_album(album_id):
    """Withdraw from an album (any member): it ends for everyone, its joint images are deleted for everyone, and
    what was not delivered yet is refunded to the payer. 409 album_not_live once it has ended."""
    svc = services()
    album = albums.of_member(svc, album_id, g.user["_id"])
    if albums.withdraw(svc, album["_id"], by=f"user:{g.user['_id']}", reason="member_withdrew") is None:
        raise Conflict("album_not_live", "This album has ended already.", {"state": album["state"]})
    return album_json(albums.of_member(svc, album_id, g.user["_id"]))


def invitation_json(album: dict, seat: dict, joined: bool = False) -> dict:
    """An invitation as its card's code opens it; the album's id for its members only."""
    inviter = album["members"][0]
    product = services().settings.skus.get(album["sku"], {})
    return {"sku": album["sku"], "description": product.get("description", album["sku"]), "people": album["people"],
            "inviter_nickname": inviter.get("nickname"), "seat": seat["index"], "state": album["state"],
            "expires_at": _iso(album.get("invite_expires_at")), "joined": joined,
            "album_id": album["_id"] if joined else None}


def album_json(album: dict) -> dict:
    """An album as a member sees it: the others by role, nickname and avatar gender only."""
    svc = services()
    uid = g.user["_id"]
    me = albums.member(album, uid)
    progress = albums.progress(svc, album) if album["state"] in ("accepted", "withdrawn") else None
    shares = album["state"] == "inviting" and album["user_id"] == uid  # the inviter alone shares the seats' cards
    return {
        "id": album["_id"], "sku": album["sku"], "people": album["people"], "state": album["state"],
        "you": me["role"] if me else albums.INVITEE,
        "order_id": album.get("order_id") if album["user_id"] == uid else None,
        "members": [{"role": m["role"], "nickname": m.get("nickname"), "gender": m.get("gender"),
                     "you": m["user_id"] == uid} for m in album["members"]],
        "seats": [{"index": s["index"], "state": s["state"],
                   "token": s["token"] if shares and s["state"] == albums.OPEN else None,
                   "invite_card_url": url_for("albums.get_seat_invite_card", album_id=album["_id"], index=s["index"])
                   if shares and s["state"] == albums.OPEN else None}
                  for s in album["seats"]],
        "created_at": _iso(album["created_at"]), "paid_at": _iso(album.get("paid_at")),
        "invite_expires_at": _iso(album.get("invite_expires_at")), "accepted_at": _iso(album.get("accepted_at")),
        "withdrawn_at": _iso(album.get("withdrawn_at")),
        "progress": _progress_json(progress) if progress else None,
        "images": [image_json(i) for i in progress["delivered"]] if progress and album["state"] == "accepted" else [],
    }


def _progress_json(progress: dict) -> dict:
    batches = progress["batches"]
    return {"phase": progress["phase"], "images_planned": progress["plan"]["images"],
            "images_delivered": len(progress["delivered"]), "images_pending_check": len(progress["pending_check"]),
            "images_refunded": len(progress["refunded_slots"]),
            "batches_done": sum(1 for b in batches if b.get("settled_at")),
            "batches_pending": sum(1 for b in batches if not b.get("settled_at"))}


def _iso(value):
    return value.isoformat().replace("+00:00", "Z") if value else None
