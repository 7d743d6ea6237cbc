"""Renders (one template on one avatar): credits, More Like Me, and the render lifecycle
(queued -> rendering -> done | failed).

A paid order carries render credits (one per render set); a render takes one when it is created and, if it fails
for a technical reason after its retries, gives it back exactly once. More Like Me is free and limited per set.
"""
from __future__ import annotations

import logging
import secrets
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pymongo.errors import DuplicateKeyError

from models.faces import relative_likeness
from models.album import AlbumFace
from models.labels import label_image
from models.ranking import RankedCandidate
from models.render_request import RenderRequest
from portraits import albums, avatars, content_checks, keys, notifications, packs, previews, privacy, states, tasks
from portraits.billing import orders, refunds
from portraits.catalog import fit_output_size
from portraits.errors import Conflict, Invalid, NotFound, PaymentRequired
from portraits.queue import lanes
from portraits.queue.tracking import QueueTracker
from portraits.retries import retry_or_fail

log = logging.getLogger(__name__)

# More Like Me is free but limited: this many refinements per paid render set (its whole tree of children).
MAX_REFINEMENTS = 3
MORE_LIKE_ME = {"identity": 1.25, "identity_max": 2.0, "style": 0.5, "candidates": 2, "candidates_max": 16}
RETRY_SEED_STRIDE = 1_000_003


# A credit or a refinement is taken in the same update that records a claim naming the render it pays for; the
# claim is dropped once that render is written. A claim left behind (the process died between the two writes) is
# settled by the sweep: dropped if its render exists, given back if it never will (settle_stale_claims).
CLAIMS = {"orders": ("render_claims", "render_credits", 1), "renders": ("refinement_claims", "refinements_used", -1)}


def claim_render_credit(db, order_id: str, user_id: str, render_id: str) -> dict | None:
    """Take one render set from a paid order for `render_id`, atomically; None when none is left (or the order is
    not paid)."""
    return db.orders.find_one_and_update(
        {"_id": order_id, "user_id": user_id, "state": {"$in": ["paid", "fulfilled"]},
         "render_credits": {"$gt": 0}},
        {"$inc": {"render_credits": -1}, "$push": {"render_claims": _claim(render_id)}})


def claim_refinement(db, root_id: str, render_id: str) -> bool:
    """Count one More Like Me (`render_id`) against the root render set; False once MAX_REFINEMENTS are used."""
    claimed = db.renders.find_one_and_update(
        {"_id": root_id, "refinements_used": {"$not": {"$gte": MAX_REFINEMENTS}}},
        {"$inc": {"refinements_used": 1}, "$push": {"refinement_claims": _claim(render_id)}})
    return claimed is not None


def _claim(render_id: str) -> dict:
    return {"render_id": render_id, "at": states.now()}


def drop_claim(db, collection: str, holder_id: str, render_id: str) -> None:
    """The render a claim paid for is written: the claim is done."""
    field, _, _ = CLAIMS[collection]
    db[collection].update_one({"_id": holder_id}, {"$pull": {field: {"render_id": render_id}}})


def give_back_claim(db, collection: str, holder_id: str, render_id: str) -> bool:
    """The render a claim paid for was never written: the credit (or refinement) goes back, once (the filter on the
    claim makes a second call, or a racing sweep, a no-op)."""
    field, counter, sign = CLAIMS[collection]
    given = db[collection].update_one({"_id": holder_id, f"{field}.render_id": render_id},
                                      {"$inc": {counter: sign}, "$pull": {field: {"render_id": render_id}}})
    return given.modified_count == 1


def settle_stale_claims(services, older_than) -> Counter:
    """Claims older than `older_than` (no request takes that long between its two writes): each dropped if its
    render was written, given back otherwise."""
    settled = Counter()
    for collection, (field, _, _) in CLAIMS.items():
        holders = list(services.db[collection].find({f"{field}.at": {"$lt": older_than}}, {field: 1}))
        stale = [(holder["_id"], claim["render_id"]) for holder in holders for claim in holder[field]
                 if claim["at"] < older_than]
        written = {r["_id"] for r in services.db.renders.find({"_id": {"$in": [rid for _, rid in stale]}}, {"_id": 1})}
        for holder_id, render_id in stale:
            if render_id in written:
                drop_claim(services.db, collection, holder_id, render_id)
                settled["claim_dropped"] += 1
            elif give_back_claim(services.db, collection, holder_id, render_id):
                settled["claim_given_back"] += 1
    return settled


def create_render(services, user: dict, avatar: dict, template_id: str) -> dict:
    template = services.catalog.get(template_id)
    if template is None:
        raise NotFound("template_not_found", "No such template.")
    if template.people > 1:
        raise Invalid("album_template", "This template is for albums of several people: start an album instead.",
                      {"people": template.people})
    if avatar["state"] != "trained":
        raise Conflict("avatar_not_trained", "The avatar is not ready for portraits yet.", {"state": avatar["state"]})
    if template.gender != avatar["gender"]:
        raise Invalid("template_gender_mismatch", "Pick a template made for this avatar's gender.",
                      {"template_gender": template.gender, "avatar_gender": avatar["gender"]})
    render_id = new_render_id()
    order = claim_render_credit(services.db, avatar["order_id"], user["_id"], render_id)
    if order is None:
        raise PaymentRequired("no_render_credits", "All render sets of this order are used.")
    params = template_params(template)
    return _insert_claimed(services, "orders", order["_id"], render_id,
                           lambda: insert_render(services, avatar, template.id, order["_id"], params, parent=None,
                                                 charged=True, render_id=render_id))


def template_params(template, candidates: int | None = None, keep: int | None = None) -> dict:
    return {"identity_strength": template.identity_strength, "style_strength": template.style_strength,
            "candidates": candidates or template.candidates, "images_to_keep": keep or template.images_to_keep}


def _insert_claimed(services, collection: str, holder_id: str, render_id: str, insert) -> dict:
    """Write the render a claim paid for, then drop the claim. On a failure the claim goes back only if the render
    was never written: once it is (the failure came after, queueing its job) the render is owed and will be made
    (the sweep enqueues a `queued` render Redis does not have), and giving the credit back too would hand out a
    render set for free (found by tests/test_drills.py)."""
    try:
        render = insert()
    except Exception:
        if services.db.renders.find_one({"_id": render_id}, {"_id": 1}) is None:
            give_back_claim(services.db, collection, holder_id, render_id)
        raise
    drop_claim(services.db, collection, holder_id, render_id)
    return render


def more_like_me(services, parent: dict, avatar: dict) -> dict:
    if parent.get("pack_slots"):
        raise Conflict("render_not_refinable", "A batch of a pack is not refined; its portraits are what it owes.")
    if parent["state"] != "done":
        raise Conflict("render_not_done", "Wait for this render to finish first.", {"state": parent["state"]})
    if avatar["state"] != "trained":
        raise Conflict("avatar_not_trained", "The avatar is not ready for portraits.", {"state": avatar["state"]})
    root_id = parent.get("root_id") or parent["_id"]
    render_id = new_render_id()
    if not claim_refinement(services.db, root_id, render_id):
        raise Conflict("refinement_limit", "This render was refined as far as it goes.", {"max": MAX_REFINEMENTS})
    return _insert_claimed(services, "renders", root_id, render_id,
                           lambda: insert_render(services, avatar, parent["template_id"], parent["order_id"],
                                                 more_like_me_params(parent["params"]), parent=parent,
                                                 charged=False, render_id=render_id))


def more_like_me_params(p: dict) -> dict:
    """Stronger identity, weaker style, more candidates; never weaker identity or fewer candidates than before."""
    return {
        "identity_strength": round(max(p["identity_strength"],
                                       min(p["identity_strength"] * MORE_LIKE_ME["identity"],
                                           MORE_LIKE_ME["identity_max"])), 3),
        "style_strength": round(p["style_strength"] * MORE_LIKE_ME["style"], 3),
        "candidates": max(p["candidates"], min(p["candidates"] * MORE_LIKE_ME["candidates"],
                                               MORE_LIKE_ME["candidates_max"])),
        "images_to_keep": p["images_to_keep"],
    }


def refinements_left(services, render: dict) -> int:
    root = services.db.renders.find_one({"_id": render["root_id"]}) if render.get("root_id") else render
    return max(0, MAX_REFINEMENTS - (root or {}).get("refinements_used", 0))


def queue_position(services, render: dict) -> dict | None:
    if render["state"] not in ("queued", "rendering"):
        return None
    tracker = tasks.queue_tracker(services)
    tracked = tracker.subject(keys.render_subject(render["_id"]))
    if not tracked.get("job_id"):
        return None
    return tracker.position(tracked["queue"], tracked["job_id"])


def new_render_id() -> str:
    return "rd_" + secrets.token_hex(10)


def insert_render(services, avatar, template_id, order_id, params, *, parent, charged: bool, by: str | None = None,
                  render_id: str | None = None, retry_of: str | None = None, rerender_of: str | None = None,
                  pack: dict | None = None) -> dict:
    """A new queued render set (a user's, a More Like Me child, or an operator's retry of a failed one), or a pack's
    batch (`pack`: packs.batch_fields; its id is derived, so a second insert raises DuplicateKeyError)."""
    at = states.now()
    render = {"_id": render_id or new_render_id(), "user_id": avatar["user_id"], "avatar_id": avatar["_id"],
              "order_id": order_id, "template_id": template_id, "parent_id": parent["_id"] if parent else None,
              "root_id": (parent.get("root_id") or parent["_id"]) if parent else None,
              "parent_likeness": parent.get("likeness_best") if parent else None,
              "params": params, "seed": secrets.randbelow(2**31), "charged": charged, "state": "queued",
              "attempts": 0, "image_ids": [], "created_at": at, "updated_at": at, "lane": lanes.lane_of(avatar),
              "history": states.initial_history("queued", by or f"user:{avatar['user_id']}")}
    if retry_of:
        render["retry_of"] = retry_of
    if rerender_of:
        render["rerender_of"] = rerender_of
    render.update(pack or {})
    services.db.renders.insert_one(render)
    enqueue_render(services, render)
    return render


def enqueue_render(services, render: dict) -> None:
    subject = keys.render_subject(render["_id"])
    tasks.track_for_owner(services, subject, render["user_id"])
    tasks.enqueue(services, tasks.gpu_queue_name("render", render), tasks.RENDER_PORTRAITS, render["_id"],
                  job_id=keys.render_job_id(render["_id"], render.get("attempts", 0) + 1), subject=subject)


# ------------------------------------------------------------------------------------------------- lifecycle


def begin_render(services, render_id: str, job_id: str) -> dict | None:
    """Claim a queued render for this job; None when it is not queued (handled elsewhere, or gone), or when it is
    a batch of an album withdrawn meanwhile (it ends without drawing)."""
    queued = services.db.renders.find_one({"_id": render_id}, {"album_id": 1})
    if queued is not None and queued.get("album_id") and albums.withdrawn(services, queued["album_id"]):
        albums.end_queued_batches(services, queued["album_id"])
        return None
    render = states.transition(services.db, "render", render_id, "rendering", expect={"queued"}, by=f"job:{job_id}",
                               inc={"attempts": 1})
    if render is not None:
        QueueTracker(services.redis).set_subject(keys.render_subject(render_id), state="rendering")
    return render


@dataclass(frozen=True)
class RenderPlan:
    """Everything the renderer is asked for one render set: what to draw, how many, how many to keep."""

    lora: bytes
    adapter_name: str
    prompt: str
    negative_prompt: str
    count: int
    keep: int
    steps: int
    guidance: float
    width: int
    height: int
    seed: int
    identity_strength: float
    style_lora: bytes | None
    style_strength: float
    init_image: Image.Image | None
    mask_image: Image.Image | None
    output_size: tuple[int, int] | None
    pivot: np.ndarray | None
    require_face: bool


def plan_render(services, render: dict) -> RenderPlan:
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
    return _plan(services, avatar, _lora(services, avatar), _pivot(services, avatar),
                 services.catalog.get(render["template_id"]), render["params"], retry_seed(render))


def plan_batch(services, render: dict) -> list[RenderPlan]:
    """One plan per image a pack's batch owes: its slot's template, a few candidates, the best one kept."""
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
    lora, pivot, seed = _lora(services, avatar), _pivot(services, avatar), retry_seed(render)
    return [_plan(services, avatar, lora, pivot, template,
                  template_params(template, candidates=services.settings.pack_candidates_per_image, keep=1),
                  (seed + slot) % 2**31)
            for slot, template in zip(render["pack_slots"],
                                      (services.catalog.get(t) for t in render["pack_templates"]))]


@dataclass(frozen=True)
class AlbumPlan:
    """One slot of an album's batch: the scene (drawn on the base model, ``scene.num_images`` candidates), then each
    member's face region redrawn with their LoRA (models.album), ranked by the worst face's likeness."""

    template_id: str
    scene: RenderRequest
    faces: tuple[AlbumFace, ...]  # member order: face region i belongs to album member i
    pivots: tuple[np.ndarray | None, ...]
    subjects: tuple[str, ...]  # how each face's prompt names its owner
    require_face: bool

    @property
    def regions(self) -> list[tuple[tuple[int, int, int, int], np.ndarray | None]]:
        """(box, owner's pivot) per face region, as models.ranking.score_regions takes them."""
        return [(face.box, pivot) for face, pivot in zip(self.faces, self.pivots)]


def plan_album_batch(services, render: dict) -> list[AlbumPlan]:
    """One plan per slot an album's batch owes (its templates show as many people as the album has members; member
    i, inviter first, owns face region i). Seeds are derived as plan_batch derives them."""
    members = [services.db.avatars.find_one({"_id": avatar_id}) for avatar_id in render["album_avatar_ids"]]
    missing = [avatar_id for avatar_id, avatar in zip(render["album_avatar_ids"], members)
               if avatar is None or avatar["state"] != "trained"]
    if missing:
        raise Conflict("avatar_not_trained", "An album member's avatar is gone or not trained.",
                       {"avatar_ids": missing})
    loras = [_lora(services, avatar) for avatar in members]
    pivots = tuple(_pivot(services, avatar) for avatar in members)
    subjects = tuple(avatars.subject_words(avatar["gender"]) for avatar in members)
    scene_subject = avatars.group_subject_words([avatar["gender"] for avatar in members])
    seed = retry_seed(render)
    plans = []
    for slot, template_id in zip(render["pack_slots"], render["pack_templates"]):
        template = services.catalog.get(template_id)
        if template is None or len(template.face_regions) != len(members):
            raise Invalid("album_template_mismatch", "The album's template does not show one face per member.",
                          {"template_id": template_id, "members": len(members)})
        params = template_params(template, candidates=services.settings.pack_candidates_per_image, keep=1)
        plain = _plan(services, members[0], loras[0], pivots[0], template, params, (seed + slot) % 2**31)
        scene = RenderRequest(prompt=template.prompt_for(scene_subject), negative_prompt=plain.negative_prompt,
                              num_images=plain.count, steps=plain.steps, guidance=plain.guidance, width=plain.width,
                              height=plain.height, seed=plain.seed)
        faces = tuple(AlbumFace(box=tuple(box), lora=lora, prompt=template.prompt_for(subject),
                                lora_scale=params["identity_strength"], adapter_name=f"user_{avatar['_id']}")
                      for box, lora, subject, avatar in zip(template.face_regions, loras, subjects, members))
        plans.append(AlbumPlan(template_id=template.id, scene=scene, faces=faces, pivots=pivots, subjects=subjects,
                               require_face=plain.require_face))
    return plans


def retry_seed(render: dict) -> int:
    """A retry draws different candidates: the same seed would only reproduce a set without usable faces."""
    return (render["seed"] + RETRY_SEED_STRIDE * (render.get("attempts", 1) - 1)) % 2**31


def _lora(services, avatar: dict) -> bytes:
    return services.sealed.get(avatar["user_id"], avatar["lora_key"])


def _pivot(services, avatar: dict) -> np.ndarray | None:
    if not avatar.get("pivot_key"):
        return None
    return np.frombuffer(services.sealed.get(avatar["user_id"], avatar["pivot_key"]), dtype=np.float64)


def _plan(services, avatar: dict, lora: bytes, pivot, template, params: dict, seed: int) -> RenderPlan:
    settings = services.settings
    steps = template.steps if settings.render_max_steps is None else min(template.steps, settings.render_max_steps)
    count = params["candidates"]
    if settings.render_max_candidates is not None:
        count = max(1, min(count, settings.render_max_candidates))
    init_image = mask = None
    if template.init_image:
        init_image = Image.open(services.catalog.asset_path(template.init_image)).convert("RGB")
        mask = Image.open(services.catalog.asset_path(template.mask)).convert("L")
    return RenderPlan(
        lora=lora, adapter_name=f"user_{avatar['_id']}",
        prompt=template.prompt_for(avatars.subject_words(avatar["gender"])), negative_prompt=template.negative_prompt,
        count=count, keep=min(params["images_to_keep"], count), steps=steps, guidance=template.guidance,
        width=template.width, height=template.height, seed=seed, identity_strength=params["identity_strength"],
        style_lora=services.catalog.asset_path(template.style_lora).read_bytes() if template.style_lora else None,
        style_strength=params["style_strength"], init_image=init_image, mask_image=mask,
        output_size=template.output_size, pivot=pivot,
        # The tiny random-weight base model draws no faces, so its candidates cannot be scored and are kept
        # unscored; a real base model's candidates without exactly one usable face are dropped.
        require_face=not settings.uses_tiny_model)


def fit_to_template(plan: RenderPlan, candidates: list[Image.Image]) -> list[Image.Image]:
    if not plan.output_size:
        return candidates
    return [fit_output_size(image, plan.output_size) for image in candidates]


def parent_images(services, render: dict) -> list[dict]:
    """The parent's kept images, which a More Like Me child must beat (see models.ranking.merge_with_parent)."""
    if not render.get("parent_id"):
        return []
    parent = services.db.renders.find_one({"_id": render["parent_id"]}) or {}
    return list(services.db.images.find({"_id": {"$in": parent.get("image_ids", [])}}))


def store_labelled(services, render: dict, image: Image.Image, score: float | None, index: int,
                   extra: dict | None = None) -> str:
    """Label one portrait (visible mark + metadata), seal it under the user's key and log the label. The ids are
    derived from (render, attempt, index), so a step replayed after a crash writes the same image and the same
    label-log row again instead of a second one."""
    image_id, content_id = keys.image_ids(render["_id"], render["attempts"], index)
    data = label_image(image, content_id=content_id, provider=services.settings.provider_name,
                       font_path=services.settings.cjk_font_path, fmt=portrait_format(services, render))
    services.sealed.put(render["user_id"], keys.image(render["user_id"], image_id), data)
    at = states.now()
    services.db.images.update_one(
        {"_id": image_id},
        {"$setOnInsert": {"user_id": render["user_id"], "render_id": render["_id"], "content_id": content_id,
                          "likeness": score, "width": image.width, "height": image.height, "created_at": at,
                          "content_check": "pending",
                          # A joint image is the album's: its members see it, a withdrawal deletes it (albums).
                          **({"album_id": render["album_id"]} if render.get("album_id") else {}), **(extra or {})}},
        upsert=True)
    services.db.label_log.update_one(
        {"content_id": content_id},
        {"$setOnInsert": privacy.label_log_entry(services, content_id, render["user_id"], at)}, upsert=True)
    return image_id


def portrait_format(services, render: dict) -> str:
    """JPEG for downloads (PORTRAIT_FORMAT), PNG where lossless matters: an ID photo's exact background colour."""
    if services.catalog.get(render["template_id"]).output_size:
        return "PNG"
    return services.settings.portrait_format.upper()


@dataclass(frozen=True)
class KeptImage:
    image_id: str
    likeness: float | None
    carried: bool  # carried over from the parent render, not drawn by this one


def keep_candidates(services, render: dict, kept: list[RankedCandidate]) -> list[KeptImage]:
    """The kept candidates as stored images: new ones labelled and stored, carried-over ones as they are."""
    return [KeptImage(image_id=candidate.image_id or store_labelled(services, render, candidate.image,
                                                                    candidate.likeness, index),
                      likeness=candidate.likeness, carried=candidate.image_id is not None)
            for index, candidate in enumerate(kept)]


def keep_batch(services, render: dict, best: list[RankedCandidate | None]) -> list[KeptImage]:
    """A batch's images, one per slot it owes (None: no usable candidate for that slot, which stays owed and is
    made good by settle_batch), labelled and stored with their slot and template."""
    return [KeptImage(image_id=store_labelled(services, render, candidate.image, candidate.likeness, index,
                                              {"pack_slot": slot, "template_id": template_id}),
                      likeness=candidate.likeness, carried=False)
            for index, (candidate, slot, template_id) in enumerate(zip(best, render["pack_slots"],
                                                                       render["pack_templates"]))
            if candidate is not None]


def complete_render(services, render: dict, job_id: str, kept: list[KeptImage], _seconds: float) -> str:
    """The render set is drawn. Its new images are delivered once WeChat's content check passes them
    (apply_image_verdict); images carried over from the parent were checked before."""
    image_ids = [image.image_id for image in kept]
    scores = [image.likeness for image in kept if image.likeness is not None]
    best = max(scores) if scores else None
    carried = [image.image_id for image in kept if image.carried]
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]}, {"likeness_baseline": 1}) or {}
    delivered = [i["_id"] for i in services.db.images.find({"_id": {"$in": carried}})
                 if content_checks.image_delivered(i)]
    done = states.transition(services.db, "render", render["_id"], "done", expect={"rendering"}, by=f"job:{job_id}",
                             set_fields={"image_ids": image_ids, "likeness_best": best,
                                         "relative_likeness_best": relative_likeness(best,
                                                                                     avatar.get("likeness_baseline")),
                                         "carried_image_ids": carried, "finished_at": states.now(),
                                         "content_checked": True, "delivered_image_ids": delivered,
                                         "image_checks_owed": True})
    if done is None:
        return "superseded"
    QueueTracker(services.redis).set_subject(keys.render_subject(render["_id"]), state="done")
    if done.get("album_id") and albums.discard_if_withdrawn(services, done):
        return "album_withdrawn"
    request_image_checks(services, done)
    if delivered:
        deliver(services, done)
    return "done"


def request_image_checks(services, render: dict) -> None:
    """The content checks of a finished render's new images, each recorded once; `image_checks_owed` (set with
    `done`) goes once they all are, so a process dying in between leaves the sweep something to find."""
    user = services.db.users.find_one({"_id": render["user_id"]})
    carried = set(render.get("carried_image_ids") or [])
    if user is not None:
        for image_id in render.get("image_ids", []):
            if image_id not in carried:
                content_checks.request_check(services, "image", image_id, user=user,
                                             blob_key=keys.image(render["user_id"], image_id),
                                             render_id=render["_id"])
    services.db.renders.update_one({"_id": render["_id"]}, {"$unset": {"image_checks_owed": ""}})


def renders_owing_image_checks(services, older_than) -> list[dict]:
    return list(services.db.renders.find({"image_checks_owed": True, "state": "done",
                                          "finished_at": {"$lt": older_than}}))


def render_delivered(render: dict) -> bool:
    """A finished render has delivered portraits: one of its images passed (renders from before the checks
    delivered all theirs)."""
    return render["state"] == "done" and (not render.get("content_checked") or bool(render.get("delivered_image_ids")))


def deliver(services, render: dict) -> None:
    """Portraits of this render passed: the order is fulfilled, the avatar's preview replaced and the user told (an
    album's every member), each once."""
    orders.fulfil(services, render["order_id"])
    previews.supersede(services, render["avatar_id"])
    for owed in notifications.portraits_ready_due(services, render):
        notifications.notify(services, **owed._asdict())


def apply_image_verdict(services, check: dict, counted: bool, reason: str | None) -> None:
    """WeChat's verdict on one portrait (portraits.moderation): delivered, or withheld for good (its file goes).
    Once the set has no image pending, a set that lost images is made good (make_good_lost_images). Idempotent."""
    image_id, render_id = check["subject_id"], check["render_id"]
    verdict = check["state"] if counted else "refused"
    services.db.images.update_one({"_id": image_id, "content_check": "pending"},
                                  {"$set": {"content_check": verdict, "content_reason": reason}})
    image = services.db.images.find_one({"_id": image_id}) or {}
    if image.get("content_check") == "refused":
        services.blobs.delete(keys.image(check["user_id"], image_id))
        services.db.renders.update_one({"_id": render_id}, {"$addToSet": {"refused_image_ids": image_id}})
    elif image:
        services.db.renders.update_one({"_id": render_id}, {"$addToSet": {"delivered_image_ids": image_id}})
    render = services.db.renders.find_one({"_id": render_id})
    if render is None:
        return
    if render.get("delivered_image_ids"):
        deliver(services, render)
    decided = not images_pending(services, render)
    if render.get("pack_slots"):
        if decided:
            settle_batch(services, render)
    elif render.get("refused_image_ids") and decided:
        make_good_lost_images(services, render)


def images_pending(services, render: dict) -> int:
    return services.db.images.count_documents({"_id": {"$in": render.get("image_ids", [])},
                                               "content_check": "pending"})


def make_good_lost_images(services, render: dict) -> str:
    """A render set that lost images to the content check is drawn again once, free; if the redraw loses images
    too, the original's render credit goes back (if it took one). Each step is claimed on the render it makes good,
    so running this again (the sweep, a second push) does nothing more."""
    if not render.get("rerender_of"):
        new_id = new_render_id()
        claimed = services.db.renders.find_one_and_update(
            {"_id": render["_id"], "content_rerender": {"$exists": False}},
            {"$set": {"content_rerender": new_id, "updated_at": states.now()}})
        if claimed is None:
            return "already_made_good"
        avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
        if avatar is not None and avatar["state"] == "trained":
            parent = services.db.renders.find_one({"_id": render["parent_id"]}) if render.get("parent_id") else None
            insert_render(services, avatar, render["template_id"], render["order_id"], render["params"],
                          parent=parent, charged=False, by=f"content-check:{render['_id']}", render_id=new_id,
                          rerender_of=render["_id"])
            return "rerendered"
        render = {**render, "rerender_of": render["_id"]}  # nothing to redraw with: the credit goes back instead
    original = services.db.renders.find_one({"_id": render["rerender_of"]}) or {}
    if original.get("charged"):
        return "credited" if credit_back(services, original) else "already_made_good"
    return "nothing_owed"


def credit_back(services, render: dict) -> bool:
    """The render set a charged render took goes back to its order, once (keyed by the render in
    `credited_renders`); True when this call gave it."""
    credited = services.db.orders.update_one(
        {"_id": render["order_id"], "credited_renders": {"$ne": render["_id"]}},
        {"$inc": {"render_credits": 1}, "$push": {"credited_renders": render["_id"]}})
    return credited.modified_count == 1


def fail_render(services, render_id: str, reason: str) -> str:
    """Retry while attempts remain; then the render set goes back to the user as a free credit, exactly once (only
    the caller whose transition to `failed` wins gives it), and an order that cannot be delivered is refunded."""
    outcome, failed = retry_or_fail(services, "render", render_id, attempts_field="attempts",
                                    retries=services.settings.render_retries, running_state="rendering",
                                    enqueue=enqueue_render, subject=keys.render_subject(render_id), reason=reason)
    if failed is None:
        return outcome
    settle_failed_render(services, failed)
    return "failed"


def settle_failed_render(services, render: dict) -> None:
    """What a failed render is owed, each step keyed so that running it again (the sweeper after a crash here)
    does only what is missing: its credit back, once, and the order's refund if it can no longer be delivered. A
    pack's batch is made good by settle_batch instead (a redraw, then its share of the price)."""
    if render.get("pack_slots"):
        settle_batch(services, render)
        return
    if render.get("charged"):
        credit_back(services, render)
    elif render.get("rerender_of"):
        # The free redraw of a set that lost images to the content check failed: the original's credit goes back.
        original = services.db.renders.find_one({"_id": render["rerender_of"]}) or {}
        if original.get("charged"):
            credit_back(services, original)
    refunds.refund_if_undeliverable(services, render["order_id"], by=f"render:{render['_id']}")
    services.db.renders.update_one({"_id": render["_id"]}, {"$set": {"settled_at": states.now()}})


def retry_failed_render(services, render: dict, by: str) -> dict:
    """An operator's retry of a failed render set: a new render, once per failed one, charged as the original was."""
    new_id = new_render_id()
    # Claim the failed render first: two operators clicking at once make one new render, not two.
    claimed = services.db.renders.find_one_and_update(
        # A pack's batch is made good by itself (settle_batch): an operator does not redraw it by hand.
        {"_id": render["_id"], "state": "failed", "retried_by": {"$exists": False}, "pack_slots": {"$exists": False}},
        {"$set": {"retried_by": new_id, "retried_at": states.now()}})
    if claimed is None:
        raise Conflict("render_not_retryable", "Only a failed render can be retried, once.")
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
    refusal = None
    if avatar is None or avatar["state"] != "trained":
        refusal = Conflict("avatar_not_trained", "The avatar is not trained.")
    elif render.get("charged") and claim_render_credit(services.db, render["order_id"], render["user_id"],
                                                       new_id) is None:
        refusal = Conflict("no_render_credits", "The order has no render credit left, or was refunded.")
    if refusal is not None:
        release_retry(services.db, render["_id"], new_id)
        raise refusal
    parent = services.db.renders.find_one({"_id": render["parent_id"]}) if render.get("parent_id") else None

    def insert():
        return insert_render(services, avatar, render["template_id"], render["order_id"], render["params"],
                             parent=parent, charged=bool(render.get("charged")), by=by, render_id=new_id,
                             retry_of=render["_id"])
    if not render.get("charged"):
        return insert()
    return _insert_claimed(services, "orders", render["order_id"], new_id, insert)


def release_retry(db, failed_id: str, new_id: str) -> None:
    """The retry `new_id` of a failed render was refused or never written: the failed render can be retried again."""
    db.renders.update_one({"_id": failed_id, "retried_by": new_id},
                          {"$unset": {"retried_by": "", "retried_at": ""}})


def release_stale_retries(services, older_than) -> int:
    """Operators' retries whose new render was never written (the process died between the two writes)."""
    claimed = list(services.db.renders.find({"state": "failed", "retried_at": {"$lt": older_than}},
                                            {"retried_by": 1}))
    written = {r["_id"] for r in services.db.renders.find({"_id": {"$in": [r["retried_by"] for r in claimed]}},
                                                          {"_id": 1})}
    stale = [r for r in claimed if r["retried_by"] not in written]
    for render in stale:
        release_retry(services.db, render["_id"], render["retried_by"])
    return len(stale)


# ---------------------------------------------------------------------------------------------------- packs


def start_pack(services, order_id: str) -> int:
    """An order with a render plan whose avatar is trained owes its batches (portraits.packs): each written once
    (its id is derived from the order) and queued; the order then records that its pack started. Safe to run
    again at any time (the job that trained the avatar, the sweep); returns how many batches this call wrote."""
    order = services.db.orders.find_one({"_id": order_id})
    if (order is None or not order.get("render_plan") or order.get("pack_started_at") or order.get("album_id")
            or order["state"] not in ("paid", "fulfilled")):  # an album's batches are albums.write_batches'
        return 0
    avatar = services.db.avatars.find_one({"_id": order["avatar_id"]})
    if avatar is None or avatar["state"] != "trained" or avatar.get("order_id") != order_id:
        return 0
    plan = order["render_plan"]
    # The spread is fixed once, on the order: a run after a crash (and a catalog change) writes the same batches.
    services.db.orders.update_one({"_id": order_id, "pack_templates": {"$exists": False}},
                                  {"$set": {"pack_templates": packs.spread(services.catalog, avatar["gender"],
                                                                           plan["images"])}})
    templates = services.db.orders.find_one({"_id": order_id}, {"pack_templates": 1})["pack_templates"]
    written = 0
    for index, slots in enumerate(packs.batches(plan)):
        if _insert_batch(services, avatar, order_id, packs.batch_id(order_id, index), by=f"order:{order_id}",
                         pack=packs.batch_fields(index, slots, [templates[slot] for slot in slots])):
            written += 1
    services.db.orders.update_one({"_id": order_id, "pack_started_at": {"$exists": False}},
                                  {"$set": {"pack_started_at": states.now()}})
    return written


def _insert_batch(services, avatar: dict, order_id: str, render_id: str, by: str, pack: dict) -> bool:
    """False when the batch was written before (a `queued` one whose job was lost is queued again by the sweep)."""
    try:
        insert_render(services, avatar, pack["pack_templates"][0], order_id, None, parent=None, charged=False,
                      by=by, render_id=render_id, pack=pack)
    except DuplicateKeyError:
        return False
    return True


def settle_batch(services, render: dict) -> str:
    """A batch that failed, or whose images are all decided: the slots it did not deliver are drawn again once,
    free (a redraw batch of just those slots); what a redraw cannot deliver is refunded, its share of the price,
    once. The batch is marked settled when that is done; a refund that has to wait (the order is busy with another
    refund) leaves it unsettled for the sweep. Returns what happened (a stable word)."""
    if render.get("settled_at"):
        return "already_settled"
    if render.get("album_id") and albums.withdrawn(services, render["album_id"]):
        # The withdrawal refunded what was not delivered (albums.settle_refund): nothing more is owed here.
        services.db.renders.update_one({"_id": render["_id"], "settled_at": {"$exists": False}},
                                       {"$set": {"settled_at": states.now()}})
        return "album_withdrawn"
    # Read from the images themselves, not the batch's delivered_image_ids: two verdicts landing together each
    # decide their image before recording it on the batch, so the one that finds nothing pending may hold a batch
    # document that does not name the other's image yet (it would redraw, even refund, a delivered slot).
    delivered = {i["pack_slot"] for i in services.db.images.find(
        {"_id": {"$in": render.get("image_ids", [])}, **content_checks.DELIVERED_IMAGE},
        {"pack_slot": 1})}
    lost = [slot for slot in render["pack_slots"] if slot not in delivered]
    outcome, fields = "delivered", {}
    if lost and not render.get("pack_redraw_of"):
        outcome = _redraw_batch(services, render, lost)
    if lost and outcome != "redrawn":
        outcome = _refund_slots(services, render, lost)
        fields = {"pack_refunded_slots": lost} if outcome == "refunded" else {}
    if outcome == "refund_owed":
        return outcome
    services.db.renders.update_one({"_id": render["_id"], "settled_at": {"$exists": False}},
                                   {"$set": {"settled_at": states.now(), "pack_lost_slots": lost, **fields}})
    return outcome


def _redraw_batch(services, render: dict, lost: list[int]) -> str:
    avatar = services.db.avatars.find_one({"_id": render["avatar_id"]})
    if avatar is None or avatar["state"] != "trained":
        return "cannot_redraw"
    album = {}
    if render.get("album_id"):  # drawn with every member's avatar: all still trained, the album still accepted
        album = albums.redraw_fields(services, render)
        if album is None:
            return "cannot_redraw"
    template_of = dict(zip(render["pack_slots"], render["pack_templates"]))
    _insert_batch(services, avatar, render["order_id"], packs.redraw_id(render["_id"]), by=f"pack:{render['_id']}",
                  pack={**packs.batch_fields(render["pack_index"], lost, [template_of[slot] for slot in lost],
                                             redraw_of=render["_id"]), **album})
    return "redrawn"


def _refund_slots(services, render: dict, lost: list[int]) -> str:
    """The share of the price of the slots this batch cannot deliver goes back, once (the refund is keyed by the
    batch): 'refunded', 'nothing_left' (already refunded otherwise), 'album_withdrawn' (the album's withdrawal
    refunds what was not delivered, these slots included: marked on the order before that refund, and checked in the
    write that would record this one), 'refund_refused' (this rail cannot refund: left to people), or 'refund_owed'
    (the order is busy with another refund: the sweep asks again)."""
    order = services.db.orders.find_one({"_id": render["order_id"]})
    if order is None:
        return "nothing_left"
    if order.get(albums.ORDER_WITHDRAWN_FIELD):
        return "album_withdrawn"
    number = refunds.batch_refund_number(order["_id"], render["_id"])
    if refunds.has_refund(order, number):
        return "refunded"
    amount = min(packs.slots_amount(order["amount"], order["render_plan"]["images"], lost),
                 refunds.refundable_amount(order))
    if amount <= 0:
        return "nothing_left"
    try:
        moved = refunds.request_refund(services, order["_id"], reason="pack_undeliverable",
                                       by=f"render:{render['_id']}", expect=("paid", "fulfilled"), amount=amount,
                                       out_refund_no=number, unless_field=albums.ORDER_WITHDRAWN_FIELD)
    except refunds.RefundRefused as refused:
        log.warning("batch %s: its undeliverable share cannot be refunded: %s", render["_id"], refused.code)
        return "refund_refused"
    after = services.db.orders.find_one({"_id": order["_id"]}) or {}
    if moved is None and after.get(albums.ORDER_WITHDRAWN_FIELD):
        return "album_withdrawn"
    if moved is None and not refunds.has_refund(after, number):
        return "refund_owed"
    return "refunded"
