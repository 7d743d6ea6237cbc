"""The preview task: one portrait from the front photo through the image-prompt adapter, on a GPU worker's own
preview pipeline (models.preview). What it means for the user (labels, content check, replacement by the trained
portraits) is portraits.previews.

A failure ends the preview (absent) and nothing else: it is not retried and not raised, so no failed job keeps an
error naming the user's blobs in Redis; a job lost with its worker is queued again by the sweep.
"""
from __future__ import annotations

import logging

from rq import get_current_job

from jobs import context
from portraits import previews

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """A technical failure injected through FAULT_PREVIEW_FAILURES (tests and drills)."""


def render_preview(avatar_id: str) -> str:
    services = context.services()
    job = get_current_job()
    job_id = job.id if job else f"inline-{avatar_id}"
    preview = previews.begin_preview(services, avatar_id, job_id)
    if preview is None:
        return "skipped"
    try:
        if preview["attempts"] <= services.settings.fault_preview_failures:
            raise InjectedFault(f"injected preview failure {preview['attempts']}")
        plan = previews.plan_preview(services, preview)
        image = services.previewer().render(face=plan.face, prompt=plan.prompt, negative_prompt=plan.negative_prompt,
                                            steps=plan.steps, guidance=plan.guidance, width=plan.size,
                                            height=plan.size, seed=plan.seed)
        return previews.complete_preview(services, preview, image)
    except Exception as error:
        # The type only: a message can name the user's blob keys.
        log.warning("%s: preview failed (%s)", job_id, type(error).__name__)
        return previews.fail_preview(services, avatar_id, type(error).__name__)
