"""The preview while the LoRA waits (issue 17 part 4): paid -> a preview from the front photo through a tiny random
IP-Adapter read by diffusers' load_ip_adapter, content-checked by the simulator's WeChat and labelled as a preview
-> replaced once the trained portraits are delivered; its failure changes nothing paid; erasure removes it."""
from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
import pytest
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from PIL import Image

from jobs.worker import EmbeddedWorker, drain as drain_queues
from models.labels import PREVIEW_KIND, read_label
from portraits import keys, previews, states, sweeper, tasks

PREVIEW_AND_CHECKS = (tasks.PREVIEW, tasks.DEFAULT)


@pytest.fixture
def settings_overrides(request):
    return {"render_max_steps": 1, "render_max_candidates": 2, **getattr(request, "param", {})}


def show_preview(services, sim) -> None:
    """Only what a preview needs runs: the GPU's preview queue, the content-check submissions and their pushes
    (the training stays queued, as it would behind other users)."""
    for _ in range(5):
        ran = drain_queues(services, queues=PREVIEW_AND_CHECKS)
        if not sim.flush_media_checks()["delivered"] and not ran:
            break


def avatar_of(api, avatar_id: str) -> dict:
    return api.get(f"/api/v1/avatars/{avatar_id}").get_json()


def render_and_deliver(api, avatar_id: str, drain) -> dict:
    render = api.post("/api/v1/renders", json={"avatar_id": avatar_id, "template_id": "urban_neon_night"})
    assert render.status_code == 201, render.get_json()
    drain()
    return api.get(f"/api/v1/renders/{render.get_json()['id']}").get_json()


# --- the model -----------------------------------------------------------------------------------------------


def test_the_tiny_adapter_is_read_by_load_ip_adapter_and_the_front_photo_steers_the_draw(tiny_previewer,
                                                                                           tiny_pipeline):
    pipe = tiny_previewer.pipe
    assert pipe is not tiny_pipeline and pipe.unet is not tiny_pipeline.unet
    assert pipe.image_encoder is not None and pipe.unet.encoder_hid_proj is not None
    cross = [p for name, p in pipe.unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert cross and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross)
    # The renderer's UNet is left as it was: plain attention, no image projection.
    assert tiny_pipeline.unet.encoder_hid_proj is None
    assert not any(isinstance(p, IPAdapterAttnProcessor2_0) for p in tiny_pipeline.unet.attn_processors.values())

    def draw(colour):
        return np.asarray(tiny_previewer.render(face=Image.new("RGB", (64, 64), colour), prompt="a portrait of a woman",
                                                steps=1, width=64, height=64, seed=3), dtype=float)

    warm, cold, warm_again = draw((220, 160, 120)), draw((20, 60, 230)), draw((220, 160, 120))
    assert np.array_equal(warm, warm_again)
    assert not np.array_equal(warm, cold)


# --- end to end over the API -----------------------------------------------------------------------------------


def test_paying_shows_a_checked_labelled_preview_until_the_trained_portraits_replace_it(services, paid_avatar, sim,
                                                                                         drain):
    api, avatar, order = paid_avatar("petra")
    assert avatar_of(api, avatar["id"])["preview"] == {"state": "pending", "image_id": None, "url": None}
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["preview"]["state"] == "pending"

    show_preview(services, sim)
    shown = avatar_of(api, avatar["id"])
    assert shown["state"] == "queued"  # the training has not started: the preview came first
    preview = shown["preview"]
    assert preview["state"] == "ready" and preview["url"] == f"/api/v1/images/{preview['image_id']}"
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["preview"] == preview
    check = services.db.content_checks.find_one({"_id": keys.content_check_id("preview", preview["image_id"])})
    assert check["state"] == "pass" and check["openid"] == sim.openid_of("petra")

    image = api.get(preview["url"])
    assert image.status_code == 200 and image.mimetype == "image/png"
    label = read_label(image.data)
    assert label["Label"] == "1" and label["Kind"] == PREVIEW_KIND
    size = services.settings.preview_size
    assert Image.open(io.BytesIO(image.data)).size == (size, size)
    assert services.db.label_log.find_one({"content_id": label["ProduceID"]}) is not None

    drain()  # the training; the preview stays until portraits are delivered
    assert avatar_of(api, avatar["id"])["state"] == "trained"
    assert avatar_of(api, avatar["id"])["preview"]["state"] == "ready"

    render = render_and_deliver(api, avatar["id"], drain)
    assert render["state"] == "done" and render["images"]
    assert avatar_of(api, avatar["id"])["preview"] == {"state": "superseded", "image_id": None, "url": None}
    assert api.get(preview["url"]).status_code == 404
    assert not services.blobs.exists(keys.image(api.user_id, preview["image_id"]))
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "fulfilled"


@pytest.mark.parametrize("settings_overrides", [{"fault_preview_failures": 1}], indirect=True)
def test_a_preview_that_fails_to_draw_is_absent_and_the_order_goes_on(services, paid_avatar, sim, drain):
    api, avatar, order = paid_avatar("fiona")
    drain()
    trained = avatar_of(api, avatar["id"])
    assert trained["state"] == "trained" and trained["preview"] is None
    assert services.db.previews.find_one({"_id": avatar["id"]})["failure"] == "InjectedFault"
    render = render_and_deliver(api, avatar["id"], drain)
    assert render["state"] == "done"
    paid = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert paid["state"] == "fulfilled" and paid["refunds"] == [] and paid["preview"] is None


def test_a_preview_the_content_check_refuses_is_deleted_and_the_order_goes_on(services, ready_avatar, sim, drain):
    api, avatar = ready_avatar("rosa")
    sim.media_check_rule("risky", openid=sim.openid_of("rosa"), count=1)  # the next check: the preview
    order = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}).get_json()
    assert sim.pay(order["id"])["delivered"]
    show_preview(services, sim)
    preview = services.db.previews.find_one({"_id": avatar["id"]})
    assert preview["state"] == "failed" and preview["failure"] == "content_risky"
    assert avatar_of(api, avatar["id"])["preview"] is None
    assert api.get(f"/api/v1/images/{preview['image_id']}").status_code == 404
    assert not services.blobs.exists(keys.image(api.user_id, preview["image_id"]))
    drain()
    assert avatar_of(api, avatar["id"])["state"] == "trained"
    assert render_and_deliver(api, avatar["id"], drain)["state"] == "done"
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "fulfilled"


def test_erasure_removes_the_preview_with_everything_else(services, paid_avatar, sim):
    api, avatar, _ = paid_avatar("erin")
    show_preview(services, sim)
    image_id = avatar_of(api, avatar["id"])["preview"]["image_id"]
    export = api.get("/api/v1/me/export").get_json()
    assert image_id in [image["id"] for image in export["images"]]
    assert api.delete("/api/v1/me").status_code == 202
    assert services.db.previews.count_documents({}) == 0
    assert services.db.images.count_documents({"_id": image_id}) == 0
    assert services.db.content_checks.count_documents({"user_id": api.user_id}) == 0
    assert not services.blobs.exists(keys.image(api.user_id, image_id))


def test_a_preview_job_queued_when_its_user_is_erased_is_deleted_with_them(services, paid_avatar):
    api, avatar, _ = paid_avatar("esme")
    preview_queue = tasks.queue(services, tasks.PREVIEW)
    assert preview_queue.count == 1
    assert api.delete("/api/v1/me").status_code == 202
    assert preview_queue.count == 0


def test_an_idle_gpu_worker_draws_the_preview_before_it_starts_the_training(services, paid_avatar):
    api, avatar, _ = paid_avatar("ida")
    gpu = EmbeddedWorker([tasks.queue(services, name) for name in tasks.GPU_WORKER_QUEUES], connection=services.redis)
    assert gpu.work(burst=True, max_jobs=1)
    assert services.db.previews.find_one({"_id": avatar["id"]})["state"] == "checking"
    assert avatar_of(api, avatar["id"])["state"] == "queued"  # the training waits for the next job


# --- the sweep -----------------------------------------------------------------------------------------------


def test_the_sweep_records_a_preview_owed_and_queues_again_one_whose_job_redis_lost(services, paid_avatar, sim):
    api, avatar, _ = paid_avatar("sally")
    # The process died between the avatar's update (preview owed) and the preview's record.
    services.db.previews.delete_one({"_id": avatar["id"]})
    services.db.avatars.update_one({"_id": avatar["id"]}, {"$set": {"preview_owed_at": states.now()}})
    services.redis.flushall()
    assert avatar_of(api, avatar["id"])["preview"]["state"] == "pending"
    assert sweeper.sweep(services).get("preview_requested") == 1
    assert tasks.queue(services, tasks.PREVIEW).count == 1

    tasks.queue(services, tasks.PREVIEW).empty()  # Redis lost the job
    assert sweeper.sweep(services).get("preview_requeued") == 1
    assert sweeper.sweep(services).get("preview_requeued") is None  # once
    show_preview(services, sim)
    assert avatar_of(api, avatar["id"])["preview"]["state"] == "ready"


def test_the_sweep_gives_up_on_a_preview_not_shown_in_time_and_the_late_job_draws_nothing(services, paid_avatar,
                                                                                          monkeypatch):
    api, avatar, order = paid_avatar("tara")
    real_now = states.now
    monkeypatch.setattr(states, "now", lambda: real_now() + previews_timeout(services))
    assert sweeper.sweep(services).get("preview_given_up") == 1
    assert avatar_of(api, avatar["id"])["preview"] is None
    monkeypatch.setattr(states, "now", real_now)
    drain_queues(services, queues=(tasks.PREVIEW,))
    assert services.db.images.count_documents({"kind": PREVIEW_KIND}) == 0
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "paid"


def previews_timeout(services):
    return timedelta(seconds=services.settings.preview_timeout_s + 1)


def test_a_preview_drawn_after_the_portraits_were_delivered_is_thrown_away(services, paid_avatar, sim):
    api, avatar, _ = paid_avatar("vera")
    claimed = previews.begin_preview(services, avatar["id"], "job-test")
    assert previews.supersede(services, avatar["id"])
    assert previews.complete_preview(services, claimed, Image.new("RGB", (32, 32))) == "superseded"
    assert services.db.images.count_documents({"kind": PREVIEW_KIND}) == 0
    assert services.db.content_checks.count_documents({"kind": "preview"}) == 0
    assert avatar_of(api, avatar["id"])["preview"] == {"state": "superseded", "image_id": None, "url": None}


# --- the contract ----------------------------------------------------------------------------------------------


def test_the_openapi_document_describes_the_preview(client):
    schemas = client.get("/api/v1/openapi.json").get_json()["components"]["schemas"]
    preview = next(schema for name, schema in schemas.items() if name.split(".")[-1] == "Preview")
    assert set(preview["properties"]) == {"state", "image_id", "url"}
    assert preview["properties"]["state"]["enum"] == ["pending", "ready", "superseded"]
    for owner in ("Avatar", "Order"):
        schema = next(s for name, s in schemas.items() if name.split(".")[-1] == owner)
        assert "preview" in schema["properties"] and "preview" in schema["required"]
