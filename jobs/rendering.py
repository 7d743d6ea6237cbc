"""Rendering one template on one avatar: draw candidates, rank by likeness, label and keep the best."""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
from PIL import Image
from rq import get_current_job

from jobs import context, queues
from jobs.failures import retry_or_fail
from jobs.notifications import notify
from jobs.tracking import QueueTracker
from jobs.training import CLASS_WORDS, TRIGGER
from miniapp_api import states


# A second face with at most this share of the main face's area is background, as in photo intake.
SECOND_FACE_MAX_RATIO = 0.25
RETRY_SEED_STRIDE = 1_000_003


class InjectedFault(RuntimeError):
    pass


class NoUsableCandidates(RuntimeError):
    pass


def subject(render_id: str) -> str:
    return f"render:{render_id}"


def enqueue_render(services, render: dict) -> None:
    attempt = render.get("attempts", 0) + 1
    queues.track_for_owner(services, subject(render["_id"]), render["user_id"])
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
        image_ids = [candidate.image_id or _store_labelled(services, render, candidate.image, candidate.likeness)
                     for candidate in kept]
    except Exception as error:
        tracker.finished(queues.RENDER, job_id, measure=False)
        handle_render_failure(services, render_id, f"{type(error).__name__}: {error}")
        raise
    scores = [candidate.likeness for candidate in kept if candidate.likeness is not None]
    carried = [candidate.image_id for candidate in kept if candidate.image_id]
    done = states.transition(services.db, "render", render_id, "done", expect={"rendering"}, by=f"job:{job_id}",
                             set_fields={"image_ids": image_ids, "likeness_best": max(scores) if scores else None,
                                         "carried_image_ids": carried, "finished_at": states.now()})
    tracker.finished(queues.RENDER, job_id, measure=True)
    if done is None:
        return "superseded"
    tracker.set_subject(subject(render_id), state="done")
    from miniapp_api.billing import fulfil

    fulfil(services, render["order_id"])
    notify(services, render["user_id"], "portraits_ready", {"render_id": render_id})
    return "done"


@dataclass(frozen=True)
class RankedCandidate:
    """One image considered for a render's result, with its likeness to the user (None: not scorable)."""

    image: Image.Image | None
    likeness: float | None
    faces: int | None = None  # usable faces found; None when not analysed (carried over from a parent)
    index: int = 0  # position among the candidates drawn
    image_id: str | None = None  # set for a stored image carried over from the parent render


def score_candidate(image: Image.Image, pivot: np.ndarray | None, analyzer) -> tuple[int, float | None]:
    """(usable faces, likeness to pivot). Likeness is None unless there is exactly one usable face and a pivot."""
    from models.faces import likeness

    rgb = np.asarray(image.convert("RGB"))
    # A background face smaller than the intake's second-face limit does not make the candidate ambiguous.
    faces = analyzer.faces(rgb, min_area_ratio=SECOND_FACE_MAX_RATIO)
    if len(faces) != 1 or pivot is None:
        return len(faces), None
    return 1, round(float(likeness(analyzer.embed(rgb, faces[0]), pivot)), 4)


def rank_candidates(images: list[Image.Image], pivot: np.ndarray | None, analyzer, keep: int,
                    require_face: bool = True) -> list[RankedCandidate]:
    """The best ``keep`` candidates, most like the pivot first.

    With ``require_face`` a candidate without exactly one usable face is dropped. Without it (the tiny random
    model draws no faces) such candidates are kept, unscored, after every scored one. Ties keep draw order.
    """
    ranked = []
    for index, image in enumerate(images):
        faces, score = score_candidate(image, pivot, analyzer)
        if require_face and faces != 1:
            continue
        ranked.append(RankedCandidate(image=image, likeness=score, faces=faces, index=index))
    return best_first(ranked)[:keep]


def best_first(candidates: list[RankedCandidate]) -> list[RankedCandidate]:
    """Scored before unscored, higher likeness first; stable, so earlier entries win ties."""
    return sorted(candidates, key=lambda c: (c.likeness is None, -(c.likeness or 0.0)))


def merge_with_parent(fresh: list[RankedCandidate], parent_images: list[dict], keep: int) -> list[RankedCandidate]:
    """More Like Me's guarantee: the child's best is never below its parent's.

    The parent's kept images compete with the child's new candidates on their stored likeness (same pivot, same
    embedder, so the scores are comparable); a new candidate wins a tie. Unscored parent images never displace
    anything, so on the tiny model the child shows only its own new images.
    """
    carried = [RankedCandidate(image=None, likeness=doc.get("likeness"), index=len(fresh) + i, image_id=doc["_id"])
               for i, doc in enumerate(parent_images) if doc.get("likeness") is not None]
    return best_first(list(fresh) + carried)[:keep]


def _draw_and_rank(services, render: dict) -> list[RankedCandidate]:
    settings = services.settings
    template = services.catalog.get(render["template_id"])
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
    params = render["params"]
    steps = template.steps if settings.render_max_steps is None else min(template.steps, settings.render_max_steps)
    count = params["candidates"]
    if settings.render_max_candidates is not None:
        count = max(1, min(count, settings.render_max_candidates))
    keep = min(params["images_to_keep"], count)
    lora = services.sealed.get(avatar["user_id"], avatar["lora_key"])
    init_image = mask = None
    if template.init_image:
        init_image = Image.open(services.catalog.asset_path(template.init_image)).convert("RGB")
        mask = Image.open(services.catalog.asset_path(template.mask)).convert("L")
    # A retry draws different candidates: the same seed would only reproduce a set without usable faces.
    seed = (render["seed"] + RETRY_SEED_STRIDE * (render.get("attempts", 1) - 1)) % 2**31
    candidates = services.renderer().render(
        lora=lora, adapter_name=f"user_{avatar['_id']}", prompt=template.prompt_for(f"{TRIGGER} {CLASS_WORDS[avatar['gender']]}"),
        negative_prompt=template.negative_prompt, num_images=count, steps=steps,
        guidance=template.guidance, width=template.width, height=template.height, seed=seed,
        lora_scale=params["identity_strength"], style_lora=_style_lora(services, template),
        style_scale=params["style_strength"], init_image=init_image, mask_image=mask,
    )
    if template.output_size:
        from miniapp_api.catalog import fit_output_size

        candidates = [fit_output_size(image, template.output_size) for image in candidates]
    # The tiny random-weight base model draws no faces, so its candidates cannot be scored and are kept unscored;
    # a real base model's candidates without exactly one usable face are dropped.
    kept = rank_candidates(candidates, _pivot(services, avatar), services.face_analyzer(), keep,
                           require_face=not settings.uses_tiny_model)
    if render.get("parent_id"):
        parent = services.db.renders.find_one({"_id": render["parent_id"]}) or {}
        parent_images = list(services.db.images.find({"_id": {"$in": parent.get("image_ids", [])}}))
        kept = merge_with_parent(kept, parent_images, keep)
    if not kept:
        raise NoUsableCandidates(f"none of {len(candidates)} candidates shows exactly one usable face")
    return kept


def _style_lora(services, template):
    if not template.style_lora:
        return None
    return services.catalog.asset_path(template.style_lora).read_bytes()


def _pivot(services, avatar: dict) -> np.ndarray | None:
    pivot_key = avatar.get("pivot_key")
    if not pivot_key:
        return None
    return np.frombuffer(services.sealed.get(avatar["user_id"], pivot_key), dtype=np.float64)


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
    """Retry while attempts remain; then the render set goes back to the user as a free credit, exactly once (only
    the caller whose transition to `failed` wins gives it), and an order that cannot be delivered is refunded."""
    outcome, failed = retry_or_fail(services, "render", render_id, attempts_field="attempts",
                                    retries=services.settings.render_retries, running_state="rendering",
                                    enqueue=enqueue_render, subject=subject(render_id), reason=reason)
    if failed is None:
        return outcome
    if failed.get("charged"):
        services.db.orders.update_one({"_id": failed["order_id"]}, {"$inc": {"render_credits": 1}})
    from miniapp_api.billing import refund_if_undeliverable

    refund_if_undeliverable(services, failed["order_id"], by=f"render:{render_id}")
    return "failed"
