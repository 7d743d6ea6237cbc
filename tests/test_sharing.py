"""Share posters carry WeChat's mini-program code, never a QR code of ours: while WeChat cannot draw the code the
poster is pending (202) and owed to a job with backoff and to the sweep, and once WeChat recovers the retry makes
the code and the poster carries it."""
from __future__ import annotations

import io
from datetime import timedelta

import pytest
from PIL import Image

from models import posters
from portraits import content_checks, keys, renders, states, sweeper, tasks
from store_scan import StoreScanner
from tests.qr_support import decode_qr

CODE_API = "/wxa/getwxacodeunlimit"


@pytest.fixture
def settings_overrides():
    return {"share_code_backoff_s": (0,)}  # one immediate retry per round: a drain runs it, no waiting


def _image(services, api, drain) -> dict:
    """A labelled portrait stored for the user as a render stores it, and passed by WeChat's content check as a
    finished render's are (only then is it shared)."""
    render = {"_id": "rd_" + "5a" * 10, "attempts": 1, "user_id": api.user_id, "template_id": "urban_neon_night"}
    image_id = renders.store_labelled(services, render, Image.new("RGB", (256, 320), (90, 60, 120)), 0.9, 0)
    content_checks.request_check(services, "image", image_id, user=services.db.users.find_one({"_id": api.user_id}),
                                 blob_key=keys.image(api.user_id, image_id), render_id=render["_id"])
    drain()
    assert services.db.images.find_one({"_id": image_id})["content_check"] == "pass"
    return {"id": image_id, "poster_url": f"/api/v1/images/{image_id}/poster"}


def _mini_program_code(response) -> str:
    return decode_qr(Image.open(io.BytesIO(response.data)).crop(posters.CODE_BOX))


def test_a_poster_waits_for_the_mini_program_code_and_is_made_once_wechat_recovers(login, services, sim, drain):
    api = login()
    image = _image(services, api, drain)
    sim.set_fault(CODE_API, "5xx", count=3)  # the poster's own try, then the job and its one retry

    pending = api.get(image["poster_url"])
    assert pending.status_code == 202
    assert pending.get_json() == {"state": "pending", "reason": "wxacode_pending", "retry_after_s": 1}
    assert pending.headers["Retry-After"] == "1" and pending.headers["Cache-Control"] == "no-store"
    owed = services.db.images.find_one({"_id": image["id"]})["share_code"]
    assert owed["state"] == "pending" and owed["attempts"] == 1

    drain()  # the job and its retry meet the two faults left: the code is still owed, the poster still pending
    assert services.db.images.find_one({"_id": image["id"]})["share_code"]["attempts"] == 3
    assert tasks.job_status(services, keys.share_code_job_id(image["id"])) == "failed"
    assert api.get(image["poster_url"]).status_code == 202  # and that poll did not ask WeChat (no fault left)

    # Retries spent: the sweep starts them again once the debt is older than its grace; WeChat has recovered.
    services.db.images.update_one({"_id": image["id"]},
                                  {"$set": {"share_code.since": states.now() - timedelta(hours=1)}})
    assert sweeper.sweep(services).get("share_code_requeued") == 1
    drain()
    assert services.db.images.find_one({"_id": image["id"]})["share_code"]["state"] == "ready"

    poster = api.get(image["poster_url"])
    assert poster.status_code == 200 and poster.mimetype == "image/png"
    assert _mini_program_code(poster) == f"pages/index/index?scene=i={image['id']}"  # what getwxacodeunlimit drew
    assert services.blobs.get(keys.share_code(api.user_id, image["id"])).startswith(b"PV1")  # kept sealed

    sim.set_fault(CODE_API, "5xx", count=1)  # kept: a later outage does not touch this poster
    assert api.get(image["poster_url"]).status_code == 200
    assert sweeper.sweep(services).get("share_code_requeued") is None


def test_a_poster_made_at_once_asks_wechat_once(login, services, sim, drain):
    api = login()
    image = _image(services, api, drain)
    first = api.get(image["poster_url"])
    assert first.status_code == 200 and _mini_program_code(first) == f"pages/index/index?scene=i={image['id']}"
    sim.set_fault(CODE_API, "5xx", count=1)
    assert api.get(image["poster_url"]).status_code == 200  # a second call to WeChat would have met the fault


def test_an_owed_code_goes_with_its_user(login, services, sim, drain):
    api = login()
    image = _image(services, api, drain)
    sim.set_fault(CODE_API, "5xx", count=1)
    assert api.get(image["poster_url"]).status_code == 202
    assert api.delete("/api/v1/me").status_code == 202
    assert tasks.job_status(services, keys.share_code_job_id(image["id"])) == "expired"  # its job deleted too
    drain()
    assert StoreScanner(services).scan({"image_id": image["id"], "user_id": api.user_id}) == set()
