"""The whole paid flow, offline, in embedded mode (EMBEDDED on), driven over HTTP like the mini-program would.

    python -m miniapp_api.dev.demo --out demo-output

It runs on the topology `make serve` runs (miniapp_api.dev.supervisor): gunicorn with two workers, a GPU worker,
the default worker, the clock and the WeChat simulator as separate processes, sharing the embedded Redis and a
SecantusDB server; the base model is the tiny random-weight Stable Diffusion unless BASE_MODEL_PATH is set.
Writes the portraits, a share poster and summary.json into --out (the processes' logs in --out/instance/logs/).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import requests

from miniapp_api.dev.supervisor import Topology
from models.sample_photos import astronaut_photos
from portraits.store import db as db_module
from wechat_sim.client import SimulatorClient

DEMO_PHONE = "13800138000"


class Timer:
    def __init__(self):
        self.steps: dict[str, float] = {}
        self._start = time.monotonic()

    def step(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.t0 = time.monotonic()
                print(f"▶ {name}", flush=True)

            def __exit__(self, *exc):
                timer.steps[name] = round(time.monotonic() - self.t0, 3)
                print(f"  done in {timer.steps[name]:.2f}s", flush=True)

        return _Step()

    def total(self) -> float:
        return round(time.monotonic() - self._start, 3)


def _check(response: requests.Response, *expected: int) -> dict:
    if response.status_code not in expected:
        raise SystemExit(f"unexpected {response.status_code} from {response.request.method} {response.url}: "
                         f"{response.text[:500]}")
    return response.json() if response.content and response.headers.get("Content-Type", "").startswith(
        "application/json") else {}


def _wait(fetch, done, describe, timeout_s: float = 1800.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        body = fetch()
        line = describe(body)
        if line != last:
            print(f"  {line}", flush=True)
            last = line
        if done(body):
            return body
        time.sleep(0.25)
    raise SystemExit("timed out waiting")


def run(out: Path, photo_count: int, template_id: str | None, platform: str = "android") -> dict:
    if out.exists():
        shutil.rmtree(out)
    (out / "portraits").mkdir(parents=True)
    timer = Timer()
    topology = Topology(out / "instance")
    with timer.step("start the processes: gunicorn (2 workers), GPU, default and intake workers, clock, "
                    "WeChat simulator"):
        topology.start()
        print(topology.describe(), flush=True)
    settings = topology.settings
    database = db_module.connect(settings)
    sim = SimulatorClient(topology.simulator_url)
    api = requests.Session()
    base = topology.base_url + "/api/v1"
    try:
        with timer.step("log in with a wx.login code"):
            login = _check(api.post(f"{base}/auth/login", json={"code": sim.login_code("demo-user")}), 200)
            api.headers["Authorization"] = f"Bearer {login['token']}"
            templates = settings.subscribe_templates
            openid = sim.openid_of("demo-user")
            for template in templates.values():
                sim.grant_subscription(openid, template)
            _check(api.post(f"{base}/subscriptions", json={"grants": {t: "accept" for t in templates.values()}}), 200)
        with timer.step("bind a phone number (getPhoneNumber) and read the filing disclosure"):
            phone = _check(api.post(f"{base}/me/phone", json={"code": sim.phone_code("demo-user", DEMO_PHONE)}),
                           200)
            print(f"  phone {phone['masked']} bound", flush=True)
            disclosure = _check(api.get(f"{base}/disclosure"), 200)
            print(f"  algorithm filing {disclosure['algorithm_filing_number']}, model {disclosure['model']['name']}"
                  f"{' (placeholders)' if disclosure['placeholder'] else ''}", flush=True)
        with timer.step("give face-processing consent"):
            consent = _check(api.get(f"{base}/consents"), 200)[0]
            _check(api.post(f"{base}/consents", json={"kind": "face_processing", "version": consent["version"],
                                                      "age_14_or_over": True, "own_face": True}), 201)
        with timer.step(f"create an avatar and upload {photo_count} photos"):
            avatar = _check(api.post(f"{base}/avatars", json={"gender": "female"}), 201)
            for index, photo in enumerate(astronaut_photos(photo_count)):
                verdict = _check(api.post(f"{base}/avatars/{avatar['id']}/photos",
                                          files={"photo": (f"photo{index}.jpg", photo, "image/jpeg")},
                                          data={"role": "front" if index == 0 else "extra"}), 201)
                print(f"  photo {index + 1:2d}: {verdict['state']}", flush=True)
        with timer.step("the intake worker judges the faces (verdicts land in the photo list)"):
            avatar = _wait(lambda: _check(api.get(f"{base}/avatars/{avatar['id']}"), 200),
                           lambda b: "photos_judging" not in b["missing"],
                           lambda b: f"{sum(p['state'] == 'judging' for p in b['photos'])} photos judging")
            for index, photo in enumerate(avatar["photos"]):
                mark = "accepted" if photo["accepted"] else "refused: " + ", ".join(photo["reasons"])
                print(f"  photo {index + 1:2d}: {mark}", flush=True)
            print(f"  avatar {avatar['id']} is {avatar['state']} with {avatar['accepted_count']} photos", flush=True)
        with timer.step("WeChat's content check of each photo (mediaCheckAsync, verdicts pushed in safe mode)"):
            avatar = _wait(lambda: _check(api.get(f"{base}/avatars/{avatar['id']}"), 200),
                           lambda b: "content_check_pending" not in b["missing"],
                           lambda b: f"{sum(p['content_check'] == 'pending' for p in b['photos'])} photos pending, "
                                     f"avatar {b['state']}")
        with timer.step(f"create an order (rail: PAYMENT_RAIL={settings.payment_rail}, platform {platform})"):
            order = _check(api.post(f"{base}/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack",
                                                            "platform": platform}), 201)
            how = (f"package={order['pay_params']['package']}" if order["rail"] == "jsapi"
                   else f"signData={order['xpay_params']['signData']}")
            print(f"  order {order['id']} on {order['rail']}: {order['amount']} fen, {how}")
        with timer.step("pay in the app (simulator) and receive the signed callback or push"):
            if order["rail"] == "jsapi":
                paid = sim.pay(order["id"])
            else:
                paid = sim.xpay_pay(openid, order["xpay_params"], platform=platform)
            print(f"  {order['rail']} notification {paid['notification_id']} answered {paid['status_code']}",
                  flush=True)
            _wait(lambda: _check(api.get(f"{base}/orders/{order['id']}"), 200), lambda b: b["state"] == "paid",
                  lambda b: f"order {b['state']}")
        with timer.step("wait in the GPU queue while the LoRA trains"):
            _wait(lambda: {**_check(api.get(f"{base}/avatars/{avatar['id']}/queue"), 200)},
                  lambda b: b["state"] in ("trained", "failed"),
                  lambda b: f"{b['state']}: position {b['position']}, eta {b['eta_seconds']}s, "
                            f"progress {round(100 * b['progress'])}%")
            avatar = _check(api.get(f"{base}/avatars/{avatar['id']}"), 200)
            if avatar["state"] != "trained":
                raise SystemExit(f"training failed: {avatar}")
            print(f"  photos purged: {avatar['photos_purged']}")
        with timer.step("render a portrait template"):
            catalog = _check(api.get(f"{base}/templates", params={"gender": "female"}), 200)
            chosen = template_id or next(t["id"] for t in catalog if t["category"] == "ancient_costume")
            render = _check(api.post(f"{base}/renders", json={"avatar_id": avatar["id"], "template_id": chosen}), 201)
            render = _wait(lambda: _check(api.get(f"{base}/renders/{render['id']}"), 200),
                           lambda b: b["state"] in ("done", "failed"), lambda b: f"render {b['state']}")
            if render["state"] != "done":
                raise SystemExit(f"render failed: {render}")
        with timer.step("WeChat's content check of each portrait"):
            render = _wait(lambda: _check(api.get(f"{base}/renders/{render['id']}"), 200),
                           lambda b: all(i["content_check"] != "pending" for i in b["images"]),
                           lambda b: f"{sum(i['content_check'] == 'pending' for i in b['images'])} portraits pending")
        with timer.step("download the labelled portraits and a share poster"):
            files = []
            for index, image in enumerate(render["images"], 1):
                data = api.get(topology.base_url + image["url"])
                path = out / "portraits" / f"portrait-{index}.png"
                path.write_bytes(_binary(data))
                files.append(str(path))
            poster_url = topology.base_url + render["images"][0]["poster_url"]
            # 202 while WeChat's mini-program code is owed (the poster is made once the retry gets it).
            poster = _wait(lambda: api.get(poster_url), lambda r: r.status_code != 202,
                           lambda r: f"poster {r.status_code}")
            (out / "poster.png").write_bytes(_binary(poster))
        order = _check(api.get(f"{base}/orders/{order['id']}"), 200)
        summary = {
            "order": {"id": order["id"], "rail": order["rail"], "platform": order["platform"],
                      "ios_make_good": order.get("ios_make_good"), "state": order["state"],
                      "amount_fen": order["amount"],
                      "render_credits_left": order["render_credits"], "refunds": order["refunds"]},
            "order_history": [h["to"] for h in database.orders.find_one({"_id": order["id"]})["history"]],
            "avatar": {"id": avatar["id"], "state": avatar["state"], "accepted_photos": avatar["accepted_count"],
                       "photos_purged": avatar["photos_purged"],
                       "training_seconds": database.avatars.find_one({"_id": avatar["id"]})["training_seconds"]},
            "render": {"id": render["id"], "template_id": chosen,
                       "images": [{"file": f, "likeness": i["likeness"], "content_id": i["content_id"]}
                                  for f, i in zip(files, render["images"])]},
            "poster": str(out / "poster.png"),
            "phone": phone["masked"],
            "disclosure": disclosure,
            "subscribe_messages_sent": [m.get("template_id") for m in sim.messages()],
            "content_checks": {
                "by_kind_and_state": {f"{row['_id']['kind']}:{row['_id']['state']}": row["count"] for row in
                                      database.content_checks.aggregate([{"$group": {
                                          "_id": {"kind": "$kind", "state": "$state"}, "count": {"$sum": 1}}}])},
                "simulator": sim.media_check_stats()},
            "base_model": settings.base_model_path or "tiny random-weight Stable Diffusion",
            "timings_s": {**timer.steps, "total": timer.total()},
            "processes": {child.name: child.command for child in topology.children.values()},
        }
    finally:
        database.client.close()
        topology.stop()
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2))
    return summary


def _binary(response: requests.Response) -> bytes:
    if response.status_code != 200:
        raise SystemExit(f"download failed {response.status_code}: {response.text[:300]}")
    return response.content


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--photos", type=int, default=21)
    parser.add_argument("--template", default=None)
    parser.add_argument("--platform", default="android",
                        help="the client platform the order names (with PAYMENT_RAIL=xpay or by_platform: ios "
                             "orders are made good, not refunded)")
    args = parser.parse_args(argv)
    summary = run(args.out.resolve(), args.photos, args.template, args.platform)
    print(json.dumps({k: summary[k] for k in ("order", "order_history", "content_checks", "timings_s")},
                     ensure_ascii=False, indent=2))
    print(f"portraits, poster and summary.json in {args.out}/")
    sys.exit(0 if summary["order"]["state"] == "fulfilled" else 1)


if __name__ == "__main__":
    main()
