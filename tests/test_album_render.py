"""Drawing couple and family albums: the scene on the base model, each face region inpainted with its owner's LoRA,
candidates ranked by their worst face.

The model-level tests run the tiny random pipeline through the real Renderer (its resident LoRA slot included) and
prove by pixels which LoRA drew which region; the ranking tests use the real face analyzer on real faces pasted into
the template's regions; the job tests drain an album batch written as the album product writes one (a pack batch
render document plus `album_id` and `album_avatar_ids`).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from jobs.worker import EmbeddedWorker
from models import sample_photos
from models.album import AlbumFace, draw_album, face_window, region_mask
from models.faces import identity_pivot
from models.labels import read_label
from models.ranking import album_score, rank_album, score_regions
from models.render import Renderer, RenderRequest
from models.train import LORA_TARGET_MODULES
from portraits import albums, avatars, keys, packs, renders, tasks
from portraits.errors import Conflict, Invalid

LORA_RANK = 4
SCENE = RenderRequest(prompt="photo of a woman and a man side by side", negative_prompt="lowres", num_images=1,
                      steps=2, guidance=7.0, width=256, height=128, seed=1234)
BOXES = ((24, 16, 104, 112), (152, 16, 232, 112))


@pytest.fixture
def settings_overrides():
    return {"render_max_steps": 1, "render_max_candidates": 1, "pack_candidates_per_image": 1}


def random_lora(pipe, seed: int, scale: float = 0.6) -> bytes:
    """A UNet-only diffusers LoRA of the tiny UNet's attention projections, random but deterministic for a seed
    (a trained LoRA on the tiny model after a few steps barely moves its pixels)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for path, module in pipe.unet.named_modules():
        if not any(path.endswith("." + target) for target in LORA_TARGET_MODULES):
            continue
        state[f"unet.{path}.lora.down.weight"] = torch.randn(LORA_RANK, module.in_features,
                                                             generator=generator) * scale
        state[f"unet.{path}.lora.up.weight"] = torch.randn(module.out_features, LORA_RANK,
                                                           generator=generator) * scale
    assert state, "the tiny UNet has attention projections"
    return safetensors.torch.save(state)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _inside(box) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    return slice(y0, y1), slice(x0, x1)


# ------------------------------------------------------------------------------------------------------ masks


def test_a_region_mask_is_a_feathered_ellipse_inside_its_box_and_always_the_same():
    box = (150, 72, 330, 312)
    first, second = region_mask((768, 512), box), region_mask((768, 512), box)
    assert first.mode == "L" and first.size == (768, 512)
    assert first.tobytes() == second.tobytes()
    mask = np.asarray(first)
    outside = np.ones_like(mask, dtype=bool)
    outside[_inside(box)] = False
    assert mask[outside].max() == 0, "nothing outside the box is redrawn"
    assert mask[(72 + 312) // 2, (150 + 330) // 2] == 255, "the face's centre is redrawn in full"
    assert mask[72, 150] == 0 and mask[311, 329] == 0, "the box's corners lie outside the ellipse"
    inner = mask[_inside(box)]
    assert 0.5 < (inner > 127).mean() < 0.8, "an ellipse filling the box, not a dot nor the whole box"
    assert ((inner > 0) & (inner < 255)).any(), "the edge is feathered"


def test_a_region_mask_refuses_a_box_outside_the_image():
    with pytest.raises(ValueError):
        region_mask((256, 128), (200, 16, 300, 112))


# ------------------------------------------------------------------------------ which LoRA drew which region


@pytest.fixture
def renderer(tiny_pipeline):
    return Renderer(tiny_pipeline)


@pytest.fixture
def loras(tiny_pipeline) -> dict[str, bytes]:
    return {name: random_lora(tiny_pipeline, seed) for seed, name in enumerate(("a", "a2", "b", "b2"))}


def _album(renderer, first: bytes, second: bytes) -> Image.Image:
    faces = [AlbumFace(box=BOXES[0], lora=first, prompt="photo of sks woman"),
             AlbumFace(box=BOXES[1], lora=second, prompt="photo of sks man")]
    [image] = draw_album(renderer, SCENE, faces)
    return image


def test_outside_every_mask_the_album_is_the_scene_and_inside_each_region_only_its_owner_counts(renderer, loras):
    [scene] = renderer.render_base(SCENE)
    album = _album(renderer, loras["a"], loras["b"])
    masks = [np.asarray(region_mask((SCENE.width, SCENE.height), box)) for box in BOXES]
    untouched = (masks[0] == 0) & (masks[1] == 0)
    assert np.array_equal(_pixels(album)[untouched], _pixels(scene)[untouched])
    for box in BOXES:
        assert np.abs(_pixels(album)[_inside(box)] - _pixels(scene)[_inside(box)]).mean() > 1, \
            "each face region is redrawn"

    second_changed = _album(renderer, loras["a"], loras["b2"])
    assert np.array_equal(_pixels(second_changed)[_inside(BOXES[0])], _pixels(album)[_inside(BOXES[0])]), \
        "member 2's LoRA does not reach member 1's face"
    assert np.abs(_pixels(second_changed)[_inside(BOXES[1])] - _pixels(album)[_inside(BOXES[1])]).mean() > 1

    first_changed = _album(renderer, loras["a2"], loras["b"])
    assert np.array_equal(_pixels(first_changed)[_inside(BOXES[1])], _pixels(album)[_inside(BOXES[1])]), \
        "member 1's LoRA does not reach member 2's face"
    assert np.abs(_pixels(first_changed)[_inside(BOXES[0])] - _pixels(album)[_inside(BOXES[0])]).mean() > 1


def test_swapping_the_members_swaps_whose_lora_draws_which_region(renderer, loras):
    album = _album(renderer, loras["a"], loras["b"])
    swapped = _album(renderer, loras["b"], loras["a"])
    for box in BOXES:
        assert not np.array_equal(_pixels(album)[_inside(box)], _pixels(swapped)[_inside(box)])


def test_the_album_draw_leaves_no_lora_on_the_base(renderer, loras, tiny_pipeline):
    [before] = renderer.render_base(SCENE)
    _album(renderer, loras["a"], loras["b"])
    [after] = renderer.render_base(SCENE)
    assert np.array_equal(_pixels(before), _pixels(after))


# --------------------------------------------------------------------------------------------- ranking per face


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _pivot(analyzer, photos: list[bytes]) -> np.ndarray:
    embeddings = []
    for data in photos:
        rgb = np.asarray(_decode(data))
        embeddings.append(analyzer.embed(rgb, analyzer.faces(rgb)[0]))
    return identity_pivot(embeddings)


def _head(image: Image.Image, face_box, size) -> Image.Image:
    """The face and some hair around it, resized to fill a template's region."""
    left, top, right, bottom = face_box
    half_w = right - left
    half_h = half_w * size[1] / size[0]
    cx, cy = (left + right) / 2, (top + bottom) / 2
    return image.crop((int(cx - half_w), int(cy - half_h * 0.9), int(cx + half_w), int(cy + half_h * 1.1))) \
        .resize(size, Image.Resampling.LANCZOS)


COUPLE_BOXES = ((150, 72, 330, 312), (438, 72, 618, 312))  # couple_city_night's face regions


@pytest.fixture(scope="module")
def heads() -> dict[str, Image.Image]:
    size = (COUPLE_BOXES[0][2] - COUPLE_BOXES[0][0], COUPLE_BOXES[0][3] - COUPLE_BOXES[0][1])
    return {"astronaut": _head(sample_photos.astronaut_image(), sample_photos.ASTRONAUT_FACE_BOX, size),
            "grace": _head(sample_photos.grace_hopper_image(), sample_photos.GRACE_HOPPER_FACE_BOX, size),
            "nobody": sample_photos.coffee_image().resize(size)}


def _couple(heads, left: str, right: str) -> Image.Image:
    canvas = Image.new("RGB", (768, 512), (92, 110, 128))
    for box, who in zip(COUPLE_BOXES, (left, right)):
        canvas.paste(heads[who], box[:2])
    return canvas


def test_each_region_is_scored_against_its_owner_and_the_candidate_whose_worst_face_is_best_wins(face_analyzer,
                                                                                                  heads):
    astronaut = _pivot(face_analyzer, sample_photos.astronaut_photos(4, seed=7))
    grace = _pivot(face_analyzer, sample_photos.grace_hopper_photos(3, seed=11))
    regions = [(COUPLE_BOXES[0], astronaut), (COUPLE_BOXES[1], grace)]  # the astronaut invited Grace
    candidates = {"both_right": _couple(heads, "astronaut", "grace"),
                  "grace_lost": _couple(heads, "astronaut", "astronaut"),
                  "swapped": _couple(heads, "grace", "astronaut"),
                  "no_face_on_the_right": _couple(heads, "astronaut", "nobody")}
    names = list(candidates)
    scores = [score_regions(image, regions, face_analyzer) for image in candidates.values()]
    by_name = dict(zip(names, scores))
    print({name: s for name, s in by_name.items()})
    assert [faces for faces, _ in by_name["both_right"]] == [1, 1]
    assert min(s for _, s in by_name["both_right"]) > 0.5, "each member's face is like its owner"
    assert by_name["grace_lost"][0] == by_name["both_right"][0], "the same face in region 1 scores the same"
    assert by_name["grace_lost"][1][1] < 0.5, "the astronaut's face where Grace's should be is not like Grace"
    assert by_name["no_face_on_the_right"][1] == (0, None)

    ranked = rank_album(list(candidates.values()), scores, keep=4)
    assert names[ranked[0].index] == "both_right"
    assert "no_face_on_the_right" not in [names[c.index] for c in ranked], "every region needs exactly one face"
    assert ranked[0].likeness == min(s for _, s in by_name["both_right"])
    assert ranked[0].region_likeness == tuple(s for _, s in by_name["both_right"])
    assert [c.likeness for c in ranked] == sorted((c.likeness for c in ranked), reverse=True)


def test_the_album_score_is_the_worst_face_so_no_one_is_sacrificed():
    lopsided = [(1, 0.99), (1, 0.45)]  # the better mean
    even = [(1, 0.70), (1, 0.65)]
    ranked = rank_album([None, None], [lopsided, even], keep=2)
    assert [c.index for c in ranked] == [1, 0]
    assert [c.likeness for c in ranked] == [0.65, 0.45]
    assert album_score([(1, 0.8), (2, None)]) == (False, None), "two faces in one region: not usable"
    assert album_score([(1, 0.8), (0, None)], require_face=False) == (True, None), \
        "the tiny model's faceless candidates stay, unscored"
    kept = rank_album([None, None], [[(0, None), (0, None)], [(1, 0.6), (1, 0.7)]], keep=2, require_face=False)
    assert [(c.index, c.likeness) for c in kept] == [(1, 0.6), (0, None)], "scored before unscored"
    assert rank_album([None], [[(0, None), (1, 0.9)]], keep=1) == []


# ------------------------------------------------------------------------------------ album batches as jobs


@pytest.fixture
def album_members(paid_avatar, services, tiny_pipeline):
    """Two users' avatars, trained (their LoRAs sealed under their own users), the inviter first."""

    def _make():
        members = []
        for seed, (name, gender) in enumerate((("alice", "female"), ("bob", "male"))):
            _api, avatar, order = paid_avatar(name, gender)
            doc = services.db.avatars.find_one({"_id": avatar["id"]})
            services.sealed.put(doc["user_id"], keys.lora(doc), random_lora(tiny_pipeline, 100 + seed))
            services.db.avatars.update_one({"_id": doc["_id"]},
                                           {"$set": {"state": "trained", "lora_key": keys.lora(doc)}})
            members.append((services.db.avatars.find_one({"_id": doc["_id"]}), order))
        return members

    return _make


def _album_batch(services, members, render_id: str, slots: list[int], templates: list[str],
                 album_id: str = "al_test") -> dict:
    inviter, order = members[0]
    # The album these members accepted, as portraits.albums records one (its batches are drawn only while it is).
    services.db.albums.update_one(
        {"_id": album_id},
        {"$setOnInsert": {"state": "accepted", "order_id": order["id"], "people": len(members),
                          "user_id": inviter["user_id"], "member_ids": [avatar["user_id"] for avatar, _ in members],
                          "members": [{"user_id": avatar["user_id"], "avatar_id": avatar["_id"],
                                       "gender": avatar["gender"]} for avatar, _ in members]}},
        upsert=True)
    fields = {**packs.batch_fields(0, slots, templates),
              **albums.batch_fields(services.db.albums.find_one({"_id": album_id}))}
    assert renders._insert_batch(services, inviter, order["id"], render_id, by="album:test", pack=fields)
    return services.db.renders.find_one({"_id": render_id})


def _run_renders(services, render: dict) -> None:
    """Run the render queue alone: the content checks the batch asks for stay unanswered."""
    worker = EmbeddedWorker([tasks.queue(services, tasks.gpu_queue_name("render", render))],
                            connection=services.redis)
    while worker.work(burst=True, with_scheduler=True, logging_level="WARNING"):
        pass


def _stored(services, image: dict) -> bytes:
    return services.sealed.get(image["user_id"], keys.image(image["user_id"], image["_id"]))


def test_an_album_batch_is_drawn_labelled_checked_and_delivered_as_a_pack_batch(album_members, services, drain):
    members = album_members()
    couple = [t.id for t in services.catalog.album_templates(2)][:2]
    render = _album_batch(services, members, "rd_album_draw", [0, 1], couple)
    _run_renders(services, render)
    done = services.db.renders.find_one({"_id": render["_id"]})
    assert done["state"] == "done", done.get("history")
    images = sorted(services.db.images.find({"_id": {"$in": done["image_ids"]}}), key=lambda i: i["pack_slot"])
    assert [(i["pack_slot"], i["template_id"], i["album_id"]) for i in images] == \
        [(0, couple[0], "al_test"), (1, couple[1], "al_test")]
    assert [i["content_check"] for i in images] == ["pending", "pending"]
    for image in images:
        data = _stored(services, image)
        label = read_label(data)
        assert label is not None and (label["Label"], label["ProduceID"]) == ("1", image["content_id"])
        template = services.catalog.get(image["template_id"])
        assert Image.open(io.BytesIO(data)).size == (template.width, template.height)

    drain()
    images = list(services.db.images.find({"_id": {"$in": done["image_ids"]}}))
    assert {i["content_check"] for i in images} == {"pass"}
    settled = services.db.renders.find_one({"_id": render["_id"]})
    assert sorted(settled["delivered_image_ids"]) == sorted(done["image_ids"])
    assert settled.get("settled_at") and settled["pack_lost_slots"] == []


def _assert_planned_with_each_members_lora_on_their_own_face(services, members):
    couple = [t.id for t in services.catalog.album_templates(2)][:2]
    render = _album_batch(services, members, "rd_album_plan", [0, 1], couple)
    plans = renders.plan_album_batch(services, render)
    assert [plan.template_id for plan in plans] == couple
    alice, bob = (avatar for avatar, _ in members)
    for plan in plans:
        template = services.catalog.get(plan.template_id)
        assert plan.scene.prompt == template.prompt_for("a woman and a man")
        assert [face.box for face in plan.faces] == [tuple(box) for box in template.face_regions]
        assert [face.lora for face in plan.faces] == [services.sealed.get(a["user_id"], a["lora_key"])
                                                      for a in (alice, bob)]
        assert [face.prompt for face in plan.faces] == [template.prompt_for(avatars.subject_words(g))
                                                        for g in ("female", "male")]
        assert plan.subjects == ("sks woman", "sks man")
        assert [face.adapter_name for face in plan.faces] == [f"user_{alice['_id']}", f"user_{bob['_id']}"]
        assert plan.scene.num_images == services.settings.pack_candidates_per_image
        assert plan.require_face is False, "the tiny model draws no faces"
    assert [plan.scene.seed for plan in plans] == [(renders.retry_seed(render) + slot) % 2**31 for slot in (0, 1)]


def _region_unchanged(first: np.ndarray, second: np.ndarray, changed_box) -> bool:
    """Equal everywhere away from `changed_box` (JPEG's 16-pixel blocks and chroma upsampling around it aside)."""
    keep = np.ones(first.shape[:2], dtype=bool)
    x0, y0, x1, y1 = changed_box
    keep[max(0, y0 // 16 * 16 - 16):y1 // 16 * 16 + 32, max(0, x0 // 16 * 16 - 16):x1 // 16 * 16 + 32] = False
    return np.array_equal(first[keep], second[keep])


def test_the_kept_album_image_shows_each_members_lora_in_their_region_only(album_members, services, tiny_pipeline):
    members = album_members()
    _assert_planned_with_each_members_lora_on_their_own_face(services, members)
    template = services.catalog.album_templates(2)[0]
    boxes = template.face_regions

    def drawn(render_id: str) -> np.ndarray:
        render = _album_batch(services, members, render_id, [0], [template.id])
        services.db.renders.update_one({"_id": render_id}, {"$set": {"seed": 4242}})
        _run_renders(services, render)
        [image] = services.db.images.find({"render_id": render_id})
        return _pixels(Image.open(io.BytesIO(_stored(services, image))))

    def reseal(member: int, seed: int) -> None:
        avatar = members[member][0]
        services.sealed.put(avatar["user_id"], avatar["lora_key"], random_lora(tiny_pipeline, seed))

    first = drawn("rd_album_lora_1")
    reseal(1, 7)  # bob's LoRA changes
    second = drawn("rd_album_lora_2")
    assert _region_unchanged(first, second, boxes[1]), "only bob's face moved"
    assert not np.array_equal(first[_inside(boxes[1])], second[_inside(boxes[1])])
    reseal(0, 8)  # then alice's
    third = drawn("rd_album_lora_3")
    assert _region_unchanged(second, third, boxes[0]), "only alice's face moved"
    assert not np.array_equal(second[_inside(boxes[0])], third[_inside(boxes[0])])


@pytest.mark.parametrize("settings_overrides", [{"render_max_steps": 1, "render_max_candidates": 1,
                                                 "pack_candidates_per_image": 1, "fault_render_failures": 1,
                                                 "render_retries": 1}])
def test_an_album_batch_that_fails_once_is_retried(album_members, services, drain):
    members = album_members()
    template = services.catalog.album_templates(2)[0]
    render = _album_batch(services, members, "rd_album_retry", [0], [template.id])
    drain()
    done = services.db.renders.find_one({"_id": render["_id"]})
    assert done["state"] == "done" and done["attempts"] == 2
    assert [h["to"] for h in done["history"]][:3] == ["queued", "rendering", "queued"]
    [image] = services.db.images.find({"render_id": render["_id"]})
    assert (image["album_id"], image["content_check"]) == ("al_test", "pass")


def test_a_face_is_redrawn_in_a_window_around_its_box_inside_the_picture():
    assert face_window((768, 512), (150, 72, 330, 312)) == (60, 0, 420, 432)
    window = face_window((256, 128), BOXES[1])
    x0, y0, x1, y1 = window
    assert (x0, y0) <= BOXES[1][:2] and (x1, y1) >= BOXES[1][2:] and x1 <= 256 and y1 <= 128
    assert (x1 - x0) % 8 == 0 and (y1 - y0) % 8 == 0
    assert face_window((100, 100), (10, 10, 90, 90)) == (0, 0, 100, 100), "never beyond the picture"


def test_a_failed_album_batch_is_drawn_again_as_an_album_batch(album_members, services, drain):
    members = album_members()
    template = services.catalog.album_templates(2)[0]
    first = _album_batch(services, members, "rd_album_failed", [0], [template.id])
    for attempt in range(services.settings.render_retries + 1):  # every attempt fails for a technical reason
        assert renders.begin_render(services, first["_id"], f"job-{attempt}") is not None
        outcome = renders.fail_render(services, first["_id"], "boom")
    assert outcome == "failed"
    redraw = services.db.renders.find_one({"pack_redraw_of": first["_id"]})
    assert (redraw["album_id"], redraw["album_avatar_ids"]) == (first["album_id"], first["album_avatar_ids"])
    assert redraw["pack_slots"] == [0] and redraw["pack_templates"] == [template.id]
    drain()
    done = services.db.renders.find_one({"_id": redraw["_id"]})
    assert done["state"] == "done"
    [image] = services.db.images.find({"render_id": redraw["_id"]})
    assert (image["album_id"], image["pack_slot"], image["content_check"]) == ("al_test", 0, "pass")


def test_an_album_batch_is_not_planned_without_every_members_trained_avatar(album_members, services):
    members = album_members()
    template = services.catalog.album_templates(2)[0]
    render = _album_batch(services, members, "rd_album_gone", [0], [template.id])
    bob = members[1][0]
    services.db.avatars.update_one({"_id": bob["_id"]}, {"$set": {"state": "failed"}})
    with pytest.raises(Conflict) as refused:
        renders.plan_album_batch(services, render)
    assert refused.value.code == "avatar_not_trained" and refused.value.details == {"avatar_ids": [bob["_id"]]}
    family = services.catalog.album_templates(3)[0]
    services.db.avatars.update_one({"_id": bob["_id"]}, {"$set": {"state": "trained"}})
    with pytest.raises(Invalid) as mismatched:
        renders.plan_album_batch(services, {**render, "pack_templates": [family.id]})
    assert mismatched.value.code == "album_template_mismatch"
