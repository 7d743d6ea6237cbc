"""Seconds from payment to the first preview visible over the API, against seconds to the first trained portrait.

Run: .venv/bin/python bench/bench_preview.py [--photos N] [--template ID]
One user, as the mini-program does it over HTTP (Flask app on a local HTTP server, the WeChat simulator speaking
the real protocols): photos uploaded and content-checked, the order paid through WeChat Pay's signed callback. From
the moment the payment is sent, the client polls GET /api/v1/avatars/{id} until `preview.state` is `ready` and its
image downloads (the preview drawn on the GPU worker's preview queue and passed by the simulated WeChat content
check), then until the avatar is trained, asks for a render and polls until its first portrait downloads. A GPU
worker thread (queues preview, render, train, as `python -m jobs.worker gpu`) and a default worker thread run the
jobs; the simulator pushes each verdict as soon as it is asked (real WeChat takes seconds to minutes, which this
leaves out of both numbers alike). Tiny random-weight model on the CPU, mongomock and an embedded redis-server.
Prints both times and their ratio.
"""
from __future__ import annotations

import argparse
import io
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from werkzeug.serving import make_server  # noqa: E402

from jobs import context  # noqa: E402
from jobs.worker import EmbeddedWorker  # noqa: E402
from miniapp_api import create_app  # noqa: E402
from miniapp_api.dev.embedded import DEFAULT_SUBSCRIBE_TEMPLATES, _Deferred, pointed_at_simulator  # noqa: E402
from miniapp_api.dev.simulator import push_url  # noqa: E402
from models.sample_photos import astronaut_photos  # noqa: E402
from portraits import tasks  # noqa: E402
from portraits.config import Settings  # noqa: E402
from portraits.services import build_services  # noqa: E402
from portraits.store.redis_client import start_embedded, stop_embedded  # noqa: E402
from wechat_sim.client import SimulatorClient  # noqa: E402
from wechat_sim.keys import generate_credentials  # noqa: E402
from wechat_sim.runner import start_simulator  # noqa: E402

POLL_S = 0.05


class WorkerThread(threading.Thread):
    """An in-process worker serving `queues` in order until stopped."""

    def __init__(self, services, queues: tuple[str, ...]):
        super().__init__(daemon=True, name="-".join(queues))
        self.worker = EmbeddedWorker([tasks.queue(services, name) for name in queues], connection=services.redis)
        self.services = services
        self.stop = threading.Event()

    def run(self) -> None:
        context.install(self.services)
        while not self.stop.is_set():
            if not self.worker.work(burst=True, with_scheduler=True, logging_level="WARNING"):
                time.sleep(POLL_S)


def wait_for(what: str, fetch, sim, timeout_s: float = 1800.0):
    """Poll like the client, letting the simulated WeChat push the verdicts it was asked for."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sim.flush_media_checks()
        found = fetch()
        if found:
            return found
        time.sleep(POLL_S)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--template", default="urban_neon_night")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        http = make_server("127.0.0.1", 0, _Deferred(), threaded=True)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        base_url = f"http://127.0.0.1:{http.server_port}"
        simulator = start_simulator(generate_credentials(), push_url=base_url + "/api/v1/wechat/push")
        sim = SimulatorClient(simulator.base_url)
        settings = pointed_at_simulator(
            Settings(embedded=True, embedded_database="mongomock", instance_dir=workdir / "instance",
                     secret_key=secrets.token_urlsafe(32), master_key=secrets.token_bytes(32),
                     public_base_url=base_url, subscribe_templates=dict(DEFAULT_SUBSCRIBE_TEMPLATES),
                     min_photos=min(args.photos, 8), mongo_db="bench"),
            simulator.creds, simulator.base_url)
        sim.configure_push(url=push_url(settings), mode=settings.wechat_push_mode, data_format="json")
        redis = start_embedded(workdir / "redis.db")
        services = build_services(settings, redis=redis)
        context.install(services)
        started = time.perf_counter()
        services.renderer(), services.face_analyzer()
        services.previewer().warm_up()  # what a GPU worker does at start
        load_s = time.perf_counter() - started
        app = create_app(services=services)
        http.app.target = app
        client = app.test_client()
        workers = [WorkerThread(services, tasks.GPU_WORKER_QUEUES), WorkerThread(services, (tasks.DEFAULT,))]
        for worker in workers:
            worker.start()
        try:
            timings = run_user(client, sim, args)
            steps = preview_steps(services)
        finally:
            for worker in workers:
                worker.stop.set()
            for worker in workers:
                worker.join(timeout=120)
            simulator.stop()
            http.shutdown()
            stop_embedded(redis)
    preview_s, portrait_s = timings
    print(f"payment -> first preview visible over the API, {preview_s:6.2f} s "
          f"(paid -> drawn and stored {steps['drawn']:.2f} s, -> passed by the content check {steps['shown']:.2f} s)")
    print(f"payment -> first trained portrait visible,     {portrait_s:6.2f} s")
    print(f"ratio preview / trained portrait: {preview_s / portrait_s:.3f} "
          f"(tiny model on the CPU, {args.photos} photos, template {args.template}; models loaded beforehand in "
          f"{load_s:.1f} s)")


def preview_steps(services) -> dict[str, float]:
    """Where the preview's time went, from its record: paid -> drawn (state `checking`) -> shown."""
    preview = services.db.previews.find_one({})
    order = services.db.orders.find_one({"_id": preview["order_id"]})
    drawn = next(entry["at"] for entry in preview["history"] if entry["to"] == "checking")
    return {"drawn": (drawn - order["paid_at"]).total_seconds(),
            "shown": (preview["shown_at"] - order["paid_at"]).total_seconds()}


def run_user(client, sim, args) -> tuple[float, float]:
    token = client.post("/api/v1/auth/login", json={"code": sim.login_code("bench")}).get_json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    assert client.post("/api/v1/me/phone", headers=headers,
                       json={"code": sim.phone_code("bench", "13800138000")}).status_code == 200
    version = client.get("/api/v1/consents", headers=headers).get_json()[0]["version"]
    assert client.post("/api/v1/consents", headers=headers,
                       json={"kind": "face_processing", "version": version, "age_14_or_over": True,
                             "own_face": True}).status_code == 201
    avatar_id = client.post("/api/v1/avatars", headers=headers, json={"gender": "female"}).get_json()["id"]
    for index, photo in enumerate(astronaut_photos(args.photos)):
        client.post(f"/api/v1/avatars/{avatar_id}/photos", headers=headers, content_type="multipart/form-data",
                    data={"photo": (io.BytesIO(photo), "p.jpg"),
                          "role": "front" if index == 0 else "extra"})

    def avatar():
        return client.get(f"/api/v1/avatars/{avatar_id}", headers=headers).get_json()

    wait_for("the avatar to be ready", lambda: avatar()["state"] == "ready", sim)
    order = client.post("/api/v1/orders", headers=headers, json={"avatar_id": avatar_id, "sku": "avatar_pack"})
    paying = time.perf_counter()
    assert sim.pay(order.get_json()["id"])["delivered"]

    def preview_downloaded():
        preview = avatar()["preview"]
        return (preview or {}).get("state") == "ready" and client.get(preview["url"], headers=headers).status_code == 200

    wait_for("the preview", preview_downloaded, sim)
    preview_s = time.perf_counter() - paying
    wait_for("the training", lambda: avatar()["state"] == "trained", sim)
    render_id = client.post("/api/v1/renders", headers=headers,
                            json={"avatar_id": avatar_id, "template_id": args.template}).get_json()["id"]

    def portrait_downloaded():
        images = client.get(f"/api/v1/renders/{render_id}", headers=headers).get_json().get("images") or []
        return any(client.get(image["url"], headers=headers).status_code == 200 for image in images)

    wait_for("the first portrait", portrait_downloaded, sim)
    return preview_s, time.perf_counter() - paying


if __name__ == "__main__":
    main()
