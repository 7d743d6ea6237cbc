"""Couple and family albums over the API (rules: portraits.albums): invite, pay through the simulator's real pay
callback, accept, batches drawn and delivered to both, fulfilled; and the money and privacy paths: expiry and decline
refund once, concurrent accepts of one seat, the refusals, withdrawal and erasure delete the joint images for both and
refund what was not delivered once, the export of each shows the album, a failed batch is redrawn then refunded.

Until the album drawing lands, a batch draws through the pack path (one person per plan); these tests hold for any
drawing: they read the documents and images, never how a face was drawn.
"""
from __future__ import annotations

import io
from datetime import timedelta

import pytest
from PIL import Image
from pymongo.errors import DuplicateKeyError

from jobs import rendering
from models import posters
from portraits import albums, config, keys, packs, products, renders, sharing, states, sweeper, tasks
from portraits.billing import orders, refunds
from portraits.privacy import user_ref
from portraits.push_events import PUSH_PATH
from tests.qr_support import decode_qr
from tests.race import winners, write_after_read
from tests.test_api import assert_error
from tests.test_notifications import TEMPLATES, grant, sent

SKUS = config.DEFAULT_SKUS  # couple_album: 1990 fen, 6 images in batches of 3
FAST = {"render_max_steps": 1, "render_max_candidates": 1, "pack_candidates_per_image": 1}
IOS_XPAY = {**FAST, "payment_rail": "by_platform", "xpay_platforms": ("ios",)}  # avatars paid as usual, albums on iOS


@pytest.fixture
def settings_overrides(request):
    """FAST; the tests marked `mongo` run on the session's database server (what mongomock does not enforce)."""
    if request.node.get_closest_marker("mongo"):
        return {**FAST, "mongo_uri": request.getfixturevalue("database_server")}
    return dict(FAST)


@pytest.fixture
def trained(paid_avatar, drain, services):
    """Users with an avatar trained for real (the inviter's is what the batches draw with)."""

    def _make(*names: str):
        made = [paid_avatar(name) for name in names]
        drain()
        for api, avatar, _order in made:
            assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
        return [(api, avatar) for api, avatar, _order in made]

    return _make


@pytest.fixture
def marked_trained(paid_avatar, services):
    """Users whose paid avatar is marked trained without training: for tests that draw nothing."""

    def _make(*names: str):
        made = []
        for name in names:
            api, avatar, _order = paid_avatar(name)
            services.db.avatars.update_one({"_id": avatar["id"]}, {"$set": {"state": "trained"}})
            made.append((api, avatar))
        return made

    return _make


def _buy(api, avatar_id: str, sku: str = "couple_album", nickname: str = "小明") -> dict:
    bought = api.post("/api/v1/albums", json={"sku": sku, "avatar_id": avatar_id, "nickname": nickname})
    assert bought.status_code == 201, bought.get_json()
    return bought.get_json()


def _paid_album(api, sim, avatar_id: str, sku: str = "couple_album") -> dict:
    bought = _buy(api, avatar_id, sku)
    paid = sim.pay(bought["order"]["id"])
    assert paid["delivered"], paid
    album = api.get(f"/api/v1/albums/{bought['album']['id']}").get_json()
    assert album["state"] == "inviting", album
    return album


def _accept(api, token: str, avatar_id: str):
    return api.post(f"/api/v1/album-invites/{token}/accept", json={"avatar_id": avatar_id, "nickname": "小红"})


@pytest.fixture
def xpay_pushes(sim, app, services):
    """The simulator pushes virtual payments to this app's message-push endpoint."""
    sim.set_push_url(services.settings.public_base_url + PUSH_PATH)
    yield
    sim.set_push_url(None)


def _paid_ios_album(api, sim, services, avatar_id: str) -> dict:
    bought = api.post("/api/v1/albums", json={"sku": "couple_album", "avatar_id": avatar_id, "platform": "ios"})
    assert bought.status_code == 201, bought.get_json()
    order = bought.get_json()["order"]
    assert order["rail"] == "xpay", order
    paid = sim.xpay_pay(services.db.users.find_one({"_id": api.user_id})["openid"], order["xpay_params"],
                        platform="ios")
    assert paid["delivered"], paid
    album = api.get(f"/api/v1/albums/{bought.get_json()['album']['id']}").get_json()
    assert album["state"] == "inviting", album
    return album


def _order(services, order_id: str) -> dict:
    return services.db.orders.find_one({"_id": order_id})


def _album_refunds(services, album: dict) -> list[dict]:
    return _order(services, album["order_id"])["refunds"]


# ------------------------------------------------------------------------------------------ end to end


def test_a_couple_album_is_invited_paid_accepted_drawn_and_delivered_to_both(trained, login, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = trained("alice", "bob")
    products = {p["sku"]: p for p in alice.get("/api/v1/products").get_json()}
    assert products["couple_album"]["album"] == {"people": 2} and products["family_album"]["album"] == {"people": 3}
    assert (products["couple_album"]["amount"], products["couple_album"]["render_sets"]) == (1990, 0)
    assert "album" not in products["pack_100"]

    bought = _buy(alice, alice_avatar["id"])
    album, order = bought["album"], bought["order"]
    assert (album["state"], album["you"], [s["state"] for s in album["seats"]]) == (
        "awaiting_payment", "inviter", ["open"])
    assert album["seats"][0]["token"] is None  # nothing to share before it is paid
    assert (order["amount"], order["avatar_id"], order["state"]) == (1990, alice_avatar["id"], "created")
    stored = _order(services, order["id"])
    assert stored["album_id"] == album["id"] and "pay_params" in order
    token = services.db.albums.find_one({"_id": album["id"]})["seats"][0]["token"]
    assert_error(bob.get(f"/api/v1/album-invites/{token}"), 409, "invite_not_open")

    assert sim.pay(order["id"])["delivered"]  # WeChat Pay's real, signed callback
    assert _order(services, order["id"])["state"] == "paid"
    trainings = services.db.avatars.find_one({"_id": alice_avatar["id"]})
    assert trainings["state"] == "trained" and trainings["order_id"] != order["id"]  # an album order trains nothing
    inviting = alice.get(f"/api/v1/albums/{album['id']}").get_json()
    assert inviting["state"] == "inviting" and inviting["seats"][0]["token"] == token

    card = alice.get(inviting["seats"][0]["invite_card_url"])
    assert card.status_code == 200 and card.mimetype == "image/png"
    assert decode_qr(Image.open(io.BytesIO(card.data)).crop(posters.CODE_BOX)).endswith(f"scene=a={token}")
    first_open = alice.get(f"/api/v1/albums/{album['id']}/invite-card")
    assert decode_qr(Image.open(io.BytesIO(first_open.data)).crop(posters.CODE_BOX)).endswith(f"scene=a={token}")
    assert_error(login("mallory").get(f"/api/v1/albums/{album['id']}"), 404, "album_not_found")

    shown = bob.get(f"/api/v1/album-invites/{token}").get_json()
    assert (shown["inviter_nickname"], shown["sku"], shown["people"], shown["state"]) == (
        "小明", "couple_album", 2, "inviting")
    assert shown["description"] == "双人写真相册" and shown["expires_at"]
    joined = _accept(bob, token, bob_avatar["id"])
    assert joined.status_code == 200, joined.get_json()
    assert joined.get_json()["state"] == "accepted" and joined.get_json()["you"] == "invitee"
    assert [(m["role"], m["nickname"], m["gender"]) for m in joined.get_json()["members"]] == [
        ("inviter", "小明", "female"), ("invitee", "小红", "female")]
    assert joined.get_json()["order_id"] is None  # the order is the inviter's

    batches = list(services.db.renders.find({"album_id": album["id"]}).sort("pack_index", 1))
    assert [b["_id"] for b in batches] == [packs.batch_id(order["id"], 0), packs.batch_id(order["id"], 1)]
    assert all(b["album_avatar_ids"] == [alice_avatar["id"], bob_avatar["id"]] for b in batches)
    assert {b["avatar_id"] for b in batches} == {alice_avatar["id"]}
    album_templates = {t.id for t in services.catalog.album_templates(2)}
    assert {t for b in batches for t in b["pack_templates"]} <= album_templates
    assert albums.write_batches(services, album["id"]) == 0  # written once

    drain()
    for api in (alice, bob):
        done = api.get(f"/api/v1/albums/{album['id']}").get_json()
        assert done["progress"]["phase"] == "done" and done["progress"]["images_delivered"] == 6, done["progress"]
        assert len(done["images"]) == 6
        assert api.get(done["images"][0]["url"]).status_code == 200  # the joint images are each member's
    assert_error(login("mallory").get(done["images"][0]["url"]), 404, "image_not_found")
    assert {i.get("album_id") for i in services.db.images.find({"render_id": {"$in": [b["_id"] for b in batches]}})} \
        == {album["id"]}
    assert _order(services, order["id"])["state"] == "fulfilled"
    assert sweeper.sweep(services).get("refund_requested") is None  # nothing takes the album order for an orphan

    for api, role in ((alice, "inviter"), (bob, "invitee")):
        exported = [a for a in api.get("/api/v1/me/export").get_json()["albums"] if a["id"] == album["id"]]
        assert [(a["role"], a["state"], a["sku"], a["image_count"]) for a in exported] == [
            (role, "accepted", "couple_album", 6)]
        assert exported[0]["accepted_at"] and exported[0]["withdrawn_at"] is None
        # The joint images are of the invitee's own face too: each member's export lists them.
        listed = {i["id"]: i for i in api.get("/api/v1/me/export").get_json()["images"]}
        assert {i["id"] for i in done["images"]} <= set(listed)
        assert all(listed[i["id"]]["content_id"] and listed[i["id"]]["url"] for i in done["images"])


def test_both_members_are_told_once_that_the_album_portraits_are_ready(trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = trained("alice", "bob")
    for api, name in ((alice, "alice"), (bob, "bob")):
        grant(api, sim, name, ["portraits_ready"], count=2)  # room for a second message, were one ever sent
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    drain()
    assert alice.get(f"/api/v1/albums/{album['id']}").get_json()["progress"]["images_delivered"] == 6
    members = sorted([alice.user_id, bob.user_id])
    openids = sorted(sim.openid_of(name) for name in ("alice", "bob"))

    def told() -> list[str]:
        return sorted(m["user_id"] for m in services.db.messages.find({"kind": "portraits_ready"}))

    assert told() == members  # one each, though both batches delivered
    assert sorted(m["touser"] for m in sent(sim, TEMPLATES["portraits_ready"])) == openids
    # Each opens what its member can see: the payer their render, the invitee the album (the render is not theirs).
    pages = {m["touser"]: m["page"] for m in sent(sim, TEMPLATES["portraits_ready"])}
    assert pages == {sim.openid_of("alice"): "pages/render/index", sim.openid_of("bob"): "pages/album/index"}
    bob_message = services.db.messages.find_one({"kind": "portraits_ready", "user_id": bob.user_id})
    assert bob_message["data"] == {"album_id": album["id"]}
    assert bob.get(f"/api/v1/albums/{bob_message['data']['album_id']}").status_code == 200
    for batch in services.db.renders.find({"album_id": album["id"]}):  # each delivery replayed, then the sweep
        renders.deliver(services, batch)
        renders.settle_batch(services, batch)
    sweeper.sweep(services)
    drain()
    assert told() == members
    assert sorted(m["touser"] for m in sent(sim, TEMPLATES["portraits_ready"])) == openids
    # A crash between the delivery and the messages: the sweep owes each member's, once.
    services.db.messages.delete_many({"kind": "portraits_ready"})
    assert sweeper.sweep(services).get("message_owed") == 2
    assert told() == members
    assert not sweeper.sweep(services).get("message_owed")


# --------------------------------------------------------------------------------------------- money


@pytest.mark.parametrize("settings_overrides", [{**FAST, "album_invite_ttl_s": 0}])
def test_an_invitation_not_accepted_in_time_expires_and_is_refunded_once(marked_trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    token = album["seats"][0]["token"]
    assert_error(bob.get(f"/api/v1/album-invites/{token}"), 410, "invite_expired")
    assert_error(_accept(bob, token, bob_avatar["id"]), 410, "invite_expired")
    assert sweeper.sweep(services).get("album_expired") == 1
    assert not sweeper.sweep(services).get("album_expired")  # the second sweep does nothing more
    assert alice.get(f"/api/v1/albums/{album['id']}").get_json()["state"] == "expired"
    assert [(r["out_refund_no"], r["amount"]) for r in _album_refunds(services, album)] == [
        (refunds.album_refund_number(album["order_id"], album["id"]), 1990)]
    drain()
    sim.settle_refunds()
    assert _order(services, album["order_id"])["state"] == "refunded"
    assert len(_album_refunds(services, album)) == 1


def test_a_crash_after_the_last_seat_is_taken_is_accepted_by_the_sweep_not_expired(marked_trained, services, sim):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    stored = services.db.albums.find_one({"_id": album["id"]})
    bob_user = services.db.users.find_one({"_id": bob.user_id})
    bob_avatar_doc = services.db.avatars.find_one({"_id": bob_avatar["id"]})
    # The accept's own compare-and-set takes the seat; the process dies before the album's acceptance.
    assert albums.take_seat(services, stored, stored["seats"][0], bob_user, bob_avatar_doc, "小红") is not None
    services.db.albums.update_one({"_id": album["id"]}, {"$set": {"invite_expires_at": states.now()}})  # deadline
    done = sweeper.sweep(services)
    assert done.get("album_accepted") == 1 and not done.get("album_expired")
    healed = services.db.albums.find_one({"_id": album["id"]})
    assert healed["state"] == "accepted" and healed["batches_written_at"]
    assert services.db.renders.count_documents({"album_id": album["id"]}) == 2
    assert not _order(services, album["order_id"]).get("refunds")


def test_a_declined_invitation_ends_the_album_and_refunds_it_once(marked_trained, login, services, sim, drain):
    (alice, alice_avatar), = marked_trained("alice")
    album = _paid_album(alice, sim, alice_avatar["id"])
    token = album["seats"][0]["token"]
    assert_error(alice.post(f"/api/v1/album-invites/{token}/decline"), 409, "already_member")
    bob = login("bob")
    declined = bob.post(f"/api/v1/album-invites/{token}/decline")
    assert declined.status_code == 200 and declined.get_json()["state"] == "declined"
    assert_error(bob.post(f"/api/v1/album-invites/{token}/decline"), 410, "invite_closed")
    assert_error(bob.get(f"/api/v1/album-invites/{token}"), 410, "invite_closed")
    sweeper.sweep(services)
    assert [r["amount"] for r in _album_refunds(services, album)] == [1990]
    drain()
    sim.settle_refunds()
    assert _order(services, album["order_id"])["state"] == "refunded"
    assert alice.get(f"/api/v1/albums/{album['id']}").get_json()["state"] == "declined"


def test_a_withdrawal_while_awaiting_payment_whose_close_fails_refunds_a_payment_landing_later_once(
        marked_trained, services, sim, drain):
    (alice, alice_avatar), = marked_trained("alice")
    bought = _buy(alice, alice_avatar["id"])
    album_id, order_id = bought["album"]["id"], bought["order"]["id"]
    sim.set_fault(f"/v3/pay/transactions/out-trade-no/{order_id}/close", "5xx")
    assert alice.post(f"/api/v1/albums/{album_id}/withdraw").status_code == 200
    closed = _order(services, order_id)
    assert (closed["state"], closed["gateway_close_pending"]) == ("closed", True)  # closed at WeChat Pay later
    assert "refund_settled_at" not in services.db.albums.find_one({"_id": album_id})  # it can still be paid
    assert sweeper.sweep(services).get("album_refund_order_open") == 1

    # The user pays with the prepay they hold; the process dies between taking the payment and its refund.
    sim.pay(order_id, deliver=False)
    states.transition(services.db, "order", order_id, "paid", expect={"closed"}, by="test")
    assert sweeper.sweep(services).get("album_refund_refunded") == 1
    number = refunds.album_refund_number(order_id, album_id)
    assert [(r["out_refund_no"], r["amount"]) for r in _order(services, order_id)["refunds"]] == [(number, 1990)]
    drain()
    sim.settle_refunds()
    sweeper.sweep(services)
    assert _order(services, order_id)["state"] == "refunded" and len(_order(services, order_id)["refunds"]) == 1
    assert [r["amount"]["refund"] for r in sim.refunds()] == [1990]
    assert services.db.albums.find_one({"_id": album_id})["refund_outcome"] == "refunded"


@pytest.mark.parametrize("settings_overrides", [{**FAST, "render_retries": 0, "fault_render_failures": 99}])
def test_a_batch_that_cannot_be_drawn_is_redrawn_once_with_the_album_then_its_share_refunded(
        marked_trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    drain()  # both batches fail, and so does each one's free redraw (drawn with the album's fields)
    docs = list(services.db.renders.find({"album_id": album["id"]}))
    redraws = [d for d in docs if d.get("pack_redraw_of")]
    assert len(docs) == 4 and len(redraws) == 2 and {d["state"] for d in docs} == {"failed"}
    assert all(d["album_avatar_ids"] == [alice_avatar["id"], bob_avatar["id"]] for d in redraws)
    # The first redraw's share is on its way; the second waits for it (one refund at a time per order).
    assert len(_album_refunds(services, album)) == 1
    sim.settle_refunds()
    sweeper.sweep(services)
    drain()
    sim.settle_refunds()
    numbers = sorted(r["out_refund_no"] for r in _album_refunds(services, album))
    assert numbers == sorted(refunds.batch_refund_number(album["order_id"], d["_id"]) for d in redraws)
    assert sorted(r["amount"] for r in _album_refunds(services, album)) == [995, 995]
    assert _order(services, album["order_id"])["state"] == "refunded"
    sweeper.sweep(services)
    assert len(_album_refunds(services, album)) == 2
    progress = alice.get(f"/api/v1/albums/{album['id']}").get_json()["progress"]
    assert (progress["phase"], progress["images_refunded"]) == ("done", 6)


@pytest.mark.parametrize("settings_overrides", [IOS_XPAY])
def test_an_ios_album_made_good_by_a_batch_settles_its_withdrawal_as_made_good(
        marked_trained, services, sim, xpay_pushes):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_ios_album(alice, sim, services, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    # A batch that cannot be delivered makes the order good (an iOS payment cannot be refunded) ...
    made = refunds.request_refund(services, album["order_id"], reason="pack_undeliverable", expect=("paid",))
    assert made["state"] == "made_good"
    # ... then the album is withdrawn: nothing more is owed, and nothing is left waiting for ever.
    assert alice.post(f"/api/v1/albums/{album['id']}/withdraw").status_code == 200
    stored = services.db.albums.find_one({"_id": album["id"]})
    assert (stored["refund_outcome"], bool(stored.get("refund_settled_at"))) == ("made_good", True)
    assert not any(k.startswith("album_refund") for k in sweeper.sweep(services))
    assert len(services.db.users.find_one({"_id": alice.user_id})["make_good_credits"]) == 1
    assert sim.xpay_refunds() == {"calls": 0, "refunds": []}


@pytest.mark.parametrize("settings_overrides", [IOS_XPAY])
def test_an_ios_album_withdrawn_after_delivery_that_cannot_be_made_good_needs_people(
        trained, services, sim, drain, xpay_pushes):
    (alice, alice_avatar), (bob, bob_avatar) = trained("alice", "bob")
    album = _paid_ios_album(alice, sim, services, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    tasks.delete_jobs_of(services, {packs.batch_id(album["order_id"], 1)})  # the first batch alone is delivered
    drain()
    assert _order(services, album["order_id"])["state"] == "fulfilled"
    assert bob.post(f"/api/v1/albums/{album['id']}/withdraw").status_code == 200
    stored = services.db.albums.find_one({"_id": album["id"]})
    assert (stored["refund_outcome"], stored["refund_refused_code"]) == ("refund_refused", "refund_impossible")
    assert [(r["order_id"], r["album_id"], r["why"], r["error"]) for r in sweeper.needs_people(services)] == [
        (album["order_id"], album["id"], "album_refund_refused", "refund_impossible")]


@pytest.mark.parametrize("settings_overrides", [{**IOS_XPAY, "album_invite_ttl_s": 0}])
def test_the_credit_an_expired_ios_album_was_made_good_with_buys_a_new_album(marked_trained, services, sim,
                                                                            xpay_pushes):
    (alice, alice_avatar), = marked_trained("alice")
    album = _paid_ios_album(alice, sim, services, alice_avatar["id"])
    assert sweeper.sweep(services).get("album_expired") == 1
    assert _order(services, album["order_id"])["state"] == "made_good"
    assert services.db.albums.find_one({"_id": album["id"]})["refund_outcome"] == "made_good"
    credits = services.db.users.find_one({"_id": alice.user_id})["make_good_credits"]
    assert [(c["order_id"], c["sku"], c["used_by"]) for c in credits] == [(album["order_id"], "couple_album", None)]

    again = alice.post("/api/v1/albums", json={"sku": "couple_album", "avatar_id": alice_avatar["id"],
                                               "platform": "ios", "use_credit": True})
    assert again.status_code == 201, again.get_json()
    bought = again.get_json()
    assert (bought["order"]["rail"], bought["order"]["state"], bought["order"]["amount"]) == ("credit", "paid", 0)
    assert bought["album"]["state"] == "inviting" and bought["album"]["seats"][0]["token"]
    spent = services.db.users.find_one({"_id": alice.user_id})["make_good_credits"]
    assert [c["used_by"] for c in spent] == [bought["order"]["id"]]
    assert_error(alice.post("/api/v1/albums", json={"sku": "couple_album", "avatar_id": alice_avatar["id"],
                                                    "use_credit": True}), 402, "no_make_good_credit")
    assert services.db.albums.count_documents({"user_id": alice.user_id}) == 2  # the refused one left nothing


def test_an_album_refund_computed_before_another_refund_landed_is_asked_again(marked_trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    read_before = _order(services, album["order_id"])
    batch = packs.batch_id(album["order_id"], 0)
    assert refunds.request_refund(services, album["order_id"], reason="pack_undeliverable", amount=995,
                                  out_refund_no=refunds.batch_refund_number(album["order_id"], batch))
    drain()
    sim.settle_refunds()
    assert _order(services, album["order_id"])["state"] == "paid"  # 995 of 1990 refunded
    stored = services.db.albums.find_one({"_id": album["id"]})
    assert albums._refund_undelivered(services, stored, read_before) == "refund_owed"  # not settled as refused
    assert alice.post(f"/api/v1/albums/{album['id']}/withdraw").status_code == 200
    assert sorted(r["amount"] for r in _album_refunds(services, album)) == [995, 995]


# ------------------------------------------------------------------------------------------ refusals


def test_one_seat_accepted_at_once_by_two_people_goes_to_exactly_one(marked_trained, services, sim, app):
    (alice, alice_avatar), (bob, bob_avatar), (carol, carol_avatar) = marked_trained("alice", "bob", "carol")
    album = _paid_album(alice, sim, alice_avatar["id"])
    token = album["seats"][0]["token"]
    answers = []

    def accept_as(api, avatar_id):
        with app.test_client() as client:
            answer = client.post(f"/api/v1/album-invites/{token}/accept", json={"avatar_id": avatar_id},
                                 headers={"Authorization": f"Bearer {api.token}"})
        answers.append(answer)
        return True if answer.status_code == 200 else None

    people = [(bob, bob_avatar["id"]), (carol, carol_avatar["id"])] * 4
    order = iter(people)
    assert winners(lambda: accept_as(*next(order)), threads=len(people)) == 1
    refused = {a.get_json()["error"]["code"] for a in answers if a.status_code != 200}
    assert refused <= {"seat_taken", "already_member", "invite_closed", "invite_busy"}, refused
    stored = services.db.albums.find_one({"_id": album["id"]})
    assert stored["state"] == "accepted" and len(stored["members"]) == 2 and len(stored["member_ids"]) == 2
    assert services.db.renders.count_documents({"album_id": album["id"]}) == 2


def test_an_accept_that_loses_the_race_with_the_album_ending_says_so(marked_trained, services, sim, monkeypatch):
    (alice, alice_avatar), (bob, bob_avatar), (carol, carol_avatar) = marked_trained("alice", "bob", "carol")
    take_seat = albums.take_seat
    couple = _paid_album(alice, sim, alice_avatar["id"])
    family = _paid_album(alice, sim, alice_avatar["id"], sku="family_album")

    def then_withdrawn(services, album, *args):  # the inviter withdraws just after the seat is taken
        taken = take_seat(services, album, *args)
        albums.withdraw(services, album["_id"], by=f"user:{alice.user_id}", reason="member_withdrew")
        return taken

    monkeypatch.setattr(albums, "take_seat", then_withdrawn)
    assert_error(_accept(bob, couple["seats"][0]["token"], bob_avatar["id"]), 409, "album_not_live")

    def then_expired(services, album, *args):  # the invitation's time runs out just after one seat is taken
        taken = take_seat(services, album, *args)
        services.db.albums.update_one({"_id": album["_id"]}, {"$set": {"invite_expires_at": states.now()}})
        assert albums.expire(services, album["_id"])  # the other seat is still open
        return taken

    monkeypatch.setattr(albums, "take_seat", then_expired)
    assert_error(_accept(carol, family["seats"][0]["token"], carol_avatar["id"]), 410, "invite_expired")


class Crash(BaseException):
    """The process dying at this point: nothing after it happens (no except clause runs)."""


def test_an_album_whose_process_died_before_its_order_was_written_is_closed_by_the_sweep(
        marked_trained, services, monkeypatch):
    (alice, alice_avatar), = marked_trained("alice")
    user = services.db.users.find_one({"_id": alice.user_id})
    avatar = services.db.avatars.find_one({"_id": alice_avatar["id"]})

    def dies(*args, **kwargs):
        raise Crash("died between the album and its order")

    monkeypatch.setattr(orders, "create_album_order", dies)
    with pytest.raises(Crash):
        albums.create_album(services, user, avatar, "couple_album")
    album = services.db.albums.find_one({"user_id": alice.user_id})
    assert album["order_id"] and _order(services, album["order_id"]) is None  # its order id chosen first
    services.db.albums.update_one({"_id": album["_id"]}, {"$set": {"updated_at": states.now() - timedelta(days=1)}})
    assert sweeper.sweep(services).get("album_closed") == 1
    assert services.db.albums.find_one({"_id": album["_id"]})["state"] == "closed"


def test_a_member_reopening_an_invite_card_is_shown_the_album_as_it_stands(marked_trained, login, services, sim):
    (alice, alice_avatar), (bob, bob_avatar), (carol, carol_avatar) = marked_trained("alice", "bob", "carol")
    family = _paid_album(alice, sim, alice_avatar["id"], sku="family_album")
    first, second = (seat["token"] for seat in family["seats"])
    mallory = login("mallory")

    def shown(api, token: str) -> tuple:
        answer = api.get(f"/api/v1/album-invites/{token}")
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        return body["state"], body["seat"], body["album_id"], body["joined"]

    assert shown(carol, first) == ("inviting", 0, None, False)  # not a member: nothing of the album but the card
    assert _accept(bob, first, bob_avatar["id"]).status_code == 200
    # Bob's own seat, and the seat still open, open the album for its members (the inviter too).
    assert shown(bob, first) == ("inviting", 0, family["id"], True)
    assert shown(bob, second) == ("inviting", 1, family["id"], True)
    assert shown(alice, second) == ("inviting", 1, family["id"], True)
    assert shown(carol, second) == ("inviting", 1, None, False)
    assert_error(_accept(bob, second, bob_avatar["id"]), 409, "already_member")  # accepting still says so
    assert_error(bob.post(f"/api/v1/album-invites/{second}/decline"), 409, "already_member")

    assert _accept(carol, second, carol_avatar["id"]).status_code == 200
    for api, token, seat in ((bob, first, 0), (carol, second, 1), (alice, first, 0)):
        assert shown(api, token) == ("accepted", seat, family["id"], True)
    assert_error(mallory.get(f"/api/v1/album-invites/{first}"), 410, "invite_closed")
    assert_error(_accept(carol, second, carol_avatar["id"]), 410, "invite_closed")  # as before: nothing to accept
    assert_error(bob.post(f"/api/v1/album-invites/{first}/decline"), 410, "invite_closed")

    assert bob.post(f"/api/v1/albums/{family['id']}/withdraw").status_code == 200
    assert shown(bob, first) == ("withdrawn", 0, family["id"], True)
    assert shown(carol, second) == ("withdrawn", 1, family["id"], True)
    assert_error(mallory.get(f"/api/v1/album-invites/{second}"), 410, "invite_closed")
    assert_error(mallory.get("/api/v1/album-invites/not-a-token"), 404, "invite_not_found")


def test_who_cannot_join_an_album(marked_trained, login, services, sim):
    (alice, alice_avatar), = marked_trained("alice")
    assert_error(alice.post("/api/v1/albums", json={"sku": "pack_100", "avatar_id": alice_avatar["id"]}), 400,
                 "not_an_album_sku")
    assert_error(alice.post("/api/v1/orders", json={"sku": "couple_album", "avatar_id": alice_avatar["id"]}), 400,
                 "album_sku")  # an album is bought as one, never as a plain order
    collecting = alice.post("/api/v1/avatars", json={"gender": "female"}).get_json()
    assert_error(alice.post("/api/v1/albums", json={"sku": "couple_album", "avatar_id": collecting["id"]}), 409,
                 "avatar_not_trained")
    album = _paid_album(alice, sim, alice_avatar["id"])
    token = album["seats"][0]["token"]
    assert_error(_accept(alice, token, alice_avatar["id"]), 409, "already_member")  # her own invitation
    assert_error(alice.get("/api/v1/album-invites/not-a-token"), 404, "invite_not_found")

    # Without their own current consent; an under-14 cannot give one (the guardian rule), so cannot get in.
    child = login("tim", consent=False)
    version = child.get("/api/v1/consents").get_json()[0]["version"]
    assert_error(child.post("/api/v1/consents", json={"kind": "face_processing", "version": version,
                                                      "age_14_or_over": False, "own_face": True}),
                 403, "guardian_consent_required")
    assert_error(_accept(child, token, alice_avatar["id"]), 403, "consent_required")
    assert_error(child.post("/api/v1/avatars", json={"gender": "male"}), 403, "consent_required")

    dave = login("dave")
    assert_error(_accept(dave, token, alice_avatar["id"]), 404, "avatar_not_found")  # someone else's avatar
    untrained = dave.post("/api/v1/avatars", json={"gender": "male"}).get_json()
    assert_error(_accept(dave, token, untrained["id"]), 409, "avatar_not_trained")
    stored = services.db.albums.find_one({"_id": album["id"]})
    assert (stored["state"], stored["member_ids"]) == ("inviting", [alice.user_id])


# ---------------------------------------------------------------------------------------------- privacy


def test_withdrawal_by_the_invitee_deletes_the_joint_images_for_both_and_refunds_the_rest_once(
        trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    first, second = (packs.batch_id(album["order_id"], index) for index in (0, 1))
    tasks.delete_jobs_of(services, {second})  # only the first batch is drawn before the withdrawal
    drain()
    before = alice.get(f"/api/v1/albums/{album['id']}").get_json()
    assert before["progress"]["images_delivered"] == 3
    image = before["images"][0]
    image_doc = services.db.images.find_one({"_id": image["id"]})
    # The second batch is being drawn when the withdrawal comes.
    drawing = renders.begin_render(services, second, "job-race")
    assert drawing is not None
    sharing._enqueue(services, image["id"])  # a share code still owed for a joint image
    share_job = keys.share_code_job_id(image["id"])
    assert share_job in tasks.queue(services, tasks.DEFAULT).get_job_ids()

    withdrawn = bob.post(f"/api/v1/albums/{album['id']}/withdraw")
    assert share_job not in tasks.queue(services, tasks.DEFAULT).get_job_ids()  # its job went first
    assert withdrawn.status_code == 200 and withdrawn.get_json()["state"] == "withdrawn"
    assert withdrawn.get_json()["images"] == []
    for api in (alice, bob):
        assert api.get(f"/api/v1/albums/{album['id']}").get_json()["state"] == "withdrawn"
        assert_error(api.get(image["url"]), 404, "image_not_found")
    assert not services.blobs.exists(keys.image(image_doc["user_id"], image["id"]))
    assert services.db.images.count_documents({"album_id": album["id"]}) == 0

    # The batch in flight finishes after the withdrawal: what it drew is deleted, nothing delivered, nothing owed.
    kept = rendering._draw_and_keep(services, drawing, None)
    assert services.db.images.count_documents({"album_id": album["id"]}) == len(kept) > 0
    assert renders.complete_render(services, drawing, "job-race", kept, 0.0) == "album_withdrawn"
    assert services.db.images.count_documents({"album_id": album["id"]}) == 0

    refunded = _album_refunds(services, album)
    assert [(r["out_refund_no"], r["amount"]) for r in refunded] == [
        (refunds.album_refund_number(album["order_id"], album["id"]),
         packs.slots_amount(1990, 6, [3, 4, 5]))]
    assert_error(alice.post(f"/api/v1/albums/{album['id']}/withdraw"), 409, "album_not_live")
    drain()
    sweeper.sweep(services)
    sweeper.sweep(services)
    assert len(_album_refunds(services, album)) == 1
    assert services.db.images.count_documents({"album_id": album["id"]}) == 0
    for api, role in ((alice, "inviter"), (bob, "invitee")):
        exported = [a for a in api.get("/api/v1/me/export").get_json()["albums"] if a["id"] == album["id"]]
        assert [(a["role"], a["state"], a["image_count"]) for a in exported] == [(role, "withdrawn", 0)]
        assert exported[0]["withdrawn_at"]


def test_a_batch_refunding_its_lost_slots_as_the_album_is_withdrawn_does_not_refund_them_twice(
        trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    second = packs.batch_id(album["order_id"], 1)
    tasks.delete_jobs_of(services, {second})  # the first batch is delivered; the second is lost
    drain()
    assert alice.get(f"/api/v1/albums/{album['id']}").get_json()["progress"]["images_delivered"] == 3
    lost = services.db.renders.find_one({"_id": second})
    # settle_batch found the album live; the withdrawal comes and is refunded; then the batch asks for its refund.
    assert albums.withdraw(services, album["id"], by=f"user:{bob.user_id}", reason="member_withdrew")
    drain()
    sim.settle_refunds()
    assert renders._refund_slots(services, lost, [3, 4, 5]) == "album_withdrawn"
    assert [(r["out_refund_no"], r["amount"]) for r in _album_refunds(services, album)] == [
        (refunds.album_refund_number(album["order_id"], album["id"]), packs.slots_amount(1990, 6, [3, 4, 5]))]


def test_a_queued_batch_of_a_withdrawn_album_ends_without_drawing(marked_trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    assert alice.post(f"/api/v1/albums/{album['id']}/withdraw").status_code == 200
    batches = list(services.db.renders.find({"album_id": album["id"]}))
    assert {(b["state"], bool(b.get("settled_at"))) for b in batches} == {("failed", True)}
    for batch in batches:  # a job left in Redis claims nothing
        assert renders.begin_render(services, batch["_id"], "late-job") is None
    drain()
    assert services.db.images.count_documents({"album_id": album["id"]}) == 0
    assert [r["amount"] for r in _album_refunds(services, album)] == [1990]


def test_erasure_of_a_member_withdraws_the_album_for_both(marked_trained, services, sim, drain):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    assert bob.delete("/api/v1/me").status_code == 202
    shown = alice.get(f"/api/v1/albums/{album['id']}").get_json()
    assert shown["state"] == "withdrawn"
    assert [r["amount"] for r in _album_refunds(services, album)] == [1990]  # nothing was delivered yet
    kept = services.db.albums.find_one({"_id": album["id"]})
    assert bob.user_id not in repr(kept)  # the album stays for alice; bob in it is the one-way reference
    assert [(m["role"], m["nickname"]) for m in kept["members"]] == [("inviter", "小明"), ("invitee", None)]
    sweeper.sweep(services)
    assert len(_album_refunds(services, album)) == 1
    exported = [a for a in alice.get("/api/v1/me/export").get_json()["albums"] if a["id"] == album["id"]]
    assert [(a["role"], a["state"]) for a in exported] == [("inviter", "withdrawn")]


def test_erasure_of_a_member_leaves_nothing_of_theirs_in_the_album_and_keeps_what_was_written_meanwhile(
        marked_trained, services, sim, monkeypatch):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    # Another writer (the sweep) moves between the erasure's read of the album and its write.
    meanwhile = write_after_read(monkeypatch, services.db.albums, {"member_ids": bob.user_id},
                                 lambda: services.db.albums.update_one({"_id": album["id"]},
                                                                         {"$set": {"written_meanwhile": True}}))
    assert bob.delete("/api/v1/me").status_code == 202
    assert len(meanwhile) == 1
    kept = services.db.albums.find_one({"_id": album["id"]})
    assert bob.user_id not in repr(kept) and bob_avatar["id"] not in repr(kept)
    assert [(m["user_id"], m["role"], m["nickname"], m["avatar_id"], m["gender"]) for m in kept["members"]] == [
        (alice.user_id, "inviter", "小明", alice_avatar["id"], "female"),
        (user_ref(services, bob.user_id), "invitee", None, None, None)]
    assert kept["member_ids"] == [alice.user_id, user_ref(services, bob.user_id)]
    assert kept["written_meanwhile"] is True
    assert (kept["state"], kept["refund_outcome"]) == ("withdrawn", "refunded")  # what the erasure wrote before


def _ended_past_the_grace(services, album_id: str) -> None:
    past = states.now() - timedelta(seconds=services.settings.worker_dead_after_s * 3)
    services.db.albums.update_one({"_id": album_id}, {"$set": {"ended_at": past}})


def _ids(found: list[dict]) -> set[str]:
    return {album["_id"] for album in found}


def test_the_sweep_reads_a_withdrawn_album_until_nothing_of_its_drawing_is_left(marked_trained, services, sim):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    finished, drawing = (_paid_album(alice, sim, alice_avatar["id"]) for _ in range(2))
    for album in (finished, drawing):
        assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    batch = services.db.renders.find_one({"album_id": drawing["id"], "pack_index": 0})
    assert renders.begin_render(services, batch["_id"], "job-drawing") is not None  # a worker is drawing it
    for album in (finished, drawing):
        assert alice.post(f"/api/v1/albums/{album['id']}/withdraw").status_code == 200
        _ended_past_the_grace(services, album["id"])
    assert _ids(albums.withdrawn_to_clean(services)) == {finished["id"], drawing["id"]}
    assert sweeper.sweep(services).get("album_cleaned") == 1
    assert _ids(albums.withdrawn_to_clean(services)) == {drawing["id"]}  # its batch can still write images
    # The batch wrote an image, then its worker died and the batch failed: the sweep deletes the image, then is done.
    services.db.images.insert_one({"_id": "im_left", "content_id": "left", "user_id": alice.user_id,
                                   "album_id": drawing["id"], "render_id": batch["_id"], "pack_slot": 0})
    assert states.transition(services.db, "render", batch["_id"], "failed", expect={"rendering"}, by="test",
                             reason="job_lost")
    assert _ids(albums.withdrawn_to_clean(services)) == {drawing["id"]}
    swept = sweeper.sweep(services)
    assert (swept.get("album_images_deleted"), swept.get("album_cleaned")) == (1, 1)
    assert albums.withdrawn_to_clean(services) == []
    assert services.db.images.count_documents({"album_id": drawing["id"]}) == 0


def test_a_withdrawn_album_without_its_end_time_is_cleaned_and_stops_no_sweep(marked_trained, services, sim):
    (alice, alice_avatar), = marked_trained("alice")
    legacy, other = (_paid_album(alice, sim, alice_avatar["id"]) for _ in range(2))
    for album in (legacy, other):
        assert alice.post(f"/api/v1/albums/{album['id']}/withdraw").status_code == 200
    _ended_past_the_grace(services, other["id"])
    services.db.albums.update_one({"_id": legacy["id"]}, {"$unset": {"ended_at": ""}})  # a hand-edited document
    assert _ids(albums.withdrawn_to_clean(services)) == {legacy["id"], other["id"]}
    assert sweeper.sweep(services).get("album_cleaned") == 2  # no end time: long past
    assert albums.withdrawn_to_clean(services) == []


def test_albums_are_indexed_by_seat_token_member_state_and_order(services):
    indexes = {tuple(index["key"]): index for index in services.db.albums.index_information().values()}
    assert indexes[(("seats.token", 1),)].get("unique") is True
    assert {(("member_ids", 1),), (("state", 1), ("updated_at", 1)), (("order_id", 1),)} <= set(indexes)


@pytest.mark.mongo
def test_a_seat_token_is_one_album_s_on_a_database_server(marked_trained, services, sim):
    """The unique index on the seats' tokens (mongomock does not enforce one on an array's field; a server does)."""
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    family = _paid_album(alice, sim, alice_avatar["id"], sku="family_album")  # two seats, two tokens, one album
    couple = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, family["seats"][0]["token"], bob_avatar["id"]).status_code == 200  # a seat's update
    copied = {**services.db.albums.find_one({"_id": couple["id"]}), "_id": albums.new_album_id()}
    copied["seats"] = [{**copied["seats"][0], "token": family["seats"][1]["token"]}]
    with pytest.raises(DuplicateKeyError):
        services.db.albums.insert_one(copied)
    assert services.db.albums.count_documents({}) == 2


def test_the_sweep_reads_an_accepted_album_until_its_order_is_past_paid(marked_trained, services, sim):
    (alice, alice_avatar), (bob, bob_avatar) = marked_trained("alice", "bob")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert _accept(bob, album["seats"][0]["token"], bob_avatar["id"]).status_code == 200
    sweeper.sweep(services)
    assert _ids(albums.accepted_owing_fulfilment(services)) == {album["id"]}  # nothing delivered: its order is paid
    assert orders.fulfil(services, album["order_id"])  # its first portraits delivered (renders.deliver)
    sweeper.sweep(services)
    assert albums.accepted_owing_fulfilment(services) == []
    assert services.db.albums.find_one({"_id": album["id"]})["state"] == "accepted"


def test_consent_withdrawal_of_the_inviter_withdraws_an_album_still_inviting(marked_trained, services, sim):
    (alice, alice_avatar), = marked_trained("alice")
    album = _paid_album(alice, sim, alice_avatar["id"])
    assert alice.delete("/api/v1/consents/face_processing").status_code == 200
    stored = services.db.albums.find_one({"_id": album["id"]})
    assert stored["state"] == "withdrawn"
    assert [r["amount"] for r in _album_refunds(services, album)] == [1990]


def test_an_album_sku_is_for_two_or_three_people_and_renders_a_plan():
    assert products.problems(config.DEFAULT_SKUS) == []
    album = config.DEFAULT_SKUS["couple_album"]
    assert products.problems({"a": {**album, "album": {"people": 4}}}) == [
        'a.album: must be {"people": 2} or {"people": 3}']
    assert products.problems({"a": {**album, "album": {"people": True}}}) == [
        'a.album: must be {"people": 2} or {"people": 3}']
    assert products.problems({"a": {**album, "album": {"people": 2, "pets": 1}}}) == [
        'a.album: must be {"people": 2} or {"people": 3}']
    assert products.problems({"a": {k: v for k, v in album.items() if k != "render_plan"}}) == [
        "a: an album sku renders a plan (render_plan)"]


def test_a_family_album_waits_for_both_seats_one_person_each(marked_trained, services, sim):
    (alice, alice_avatar), (bob, bob_avatar), (carol, carol_avatar) = marked_trained("alice", "bob", "carol")
    album = _paid_album(alice, sim, alice_avatar["id"], sku="family_album")
    first, second = (seat["token"] for seat in album["seats"])
    card = alice.get(album["seats"][1]["invite_card_url"])
    assert card.status_code == 200
    assert decode_qr(Image.open(io.BytesIO(card.data)).crop(posters.CODE_BOX)).endswith(f"scene=a={second}")
    assert_error(alice.get(f"/api/v1/albums/{album['id']}/seats/x/invite-card"), 404, "seat_not_found")

    half = _accept(bob, first, bob_avatar["id"]).get_json()
    assert half["state"] == "inviting" and [s["state"] for s in half["seats"]] == ["taken", "open"]
    # Only the inviter shares the open seats: an invitee sees neither their tokens nor their cards.
    assert [(s["token"], s["invite_card_url"]) for s in half["seats"]] == [(None, None), (None, None)]
    assert_error(bob.get(f"/api/v1/albums/{album['id']}/seats/1/invite-card"), 409, "not_inviter")
    shown = alice.get(f"/api/v1/albums/{album['id']}").get_json()["seats"]
    assert shown[1]["token"] == second and shown[1]["invite_card_url"]
    assert services.db.renders.count_documents({"album_id": album["id"]}) == 0
    assert_error(_accept(bob, second, bob_avatar["id"]), 409, "already_member")  # one seat per person
    full = _accept(carol, second, carol_avatar["id"]).get_json()
    assert full["state"] == "accepted" and [m["role"] for m in full["members"]] == ["inviter", "invitee", "invitee"]
    batches = list(services.db.renders.find({"album_id": album["id"]}))
    assert len(batches) == 2 and all(b["album_avatar_ids"] == [alice_avatar["id"], bob_avatar["id"],
                                                               carol_avatar["id"]] for b in batches)
    assert {t for b in batches for t in b["pack_templates"]} <= {t.id for t in services.catalog.album_templates(3)}
    assert _order(services, album["order_id"])["amount"] == 2990
