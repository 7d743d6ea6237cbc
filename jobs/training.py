"""Training a user's digital avatar (a LoRA) on the resident base pipeline."""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image
from rq import get_current_job

from jobs import context, queues
from jobs.failures import retry_or_fail
from jobs.notifications import notify
from jobs.tracking import QueueTracker
from miniapp_api import states

CLASS_WORDS = {"female": "woman", "male": "man"}
TRIGGER = "sks"


class InjectedFault(RuntimeError):
    """A technical failure injected through FAULT_TRAIN_FAILURES (tests and drills)."""


def subject(avatar_id: str) -> str:
    return f"avatar:{avatar_id}"


def caption_for(gender: str) -> str:
    return f"a photo of {TRIGGER} {CLASS_WORDS[gender]}"


def lora_key(avatar: dict) -> str:
    return f"users/{avatar['user_id']}/avatars/{avatar['_id']}/lora.safetensors"


def pivot_key(avatar: dict) -> str:
    return f"users/{avatar['user_id']}/avatars/{avatar['_id']}/pivot.f64"


def _identity_pivot(services, avatar: dict) -> np.ndarray:
    """The mean face embedding of the accepted photos: what renders are ranked against after the photos are gone."""
    from models.faces import identity_pivot

    embeddings = [np.frombuffer(services.sealed.get(avatar["user_id"], p["embedding_key"]), dtype=np.float64)
                  for p in avatar["photos"] if p["accepted"]]
    return np.asarray(identity_pivot(embeddings), dtype=np.float64)


def start_training(services, order: dict) -> None:
    avatar = states.transition(services.db, "avatar", order["avatar_id"], "queued", expect={"ready"},
                               by=f"order:{order['_id']}", set_fields={"order_id": order["_id"]})
    if avatar is not None:
        enqueue_training(services, avatar)


def enqueue_training(services, avatar: dict) -> None:
    attempt = avatar.get("train_attempts", 0) + 1
    job_id = f"train-{avatar['_id']}-{attempt}"
    queues.track_for_owner(services, subject(avatar["_id"]), avatar["user_id"])
    queues.enqueue(services, queues.TRAIN, train_avatar, avatar["_id"], job_id=job_id, subject=subject(avatar["_id"]))


def train_avatar(avatar_id: str) -> str:
    services = context.services()
    settings = services.settings
    tracker = QueueTracker(services.redis)
    job = get_current_job()
    job_id = job.id if job else f"inline-{avatar_id}"
    avatar = states.transition(services.db, "avatar", avatar_id, "training", expect={"queued"}, by=f"job:{job_id}",
                               inc={"train_attempts": 1}, set_fields={"training_started_at": states.now()})
    if avatar is None:
        tracker.finished(queues.TRAIN, job_id, measure=False)
        return "skipped"
    tracker.started(queues.TRAIN, job_id)
    tracker.set_subject(subject(avatar_id), state="training", progress=0)
    notify(services, avatar["user_id"], "training_started", {"avatar_id": avatar_id})
    started = time.monotonic()
    try:
        if avatar["train_attempts"] <= settings.fault_train_failures:
            raise InjectedFault(f"injected training failure {avatar['train_attempts']}")
        services.sealed.put(avatar["user_id"], pivot_key(avatar), _identity_pivot(services, avatar).tobytes())
        weights = _train(services, avatar, job, tracker)
        services.sealed.put(avatar["user_id"], lora_key(avatar), weights)
    except Exception as error:
        tracker.finished(queues.TRAIN, job_id, measure=False)
        handle_training_failure(services, avatar_id, reason=f"{type(error).__name__}: {error}")
        raise
    trained = states.transition(services.db, "avatar", avatar_id, "trained", expect={"training"}, by=f"job:{job_id}",
                                set_fields={"lora_key": lora_key(avatar), "pivot_key": pivot_key(avatar),
                                            "trained_at": states.now(),
                                            "training_seconds": round(time.monotonic() - started, 3)})
    tracker.finished(queues.TRAIN, job_id, measure=True)
    if trained is None:
        return "superseded"
    from miniapp_api.privacy import purge_avatar_photos

    purge_avatar_photos(services, trained)
    tracker.set_subject(subject(avatar_id), state="trained", progress=1)
    notify(services, avatar["user_id"], "avatar_ready", {"avatar_id": avatar_id})
    return "trained"


def _train(services, avatar: dict, job, tracker: QueueTracker) -> bytes:
    from models.train import TrainConfig, train_lora

    settings = services.settings
    images = [
        Image.open(io.BytesIO(services.sealed.get(avatar["user_id"], photo["crop_key"]))).convert("RGB")
        for photo in avatar["photos"] if photo["accepted"]
    ]
    config = TrainConfig(rank=settings.lora_rank, steps=settings.train_steps, resolution=settings.train_resolution,
                         seed=int.from_bytes(avatar["_id"].encode()[:4], "big"))

    started = time.monotonic()

    def progress(step: int, total: int) -> None:
        from jobs.worker import check_hand_back

        fraction = round(step / total, 4)
        if job is not None:
            job.meta.update({"step": step, "total": total, "progress": fraction})
            job.save_meta()
        tracker.set_subject(subject(avatar["_id"]), progress=fraction, step=step, total=total)
        check_hand_back(fraction, time.monotonic() - started)

    return train_lora(services.pipeline(), images, caption_for(avatar["gender"]), config, progress=progress)


def handle_training_failure(services, avatar_id: str, reason: str) -> str:
    """Retry while attempts remain, else fail the avatar and refund its order — each exactly once."""
    from miniapp_api.billing import request_refund

    outcome, failed = retry_or_fail(services, "avatar", avatar_id, attempts_field="train_attempts",
                                    retries=services.settings.train_retries, running_state="training",
                                    enqueue=enqueue_training, subject=subject(avatar_id), reason=reason)
    if failed is None:
        return outcome
    request_refund(services, failed["order_id"], reason="training_failed")
    return "failed"
