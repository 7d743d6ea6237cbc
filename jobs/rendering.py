"""The render task: draw candidates for one template on one avatar, rank them by likeness, keep the best.

What a render means for the user (credits, labels, fulfilment, a credit back on failure) is portraits.renders; this
module runs the renderer and the ranking.
"""
from __future__ import annotations

import time
from concurrent.futures import wait

from jobs import gpu_job
from models.album import draw_album
from models.ranking import merge_with_parent, rank_album, rank_scored
from portraits import renders, tasks


class InjectedFault(RuntimeError):
    """A technical failure injected through FAULT_RENDER_FAILURES (tests and drills)."""


class NoUsableCandidates(RuntimeError):
    pass


def render_portraits(render_id: str) -> str:
    return gpu_job.run(RENDERING, render_id)


def _draw(services, plan: renders.RenderPlan) -> list:
    """Draw a plan's candidates and rank them; each batch is scored on the judge's thread while the next one
    samples."""
    judge = services.candidate_judge()
    drawn, judging = [], []

    def judge_batch(batch):
        fitted = renders.fit_to_template(plan, batch)
        drawn.extend(fitted)
        judging.append(judge.score(fitted, plan.pivot))

    try:
        services.renderer().render(
            lora=plan.lora, adapter_name=plan.adapter_name, prompt=plan.prompt,
            negative_prompt=plan.negative_prompt, num_images=plan.count, steps=plan.steps, guidance=plan.guidance,
            width=plan.width, height=plan.height, seed=plan.seed, lora_scale=plan.identity_strength,
            style_lora=plan.style_lora, style_scale=plan.style_strength, init_image=plan.init_image,
            mask_image=plan.mask_image, on_images=judge_batch,
        )
    finally:
        wait(judging)  # a failed render's batches too: no judging outlives its job
    scores = [score for future in judging for score in future.result()]
    return rank_scored(drawn, scores, plan.keep, require_face=plan.require_face)


def _draw_album(services, plan: renders.AlbumPlan) -> list:
    """Draw an album slot's candidates (the scene, then each member's face with their LoRA) and rank them by their
    worst face; each candidate is scored on the judge's thread while the next one draws."""
    judge = services.candidate_judge()
    drawn, judging = [], []

    def judge_candidate(image):
        drawn.append(image)
        judging.append(judge.score_regions([image], plan.regions))

    try:
        draw_album(services.renderer(), plan.scene, list(plan.faces), on_candidate=judge_candidate)
    finally:
        wait(judging)
    scores = [score for future in judging for score in future.result()]
    return rank_album(drawn, scores, keep=1, require_face=plan.require_face)


def _draw_batch(services, render: dict) -> list[renders.KeptImage]:
    """A pack's batch: each slot drawn with its own template, its likeliest candidate kept; a slot without a usable
    one stays owed (renders.settle_batch redraws it), a batch without any is a technical failure."""
    return _keep_best_per_slot(services, render, renders.plan_batch(services, render), _draw,
                               "a candidate with exactly one usable face")


def _draw_album_batch(services, render: dict) -> list[renders.KeptImage]:
    """An album's batch: as a pack's, each slot's candidates drawn with every member's LoRA on their own face."""
    return _keep_best_per_slot(services, render, renders.plan_album_batch(services, render), _draw_album,
                               "a candidate with exactly one usable face in every face region")


def _keep_best_per_slot(services, render: dict, plans: list, draw, usable: str) -> list[renders.KeptImage]:
    started = time.monotonic()
    best = []
    for done, plan in enumerate(plans):
        gpu_job.check_hand_back(done / len(plans), time.monotonic() - started)
        kept = draw(services, plan)
        best.append(kept[0] if kept else None)
    if not any(best):
        raise NoUsableCandidates(f"none of the {len(plans)} slots drew {usable}")
    return renders.keep_batch(services, render, best)


def _draw_and_keep(services, render: dict, job) -> list[renders.KeptImage]:
    if render["attempts"] <= services.settings.fault_render_failures:
        raise InjectedFault(f"injected render failure {render['attempts']}")
    if render.get("album_id"):
        return _draw_album_batch(services, render)
    if render.get("pack_slots"):
        return _draw_batch(services, render)
    plan = renders.plan_render(services, render)
    kept = _draw(services, plan)
    if render.get("parent_id"):
        kept = merge_with_parent(kept, renders.parent_images(services, render), plan.keep)
    if not kept:
        raise NoUsableCandidates(f"none of {plan.count} candidates shows exactly one usable face")
    return renders.keep_candidates(services, render, kept)


RENDERING = gpu_job.GpuJobKind(queue=tasks.RENDER, collection="renders", claim=renders.begin_render,
                               work=_draw_and_keep, complete=renders.complete_render, fail=renders.fail_render)
