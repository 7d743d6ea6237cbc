"""The whole paid flow over the HTTP API, on real parts: money in -> GPU work -> portraits out, or money back."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from models.labels import read_label


def test_happy_path_from_login_to_downloaded_labelled_portraits(paid_avatar, drain, services, sim):
    api, avatar, order = paid_avatar()
    assert order["state"] == "created" and order["amount"] == 990
    assert set(order["pay_params"]) == {"appId", "timeStamp", "nonceStr", "package", "signType", "paySign"}

    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "paid"
    queued = api.get(f"/api/v1/avatars/{avatar['id']}").get_json()
    assert queued["state"] == "queued"
    assert queued["queue"]["position"] == 0
    poll = api.get(f"/api/v1/avatars/{avatar['id']}/queue").get_json()
    assert poll["state"] == "queued" and poll["ahead"] == 0 and poll["eta_seconds"] > 0

    drain()
    trained = api.get(f"/api/v1/avatars/{avatar['id']}").get_json()
    assert trained["state"] == "trained", trained
    assert trained["photos_purged"] is True
    assert not list(services.blobs.keys(f"users/{api.user_id}/avatars/{avatar['id']}/photos/"))
    assert services.blobs.exists(f"users/{api.user_id}/avatars/{avatar['id']}/lora.safetensors")

    templates = api.get("/api/v1/templates?gender=female").get_json()
    template = next(t for t in templates if t["category"] == "urban")
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template["id"]})
    assert render.status_code == 201, render.get_json()
    drain()
    done = api.get(f"/api/v1/renders/{render.get_json()['id']}").get_json()
    assert done["state"] == "done", done
    assert done["images"]

    for image in done["images"]:
        download = api.get(image["url"])
        # A portrait downloads as JPEG (PORTRAIT_FORMAT), its metadata label in XMP, as the label reader sees it.
        assert download.status_code == 200 and download.mimetype == "image/jpeg"
        assert download.headers["Content-Disposition"].endswith(f'{image["id"]}.jpg"')
        assert b"<TC260:AIGC>" in Image.open(io.BytesIO(download.data)).info["xmp"]
        label = read_label(download.data)
        assert label["ProduceID"] == image["content_id"]
        assert label["ContentProducer"] == services.settings.provider_name
        assert Image.open(io.BytesIO(download.data)).size == (image["width"], image["height"])
        assert services.db.label_log.count_documents({"content_id": image["content_id"]}) == 1

    final = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert final["state"] == "fulfilled"
    assert final["render_credits"] == 2
    assert final["refunds"] == []


@pytest.mark.parametrize("settings_overrides", [{"fault_train_failures": 99, "train_retries": 2}])
def test_technical_failure_is_retried_then_refunded_exactly_once(paid_avatar, drain, services, sim):
    api, avatar, order = paid_avatar()
    drain()
    failed = api.get(f"/api/v1/avatars/{avatar['id']}").get_json()
    assert failed["state"] == "failed"
    stored = services.db.avatars.find_one({"_id": avatar["id"]})
    assert stored["train_attempts"] == 3  # the first try and two retries

    refunding = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert refunding["state"] == "refunding"
    assert [r["out_refund_no"] for r in refunding["refunds"]] == [f"R{order['id']}-1"]

    # Failure handling run again changes nothing more.
    from portraits.avatars import fail_training as handle_training_failure

    assert handle_training_failure(services, avatar["id"], "again") == "already_handled"
    from portraits.billing import refunds

    assert refunds.request_refund(services, order["id"], reason="again") is None

    sim.settle_refunds()
    refunded = api.get(f"/api/v1/orders/{order['id']}").get_json()
    assert refunded["state"] == "refunded"
    assert refunded["refunds"][0]["state"] == "SUCCESS"

    # The refund callback delivered again changes nothing.
    refund_notes = [n for n in sim.notifications() if n["event_type"].startswith("REFUND.")]
    assert len(refund_notes) == 1
    again = sim.redeliver(refund_notes[0]["id"], copies=3)
    assert all(d["delivered"] for d in again["deliveries"])
    assert [r["status"] for r in sim.refunds()] == ["SUCCESS"]
    history = services.db.orders.find_one({"_id": order["id"]})["history"]
    assert [h["to"] for h in history] == ["created", "paid", "refunding", "refunded"]

    # Photos of a failed avatar go once the refund is settled.
    assert not list(services.blobs.keys(f"users/{api.user_id}/avatars/{avatar['id']}/photos/"))
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["photos_purged"] is True


@pytest.mark.parametrize("settings_overrides", [{"fault_train_failures": 1, "train_retries": 2}])
def test_one_technical_failure_is_retried_and_training_succeeds(paid_avatar, drain, services, sim):
    api, avatar, order = paid_avatar()
    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
    assert services.db.avatars.find_one({"_id": avatar["id"]})["train_attempts"] == 2
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "paid"
    assert sim.refunds() == []
