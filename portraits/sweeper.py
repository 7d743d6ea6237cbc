"""The sweep: MongoDB records the work owed; this brings RQ (and the other stores) back in line with it.

Every state that owes work is a state in MongoDB, written by the same update that created the debt:
- an order `paid` whose avatar is still `ready` owes a training start (the process died between the two writes);
- a photo `judging` owes its judging job (`judge-<photo>`, on the intake queue) until its verdict is recorded;
- an avatar `queued` owes an RQ job (`train-<avatar>-<attempt>`), a render `queued` owes one too;
- an avatar `training` or a render `rendering` whose job RQ no longer knows (Redis lost its data) owes a retry;
- an avatar `failed` whose order is still `paid` owes a refund;
- a render `failed` and not yet `settled_at` owes its credit back (charged ones) and, maybe, the order's refund;
- a paid order with a render plan whose avatar is trained owes its batches (portraits.packs), and a batch `done`
  with every image decided but not yet `settled_at` owes its redraw or its share of the price back (a refund that
  had to wait for another one to settle, or a verdict applied by a process that died before settling);
- an album owes what portraits.albums.sweep heals (its invitation opened, expired or refunded, its batches
  written, a withdrawn album's images deleted, its order fulfilled);
- a render `done` with portraits delivered (passed by the content check) whose order is still `paid` owes the
  fulfilment, a paid order whose avatar cannot train a refund;
- an avatar `trained` whose photos are not purged owes the purge, as does a failed one whose order is refunded;
- a render credit or refinement claimed for a render that was never written owes its return (renders.CLAIMS), and
  an operator's retry that was never written frees the failed render for another retry;
- a subscribe message owed whose job Redis lost, or one a state change owes that was never recorded
  (portraits.notifications.heal);
- a share poster's mini-program code owed whose job ended without it or was lost (portraits.sharing.heal);
- a paid avatar's preview owed but never recorded, queued without a job, or drawing on a worker that died, and one
  not shown PREVIEW_TIMEOUT_S after it was asked for, given up (portraits.previews.sweep);
- a finished render still owing its images' content checks (`image_checks_owed`) owes their recording, a content
  check WeChat never answered within CONTENT_CHECK_TIMEOUT_S owes its timeout policy, a decided one not
  yet applied to its photo or portrait owes that, an interrupted submission owes its place in the queue back, and
  the queue (checks waiting for quota, or never enqueued) owes its submission as quota allows
  (portraits.moderation.sweep).
The sweep finds each of these and does what is missing through the ordinary, idempotent domain functions, so it can
run at any time, as often as wanted, from any process (the clock every SWEEP_INTERVAL_S, every worker at start).
Queued work is re-enqueued in the order it was paid for, so positions rebuilt after a Redis loss keep the line.
"""
from __future__ import annotations

import logging
from collections import Counter
from datetime import timedelta

from portraits import albums, avatars, keys, moderation, notifications, photos, previews, renders, sharing, states, tasks
from portraits.billing import orders, promises, refunds
from portraits.queue.tracking import QueueTracker

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60
# A refund still `refunding` this long after it was asked for is waiting on WeChat Pay beyond any normal delay.
REFUND_OVERDUE = timedelta(days=1)
# RQ's words for a job that is still going to run (or running).
LIVE = ("queued", "started", "scheduled", "deferred")
LOST_REASON = "job_lost"


def sweep(services) -> dict[str, int]:
    """One pass over everything owed; returns what was done, by kind (nothing when all is in line)."""
    done = Counter()
    _settle_paid_orders(services, done)
    _requeue(services, done)
    _requeue_judging(services, done)
    _recover_running(services, done)
    _settle_failed_avatars(services, done)
    _settle_failed_renders(services, done)
    _settle_packs(services, done)
    _purge_photos(services, done)
    _settle_claims(services, done)
    done.update(albums.sweep(services, _grace_cutoff(services)))
    done.update(promises.sweep(services))
    done.update(moderation.sweep(services, _grace_cutoff(services)))
    done.update(notifications.heal(services, _grace_cutoff(services)))
    done.update(sharing.heal(services, _grace_cutoff(services)))
    done.update(previews.sweep(services, _grace_cutoff(services)))
    done = +done  # only what happened
    at = states.now()
    services.db.sweeps.update_one({"_id": "last"}, {"$set": {"at": at}}, upsert=True)
    if done:
        log.warning("sweep: %s", dict(done))
        services.db.sweeps.insert_one({"at": at, "done": dict(done)})
    return dict(done)


def healed_since(services, since) -> dict[str, int]:
    """What the sweeps since `since` did, by kind (for the console)."""
    total = Counter()
    for run in services.db.sweeps.find({"at": {"$gte": since}, "done": {"$exists": True}}, {"done": 1}):
        total.update(run["done"])
    return dict(total)


def last_sweep_at(services):
    last = services.db.sweeps.find_one({"_id": "last"})
    return last["at"] if last else None


def needs_people(services) -> list[dict]:
    """What the sweep cannot heal by itself (README, "What the code cannot heal"): refunds WeChat Pay refused,
    refunds overdue at WeChat Pay (an outage longer than the refund window keeps them here until it ends), and
    albums whose undelivered share could not be refunded nor made good (an iOS order already fulfilled)."""
    overdue_before = states.now() - REFUND_OVERDUE
    rows = [{"order_id": o["_id"], "state": o["state"], "since": o["updated_at"], "why": "refund_failed",
             "error": (o.get("refunds") or [{}])[-1].get("error")}
            for o in services.db.orders.find({"state": "refund_failed"}, {"updated_at": 1, "refunds": 1, "state": 1})]
    for order in services.db.orders.find({"state": "refunding", "refunds.requested_at": {"$lt": overdue_before}},
                                         {"updated_at": 1, "refunds": 1, "state": 1}):
        latest = order["refunds"][-1]
        if latest.get("requested_at") and latest["requested_at"] < overdue_before:
            rows.append({"order_id": order["_id"], "state": order["state"], "since": latest["requested_at"],
                         "why": "refund_overdue", "error": latest.get("error")})
    for album in services.db.albums.find({"refund_outcome": "refund_refused"},
                                         {"order_id": 1, "state": 1, "refund_settled_at": 1, "refund_refused_code": 1}):
        rows.append({"order_id": album["order_id"], "album_id": album["_id"], "state": album["state"],
                     "since": album["refund_settled_at"], "why": "album_refund_refused",
                     "error": album.get("refund_refused_code")})
    return sorted(rows, key=lambda row: row["since"])


def _settle_paid_orders(services, done: Counter) -> None:
    """A paid order owes a training (its avatar still `ready`), a refund (its avatar can no longer train for it), or
    its fulfilment (a render of it is `done`)."""
    # An album's order is the album's to settle (albums.sweep): its avatar was trained for another order.
    paid = list(services.db.orders.find({"state": "paid", "album_id": {"$exists": False}},
                                        {"avatar_id": 1, "sku": 1, "lane": 1}))
    avatar_of = {a["_id"]: a for a in services.db.avatars.find({"_id": {"$in": [o["avatar_id"] for o in paid]}},
                                                                {"state": 1, "order_id": 1})}
    delivered = {r["order_id"] for r in services.db.renders.find(
        {"order_id": {"$in": [o["_id"] for o in paid]}, "state": "done"},
        {"order_id": 1, "state": 1, "content_checked": 1, "delivered_image_ids": 1}) if renders.render_delivered(r)}
    for order in paid:
        avatar = avatar_of.get(order["avatar_id"])
        if avatar is None:
            continue
        if avatar.get("order_id") == order["_id"]:
            if order["_id"] in delivered and orders.fulfil(services, order["_id"]) is not None:
                done["order_fulfilled"] += 1
        elif avatar["state"] == "ready" and avatars.start_training(services, order):
            done["training_started"] += 1
        elif refunds.request_refund(services, order["_id"], reason="avatar_unavailable", by="sweeper") is not None:
            done["refund_requested"] += 1


def _paid_at(services, order_ids) -> dict:
    return {o["_id"]: o.get("paid_at") for o in services.db.orders.find({"_id": {"$in": list(order_ids)}},
                                                                         {"paid_at": 1})}


def _requeue(services, done: Counter) -> None:
    queued_avatars = list(services.db.avatars.find({"state": "queued"}))
    queued_renders = list(services.db.renders.find({"state": "queued"}))
    paid_at = _paid_at(services, {a.get("order_id") for a in queued_avatars})
    # In the order the work was bought: the line rebuilt after a loss is the line that was lost.
    queued_avatars.sort(key=lambda a: paid_at.get(a.get("order_id")) or a["updated_at"])
    queued_renders.sort(key=lambda r: r["created_at"])
    owed = ([(avatar, keys.train_job_id(avatar["_id"], avatar.get("train_attempts", 0) + 1),
              keys.avatar_subject(avatar["_id"])) for avatar in queued_avatars]
            + [(render, keys.render_job_id(render["_id"], render.get("attempts", 0) + 1),
                keys.render_subject(render["_id"])) for render in queued_renders])
    alive = _jobs_alive(services, [(job_id, subject) for _, job_id, subject in owed])
    alive = _not_lost_in_a_worker(services, owed, alive)
    for (doc, _, subject), is_alive in zip(owed, alive):
        if is_alive:
            continue
        if subject.startswith("avatar:"):
            avatars.enqueue_training(services, doc)
            done["training_requeued"] += 1
        else:
            renders.enqueue_render(services, doc)
            done["render_requeued"] += 1


def _requeue_judging(services, done: Counter) -> None:
    """Photos still `judging` past the grace whose job RQ no longer has waiting or running (Redis lost it, or every
    try failed) are queued for judging again; judging is idempotent, so a late duplicate changes nothing."""
    cutoff = _grace_cutoff(services)
    owed = [(avatar["_id"], photo["id"])
            for avatar in services.db.avatars.find({"photos.state": "judging"}, {"photos": 1})
            for photo in avatar["photos"]
            if avatars.judging(photo) and photo.get("uploaded_at") is not None and photo["uploaded_at"] < cutoff]
    if not owed:
        return
    statuses = tasks.job_statuses(services, [keys.judge_job_id(photo_id) for _, photo_id in owed])
    for (avatar_id, photo_id), status in zip(owed, statuses):
        if status in LIVE:
            continue
        stale = tasks.queue(services, tasks.INTAKE).fetch_job(keys.judge_job_id(photo_id))
        if stale is not None:  # finished or failed without a verdict: replaced by a new one
            stale.delete()
        avatars.enqueue_judging(services, avatar_id, photo_id)
        done["judging_requeued"] += 1


def _not_lost_in_a_worker(services, owed: list[tuple[dict, str, str]], alive: list[bool]) -> list[bool]:
    """A worker pops a job from its queue (LPOP) and marks it started at once. One that dies, or fails to write to
    Redis, in between leaves a job whose hash still says `queued` but which is in no list and no registry: nothing
    will ever run it or find it (the reaper sees only started and failed jobs), and tasks.enqueue keeps it as one
    still queued. Such a job, still not started past the grace a live worker needs, is deleted here so that it is
    queued again. One read of each GPU queue's list per sweep, only when a queued job is that old.
    Found by tests/test_drills.py (a worker's heartbeat write failing right after its LPOP)."""
    cutoff = _grace_cutoff(services)
    old = [i for i, ((doc, _, _), is_alive) in enumerate(zip(owed, alive))
           if is_alive and doc.get("updated_at") is not None and doc["updated_at"] < cutoff]
    if not old:
        return alive
    alive = list(alive)
    waiting: dict[str, set[str]] = {}
    for i, status in zip(old, tasks.job_statuses(services, [owed[i][1] for i in old])):
        _, job_id, subject = owed[i]
        if status != "queued":
            continue
        q = tasks.queue(services, tasks.gpu_queue_name("train" if subject.startswith("avatar:") else "render", owed[i][0]))
        if q.name not in waiting:
            listed = services.redis.lrange(q.key, 0, -1) + services.redis.lrange(q.intermediate_queue_key, 0, -1)
            waiting[q.name] = {raw.decode() for raw in listed}
        if job_id not in waiting[q.name]:
            job = q.fetch_job(job_id)
            if job is not None:
                job.delete()
            alive[i] = False
    return alive


def heal_queued_avatar(services, avatar: dict) -> bool:
    """Queue a `queued` avatar's job again if Redis lost it (the poll calls this when Redis does not know the
    avatar); True when it was re-enqueued."""
    job_id = keys.train_job_id(avatar["_id"], avatar.get("train_attempts", 0) + 1)
    if _jobs_alive(services, [(job_id, keys.avatar_subject(avatar["_id"]))])[0]:
        return False
    avatars.enqueue_training(services, avatar)
    return True


def _jobs_alive(services, owed: list[tuple[str, str]]) -> list[bool]:
    """For each (job id, subject): the job exists and will run, and the queue tracker knows it (the poll answers
    from the tracker). Two reads per job, pipelined."""
    statuses = tasks.job_statuses(services, [job_id for job_id, _ in owed])
    tracked = QueueTracker(services.redis).subject_job_ids([subject for _, subject in owed])
    return [status in LIVE and tracked_id == job_id
            for (job_id, _), status, tracked_id in zip(owed, statuses, tracked)]


def _recover_running(services, done: Counter) -> None:
    """Running work whose job RQ has forgotten (not failed: a failed job is the reaper's, jobs.recovery)."""
    cutoff = _grace_cutoff(services)
    for avatar in services.db.avatars.find({"state": "training", "updated_at": {"$lt": cutoff}}):
        job_id = keys.train_job_id(avatar["_id"], avatar.get("train_attempts", 0))
        if tasks.job_status(services, job_id) == "expired":
            done[f"training_{avatars.fail_training(services, avatar['_id'], LOST_REASON)}"] += 1
    for render in services.db.renders.find({"state": "rendering", "updated_at": {"$lt": cutoff}}):
        job_id = keys.render_job_id(render["_id"], render.get("attempts", 0))
        if tasks.job_status(services, job_id) == "expired":
            done[f"render_{renders.fail_render(services, render['_id'], LOST_REASON)}"] += 1


def _settle_failed_avatars(services, done: Counter) -> None:
    # A failed avatar keeps its photos until its refund settles (then they are purged): those are the unsettled ones.
    for avatar in services.db.avatars.find({"state": "failed", "photos_purged_at": {"$exists": False},
                                            "order_id": {"$exists": True}}, {"order_id": 1}):
        order = services.db.orders.find_one({"_id": avatar["order_id"]}, {"state": 1})
        if order is not None and order["state"] == "paid":
            if refunds.request_refund(services, avatar["order_id"], reason="training_failed", by="sweeper"):
                done["refund_requested"] += 1


def _settle_failed_renders(services, done: Counter) -> None:
    for render in services.db.renders.find({"state": "failed", "settled_at": {"$exists": False}}):
        renders.settle_failed_render(services, render)
        done["render_settled"] += 1


def _settle_packs(services, done: Counter) -> None:
    for order in services.db.orders.find({"state": {"$in": ["paid", "fulfilled"]}, "render_plan": {"$ne": None},
                                          "pack_started_at": {"$exists": False}, "album_id": {"$exists": False}},
                                         {"_id": 1}):
        if renders.start_pack(services, order["_id"]):
            done["pack_started"] += 1
    for batch in services.db.renders.find({"state": "done", "pack_slots": {"$exists": True},
                                           "settled_at": {"$exists": False}, "updated_at": {"$lt": _grace_cutoff(services)}}):
        if not renders.images_pending(services, batch):
            done[f"pack_batch_{renders.settle_batch(services, batch)}"] += 1


def _purge_photos(services, done: Counter) -> None:
    for avatar in services.db.avatars.find({"state": "trained", "photos_purged_at": {"$exists": False}}):
        photos.purge_avatar_photos(services, avatar)
        done["photos_purged"] += 1
    for avatar in services.db.avatars.find({"state": "failed", "photos_purged_at": {"$exists": False}},
                                           {"order_id": 1}):
        order = services.db.orders.find_one({"_id": avatar.get("order_id")}, {"state": 1})
        if order is not None and order["state"] == "refunded":
            photos.purge_failed_avatar_photos(services, avatar["_id"])
            done["photos_purged"] += 1


def _grace_cutoff(services):
    """Work younger than this may still be in the hands of a live process."""
    return states.now() - timedelta(seconds=services.settings.worker_dead_after_s * 2)


def _settle_claims(services, done: Counter) -> None:
    older_than = _grace_cutoff(services)
    done.update(renders.settle_stale_claims(services, older_than))
    done["retry_released"] += renders.release_stale_retries(services, older_than)
