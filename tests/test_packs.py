"""The 100-avatar pack (Meitu Xiuxiu's product) over the API: a product's own photo minimum, its render plan drawn in
batches spread over the templates, delivered as they finish, one archive, and the failure rules per batch.

The plan here is 6 images in batches of 3 (SKUS is a setting); the real plan's spread is checked without rendering.
"""
from __future__ import annotations

import io
import zipfile
from collections import Counter

import pytest

from jobs.worker import EmbeddedWorker
from models.labels import read_label
from portraits import config, content_checks, packs, renders, sweeper, tasks
from portraits.billing import refunds
from tests.test_api import assert_error
from tests.test_notifications import TEMPLATES, grant, sent

SMALL_PLAN = {"images": 6, "batch": 3}
PACK = {**config.DEFAULT_SKUS["pack_100"], "render_plan": SMALL_PLAN}
SKUS = {**config.DEFAULT_SKUS, "pack_100": PACK}


@pytest.fixture
def settings_overrides():
    return {"skus": SKUS, "render_max_steps": 1, "render_max_candidates": 1,
            "pack_candidates_per_image": 1}


def _pack_avatar(login, user_photos, drain, name: str, count: int = 3, sku: str | None = "pack_100"):
    api = login(name)
    avatar = api.post("/api/v1/avatars", json={"gender": "female", **({"sku": sku} if sku else {})})
    assert avatar.status_code == 201, avatar.get_json()
    for index, photo in enumerate(user_photos[:count]):
        taken = api.upload(avatar.get_json()["id"], photo, role="front" if index == 0 else "extra")
        assert taken.get_json()["state"] == "judging", taken.get_json()
    drain()  # the photos' judging, then their content checks
    shown = api.get(f"/api/v1/avatars/{avatar.get_json()['id']}").get_json()
    assert [p["accepted"] for p in shown["photos"]] == [True] * count, shown["photos"]
    return api, shown


def _buy_pack(api, sim, avatar_id: str) -> dict:
    order = api.post("/api/v1/orders", json={"avatar_id": avatar_id, "sku": "pack_100"})
    assert order.status_code == 201, order.get_json()
    assert sim.pay(order.get_json()["id"])["delivered"]
    return order.get_json()


def _pack(api, order_id: str) -> dict:
    answer = api.get(f"/api/v1/packs/{order_id}")
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def _order(services, order_id: str) -> dict:
    return services.db.orders.find_one({"_id": order_id})


def _train_only(services) -> None:
    """Run the training and default queues, not the renders: the pack's batches stay queued."""
    worker = EmbeddedWorker([tasks.queue(services, tasks.TRAIN), tasks.queue(services, tasks.DEFAULT)],
                            connection=services.redis)
    while worker.work(burst=True, with_scheduler=True, logging_level="WARNING"):
        pass


# ---------------------------------------------------------------------------------------- photo minimum


def test_three_photos_are_enough_for_the_pack_but_not_for_the_portrait_pack(login, user_photos, drain, services):
    products = {p["sku"]: p for p in login("prod").get("/api/v1/products").get_json()}
    assert products["pack_100"]["min_photos"] == 3 and products["pack_100"]["render_plan"] == SMALL_PLAN
    assert products["avatar_pack"]["min_photos"] == services.settings.min_photos == 4  # MIN_PHOTOS, as before
    assert products["avatar_pack"]["render_plan"] is None

    api, avatar = _pack_avatar(login, user_photos, drain, "tess")
    assert (avatar["state"], avatar["sku"], avatar["min_photos"], avatar["missing"]) == ("ready", "pack_100", 3, [])
    refused = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert_error(refused, 409, "avatar_not_ready")
    assert refused.get_json()["error"]["details"]["missing"] == ["more_photos"]
    assert refused.get_json()["error"]["details"]["min_photos"] == 4
    after = api.get(f"/api/v1/avatars/{avatar['id']}").get_json()
    assert (after["state"], after["sku"]) == ("ready", "pack_100")  # a refused order changes nothing

    # Declared for nothing (MIN_PHOTOS applies), three photos are short; an order for the pack re-judges it.
    api2, plain = _pack_avatar(login, user_photos, drain, "ursa", sku=None)
    assert (plain["state"], plain["sku"], plain["min_photos"], plain["missing"]) == (
        "collecting", None, 4, ["more_photos"])
    order = api2.post("/api/v1/orders", json={"avatar_id": plain["id"], "sku": "pack_100"})
    assert order.status_code == 201, order.get_json()
    assert api2.get(f"/api/v1/avatars/{plain['id']}").get_json()["state"] == "ready"

    assert_error(api.post("/api/v1/avatars", json={"gender": "male", "sku": "no_such"}), 400, "unknown_sku")


# ------------------------------------------------------------------------------------------ end to end


def test_a_pack_renders_its_plan_in_batches_and_downloads_as_one_archive(login, user_photos, drain, services, sim):
    api, avatar = _pack_avatar(login, user_photos, drain, "vera")
    order = _buy_pack(api, sim, avatar["id"])
    assert order["render_credits"] == 0
    early = _pack(api, order["id"])
    assert (early["phase"], early["batches"], early["archive_url"]) == ("training", [], None)
    assert_error(api.get(f"/api/v1/packs/{order['id']}/archive"), 409, "pack_nothing_delivered")

    grant(api, sim, "vera", ["portraits_ready"], count=3)
    sim.media_check_rule("pass", openid=sim.openid_of("vera"), hold=True)  # the portraits wait for their verdicts
    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
    drawn = _pack(api, order["id"])
    assert drawn["phase"] == "rendering" and (drawn["batches_done"], drawn["batches_pending"]) == (0, 2)
    assert [(b["index"], b["state"], b["images_owed"]) for b in drawn["batches"]] == [(0, "done", 3), (1, "done", 3)]
    assert (drawn["images_delivered"], drawn["images_pending_check"]) == (0, 6)
    assert_error(api.get(f"/api/v1/packs/{order['id']}/archive"), 409, "pack_nothing_delivered")
    assert _order(services, order["id"])["state"] == "paid"

    sim.flush_media_checks(include_held=True)
    done = _pack(api, order["id"])
    assert done["phase"] == "done" and (done["batches_done"], done["batches_pending"]) == (2, 0)
    assert (done["images_planned"], done["images_delivered"], done["images_refunded"]) == (6, 6, 0)
    assert _order(services, order["id"])["state"] == "fulfilled"
    drain()
    # Both batches delivered, one message: the news is the pack's, and her other grants stay hers.
    assert len(sent(sim, TEMPLATES["portraits_ready"])) == 1
    assert services.db.users.find_one({"_id": api.user_id})["subscriptions"][TEMPLATES["portraits_ready"]] == 2
    # Spread over the catalog's templates for her gender: six different ones, every batch mixing categories.
    images = list(services.db.images.find({"_id": {"$in": [i["id"] for i in done["images"]]}}))
    assert sorted(i["pack_slot"] for i in images) == list(range(6))
    templates = [services.catalog.get(i["template_id"]) for i in images]
    assert len({t.id for t in templates}) == 6 and {t.gender for t in templates} == {"female"}
    assert len({t.category for t in templates}) == 6

    archive = api.get(done["archive_url"])
    assert archive.status_code == 200 and archive.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(archive.data)) as opened:
        names = opened.namelist()
        labels = [read_label(opened.read(name)) for name in names]
    assert [name[:4] for name in names] == ["001_", "002_", "003_", "004_", "005_", "006_"]
    assert sorted(label["ProduceID"] for label in labels) == sorted(i["content_id"] for i in images)
    assert {label["Label"] for label in labels} == {"1"}
    # Only its owner gets it; a pack is not a render set to spend.
    other = login("wendy")
    assert_error(other.get(f"/api/v1/packs/{order['id']}"), 404, "pack_not_found")
    assert_error(other.get(f"/api/v1/packs/{order['id']}/archive"), 404, "pack_not_found")
    assert_error(api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": templates[0].id}),
                 402, "no_render_credits")


def test_the_real_plan_spreads_100_images_over_the_templates_of_each_gender(services):
    plan = config.DEFAULT_SKUS["pack_100"]["render_plan"]
    assert plan == {"images": 100, "batch": 10}
    batches = packs.batches(plan)
    assert len(batches) == 10 and [slot for batch in batches for slot in batch] == list(range(100))
    for gender in ("female", "male"):
        own = {t.id for t in services.catalog.filter(gender=gender)}
        spread = packs.spread(services.catalog, gender, plan["images"])
        uses = Counter(spread)
        assert set(uses) == own  # every template of the gender, none of the other
        assert max(uses.values()) - min(uses.values()) <= 1
        for batch in batches:  # no template twice in a batch
            assert len({spread[slot] for slot in batch}) == len(batch)
        # The first batch (what a user sees first) shows every category.
        assert {services.catalog.get(spread[slot]).category for slot in batches[0]} == set(
            services.catalog.categories())
    # The shares of the price add up to it exactly, whatever the split.
    assert packs.slots_amount(990, 100, range(100)) == 990
    assert packs.slots_amount(990, 100, range(10)) + packs.slots_amount(990, 100, range(10, 100)) == 990


def test_a_delivered_image_is_one_rule_as_a_predicate_and_as_a_query(services):
    """What the archive, an album's withdrawal and a batch's settlement count as delivered (content_checks.DELIVERED_IMAGE, a
    MongoDB filter) is what content_checks.image_delivered says of each image document: for every verdict an image can
    carry, and for an image from before the checks (no verdict)."""
    # A new image is pending; apply_image_verdict writes the check's state when it counts (pass; review and timeout
    # when their policy accepts), refused otherwise.
    verdicts = ["pending", "refused", "pass", "review", "timeout", None]
    services.db.images.insert_many([{"_id": f"im_{verdict}", "content_id": f"probe_{verdict}", "probe": True,
                                     **({"content_check": verdict} if verdict else {})} for verdict in verdicts])
    queried = {i["_id"] for i in services.db.images.find({"probe": True, **content_checks.DELIVERED_IMAGE})}
    predicted = {i["_id"] for i in services.db.images.find({"probe": True}) if content_checks.image_delivered(i)}
    assert queried == predicted == {"im_pass", "im_review", "im_timeout", "im_None"}


@pytest.mark.parametrize("settings_overrides", [{}])
def test_the_real_plan_writes_ten_batches_once(login, user_photos, drain, services, sim):
    api, avatar = _pack_avatar(login, user_photos, drain, "xena")
    order = _buy_pack(api, sim, avatar["id"])
    _train_only(services)
    written = list(services.db.renders.find({"order_id": order["id"]}))
    assert len(written) == 10 and {r["state"] for r in written} == {"queued"}
    assert sorted(len(r["pack_slots"]) for r in written) == [10] * 10
    assert renders.start_pack(services, order["id"]) == 0
    services.db.orders.update_one({"_id": order["id"]}, {"$unset": {"pack_started_at": ""}})  # a crash before it
    assert renders.start_pack(services, order["id"]) == 0  # the same ids: nothing written twice
    assert services.db.renders.count_documents({"order_id": order["id"]}) == 10
    assert _pack(api, order["id"])["batches_pending"] == 10
    # MongoDB records the batches owed: Redis losing every job, the sweep queues them again.
    services.redis.flushall()
    assert sweeper.sweep(services).get("render_requeued") == 10
    assert len(tasks.queue(services, tasks.RENDER).get_job_ids()) == 10
    # A process that died between training the avatar and writing its batches: the sweep writes them.
    services.db.renders.delete_many({"order_id": order["id"]})
    services.db.orders.update_one({"_id": order["id"]}, {"$unset": {"pack_started_at": ""}})
    assert sweeper.sweep(services).get("pack_started") == 1
    assert services.db.renders.count_documents({"order_id": order["id"], "state": "queued"}) == 10


# -------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("settings_overrides", [{"skus": SKUS, "render_max_steps": 1,
                                                 "render_max_candidates": 1, "pack_candidates_per_image": 1,
                                                 "fault_render_failures": 1, "render_retries": 1}])
def test_a_batch_that_fails_once_is_retried(login, user_photos, drain, services, sim):
    api, avatar = _pack_avatar(login, user_photos, drain, "yara")
    order = _buy_pack(api, sim, avatar["id"])
    drain()
    done = _pack(api, order["id"])
    assert (done["phase"], done["images_delivered"]) == ("done", 6)
    for batch in services.db.renders.find({"order_id": order["id"]}):
        assert batch["attempts"] == 2 and [h["to"] for h in batch["history"]][:3] == ["queued", "rendering", "queued"]
    assert _order(services, order["id"])["refunds"] == []


def test_a_failed_batch_is_drawn_again_free(login, user_photos, drain, services, sim):
    api, avatar = _pack_avatar(login, user_photos, drain, "zoe")
    order = _buy_pack(api, sim, avatar["id"])
    _train_only(services)
    first = services.db.renders.find_one({"order_id": order["id"], "pack_index": 0})
    for attempt in range(services.settings.render_retries + 1):  # every attempt fails for a technical reason
        assert renders.begin_render(services, first["_id"], f"job-{attempt}") is not None
        outcome = renders.fail_render(services, first["_id"], "boom")
    assert outcome == "failed"
    redraw = services.db.renders.find_one({"pack_redraw_of": first["_id"]})
    assert redraw["pack_slots"] == first["pack_slots"] and redraw["pack_templates"] == first["pack_templates"]
    assert not redraw["charged"] and redraw["state"] == "queued"
    # Once: settling the failed batch again, or a sweep, draws nothing more.
    renders.settle_failed_render(services, services.db.renders.find_one({"_id": first["_id"]}))
    sweeper.sweep(services)
    assert services.db.renders.count_documents({"pack_redraw_of": first["_id"]}) == 1
    drain()
    done = _pack(api, order["id"])
    assert (done["phase"], done["images_delivered"], done["images_refunded"]) == ("done", 6, 0)
    assert [(b["index"], b["state"], b["redraw_of"]) for b in done["batches"]] == [
        (0, "failed", None), (0, "done", first["_id"]), (1, "done", None)]
    assert _order(services, order["id"])["refunds"] == []


def test_two_verdicts_landing_together_settle_their_batch_as_delivered(login, user_photos, drain, services, sim):
    """The race `make demo` found: each verdict decides its image, then records it on the batch; the one that finds
    nothing pending may still hold a batch naming only its own image. The batch is delivered, not redrawn."""
    api, avatar = _pack_avatar(login, user_photos, drain, "rita")
    order = _buy_pack(api, sim, avatar["id"])
    sim.media_check_rule("pass", openid=sim.openid_of("rita"), hold=True)
    drain()
    batch = services.db.renders.find_one({"_id": packs.batch_id(order["id"], 0)})
    *first, last = batch["image_ids"]
    services.db.images.update_many({"_id": {"$in": batch["image_ids"]}}, {"$set": {"content_check": "pass"}})
    services.db.renders.update_one({"_id": batch["_id"]}, {"$addToSet": {"delivered_image_ids": {"$each": first}}})
    seen_by_the_first = services.db.renders.find_one({"_id": batch["_id"]})
    assert renders.settle_batch(services, seen_by_the_first) == "delivered"
    assert services.db.renders.find_one({"_id": packs.redraw_id(batch["_id"])}) is None
    assert services.db.renders.find_one({"_id": batch["_id"]})["pack_lost_slots"] == []


def test_an_image_the_redraw_cannot_deliver_is_refunded_its_share_once(login, user_photos, drain, services, sim):
    api, avatar = _pack_avatar(login, user_photos, drain, "abby")
    order = _buy_pack(api, sim, avatar["id"])
    openid = sim.openid_of("abby")
    # The preview drawn at payment is checked first and passes; then the first portrait checked is risky, the next
    # five pass, and the free redraw of the lost one is risky too.
    sim.media_check_rule("pass", openid=openid, count=1)
    sim.media_check_rule("risky", openid=openid, count=1)
    sim.media_check_rule("pass", openid=openid, count=5)
    sim.media_check_rule("risky", openid=openid, count=1)
    drain()
    done = _pack(api, order["id"])
    assert (done["phase"], done["images_delivered"], done["images_refunded"]) == ("done", 5, 1)
    redraw = next(b for b in done["batches"] if b["redraw_of"])
    assert (redraw["images_owed"], redraw["images_refunded"]) == (1, 1)
    lost = services.db.renders.find_one({"_id": redraw["id"]})["pack_slots"]
    share = packs.slots_amount(990, SMALL_PLAN["images"], lost)
    assert share == 165
    stored = _order(services, order["id"])
    assert [(r["amount"], r["reason"], r["out_refund_no"]) for r in stored["refunds"]] == [
        (share, "pack_undeliverable", refunds.batch_refund_number(order["id"], redraw["id"]))]
    sim.settle_refunds()
    assert _order(services, order["id"])["state"] == "fulfilled"  # the rest was delivered
    # Exactly once: settling again, or a sweep, refunds nothing more.
    batch = services.db.renders.find_one({"_id": redraw["id"]})
    assert renders.settle_batch(services, batch) == "already_settled"
    assert renders._refund_slots(services, batch, lost) == "refunded"
    sweeper.sweep(services)
    assert len(_order(services, order["id"])["refunds"]) == 1
    assert [(r["status"], r["amount"]["refund"]) for r in sim.refunds()] == [("SUCCESS", share)]


@pytest.mark.parametrize("settings_overrides", [{"skus": SKUS, "render_max_steps": 1,
                                                 "render_max_candidates": 1, "fault_render_failures": 2,
                                                 "render_retries": 1}])
def test_a_pack_that_cannot_be_delivered_is_refunded_batch_by_batch_in_full(login, user_photos, drain, services,
                                                                            sim):
    api, avatar = _pack_avatar(login, user_photos, drain, "bea")
    order = _buy_pack(api, sim, avatar["id"])
    drain()  # every batch fails twice, and so does each one's free redraw
    stored = _order(services, order["id"])
    assert services.db.renders.count_documents({"order_id": order["id"], "state": "failed"}) == 4
    # The first batch's share is on its way; the second waits for it (one refund at a time per order).
    assert [(r["amount"], r["reason"]) for r in stored["refunds"]] == [(495, "pack_undeliverable")]
    assert _pack(api, order["id"])["phase"] == "rendering"
    sim.settle_refunds()
    assert _order(services, order["id"])["state"] == "paid"
    healed = sweeper.sweep(services)
    assert healed.get("render_settled") == 1, healed
    drain()
    sim.settle_refunds()
    final = _order(services, order["id"])
    assert final["state"] == "refunded"
    assert sorted(r["amount"] for r in final["refunds"]) == [495, 495]
    assert len({r["out_refund_no"] for r in final["refunds"]}) == 2
    shown = _pack(api, order["id"])
    assert (shown["phase"], shown["images_delivered"], shown["images_refunded"]) == ("done", 0, 6)
    sweeper.sweep(services)
    assert len(_order(services, order["id"])["refunds"]) == 2
