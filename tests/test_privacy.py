"""Privacy by design, proved by scanning every store: what the service promises to delete is gone everywhere."""
from __future__ import annotations

import io
import pickle
import shutil
import zlib
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image

import jobs.training
from portraits import keys, logs, renders, states, tasks
from portraits.privacy import user_ref
from portraits.store.vault import KeyShredded
from tests.race import write_after_read
from store_scan import Finding, StoreScanner, photo_samples, places
from tests.conftest import phone_for
from tests.test_queue import quick_paid_avatar


def personal_needles(services, api, user_photos, name: str = "alice") -> dict:
    """The user's id, openid, phone number, samples of every uploaded photo and of every stored crop (encoded and as pixels) and
    the embeddings' bytes. Call while the crops still exist."""
    user = services.db.users.find_one({"_id": api.user_id})
    # The phone bound at login (tests.conftest) is sealed: any plain copy of it, anywhere, is a finding.
    needles = {"user_id": api.user_id, "openid": user["openid"], "phone": phone_for(name)}
    for index, data in enumerate(user_photos[:4]):
        needles.update(photo_samples(data, f"photo{index}"))
    for avatar in services.db.avatars.find({"user_id": api.user_id}):
        for photo in avatar["photos"]:
            if not photo.get("crop_key"):
                continue
            png = services.sealed.get(api.user_id, photo["crop_key"])
            needles.update(photo_samples(png, f"crop-{photo['id']}"))
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).tobytes()
            needles.update(photo_samples(pixels, f"crop-pixels-{photo['id']}"))
            embedding = services.sealed.get(api.user_id, photo["embedding_key"])
            needles[f"embedding-{photo['id']}"] = embedding[:32]
    assert sum(name.startswith("crop-") for name in needles) >= 8
    return needles


def photo_findings(findings: set[Finding]) -> set[Finding]:
    return {f for f in findings if f.needle not in ("user_id", "openid")}


def job_payloads(redis) -> list[tuple]:
    """(function name, args, kwargs, meta) of every RQ job hash in Redis."""
    payloads = []
    for key in redis.scan_iter("rq:job:*"):
        if redis.type(key) != b"hash":
            continue
        job = redis.hgetall(key)
        if b"data" not in job:
            continue
        func, _instance, args, kwargs = pickle.loads(zlib.decompress(job[b"data"]))
        meta = pickle.loads(job[b"meta"]) if job.get(b"meta") else {}
        payloads.append((func, args, kwargs, meta))
    return payloads


def assert_only_ids(value, openid: str) -> None:
    if isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        raise AssertionError(f"binary data in a job payload: {type(value).__name__}")
    if isinstance(value, str):
        assert len(value) <= 64 and openid not in value, value
    elif isinstance(value, dict):
        for k, v in value.items():
            assert_only_ids(k, openid)
            assert_only_ids(v, openid)
    elif isinstance(value, (list, tuple)):
        for v in value:
            assert_only_ids(v, openid)
    else:
        assert value is None or isinstance(value, (int, float, bool)), type(value)


def test_from_upload_to_delete_me_no_photo_survives_anywhere(paid_avatar, drain, services, user_photos, monkeypatch,
                                                            tmp_path):
    trained_with = {}
    real_train = jobs.training.train_lora

    def recording_train(pipe, images, caption, config, **kw):
        trained_with.update(caption=caption, sizes={image.size for image in images}, count=len(images))
        return real_train(pipe, images, caption, config, **kw)

    monkeypatch.setattr(jobs.training, "train_lora", recording_train)
    api, avatar, order = paid_avatar(gender="male")
    openid = services.db.users.find_one({"_id": api.user_id})["openid"]
    template_ids = list(services.settings.subscribe_templates.values())
    assert api.post("/api/v1/subscriptions", json={"grants": {template_ids[0]: "accept"}}).status_code in (200, 201)
    needles = personal_needles(services, api, user_photos)
    scanner = StoreScanner(services)

    # Before training the crops exist, sealed: the scanner finds no plain photo or crop bytes even now.
    assert photo_findings(scanner.scan(needles)) == set()

    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
    # Captions come from the gender the user chose; the training images are the aligned crops.
    size = services.settings.train_resolution
    assert trained_with == {"caption": "a photo of sks man", "sizes": {(size, size)}, "count": 4}
    template = next(t for t in api.get("/api/v1/templates?gender=male").get_json() if t["category"] == "urban")
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template["id"]}).get_json()
    drain()
    done = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert done["state"] == "done" and done["images"]

    # After training: no photo, crop or embedding bytes anywhere; ids only in the user's own records.
    findings = scanner.scan(needles)
    assert photo_findings(findings) == set()
    assert places(findings, "user_id") == {
        ("mongo", "users"), ("mongo", "user_keys"), ("mongo", "avatars"), ("mongo", "orders"),
        ("mongo", "renders"), ("mongo", "images"),
        # The subscribe messages owed to the user (their jobs carry only the message's id).
        ("mongo", "messages"),
        # WeChat's content checks of their photos and portraits (deleted with the user).
        ("mongo", "content_checks"),
        # The record of their avatar's preview (portraits.previews; deleted with the user).
        ("mongo", "previews"),
        # Sealed blobs are filed under the user's id: the LoRA, the identity pivot and the labelled images.
        ("blobs", "blobs/users/*/avatars/*/lora.safetensors"), ("blobs", "blobs/users/*/avatars/*/pivot.f64"),
        ("blobs", "blobs/users/*/images/*.png"),
        # Queue subjects name their owner; no job does.
        ("redis", "portraits:subject:avatar:*"), ("redis", "portraits:subject:render:*"),
    }, findings
    # The openid is in the user, their orders and their content checks (mediaCheckAsync names the user; deleted with
    # them).
    assert places(findings, "openid") == {("mongo", "users"), ("mongo", "orders"), ("mongo", "content_checks")}
    # Every blob is sealed (the pivot and the images too), none is a plain file.
    for key in services.blobs.keys():
        assert services.blobs.get(key).startswith(b"PV1"), key
    # Job arguments, kwargs and meta carry ids and numbers, never bytes or the openid.
    payloads = job_payloads(services.redis)
    assert {func.rsplit(".", 1)[-1] for func, *_ in payloads} >= {"train_avatar", "render_portraits", "send_message"}
    for func, args, kwargs, meta in payloads:
        assert_only_ids([args, kwargs, meta], openid)

    # Export: everything held about the user.
    export = api.get("/api/v1/me/export").get_json()
    face = export["user"]["consents"]["face_processing"]
    assert face["version"] == services.settings.consent_version and face["given_at"]
    assert template_ids[0] in export["user"]["subscriptions"]  # (the grant itself was used by a message)
    assert [a["id"] for a in export["avatars"]] == [avatar["id"]]
    assert all(p["accepted"] and p["reasons"] == [] for p in export["avatars"][0]["photos"])
    assert [o["id"] for o in export["orders"]] == [order["id"]]
    assert [r["id"] for r in export["renders"]] == [render["id"]]
    assert {i["id"] for i in export["images"]} == {i["id"] for i in done["images"]}
    assert all(api.get(i["url"]).status_code == 200 for i in export["images"])
    # The preview (superseded by these portraits, its image deleted) keeps its label-log row, as every labelled image.
    preview_content_id = keys.image_ids(keys.preview_subject(avatar["id"]), 1, 0)[1]
    assert export["avatars"][0]["preview"]["state"] == "superseded"
    assert {e["content_id"] for e in export["label_log"]} == {i["content_id"] for i in done["images"]} | {
        preview_content_id}

    # A "backup" of a sealed blob taken before the deletion.
    lora_key = f"users/{api.user_id}/avatars/{avatar['id']}/lora.safetensors"
    backup = tmp_path / "backup.bin"
    shutil.copyfile(services.settings.blob_root / lora_key, backup)
    assert services.vault.open(api.user_id, backup.read_bytes(), lora_key)  # readable while the user exists

    assert api.delete("/api/v1/me").status_code == 202
    assert api.get("/api/v1/me/export").status_code == 401  # the token died with the user
    findings = scanner.scan(needles)
    assert findings == set(), findings
    with pytest.raises(KeyShredded):  # crypto-shredding: the backup copy cannot be opened any more
        services.vault.open(api.user_id, backup.read_bytes(), lora_key)

    # Payment records stay, with the user replaced by the one-way reference; the label log keeps only that too.
    ref = user_ref(services, api.user_id)
    kept = services.db.orders.find_one({"_id": order["id"]})
    assert kept["user_id"] == ref and "openid" not in kept and kept["amount"] == 990
    found = places(scanner.scan({"ref": ref}))
    # ...and the rate-limit counters of the last minutes (miniapp_api.throttle), which never name the user by id.
    counters = {place for place in found if place[0] == "redis" and place[1].startswith("portraits:limits:")}
    assert found - counters == {("mongo", "orders"), ("mongo", "label_log")}


def test_consent_withdrawal_erases_the_face_data_cancels_queued_jobs_and_revokes_tokens(
        paid_avatar, services, user_photos, sim, login):
    api, avatar, order = paid_avatar()
    openid = services.db.users.find_one({"_id": api.user_id})["openid"]
    needles = personal_needles(services, api, user_photos)
    assert any(f.startswith("rq:job:train-") for f in (k.decode() for k in services.redis.keys("rq:job:*")))

    withdrawn = api.delete("/api/v1/consents/face_processing")
    assert withdrawn.status_code == 200, withdrawn.get_json()
    assert withdrawn.get_json()["deleted"]["avatars"] == 1
    # Sessions end with the consent (decided: the account stays, its tokens do not).
    assert api.get("/api/v1/consents").status_code == 401

    findings = StoreScanner(services).scan(needles)
    assert photo_findings(findings) == set()
    # The account still exists: its own record, its (new, empty) data key and its payment record.
    assert places(findings, "user_id") == {("mongo", "users"), ("mongo", "user_keys"), ("mongo", "orders")}
    assert places(findings, "openid") == {("mongo", "users"), ("mongo", "orders")}
    assert not services.redis.keys("rq:job:train-*") and not services.redis.keys("portraits:subject:*")
    # The paid order whose avatar is gone is refunded.
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "refunding"

    again = login("alice")  # the same WeChat user logs in again and may consent anew
    assert again.user_id == api.user_id
    assert again.get(f"/api/v1/avatars/{avatar['id']}").status_code == 404
    assert again.post("/api/v1/avatars", json={"gender": "female"}).status_code == 201


def test_a_token_revoked_by_withdrawal_cannot_poll_the_queue_of_a_later_avatar(services, login, sim):
    """The queue poll checks tokens without MongoDB; the generation kept with the queued avatar stands in."""
    from tests.test_queue import quick_paid_avatar

    revoked = login("alice")
    assert revoked.delete("/api/v1/consents/face_processing").status_code == 200
    current = login("alice")  # logs in again and consents anew
    avatar, _ = quick_paid_avatar(services, current, sim)
    assert current.get(f"/api/v1/avatars/{avatar['_id']}/queue").status_code == 200
    refused = revoked.get(f"/api/v1/avatars/{avatar['_id']}/queue")
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "invalid_token"
    assert revoked.get(f"/api/v1/avatars/{avatar['_id']}").status_code == 401  # the same answer as the full route


@pytest.mark.parametrize("settings_overrides", [{"collecting_ttl_s": 3600}])
def test_avatars_left_collecting_are_purged_by_the_periodic_job(login, services, user_photos, upload_judged):
    from jobs.maintenance import purge_stale_avatars
    from jobs.periodic import PERIODIC

    assert purge_stale_avatars in [func for func, _ in PERIODIC]
    api = login()
    stale = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()["id"]
    fresh = api.post("/api/v1/avatars", json={"gender": "female"}).get_json()["id"]
    assert upload_judged(api, stale, user_photos[0], role="front")["accepted"]
    assert upload_judged(api, fresh, user_photos[1], role="front")["accepted"]
    services.db.avatars.update_one({"_id": stale}, {"$set": {"updated_at": states.now() - timedelta(seconds=3601)}})

    assert purge_stale_avatars() == 1
    assert api.get(f"/api/v1/avatars/{stale}").status_code == 404
    assert not list(services.blobs.keys(f"users/{api.user_id}/avatars/{stale}/"))
    assert len(list(services.blobs.keys(f"users/{api.user_id}/avatars/{fresh}/"))) == 2
    assert purge_stale_avatars() == 0


def test_the_scanner_finds_what_was_planted_in_any_store(login, services, user_photos):
    api = login()
    openid = services.db.users.find_one({"_id": api.user_id})["openid"]
    sample = photo_samples(user_photos[0], "photo")
    scanner = StoreScanner(services)
    assert photo_findings(scanner.scan(sample)) == set()

    services.redis.hset("leak:hash", "who", f"openid={openid}")
    services.redis.rpush("leak:list", b"x" + next(iter(sample.values())) + b"y")
    services.redis.set("leak:job", zlib.compress(pickle.dumps(("f", None, (api.user_id + "-arg",), {}))))
    services.blobs.put("stray/photo.jpg", user_photos[0])
    services.db.stray.insert_one({"note": b"..." + list(sample.values())[1]})
    found = scanner.scan({"openid": openid, "user_id": api.user_id, **sample})
    assert Finding("redis", "leak:hash", "openid") in found
    assert Finding("redis", "leak:job", "user_id") in found
    assert {f.where for f in photo_findings(found)} == {"leak:list", "blobs/stray/photo.jpg", "stray"}


def test_deleting_a_user_closes_their_unpaid_order_at_wechat_pay_too(ready_avatar, services, sim):
    api, avatar = ready_avatar("olga")
    order = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}).get_json()
    assert api.delete("/api/v1/me").status_code == 202
    assert [o["trade_state"] for o in sim.orders() if o["out_trade_no"] == order["id"]] == ["CLOSED"]
    assert services.db.orders.find_one({"_id": order["id"]})["state"] == "closed"


def test_withdrawing_a_consent_never_given_changes_nothing_and_login_keeps_working(login, client, sim):
    api = login("never", consent=False)
    withdrawn = api.delete("/api/v1/consents/face_processing")
    assert withdrawn.status_code == 200, withdrawn.get_json()
    assert withdrawn.get_json()["consents"] == {"face_processing": None}
    assert withdrawn.get_json()["deleted"]["tokens_revoked"] is False
    assert api.get("/api/v1/consents").status_code == 200  # the token still works
    again = client.post("/api/v1/auth/login", json={"code": sim.login_code("never")})
    assert again.status_code == 200 and again.get_json()["user"]["consents"] == {"face_processing": None}


def test_a_render_running_at_delete_me_leaves_no_failed_job_and_no_trace_of_the_user(
        services, login, sim, drain, monkeypatch, caplog):
    api = login("nora")
    avatar, _ = quick_paid_avatar(services, api, sim)
    drain()
    template = next(t for t in api.get("/api/v1/templates?gender=female").get_json())
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["_id"], "template_id": template["id"]})
    assert render.status_code == 201, render.get_json()
    real_keep = renders.keep_candidates
    erased = []

    def user_deletes_the_account_mid_render(services_, render_, kept):
        erased.append(api.delete("/api/v1/me").status_code)
        return real_keep(services_, render_, kept)  # storing the images now fails: the user's key is shredded

    monkeypatch.setattr(renders, "keep_candidates", user_deletes_the_account_mid_render)
    caplog.set_level("DEBUG")
    # as our processes configure them: pymongo's DEBUG command log quotes documents (seen once MONGO_URI is a server)
    for name, held_at in logs.DOCUMENT_QUOTING_LOGGERS.items():
        caplog.set_level(held_at, logger=name)
    drain()
    assert erased == [202]
    assert tasks.queue(services, tasks.RENDER).failed_job_registry.count == 0
    leftovers = [key for key in services.redis.scan_iter("*")
                 if api.user_id.encode() in key or any(api.user_id.encode() in v for v in _values(services, key))]
    assert leftovers == []
    assert api.user_id not in caplog.text and phone_for("nora") not in caplog.text


def _values(services, key) -> list[bytes]:
    kind = services.redis.type(key)
    if kind == b"string":
        return [services.redis.get(key) or b""]
    if kind == b"hash":
        return list(services.redis.hgetall(key).values())
    if kind == b"list":
        return services.redis.lrange(key, 0, -1)
    if kind == b"set":
        return list(services.redis.smembers(key))
    if kind == b"zset":
        return [member for member, _ in services.redis.zrange(key, 0, -1, withscores=True)]
    return []


def test_deleting_a_user_keeps_what_a_payment_write_put_on_their_order_meanwhile(paid_avatar, services, monkeypatch):
    api, _, order = paid_avatar("nora")
    user = services.db.users.find_one({"_id": services.db.orders.find_one({"_id": order["id"]})["user_id"]})
    # A refund callback (or the reconciler) writes the order between the erasure's read and its write.
    meanwhile = write_after_read(monkeypatch, services.db.orders, {"user_id": user["_id"]},
                                 lambda: services.db.orders.update_one({"_id": order["id"]},
                                                                         {"$set": {"refund_note": "written meanwhile"}}))
    assert api.delete("/api/v1/me").status_code == 202
    assert len(meanwhile) == 1
    kept = services.db.orders.find_one({"_id": order["id"]})
    assert kept["refund_note"] == "written meanwhile"
    assert kept["user_erased"] is True and "openid" not in kept
    assert user["_id"] not in repr(kept) and user["openid"] not in repr(kept)
    assert kept["user_id"] == user_ref(services, user["_id"])
