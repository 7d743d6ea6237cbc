"""Album invitations over the API: what an invite card's code opens, accepting or declining its seat (rules:
portraits.albums)."""
from __future__ import annotations

from flask import Blueprint, g

from miniapp_api.api.albums import album_json, invitation_json
from miniapp_api.api.auth import login_required
from miniapp_api.api.openapi import endpoint
from miniapp_api.api.requests import owned, services
from miniapp_api.schemas import Album, AlbumAcceptRequest, AlbumInvitation
from portraits import albums, consents

bp = Blueprint("album_invites", __name__, url_prefix="/api/v1/album-invites")


@bp.get("/<token>")
@login_required
@endpoint(ok={200: AlbumInvitation}, errors=[404, 409, 410])
def get_invitation(token):
    """What an invite card's code opens: who invites, the product, the seat, until when. 404 invite_not_found, 410
    invite_expired or invite_closed, 409 invite_not_open (not paid yet). A member of the album (whoever took the
    seat, the inviter, another invitee) is shown it as it stands, whatever its state, with joined and the album's
    id to open it."""
    album, seat, joined = albums.invitation_for(services(), token, g.user["_id"])
    return invitation_json(album, seat, joined=joined)


@bp.post("/<token>/accept")
@login_required
@endpoint(ok={200: Album}, errors=[403, 404, 409, 410])
def accept_invitation(token, json: AlbumAcceptRequest):
    """Join the album with my own trained avatar (403 consent_required: my own current face consent, which under-14s
    cannot give; 409 avatar_not_trained, already_member, seat_taken). The last seat taken starts the drawing."""
    svc = services()
    albums.invitation(svc, token)
    consents.require_face_consent(svc.settings, g.user)  # before the avatar: someone without consent has none
    avatar = owned("avatars", json.avatar_id, "avatar")
    album = albums.accept(svc, g.user, token, avatar, nickname=json.nickname)
    return album_json(album)


@bp.post("/<token>/decline")
@login_required
@endpoint(ok={200: AlbumInvitation}, errors=[404, 409, 410])
def decline_invitation(token):
    """Say no: the album is declined for everyone and its price refunded to the inviter."""
    svc = services()
    album, seat = albums.invitation(svc, token)
    declined = albums.decline(svc, g.user, token)
    return invitation_json(declined, next(s for s in declined["seats"] if s["index"] == seat["index"]))
