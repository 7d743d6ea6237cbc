"""The paid flows, offline, in embedded mode (EMBEDDED on), driven over HTTP like the mini-program would.

    python -m miniapp_api.dev.demo --out demo-output

It runs on the topology `make serve` runs (miniapp_api.dev.supervisor): gunicorn with two workers, a GPU worker,
the default and intake workers, the clock and the WeChat simulator as separate processes, sharing the embedded Redis
and a SecantusDB server; the base model is the tiny random-weight Stable Diffusion unless BASE_MODEL_PATH is set.
Three users, at once, each in a thread of their own:
- standard: the portrait pack (`avatar_pack`); after payment, the preview, timed from the payment callback's answer to
  the preview's image downloaded; then the training, a render, the portraits and a share poster;
- express: the express pack (`express_pack`): its lane, position and ETA as the client polls them, and its promise;
- pack: the 100-avatar pack (`pack_100`, three photos): its batches as they are delivered, then its archive. Its plan
  is shrunk for the demo (--pack-images, --pack-batch, --pack-candidates; the output says so) unless asked whole.
The express and pack users pay once the standard user's preview is shown, so that figure is an idle GPU worker's.
Then, once both have a trained avatar, the standard user buys a couple album (`couple_album`) and invites the express
user: the invite card's mini-program code scanned, the invitation accepted with the invitee's own avatar, the joint
portraits (each face drawn with its owner's LoRA) downloaded by the invitee. Its plan is shrunk too (--album-images).
Writes the portraits, the preview, a share poster, the pack's archive and summary.json into --out (the processes'
logs in --out/instance/logs/). Exits 1 when any flow does not end as it should.
"""
from __future__ import annotations

import argparse
import io
import json
import mimetypes
import os
import shutil
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import requests
from PIL import Image

from miniapp_api.dev.supervisor import Topology
from models.posters import CODE_BOX
from models.sample_photos import astronaut_photos
from portraits import config
from portraits.store import db as db_module
from wechat_sim.client import SimulatorClient
from wechat_sim.scan import scanned_scene

PHONES = {"standard": "13800138000", "express": "13800138001", "pack": "13800138002"}
EXPRESS_SKU = "express_pack"
PACK_SKU = "pack_100"
ALBUM_SKU = "couple_album"
# The 100-avatar pack on two CPU cores with the tiny model takes about 5 s per candidate drawn: the whole plan
# (100 images, two candidates each) is over 15 minutes, so the demo draws a smaller plan unless asked for the whole.
DEMO_PACK_PLAN = {"images": 10, "batch": 5}
DEMO_PACK_CANDIDATES = 1
DEMO_ALBUM_PLAN = {"images": 2, "batch": 2}
PRODUCT_PACK_CANDIDATES = config.Settings.model_fields["pack_candidates_per_image"].default
PREVIEW_WAIT_S = 300.0
_print_lock = threading.Lock()


class Timer:
    def __init__(self, label: str = ""):
        self.label = label
        self.steps: dict[str, float] = {}
        self._start = time.monotonic()

    def say(self, line: str) -> None:
        with _print_lock:
            print(f"[{self.label}] {line}" if self.label else line, flush=True)

    def step(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.t0 = time.monotonic()
                timer.say(f"▶ {name}")

            def __exit__(self, *exc):
                timer.steps[name] = round(time.monotonic() - self.t0, 3)
                timer.say(f"  done in {timer.steps[name]:.2f}s")

        return _Step()

    def total(self) -> float:
        return round(time.monotonic() - self._start, 3)


def _check(response: requests.Response, *expected: int) -> dict:
    if response.status_code not in expected:
        raise SystemExit(f"unexpected {response.status_code} from {response.request.method} {response.url}: "
                         f"{response.text[:500]}")
    return response.json() if response.content and response.headers.get("Content-Type", "").startswith(
        "application/json") else {}


def _binary(response: requests.Response) -> bytes:
    if response.status_code != 200:
        raise SystemExit(f"download failed {response.status_code}: {response.text[:300]}")
    return response.content


class Client:
    """One user of the mini-program: their HTTP session with the API and the simulator acting as them in WeChat."""

    def __init__(self, topology: Topology, sim: SimulatorClient, user: str, out: Path):
        self.topology = topology
        self.settings = topology.settings
        self.sim = sim
        self.user = user
        self.out = out
        self.timer = Timer(user)
        self.api = requests.Session()
        self.base = topology.base_url + "/api/v1"
        self.openid = sim.openid_of(user)

    def say(self, line: str) -> None:
        self.timer.say(line)

    def get(self, path: str, *expected: int, **params) -> dict:
        return _check(self.api.get(self.base + path, params=params or None), *(expected or (200,)))

    def post(self, path: str, expected: int, **body) -> dict:
        return _check(self.api.post(self.base + path, **body), expected)

    def download(self, url: str, stem: Path) -> Path:
        """The file at `url` saved as `stem` with the extension of the type it was served as (portraits are JPEG,
        ID photos, previews and posters PNG)."""
        response = self.api.get(self.topology.base_url + url)
        data = _binary(response)
        path = stem.with_suffix(mimetypes.guess_extension(response.headers["Content-Type"].split(";")[0]) or "")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def wait(self, fetch: Callable, done: Callable, describe: Callable, timeout_s: float = 1800.0):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            body = fetch()
            line = describe(body)
            if line != last:
                self.say(f"  {line}")
                last = line
            if done(body):
                return body
            time.sleep(0.25)
        raise SystemExit(f"{self.user}: timed out waiting ({last})")

    # ------------------------------------------------------------------------------------- the shared steps
    def sign_up(self) -> dict:
        """Log in, accept the subscribe messages, bind a phone and give face-processing consent: {phone}."""
        with self.timer.step("log in with a wx.login code"):
            login = self.post("/auth/login", 200, json={"code": self.sim.login_code(self.user)})
            self.api.headers["Authorization"] = f"Bearer {login['token']}"
            templates = self.settings.subscribe_templates
            for template in templates.values():
                self.sim.grant_subscription(self.openid, template)
            self.post("/subscriptions", 200, json={"grants": {t: "accept" for t in templates.values()}})
        with self.timer.step("bind a phone number (getPhoneNumber)"):
            phone = self.post("/me/phone", 200, json={"code": self.sim.phone_code(self.user, PHONES[self.user])})
            self.say(f"  phone {phone['masked']} bound")
        with self.timer.step("give face-processing consent"):
            consent = self.get("/consents")[0]
            self.post("/consents", 201, json={"kind": "face_processing", "version": consent["version"],
                                              "age_14_or_over": True, "own_face": True})
        return phone

    def avatar_with_photos(self, photo_count: int | None, sku: str | None = None, seed: int = 7) -> dict:
        """An avatar collecting for `sku`, `photo_count` photos (None: its product's minimum) uploaded, judged by
        the intake worker and passed by WeChat's content check."""
        avatar = self.post("/avatars", 201, json={"gender": "female", **({"sku": sku} if sku else {})})
        count = photo_count or avatar["min_photos"]
        with self.timer.step(f"create an avatar{f' for {sku}' if sku else ''} and upload {count} photos"):
            for index, photo in enumerate(astronaut_photos(count, seed=seed)):
                verdict = self.post(f"/avatars/{avatar['id']}/photos", 201,
                                    files={"photo": (f"photo{index}.jpg", photo, "image/jpeg")},
                                    data={"role": "front" if index == 0 else "extra"})
                self.say(f"  photo {index + 1:2d}: {verdict['state']}")
        with self.timer.step("the intake worker judges the faces (verdicts land in the photo list)"):
            avatar = self.wait(lambda: self.get(f"/avatars/{avatar['id']}"),
                               lambda b: "photos_judging" not in b["missing"],
                               lambda b: f"{sum(p['state'] == 'judging' for p in b['photos'])} photos judging")
            for index, photo in enumerate(avatar["photos"]):
                mark = "accepted" if photo["accepted"] else "refused: " + ", ".join(photo["reasons"])
                self.say(f"  photo {index + 1:2d}: {mark}")
            self.say(f"  avatar {avatar['id']} is {avatar['state']} with {avatar['accepted_count']} photos")
        with self.timer.step("WeChat's content check of each photo (mediaCheckAsync, verdicts pushed in safe mode)"):
            return self.wait(lambda: self.get(f"/avatars/{avatar['id']}"),
                             lambda b: "content_check_pending" not in b["missing"],
                             lambda b: f"{sum(p['content_check'] == 'pending' for p in b['photos'])} photos "
                                       f"pending, avatar {b['state']}")

    def order(self, avatar: dict, sku: str, platform: str) -> dict:
        with self.timer.step(f"create a {sku} order (rail: PAYMENT_RAIL={self.settings.payment_rail}, "
                             f"platform {platform})"):
            order = self.post("/orders", 201, json={"avatar_id": avatar["id"], "sku": sku, "platform": platform})
            how = (f"package={order['pay_params']['package']}" if order["rail"] == "jsapi"
                   else f"signData={order['xpay_params']['signData']}")
            self.say(f"  order {order['id']} on {order['rail']}: {order['amount']} fen, lane {order['lane']}, {how}")
            return order

    def pay(self, order: dict, platform: str) -> float:
        """Pay in the app; the monotonic time the signed callback (or push) was answered: payment confirmed."""
        with self.timer.step("pay in the app (simulator) and receive the signed callback or push"):
            if order["rail"] == "jsapi":
                paid = self.sim.pay(order["id"])
            else:
                paid = self.sim.xpay_pay(self.openid, order["xpay_params"], platform=platform)
            confirmed = time.monotonic()
            self.say(f"  {order['rail']} notification {paid['notification_id']} answered {paid['status_code']}")
            self.wait(lambda: self.get(f"/orders/{order['id']}"), lambda b: b["state"] == "paid",
                      lambda b: f"order {b['state']}")
            return confirmed

    def preview(self, order: dict, confirmed: float) -> dict:
        """Poll until the preview is shown and its image downloads: {shown_after_payment_s, file} (or why none)."""
        if not self.settings.previews_enabled:
            self.say("  no preview: a real base model without IP_ADAPTER_PATH draws none")
            return {"enabled": False}
        with self.timer.step("the preview while the LoRA waits (drawn on the GPU worker, content-checked)"):
            def shown(body: dict) -> bool:
                preview = body.get("preview") or {}
                return preview.get("state") == "ready" and self.api.get(
                    self.topology.base_url + preview["url"]).status_code == 200

            body = self.wait(lambda: self.get(f"/orders/{order['id']}"), shown,
                             lambda b: f"preview {(b.get('preview') or {}).get('state', 'not yet recorded')}",
                             timeout_s=PREVIEW_WAIT_S)
            seconds = round(time.monotonic() - confirmed, 2)
            path = self.download(body["preview"]["url"], self.out / "preview")
            self.say(f"  preview shown {seconds:.1f} s after payment (payment callback answered -> the preview's "
                     f"image downloaded by the client)")
            return {"enabled": True, "shown_after_payment_s": seconds, "file": str(path)}

    def wait_trained(self, avatar: dict) -> dict:
        with self.timer.step("wait in the GPU queue while the LoRA trains"):
            self.wait(lambda: self.get(f"/avatars/{avatar['id']}/queue"),
                      lambda b: b["state"] in ("trained", "failed"),
                      lambda b: f"{b['state']}: {b['lane']} lane, position {b['position']}, eta {b['eta_seconds']}s, "
                                f"progress {round(100 * b['progress'])}%")
            avatar = self.get(f"/avatars/{avatar['id']}")
            if avatar["state"] != "trained":
                raise SystemExit(f"{self.user}: training failed: {avatar}")
            self.say(f"  photos purged: {avatar['photos_purged']}")
            return avatar

    def render(self, avatar: dict, template_id: str | None, category: str) -> dict:
        """A render of `template_id` (or the first template of `category`), done and content-checked."""
        with self.timer.step("render a portrait template"):
            catalog = self.get("/templates", gender=avatar["gender"])
            chosen = template_id or next(t["id"] for t in catalog if t["category"] == category)
            render = self.post("/renders", 201, json={"avatar_id": avatar["id"], "template_id": chosen})
            render = self.wait(lambda: self.get(f"/renders/{render['id']}"),
                               lambda b: b["state"] in ("done", "failed"),
                               lambda b: f"render {b['state']}" + (
                                   f": {b['queue']['lane']} lane, position {b['queue']['position']}, "
                                   f"eta {b['queue']['eta_seconds']}s" if b.get("queue") else ""))
            if render["state"] != "done":
                raise SystemExit(f"{self.user}: render failed: {render}")
        with self.timer.step("WeChat's content check of each portrait"):
            return self.wait(lambda: self.get(f"/renders/{render['id']}"),
                             lambda b: all(i["content_check"] != "pending" for i in b["images"]),
                             lambda b: f"{sum(i['content_check'] == 'pending' for i in b['images'])} portraits "
                                       "pending")

    def download_portraits(self, render: dict) -> list[str]:
        return [str(self.download(image["url"], self.out / "portraits" / f"portrait-{index}"))
                for index, image in enumerate(render["images"], 1)]

    def order_record(self, order_id: str, database) -> dict:
        order = self.get(f"/orders/{order_id}")
        return {"order": {key: order.get(key) for key in (
                    "id", "sku", "lane", "rail", "platform", "ios_make_good", "state", "amount", "render_credits",
                    "refunds", "promise")},
                "order_history": [h["to"] for h in database.orders.find_one({"_id": order_id})["history"]],
                "preview_state": (order.get("preview") or {}).get("state")}


# ---------------------------------------------------------------------------------------------------- flows
def standard_flow(client: Client, database, first_preview: threading.Event, photo_count: int,
                  template_id: str | None, platform: str) -> dict:
    try:
        phone = client.sign_up()
        with client.timer.step("read the filing disclosure"):
            disclosure = client.get("/disclosure")
            client.say(f"  algorithm filing {disclosure['algorithm_filing_number']}, model "
                       f"{disclosure['model']['name']}{' (placeholders)' if disclosure['placeholder'] else ''}")
        avatar = client.avatar_with_photos(photo_count)
        order = client.order(avatar, "avatar_pack", platform)
        preview = client.preview(order, client.pay(order, platform))
    finally:
        first_preview.set()  # the other users pay now, whatever happened here
    avatar = client.wait_trained(avatar)
    render = client.render(avatar, template_id, "ancient_costume")
    with client.timer.step("download the labelled portraits and a share poster"):
        files = client.download_portraits(render)
        poster_url = client.topology.base_url + render["images"][0]["poster_url"]
        # 202 while WeChat's mini-program code is owed (the poster is made once the retry gets it).
        poster = client.wait(lambda: client.api.get(poster_url), lambda r: r.status_code != 202,
                             lambda r: f"poster {r.status_code}")
        (client.out / "poster.png").write_bytes(_binary(poster))
    return {**client.order_record(order["id"], database),
            "avatar": {"id": avatar["id"], "state": avatar["state"], "accepted_photos": avatar["accepted_count"],
                       "photos_purged": avatar["photos_purged"],
                       "training_seconds": database.avatars.find_one({"_id": avatar["id"]})["training_seconds"]},
            "preview": preview,
            "render": {"id": render["id"], "template_id": render["template_id"],
                       "images": [{"file": f, "likeness": i["likeness"], "content_id": i["content_id"]}
                                  for f, i in zip(files, render["images"])]},
            "poster": str(client.out / "poster.png"), "phone": phone["masked"], "disclosure": disclosure}


def express_flow(client: Client, database, first_preview: threading.Event, platform: str) -> dict:
    client.sign_up()
    avatar = client.avatar_with_photos(None, seed=17)
    with client.timer.step("wait for the standard user's preview (their figure is an idle GPU worker's)"):
        first_preview.wait()
    order = client.order(avatar, EXPRESS_SKU, platform)
    promise = client.get(f"/orders/{order['id']}").get("promise") or {}
    client.say(f"  promise: training starts within {promise.get('wait_s')} s of payment (margin "
               f"{promise.get('margin_s')} s, else {promise.get('difference_fen')} fen back)")
    preview = client.preview(order, client.pay(order, platform))
    avatar = client.wait_trained(avatar)
    render = client.render(avatar, None, "urban")
    files = client.download_portraits(render)
    record = client.order_record(order["id"], database)
    kept = record["order"]["promise"] or {}
    client.say(f"  express order {record['order']['state']}; promise {kept.get('state')}, its training started "
               f"{kept.get('waited_s')} s after payment")
    return {**record, "avatar_id": avatar["id"], "preview": preview,
            "render": {"id": render["id"], "template_id": render["template_id"], "files": files}}


def pack_flow(client: Client, database, first_preview: threading.Event, platform: str) -> dict:
    client.sign_up()
    avatar = client.avatar_with_photos(3, sku=PACK_SKU, seed=27)
    with client.timer.step("wait for the standard user's preview (their figure is an idle GPU worker's)"):
        first_preview.wait()
    order = client.order(avatar, PACK_SKU, platform)
    preview = client.preview(order, client.pay(order, platform))
    with client.timer.step("the pack's batches, delivered as they finish"):
        pack = client.wait(lambda: client.get(f"/packs/{order['id']}"),
                           lambda b: b["phase"] in ("done", "refunded"),
                           lambda b: f"{b['phase']}: batches settled {b['batches_done']}/{len(b['batches'])}, "
                                     f"images delivered {b['images_delivered']}/{b['images_planned']}, "
                                     f"waiting for their check {b['images_pending_check']}, "
                                     f"refunded {b['images_refunded']}")
    with client.timer.step("download the pack's archive"):
        if not pack["archive_url"]:
            raise SystemExit(f"{client.user}: nothing of the pack was delivered: {pack}")
        path = client.download(pack["archive_url"], client.out / "pack")
        with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
            names = archive.namelist()
        client.say(f"  archive {path.name}: {len(names)} images (planned {pack['images_planned']}), "
                   f"{path.stat().st_size // 1024} KiB")
    return {**client.order_record(order["id"], database), "preview": preview,
            "pack": {"phase": pack["phase"], "images_planned": pack["images_planned"],
                     "images_delivered": pack["images_delivered"], "images_refunded": pack["images_refunded"],
                     "batches": len(pack["batches"]), "archive": str(path), "archive_images": len(names)}}


def album_flow(inviter: Client, invitee: Client, inviter_avatar_id: str, invitee_avatar_id: str, database,
               platform: str) -> dict:
    """The standard user buys a couple album and invites the express user, who accepts with their own avatar."""
    with inviter.timer.step(f"buy a couple album ({ALBUM_SKU}) with my trained avatar"):
        bought = inviter.post("/albums", 201, json={"sku": ALBUM_SKU, "avatar_id": inviter_avatar_id,
                                                    "nickname": inviter.user, "platform": platform})
        album, order = bought["album"], bought["order"]
        inviter.say(f"  album {album['id']} {album['state']}, order {order['id']}: {order['amount']} fen")
    inviter.pay(order, platform)
    with inviter.timer.step("share the invite card (its mini-program code carries the seat's token)"):
        album = inviter.wait(lambda: inviter.get(f"/albums/{album['id']}"), lambda b: b["state"] == "inviting",
                             lambda b: f"album {b['state']}")
        card = inviter.download(album["seats"][0]["invite_card_url"], inviter.out / "album-invite-card")
        scene = scanned_scene(Image.open(card).crop(CODE_BOX))
        if not scene.startswith("a="):
            raise SystemExit(f"{inviter.user}: the invite card's code does not read as an album seat ({scene!r})")
    with invitee.timer.step("scan the card, read the invitation, accept with my own trained avatar"):
        token = scene[len("a="):]
        invitation = invitee.get(f"/album-invites/{token}")
        invitee.say(f"  {invitation['inviter_nickname']} invites me to {invitation['description']} "
                    f"(seat {invitation['seat']}, until {invitation['expires_at']})")
        album = invitee.post(f"/album-invites/{token}/accept", 200,
                             json={"avatar_id": invitee_avatar_id, "nickname": invitee.user})
        invitee.say(f"  album {album['state']}: " + ", ".join(f"{m['role']} {m['nickname']}" for m in album["members"]))
    with invitee.timer.step("the album's joint portraits, delivered as they finish"):
        album = invitee.wait(lambda: invitee.get(f"/albums/{album['id']}"),
                             lambda b: (b["progress"] or {}).get("phase") in ("done", "refunded"),
                             lambda b: f"album {b['state']}: " + (
                                 f"{b['progress']['phase']}, images delivered {b['progress']['images_delivered']}"
                                 f"/{b['progress']['images_planned']}, waiting for their check "
                                 f"{b['progress']['images_pending_check']}" if b["progress"] else "no batch yet"))
        files = [str(invitee.download(image["url"], invitee.out / "album" / f"album-{index}"))
                 for index, image in enumerate(album["images"], 1)]
        invitee.say(f"  {len(files)} joint portraits downloaded by the invitee")
    return {**inviter.order_record(order["id"], database),
            "album": {"id": album["id"], "state": album["state"], "phase": album["progress"]["phase"],
                      "images_planned": album["progress"]["images_planned"], "images_downloaded": len(files),
                      "members": [m["role"] for m in album["members"]], "files": files}}


def failures(summary: dict) -> list[str]:
    """What did not end as it should: each flow fulfilled, the previews shown (when previews are on), the express
    order in its lane, the pack's archive holding every image of its plan."""
    found = list(summary.get("errors", []))
    flows = summary.get("flows", {})
    for name in ("standard", "express", "pack"):
        flow = flows.get(name)
        if flow is None:
            found.append(f"{name}: did not finish")
            continue
        if flow["order"]["state"] != "fulfilled":
            found.append(f"{name}: order {flow['order']['state']}, not fulfilled")
        preview = flow.get("preview") or {}
        if preview.get("enabled") and preview.get("shown_after_payment_s") is None:
            found.append(f"{name}: preview not shown")
    if "express" in flows and flows["express"]["order"]["lane"] != "express":
        found.append(f"express: order in the {flows['express']['order']['lane']} lane")
    if "pack" in flows:
        pack = flows["pack"]["pack"]
        if pack["archive_images"] != pack["images_planned"]:
            found.append(f"pack: archive holds {pack['archive_images']} images of {pack['images_planned']} planned")
    album = flows.get("album")
    if album is None:
        found.append("album: did not finish")
    else:
        if album["order"]["state"] != "fulfilled":
            found.append(f"album: order {album['order']['state']}, not fulfilled")
        if album["album"]["images_downloaded"] != album["album"]["images_planned"]:
            found.append(f"album: the invitee downloaded {album['album']['images_downloaded']} joint portraits of "
                         f"{album['album']['images_planned']} planned")
    return found


def demo_environ(environ: dict, plans: dict[str, dict], candidates: int) -> dict:
    """The processes' environment with the render plans ({sku: plan}) and candidates per image as the demo asks."""
    skus = json.loads(environ["SKUS"]) if environ.get("SKUS") else config.DEFAULT_SKUS
    return {**environ, "SKUS": json.dumps({**skus, **{sku: {**skus[sku], "render_plan": plan}
                                                      for sku, plan in plans.items()}}),
            "PACK_CANDIDATES_PER_IMAGE": str(candidates)}


def run(out: Path, photo_count: int, template_id: str | None, platform: str = "android",
        pack_plan: dict | None = None, pack_candidates: int | None = None, album_plan: dict | None = None) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timer = Timer()
    product_plan = config.DEFAULT_SKUS[PACK_SKU]["render_plan"]
    product_album_plan = config.DEFAULT_SKUS[ALBUM_SKU]["render_plan"]
    environ = dict(os.environ)
    if pack_plan or pack_candidates or album_plan:
        plans = {PACK_SKU: pack_plan or product_plan, ALBUM_SKU: album_plan or product_album_plan}
        environ = demo_environ(environ, plans, pack_candidates or PRODUCT_PACK_CANDIDATES)
    topology = Topology(out / "instance", environ=environ)
    with timer.step("start the processes: gunicorn (2 workers), GPU, default and intake workers, clock, "
                    "WeChat simulator"):
        topology.start()
        timer.say(topology.describe())
    settings = topology.settings
    plan = settings.skus[PACK_SKU]["render_plan"]
    shrunk = plan != product_plan or settings.pack_candidates_per_image != PRODUCT_PACK_CANDIDATES
    timer.say(f"{PACK_SKU}'s plan {'SHRUNK FOR THE DEMO' if shrunk else 'as sold'}: {plan['images']} images in "
              f"batches of {plan['batch']}, {settings.pack_candidates_per_image} candidate(s) each"
              + (f" (the product: {product_plan['images']} in batches of {product_plan['batch']}, "
                 f"{PRODUCT_PACK_CANDIDATES} candidates each; --pack-images {product_plan['images']} --pack-batch "
                 f"{product_plan['batch']} --pack-candidates {PRODUCT_PACK_CANDIDATES} runs it whole)" if shrunk
                 else ""))
    album_shrunk = settings.skus[ALBUM_SKU]["render_plan"] != product_album_plan
    timer.say(f"{ALBUM_SKU}'s plan {'SHRUNK FOR THE DEMO' if album_shrunk else 'as sold'}: "
              f"{settings.skus[ALBUM_SKU]['render_plan']['images']} images"
              + (f" (the product: {product_album_plan['images']}; --album-images {product_album_plan['images']} "
                 "runs it whole)" if album_shrunk else ""))
    database = db_module.connect(settings)
    sim = SimulatorClient(topology.simulator_url)
    first_preview = threading.Event()
    flows = {"standard": lambda c: standard_flow(c, database, first_preview, photo_count, template_id, platform),
             "express": lambda c: express_flow(c, database, first_preview, platform),
             "pack": lambda c: pack_flow(c, database, first_preview, platform)}
    results: dict[str, dict] = {}
    errors: list[str] = []
    clients: dict[str, Client] = {}

    def run_flow(name: str) -> None:
        try:
            clients[name] = Client(topology, sim, name, out / name)
            results[name] = flows[name](clients[name])
        except (Exception, SystemExit) as error:  # one flow failing leaves the others running
            errors.append(f"{name}: {error}")
            first_preview.set()

    try:
        threads = [threading.Thread(target=run_flow, args=(name,), name=f"demo-{name}") for name in flows]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if "standard" in results and "express" in results:
            try:
                results["album"] = album_flow(clients["standard"], clients["express"],
                                              results["standard"]["avatar"]["id"], results["express"]["avatar_id"],
                                              database, platform)
            except (Exception, SystemExit) as error:
                errors.append(f"album: {error}")
        summary = {
            "flows": results,
            "preview_shown_after_payment_s": {name: (flow.get("preview") or {}).get("shown_after_payment_s")
                                              for name, flow in results.items()},
            "pack_plan": {**plan, "candidates_per_image": settings.pack_candidates_per_image,
                          "shrunk_for_the_demo": shrunk},
            "album_plan": {**settings.skus[ALBUM_SKU]["render_plan"], "shrunk_for_the_demo": album_shrunk},
            "subscribe_messages_sent": [m.get("template_id") for m in sim.messages()],
            "content_checks": {
                "by_kind_and_state": {f"{row['_id']['kind']}:{row['_id']['state']}": row["count"] for row in
                                      database.content_checks.aggregate([{"$group": {
                                          "_id": {"kind": "$kind", "state": "$state"}, "count": {"$sum": 1}}}])},
                "simulator": sim.media_check_stats()},
            "base_model": settings.base_model_path or "tiny random-weight Stable Diffusion",
            "timings_s": {**{name: client.timer.steps for name, client in clients.items()},
                          "start": timer.steps, "total": timer.total()},
            "processes": {child.name: child.command for child in topology.children.values()},
            "errors": errors,
        }
    finally:
        database.client.close()
        topology.stop()
    summary["failures"] = failures(summary)
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--photos", type=int, default=21, help="photos the standard user uploads")
    parser.add_argument("--template", default=None, help="the standard user's template")
    parser.add_argument("--platform", default="android",
                        help="the client platform the orders name (with PAYMENT_RAIL=xpay or by_platform: ios "
                             "orders are made good, not refunded)")
    parser.add_argument("--pack-images", type=int, default=DEMO_PACK_PLAN["images"],
                        help=f"images of {PACK_SKU}'s plan in the demo (the product's: 100)")
    parser.add_argument("--pack-batch", type=int, default=DEMO_PACK_PLAN["batch"],
                        help="images per batch (the product's: 10)")
    parser.add_argument("--album-images", type=int, default=DEMO_ALBUM_PLAN["images"],
                        help=f"images of {ALBUM_SKU}'s plan in the demo, drawn in one batch (the product's: 6 in "
                             "batches of 3)")
    parser.add_argument("--pack-candidates", type=int, default=DEMO_PACK_CANDIDATES,
                        help="candidates drawn per pack image (PACK_CANDIDATES_PER_IMAGE; the setting's default: "
                             f"{PRODUCT_PACK_CANDIDATES})")
    args = parser.parse_args(argv)
    summary = run(args.out.resolve(), args.photos, args.template, args.platform,
                  {"images": args.pack_images, "batch": args.pack_batch}, args.pack_candidates,
                  {"images": args.album_images, "batch": args.album_images})
    print(json.dumps({k: summary[k] for k in ("preview_shown_after_payment_s", "pack_plan", "content_checks",
                                              "timings_s")}, ensure_ascii=False, indent=2))
    for name, flow in summary["flows"].items():
        print(f"{name}: order {flow['order']['id']} {flow['order']['state']} ({' -> '.join(flow['order_history'])})")
    previews = summary["preview_shown_after_payment_s"]
    if previews.get("standard") is not None:
        others = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in previews.items()
                           if name != "standard" and seconds is not None)
        print(f"preview shown {previews['standard']:.1f} s after payment (standard order, paid on an idle GPU "
              f"worker; {others or 'no other preview'}: paid while the worker had a job, which it finishes first)")
    if "pack" in summary["flows"]:
        pack = summary["flows"]["pack"]["pack"]
        print(f"pack archive: {pack['archive_images']} images of {pack['images_planned']} planned"
              + (" (plan shrunk for the demo)" if summary["pack_plan"]["shrunk_for_the_demo"] else ""))
    if "album" in summary["flows"]:
        album = summary["flows"]["album"]["album"]
        print(f"couple album: {album['images_downloaded']} joint portraits of {album['images_planned']} planned, "
              f"downloaded by the invitee" + (" (plan shrunk for the demo)" if summary["album_plan"][
                  "shrunk_for_the_demo"] else ""))
    print(f"total {summary['timings_s']['total']:.0f} s; portraits, preview, poster, pack archive, album and "
          f"summary.json in {args.out}/")
    for failure in summary["failures"]:
        print(f"FAILED {failure}")
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
