"""The dashboard's numbers: queues and workers from Redis, failures, refunds and revenue from MongoDB."""
from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from portraits import content_checks, sweeper, tasks
from portraits.queue import lanes
from portraits.queue.tracking import QueueTracker
from portraits import states
from portraits.billing.refunds import REFUND_FINAL_FAILURES

QUEUE_LABELS = {tasks.PREVIEW: "预览 preview", tasks.RENDER: "出图 render", tasks.TRAIN: "训练 train",
                tasks.RENDER_EXPRESS: "加急出图 express render", tasks.TRAIN_EXPRESS: "加急训练 express train",
                tasks.INTAKE: "照片审核 intake", tasks.DEFAULT: "后台 default"}


def queue_rows(services) -> list[dict]:
    tracker = tasks.queue_tracker(services)
    rows = []
    for name in tasks.ALL_QUEUES:
        if name in tasks.GPU_QUEUES:
            waiting, running = tracker.waiting_count(name), tracker.running_count(name)
        else:
            waiting, running = tasks.default_queue_counts(services, name)
        row = {"name": name, "label": QUEUE_LABELS[name], "lane": lanes.QUEUE_LANE.get(name), "waiting": waiting,
               "running": running,
               "workers": tracker.live_workers(name), "eta_new_s": None}
        if name in tasks.GPU_QUEUES:
            row["eta_new_s"] = eta_for_new_job(tracker, name)
            row["average_s"] = round(tracker.average_duration(name))
        rows.append(row)
    return rows


def eta_for_new_job(tracker: QueueTracker, queue: str) -> int:
    """What a job enqueued now would be told: its lane's estimate at rank = jobs waiting now."""
    return tracker.new_job_estimate(queue)["eta_seconds"]


def workers(services) -> list[dict]:
    return tasks.live_workers(services)


def failures_since(services, since: datetime) -> dict:
    db = services.db
    return {
        "avatars": list(db.avatars.find({"state": "failed", "updated_at": {"$gte": since}},
                                        {"_id": 1, "user_id": 1, "order_id": 1, "failure": 1, "updated_at": 1})
                        .sort("updated_at", -1).limit(50)),
        "renders": list(db.renders.find({"state": "failed", "updated_at": {"$gte": since}},
                                        {"_id": 1, "user_id": 1, "order_id": 1, "failure": 1, "updated_at": 1,
                                         "retried_by": 1})
                        .sort("updated_at", -1).limit(50)),
        "refund_failed": list(db.orders.find({"state": "refund_failed"}, {"_id": 1, "user_id": 1, "updated_at": 1})
                              .sort("updated_at", -1).limit(50)),
        "alerts": db.payment_alerts.count_documents({"last_at": {"$gte": since}}),
    }


def refunds_since(services, since: datetime) -> list[dict]:
    rows = []
    for order in services.db.orders.find({"refunds.requested_at": {"$gte": since}}, {"refunds": 1}):
        for refund in order.get("refunds", []):
            if refund.get("requested_at") and refund["requested_at"] >= since:
                rows.append({"order_id": order["_id"], **refund})
    return sorted(rows, key=lambda row: row["requested_at"], reverse=True)


def start_of_today(timezone_name: str) -> datetime:
    local = states.now().astimezone(ZoneInfo(timezone_name))
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def revenue_since(services, since: datetime) -> dict:
    """Money taken by orders paid since `since`, less refunds requested since then that did not finally fail."""
    gross = sum(order["amount"] for order in services.db.orders.find({"paid_at": {"$gte": since}}, {"amount": 1}))
    refunded = sum(refund["amount"] for refund in refunds_since(services, since)
                   if refund["state"] not in REFUND_FINAL_FAILURES)
    return {"gross": gross, "refunded": refunded, "net": gross - refunded}


def dashboard(services) -> dict:
    day_ago = states.now() - timedelta(hours=24)
    today = start_of_today(services.settings.console_timezone)
    refunds = refunds_since(services, day_ago)
    return {
        "queues": queue_rows(services),
        "workers": workers(services),
        "failures": failures_since(services, day_ago),
        "refunds": refunds,
        "refunds_total": sum(r["amount"] for r in refunds if r["state"] not in REFUND_FINAL_FAILURES),
        "revenue": revenue_since(services, today),
        "today": today,
        "sweep": {"last_at": sweeper.last_sweep_at(services), "healed": sweeper.healed_since(services, day_ago),
                  "needs_people": sweeper.needs_people(services)},
        "content_checks": content_check_numbers(services),
    }


def content_check_numbers(services) -> dict:
    """WeChat's content checks waiting (queued ones wait for quota or for WeChat; submitted ones for the verdict),
    the quota used this minute and today, and its limits."""
    settings = services.settings
    return {**content_checks.waiting_counts(services), "used": content_checks.quota_used(services),
            "per_minute": settings.content_check_per_minute, "per_day": settings.content_check_per_day}
