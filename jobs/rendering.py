"""Rendering one template on one avatar: draw candidates, rank by likeness, label and keep the best."""
from __future__ import annotations

import io
import secrets

import numpy as np
from PIL import Image
from rq import get_current_job

from jobs import context, queues
from jobs.notifications import notify
from jobs.tracking import QueueTracker
from jobs.training import CLASS_WORDS, TRIGGER
from miniapp_api import states


class InjectedFault(RuntimeError):
    pass


def subject(render_id: str) -> str:
    return f"render:{render_id}"


def enqueue_render(services, render: dict) -> None:
    attempt = render.get("attempts", 0) + 1
    QueueTracker(services.redis).set_subject(subject(render["_id"]), owner=render["user_id"], state="queued")
    queues.enqueue(services, queues.RENDER, render_portraits, render["_id"], job_id=f"render-{render['_id']}-{attempt}",
                   subject=subject(render["_id"]))


def image_key(user_id: str, image_id: str) -> str:
    return f"users/{user_id}/images/{image_id}.png"


def render_portraits(render_id: str) -> str:
    services = context.services()
    tracker = QueueTracker(services.redis)
    job = get_current_job()
    job_id = job.id if job else f"inline-{render_id}"
    render = states.transition(services.db, "render", render_id, "rendering", expect={"queued"}, by=f"job:{job_id}",
                               inc={"attempts": 1})
    if render is None:
        tracker.finished(queues.RENDER, job_id, measure=False)
        return "skipped"
    tracker.started(queues.RENDER, job_id)
    tracker.set_subject(subject(render_id), state="rendering")
    try:
        if render["attempts"] <= services.settings.fault_render_failures:
            raise InjectedFault(f"injected render failure {render['attempts']}")
        kept = _draw_and_rank(services, render)
        image_ids = [_store_labelled(services, render, image, score) for image, score in kept]
    except Exception as error:
        tracker.finished(queues.RENDER, job_id, measure=False)
        handle_render_failure(services, render_id, f"{type(error).__name__}: {error}")
        raise
    scores = [score for _, score in kept if score is not None]
    done = states.transition(services.db, "render", render_id, "done", expect={"rendering"}, by=f"job:{job_id}",
                             set_fields={"image_ids": image_ids, "likeness_best": max(scores) if scores else None,
                                         "finished_at": states.now()})
    tracker.finished(queues.RENDER, job_id, measure=True)
    if done is None:
        return "superseded"
    tracker.set_subject(subject(render_id), state="done")
    from miniapp_api.billing import fulfil

    fulfil(services, render["order_id"])
    notify(services, render["user_id"], "portraits_ready", {"render_id": render_id})
    return "done"


def _draw_and_rank(services, render: dict) -> list[tuple[Image.Image, float | None]]:
    settings = services.settings
    template = services.catalog.get(render["template_id"])
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
    params = render["params"]
    steps = template.steps if settings.render_max_steps is None else min(template.steps, settings.render_max_steps)
    lora = services.sealed.get(avatar["user_id"], avatar["lora_key"])
    init_image = mask = None
    if template.init_image:
        init_image = Image.open(services.catalog.asset_path(template.init_image)).convert("RGB")
        mask = Image.open(services.catalog.asset_path(template.mask)).convert("L")
    candidates = services.renderer().render(
        lora=lora, adapter_name=f"user_{avatar['_id']}", prompt=template.prompt_for(f"{TRIGGER} {CLASS_WORDS[avatar['gender']]}"),
        negative_prompt=template.negative_prompt, num_images=params["candidates"], steps=steps,
        guidance=template.guidance, width=template.width, height=template.height, seed=render["seed"],
        lora_scale=params["identity_strength"], style_lora=_style_lora(services, template),
        style_scale=params["style_strength"], init_image=init_image, mask_image=mask,
    )
    if template.output_size:
        from miniapp_api.catalog import fit_output_size

        candidates = [fit_output_size(image, template.output_size) for image in candidates]
    scored = [(image, _likeness(services, avatar, image)) for image in candidates]
    # The tiny random-weight base model draws no faces, so its candidates cannot be scored; a real base model's
    # candidates without exactly one usable face are dropped.
    if not settings.uses_tiny_model:
        scored = [(image, score) for image, score in scored if score is not None]
    scored.sort(key=lambda pair: -1.0 if pair[1] is None else pair[1], reverse=True)
    return scored[: params["images_to_keep"]]


def _style_lora(services, template):
    if not template.style_lora:
        return None
    return services.catalog.asset_path(template.style_lora).read_bytes()


def _likeness(services, avatar: dict, image: Image.Image) -> float | None:
    pivot_key = avatar.get("pivot_key")
    if not pivot_key:
        return None
    from models.faces import likeness

    analyzer = services.face_analyzer()
    rgb = np.asarray(image.convert("RGB"))
    faces = analyzer.faces(rgb)
    if len(faces) != 1:
        return None
    pivot = np.frombuffer(services.sealed.get(avatar["user_id"], pivot_key), dtype=np.float64)
    return round(float(likeness(analyzer.embed(rgb, faces[0]), pivot)), 4)


def _store_labelled(services, render: dict, image: Image.Image, score: float | None) -> str:
    from models.labels import label_image

    image_id = "img_" + secrets.token_hex(10)
    content_id = "AIGC-" + secrets.token_hex(12).upper()
    data = label_image(image, content_id=content_id, provider=services.settings.provider_name,
                       font_path=services.settings.cjk_font_path)
    services.sealed.put(render["user_id"], image_key(render["user_id"], image_id), data)
    at = states.now()
    services.db.images.insert_one({"_id": image_id, "user_id": render["user_id"], "render_id": render["_id"],
                                   "content_id": content_id, "likeness": score, "width": image.width,
                                   "height": image.height, "created_at": at})
    from miniapp_api.privacy import label_log_entry

    services.db.label_log.insert_one(label_log_entry(services, content_id, render["user_id"], at))
    return image_id


def handle_render_failure(services, render_id: str, reason: str) -> str:
    """Retry while attempts remain; then the render set goes back to the user as a free credit."""
    render = services.db.renders.find_one({"_id": render_id})
    if render is None:
        return "gone"
    if render.get("attempts", 0) <= services.settings.render_retries:
        requeued = states.transition(services.db, "render", render_id, "queued", expect={"rendering"}, reason=reason)
        if requeued is not None:
            enqueue_render(services, requeued)
            return "retried"
        return "already_handled"
    failed = states.transition(services.db, "render", render_id, "failed", expect={"rendering", "queued"},
                               reason=reason, set_fields={"failure": reason})
    if failed is None:
        return "already_handled"
    QueueTracker(services.redis).set_subject(subject(render_id), state="failed")
    if failed.get("charged"):
        services.db.orders.update_one({"_id": failed["order_id"]}, {"$inc": {"render_credits": 1}})
    return "failed"
