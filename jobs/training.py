"""The training task: a user's digital avatar (a LoRA) trained on the resident base pipeline.

What training means for the avatar (claim, photos purged, refund on failure) is portraits.avatars; this module runs
the model and reports progress into job.meta and the queue tracker.
"""
from __future__ import annotations

import time

from jobs import gpu_job
from models.train import TrainConfig, train_lora
from portraits import avatars, keys, renders, tasks
from portraits.queue.tracking import QueueTracker


class InjectedFault(RuntimeError):
    """A technical failure injected through FAULT_TRAIN_FAILURES (tests and drills)."""


def train_avatar(avatar_id: str) -> str:
    return gpu_job.run(TRAINING, avatar_id)


def _train(services, avatar: dict, job) -> None:
    if avatar["train_attempts"] <= services.settings.fault_train_failures:
        raise InjectedFault(f"injected training failure {avatar['train_attempts']}")
    avatars.store_identity_pivot(services, avatar)
    tracker = QueueTracker(services.redis)
    subject = keys.avatar_subject(avatar["_id"])
    started = time.monotonic()

    def progress(step: int, total: int) -> None:
        fraction = round(step / total, 4)
        if job is not None:
            job.meta.update({"step": step, "total": total, "progress": fraction})
            job.save_meta()
        tracker.set_subject(subject, progress=fraction, step=step, total=total)
        gpu_job.check_hand_back(fraction, time.monotonic() - started)

    weights = train_lora(services.training_pipeline(), avatars.training_images(services, avatar),
                         avatars.caption_for(avatar["gender"]), _config(services.settings, avatar),
                         progress=progress)
    avatars.store_lora(services, avatar, weights)


def _config(settings, avatar: dict) -> TrainConfig:
    compile_mode = None if settings.train_compile == "off" else settings.train_compile
    return TrainConfig.for_recipe(settings.train_recipe, rank=settings.lora_rank, steps=settings.train_steps,
                                  resolution=settings.train_resolution, seed=avatars.training_seed(avatar),
                                  compile_mode=compile_mode)


def _complete(services, avatar: dict, job_id: str, result, seconds: float) -> str:
    """The avatar is trained; an order with a render plan starts its batches (renders.start_pack; the sweep does it
    if this process dies first)."""
    outcome = avatars.complete_training(services, avatar, job_id, result, seconds)
    if outcome == "trained":
        renders.start_pack(services, avatar["order_id"])
    return outcome


TRAINING = gpu_job.GpuJobKind(queue=tasks.TRAIN, collection="avatars", claim=avatars.begin_training, work=_train,
                              complete=_complete, fail=avatars.fail_training)
