"""Photo intake judge and face analysis, on real face photos shipped inside installed wheels."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from models.faces import (CASCADE_CONFIDENT, CASCADE_GLANCE_FACE, CASCADE_SMALLEST_FACE, HOG_CONFIDENT_SCORE,
                          HOG_MIN_FACE, Face, FaceAnalyzer, _overlap, cosine_similarity, hog_style_box, identity_pivot,
                          likeness, power_of_two_at_most, resized)
from models import intake
from models.intake import REASONS, AcceptedFace, drop_outliers
from models import sample_photos as photos
from models.face_cascade import CascadeFace
from models.halvings import Halvings
from intake_support import LIMITS, judge, real_photo


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer()


@pytest.fixture(scope="module")
def astronaut_series(analyzer):
    """The 21-photo upload of one person, judged in order like the mini-program does."""
    accepted, verdicts = [], []
    for index, data in enumerate(photos.astronaut_photos(21)):
        verdict = judge(data, analyzer, role="front" if index == 0 else "extra", accepted=accepted)
        verdicts.append(verdict)
        if verdict.accepted:
            accepted.append(AcceptedFace(verdict.embedding, verdict.phash))
    return verdicts, accepted


@pytest.fixture(scope="module")
def two_accepted(astronaut_series):
    return astronaut_series[1][:2]


def test_astronaut_series_is_mostly_accepted(astronaut_series):
    verdicts, accepted = astronaut_series
    refused = {i: v.reasons for i, v in enumerate(verdicts) if not v.accepted}
    assert len(accepted) >= 19, refused
    for verdict in verdicts:
        if verdict.accepted:
            assert verdict.reasons == []
            assert verdict.crop.size == (512, 512)
            assert verdict.embedding.shape == (128,)
            assert np.linalg.norm(verdict.embedding) == pytest.approx(1.0)
            assert set(verdict.scores) >= {"blur", "brightness", "frontalness", "yaw", "pitch", "roll", "face_fraction"}


def test_reason_codes_are_the_documented_ones():
    assert REASONS == (
        "not_an_image", "unsupported_format", "file_too_large", "too_many_pixels", "image_too_small",
        "no_face", "multiple_faces", "face_too_small", "too_blurry", "too_dark", "overexposed",
        "duplicate_photo", "not_frontal", "different_person",
    )


@pytest.mark.parametrize("data", [photos.not_an_image_bytes(), b"", photos.astronaut_photo()[:3000]],
                         ids=["pdf", "empty", "truncated_jpeg"])
def test_not_an_image(analyzer, data):
    assert judge(data, analyzer).reasons == ["not_an_image"]


def test_unsupported_format(analyzer):
    assert judge(photos.gif_photo(), analyzer).reasons == ["unsupported_format"]


@pytest.mark.parametrize("make", [photos.png_photo, photos.webp_photo], ids=["png", "webp"])
def test_png_and_webp_are_accepted(analyzer, make):
    assert judge(make(), analyzer).accepted


def test_file_too_large(analyzer):
    verdict = judge(photos.oversized_file(LIMITS.max_bytes + 1), analyzer)
    assert verdict.reasons == ["file_too_large"]


@pytest.mark.parametrize("size", [(30000, 30000), (8000, 6000)], ids=["pillow_bomb_limit", "over_max_pixels"])
def test_decompression_bomb_refused_without_decoding(analyzer, monkeypatch, size):
    def forbidden_decode(self, *args, **kwargs):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(Image.Image, "load", forbidden_decode)
    monkeypatch.setattr(Image.core, "zip_decoder", forbidden_decode, raising=False)
    verdict = judge(photos.decompression_bomb_png(*size), analyzer)
    assert verdict.reasons == ["too_many_pixels"]


def test_image_too_small(analyzer):
    assert judge(photos.tiny_photo(200), analyzer).reasons == ["image_too_small"]


@pytest.mark.parametrize("name", ["coffee", "chelsea_cat"])
def test_no_face(analyzer, name):
    assert judge(photos.non_face_photos()[name], analyzer).reasons == ["no_face"]


def test_multiple_faces(analyzer):
    assert judge(photos.two_faces_photo(1.0), analyzer).reasons == ["multiple_faces"]


def test_small_bystander_is_tolerated(analyzer):
    # Grace Hopper's face at 40% of the astronaut's width is 16% of its area: under the quarter limit.
    verdict = judge(photos.two_faces_photo(0.4), analyzer)
    assert verdict.accepted, verdict.reasons


def test_face_too_small(analyzer):
    verdict = judge(photos.small_face_photo(), analyzer)
    assert "face_too_small" in verdict.reasons
    assert verdict.scores["face_fraction"] < LIMITS.min_face_fraction


def test_too_blurry(analyzer):
    verdict = judge(photos.blurry_photo(), analyzer)
    assert verdict.reasons == ["too_blurry"]
    assert verdict.embedding is None and verdict.crop is None


@pytest.mark.parametrize("side", [256, 384, 512])
def test_blur_does_not_jump_where_the_face_box_is_a_multiple_of_the_patch(analyzer, side):
    """The same face measured on boxes a pixel apart scores alike: a detector that reports a box one pixel wider on
    one copy of a photo than on another must not move its blur score by more than that pixel's worth."""
    rgb = np.asarray(photos.phone_sized_image((2000, 1500)))
    face = analyzer.faces(rgb)[0]
    centre_x, centre_y = (face.box[0] + face.box[2]) // 2, (face.box[1] + face.box[3]) // 2
    scores = []
    for width in (side - 1, side, side + 1):
        left, top = centre_x - width // 2, max(0, centre_y - width // 2)
        box = Face(box=(left, top, left + width, top + width), landmarks=face.landmarks, score=face.score)
        scores.append(intake._sharpness(intake._face_patch(rgb, box)))
    steps = np.abs(np.diff(scores)) / np.mean(scores)
    assert steps.max() < 0.04, scores


def test_too_dark(analyzer):
    assert judge(photos.dark_photo(), analyzer).reasons == ["too_dark"]


def test_overexposed(analyzer):
    assert judge(photos.overexposed_photo(), analyzer).reasons == ["overexposed"]


def test_several_quality_reasons_reported_together(analyzer):
    turned = Image.open(io.BytesIO(photos.head_turned_photo()))
    verdict = judge(photos.encode(turned.filter(ImageFilter.GaussianBlur(3))), analyzer, role="front")
    assert verdict.reasons == ["too_blurry", "not_frontal"]
    small = Image.open(io.BytesIO(photos.small_face_photo()))
    verdict = judge(photos.encode(small.point(lambda v: int(v * 0.3))), analyzer)
    assert verdict.reasons == ["face_too_small", "too_dark"]


def test_duplicate_photo(analyzer, two_accepted):
    original = judge(photos.astronaut_photo(), analyzer, accepted=two_accepted)
    assert original.accepted
    resaved = Image.open(io.BytesIO(photos.astronaut_photo())).resize((700, 700))
    accepted = [*two_accepted, AcceptedFace(original.embedding, original.phash)]
    verdict = judge(photos.encode(resaved, quality=70), analyzer, accepted=accepted)
    assert verdict.reasons == ["duplicate_photo"]


def test_not_frontal_only_for_the_front_photo(analyzer):
    data = photos.head_turned_photo()
    front = judge(data, analyzer, role="front")
    assert front.reasons == ["not_frontal"]
    assert abs(front.scores["yaw"]) > LIMITS.max_front_yaw
    assert judge(data, analyzer, role="extra").accepted


def test_different_person(analyzer, two_accepted):
    verdict = judge(photos.grace_hopper_photo(), analyzer, accepted=two_accepted)
    assert verdict.reasons == ["different_person"]
    assert verdict.scores["similarity"] < LIMITS.same_person_min_similarity
    same = judge(photos.astronaut_photo(), analyzer, accepted=two_accepted)
    assert same.accepted and same.scores["similarity"] > LIMITS.same_person_min_similarity


def test_identity_is_not_checked_before_two_accepted_photos(analyzer, two_accepted):
    assert judge(photos.grace_hopper_photo(), analyzer, accepted=two_accepted[:1]).accepted


def test_exif_rotated_photo_is_judged_upright(analyzer):
    verdict = judge(photos.exif_rotated_photo(6), analyzer, role="front")
    assert verdict.accepted, verdict.reasons
    upright = judge(photos.astronaut_photo(), analyzer, role="front")
    assert cosine_similarity(verdict.embedding, upright.embedding) > 0.98
    # Without the orientation tag the stored pixels are sideways and no upright face is found.
    sideways = Image.open(io.BytesIO(photos.exif_rotated_photo(6)))
    assert judge(photos.encode(sideways), analyzer).reasons == ["no_face"]


def eye_line_degrees(face) -> float:
    left_eye, right_eye = face.eye_centres()
    dx, dy = right_eye - left_eye
    return float(np.degrees(np.arctan2(dy, dx)))


def test_aligned_crop_has_level_eyes_and_centred_face(analyzer):
    rotated = Image.open(io.BytesIO(photos.astronaut_photo())).rotate(12, resample=Image.Resampling.BICUBIC)
    rgb = np.asarray(rotated.convert("RGB"))
    face = analyzer.faces(rgb)[0]
    assert abs(eye_line_degrees(face)) > 8  # the source really is tilted
    crop = analyzer.aligned_crop(rgb, face, size=512)
    assert crop.size == (512, 512)
    crop_face = analyzer.faces(np.asarray(crop))[0]
    assert abs(eye_line_degrees(crop_face)) < 2
    centre_x = (crop_face.box[0] + crop_face.box[2]) / 2
    assert abs(centre_x - 256) < 30
    assert crop_face.box[0] > 20 and crop_face.box[2] < 492  # margin on both sides


def test_frontalness_of_a_portrait_is_high(analyzer):
    rgb = np.asarray(photos.astronaut_image())
    assert analyzer.frontalness(analyzer.faces(rgb)[0]) > 0.85


def test_same_person_is_more_alike_than_a_different_person(analyzer, astronaut_series):
    embeddings = [a.embedding for a in astronaut_series[1]]
    pivot = identity_pivot(embeddings[:10])
    rgb = np.asarray(photos.grace_hopper_image())
    stranger = analyzer.embed(rgb, analyzer.faces(rgb)[0])
    same = [likeness(e, pivot) for e in embeddings[10:]]
    different = likeness(stranger, pivot)
    assert all(0.0 <= value <= 1.0 for value in [*same, different])
    assert min(same) > 0.9 > 0.3 > different
    assert likeness(pivot, pivot) > likeness(embeddings[10], pivot) > different  # monotone in cosine


def test_drop_outliers_finds_the_stranger(analyzer, astronaut_series):
    embeddings = [a.embedding for a in astronaut_series[1][:8]]
    rgb = np.asarray(photos.grace_hopper_image())
    embeddings.insert(3, analyzer.embed(rgb, analyzer.faces(rgb)[0]))
    assert drop_outliers(embeddings, LIMITS) == [3]
    assert drop_outliers(embeddings[:3], LIMITS) == []


def test_unknown_role_is_a_programming_error(analyzer):
    with pytest.raises(ValueError):
        judge(photos.astronaut_photo(), analyzer, role="profile")


def _cascade_passes(analyzer, monkeypatch) -> list[tuple[float, float | None]]:
    """Records each (smallest, largest) face width the cascade is asked to find in the judging that follows."""
    passes = []
    detect = analyzer._cascade.detect
    monkeypatch.setattr(analyzer._cascade, "detect",
                        lambda image, smallest, largest=None, known=(): passes.append((smallest, largest))
                        or detect(image, smallest, largest, known))
    return passes


def _hog_scans(analyzer, monkeypatch) -> list[float]:
    scales = []
    candidates = analyzer._candidates
    monkeypatch.setattr(analyzer, "_candidates", lambda gray, scale: scales.append(scale) or candidates(gray, scale))
    return scales


def test_a_face_found_at_a_glance_still_reveals_a_second_one(analyzer, monkeypatch):
    # A selfie-sized face (45% of the short side) ends detection at the cascade's first, coarsest pass (faces from
    # twice the glance); a second face 60% as wide (36% of its area, over the quarter limit) beside it was seen there.
    left, top, right, bottom = photos.ASTRONAUT_FACE_BOX
    margin = (right - left) * 6 // 10
    selfie = photos.astronaut_image().crop((left - margin, top - margin, right + margin, bottom + margin))
    selfie = selfie.resize((800, 800), Image.Resampling.LANCZOS)
    face_width = (right - left) * 800 / (right - left + 2 * margin)
    grace = photos.grace_hopper_image()
    grace_left, _, grace_right, _ = photos.GRACE_HOPPER_FACE_BOX
    factor = 0.6 * face_width / (grace_right - grace_left)
    grace = grace.resize((round(grace.width * factor), round(grace.height * factor)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (800 + grace.width + 40, 800), (200, 200, 205))
    canvas.paste(selfie, (0, 0))
    canvas.paste(grace, (820, 40))
    passes, scans = _cascade_passes(analyzer, monkeypatch), _hog_scans(analyzer, monkeypatch)
    verdict = judge(photos.encode(canvas), analyzer)
    assert passes == [(2 * CASCADE_GLANCE_FACE * 800, None)] and not scans  # the coarse pass alone
    assert verdict.reasons == ["multiple_faces"]


def test_a_12_megapixel_photo_is_judged_as_the_same_photo_at_a_quarter_of_its_pixels(analyzer):
    """The 12 MP JPEG is decoded at half size (DCT scaling), its face confirmed and embedded by the torch ports of
    dlib's networks: its verdict and scores are those of the same picture resized to 2000x1500 and decoded whole,
    every score measured in the same units whatever the resolution."""
    phone = photos.encode(photos.phone_sized_image((4000, 3000)), quality=90)
    quarter = photos.encode(photos.phone_sized_image((2000, 1500)), quality=90)
    assert Image.open(io.BytesIO(phone)).size == (4000, 3000)
    large, small = judge(phone, analyzer, role="front"), judge(quarter, analyzer, role="front")
    assert large.accepted and small.accepted
    assert large.scores["face_fraction"] == pytest.approx(small.scores["face_fraction"], abs=0.01)
    assert large.scores["blur"] == pytest.approx(small.scores["blur"], rel=0.1)
    for level in ("highlight_level", "shadow_level", "brightness"):
        assert large.scores[level] == pytest.approx(small.scores[level], abs=2)
    for angle in ("yaw", "pitch", "roll"):
        assert large.scores[angle] == pytest.approx(small.scores[angle], abs=2)
    assert cosine_similarity(large.embedding, small.embedding) > 0.999
    assert large.crop.size == small.crop.size == (512, 512)
    assert np.abs(np.asarray(large.crop, dtype=float) - np.asarray(small.crop, dtype=float)).mean() < 4


def _selfie_with_a_bystander(face_fraction: float, bystander_ratio: float) -> bytes:
    """A 2000x1500 JPEG: the astronaut's face at ``face_fraction`` of the short side, Grace Hopper beside her with a
    face ``bystander_ratio`` times as wide."""
    left, top, right, bottom = photos.ASTRONAUT_FACE_BOX
    margin = (right - left) * 6 // 10
    face_width = face_fraction * 1500
    selfie = photos.astronaut_image().crop((left - margin, top - margin, right + margin, bottom + margin))
    side = round(face_width * selfie.width / (right - left))
    selfie = selfie.resize((side, side), Image.Resampling.LANCZOS)
    grace = photos.grace_hopper_image()
    grace_left, _, grace_right, _ = photos.GRACE_HOPPER_FACE_BOX
    factor = bystander_ratio * face_width / (grace_right - grace_left)
    grace = grace.resize((round(grace.width * factor), round(grace.height * factor)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (max(2000, side + grace.width + 60), 1500), (200, 200, 205))
    canvas.paste(selfie, (20, (1500 - side) // 2))
    canvas.paste(grace, (side + 40, 1500 - grace.height - 20))
    return photos.encode(canvas, quality=92)


@pytest.mark.parametrize("face_fraction, passes", [(0.45, 1), (0.36, 1), (0.2, 2), (0.1, 2), (0.07, 3)])
@pytest.mark.parametrize("bystander_ratio, refused", [(0.6, True), (0.4, False)])
def test_the_quarter_rule_holds_however_close_the_main_face_is(analyzer, monkeypatch, face_fraction, passes,
                                                               bystander_ratio, refused):
    # Three ways detection ends: a face at least twice the coarse pass's smallest (faces from twice the glance) with
    # that pass alone; a smaller one it found (down to ~half that width, 0.08 of the short side) with a second pass
    # over the finer levels, down to half its width; one it did not (7% of the short side, too small to keep) with a
    # second pass down to the glance and a third down to half its width. Each pass scans the levels just finer than
    # the one before. Either way a bystander 60% as wide (36% of the area) is refused and one 40% as wide (16%) is
    # tolerated, and dlib's HOG never runs (the cascade found a face).
    found, scans = _cascade_passes(analyzer, monkeypatch), _hog_scans(analyzer, monkeypatch)
    verdict = judge(_selfie_with_a_bystander(face_fraction, bystander_ratio), analyzer)
    assert ("multiple_faces" in verdict.reasons) == refused, verdict.reasons
    assert len(found) == passes, found
    assert not scans
    assert found[0] == (2 * CASCADE_GLANCE_FACE * 1500, None)
    for (smallest, largest), (before, _) in zip(found[1:], found):
        assert largest == before and smallest < largest
    if passes == 3:
        assert found[1][0] == CASCADE_GLANCE_FACE * 1500


def test_a_photo_the_cascade_finds_no_face_in_is_judged_by_hog(analyzer, monkeypatch):
    # The cascade misses some faces HOG finds (a blown-out one, in its development): when it finds none, the HOG plan
    # runs, and the photo is judged on HOG's face rather than refused as "no_face".
    monkeypatch.setattr(analyzer._cascade, "detect", lambda image, smallest, largest=None, known=(): [])
    scans = _hog_scans(analyzer, monkeypatch)
    verdict = judge(photos.astronaut_photo(), analyzer)
    assert verdict.accepted, verdict.reasons
    assert scans
    assert judge(photos.two_faces_photo(1.0), analyzer).reasons == ["multiple_faces"]


def test_a_photo_where_the_cascade_finds_only_what_is_no_face_is_judged_by_hog(analyzer, monkeypatch):
    # The cascade's only find is a doubtful candidate on the wall beside the astronaut, which dlib's CNN does not
    # confirm: HOG's plan runs, finds her, and the photo is accepted.
    wall = CascadeFace(box=(5.0, 5.0, 80.0, 100.0), probability=0.85, points=np.array(
        [[25.0, 40.0], [60.0, 40.0], [42.0, 60.0], [28.0, 80.0], [58.0, 80.0]]))
    monkeypatch.setattr(analyzer._cascade, "refine", lambda rgb, proposals: [wall])
    scans = _hog_scans(analyzer, monkeypatch)
    verdict = judge(photos.two_faces_photo(0.3), analyzer)
    assert verdict.accepted, verdict.reasons
    assert scans


def test_the_cascade_reports_the_faces_hog_does_where_hog_would_put_them(analyzer):
    # Every shipped face both detectors find: one confident cascade face per HOG face, the box handed to
    # dlib's landmarks (hog_style_box) overlapping HOG's own by most of it, and the cascade's eyes within a tenth of
    # the face's width of where dlib's 68 landmarks put them (a mis-read weight layout would miss all three).
    shipped = photos.astronaut_photos(6) + photos.grace_hopper_photos(3) + [photos.two_faces_photo(1.0)]
    shipped += [real_photo(name) for name in ("obama", "obama2", "obama3", "biden")]
    for data in shipped:
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        hog = [box for box, score in analyzer._hog_candidates(rgb, gray, [])
               if analyzer._is_face(rgb, box, score >= HOG_CONFIDENT_SCORE, [])]
        cascade = [face for face in analyzer._cascade.detect(Halvings(rgb), CASCADE_SMALLEST_FACE)
                   if face.probability >= CASCADE_CONFIDENT]
        assert len(cascade) == len(hog) >= 1
        faces = analyzer.faces(rgb)
        for box in hog:
            found = max(cascade, key=lambda f: _overlap(hog_style_box(f), box))
            assert _overlap(hog_style_box(found), box) > 0.6, (hog_style_box(found), box)
            face = max(faces, key=lambda f: _overlap(f.box, hog_style_box(found)))
            for seen, landmarked in zip(found.points[:2], face.eye_centres()):
                assert np.hypot(*(seen - landmarked)) < 0.1 * face.width, (seen, landmarked)


def test_the_cascade_refines_no_proposal_inside_a_face_it_already_knows(analyzer, monkeypatch):
    # The finer pass after a coarse one is told the faces found: it refines no proposal centred inside them (their
    # own proposals at the finer levels), and still finds the other face in the photo.
    rgb = np.asarray(Image.open(io.BytesIO(photos.two_faces_photo(0.6))).convert("RGB"))
    everything = analyzer._cascade.detect(Halvings(rgb), CASCADE_SMALLEST_FACE)
    sure = [face for face in everything if face.probability >= CASCADE_CONFIDENT]
    assert len(sure) == 2
    known = max(sure, key=lambda face: face.box[2] - face.box[0])
    refined = []
    refine = analyzer._cascade.refine
    monkeypatch.setattr(analyzer._cascade, "refine",
                        lambda image, proposals: refined.append(proposals) or refine(image, proposals))
    found = analyzer._cascade.detect(Halvings(rgb), CASCADE_SMALLEST_FACE, known=[known])
    left, top, right, bottom = known.box
    centres = (refined[0][:, :2] + refined[0][:, 2:4]) / 2
    assert not ((centres[:, 0] >= left) & (centres[:, 0] <= right) & (centres[:, 1] >= top) & (centres[:, 1] <= bottom)).any()
    others = [face.box for face in found if face.probability >= CASCADE_CONFIDENT]
    assert np.allclose(others, [face.box for face in sure if face is not known], atol=0.01)  # batch-size rounding


def test_hog_boxes_come_in_the_widths_the_scan_plan_assumes(analyzer):
    # The plan (models.faces.HOG_MIN_FACE) counts on dlib's HOG reporting boxes 72 px wide at its smallest window and
    # 1.2x wider per pyramid level, whatever scale it scans at.
    gray = np.asarray(Image.open(io.BytesIO(photos.two_faces_photo(0.6))).convert("L"))
    widths = set()
    for scale in (0.3, 0.45, 0.6, 1.0):
        for (left, _, right, _), _ in analyzer._candidates(gray, scale):
            widths.add((right - left) * scale)
    assert widths
    for width in widths:
        level = round(np.log(width / HOG_MIN_FACE) / np.log(1.2))
        assert level >= 0 and width == pytest.approx(HOG_MIN_FACE * 1.2 ** level, rel=0.03), width


def _face_with_eyes(left_eye: tuple[float, float], right_eye: tuple[float, float]) -> Face:
    landmarks = np.zeros((68, 2))
    landmarks[36:42], landmarks[42:48] = left_eye, right_eye
    return Face(box=(0, 0, 1, 1), landmarks=landmarks, score=1.0)


def test_a_crop_that_shrinks_a_large_face_averages_instead_of_aliasing(analyzer):
    # A one-pixel checkerboard shrunk ~5x (eyes 600 px apart, 22% of a 512 px crop) is flat grey when averaged; bilinear
    # sampling alone (what warpAffine does for INTER_AREA) would pick up stripes of black and white.
    checkerboard = ((np.indices((2400, 2400)).sum(axis=0) % 2) * 255).astype(np.uint8)
    rgb = np.repeat(checkerboard[:, :, None], 3, axis=2)
    crop = np.asarray(analyzer.aligned_crop(rgb, _face_with_eyes((900, 1100), (1500, 1160)), size=512), dtype=float)
    assert abs(crop.mean() - 127.5) < 3 and crop.std() < 8, (crop.mean(), crop.std())


def test_a_crop_of_a_large_face_is_the_crop_of_the_same_face_shrunk_beforehand(analyzer):
    # The crop box-averages the region it reads before the warp: its geometry (where the eyes land) must not move.
    rgb = np.asarray(photos.phone_selfie_image((2000, 1500), face_fraction=0.5))
    face = analyzer.faces(rgb)[0]
    small = cv2.resize(rgb, (500, 375), interpolation=cv2.INTER_AREA)
    left_eye, right_eye = ((eye + 0.5) / 4 - 0.5 for eye in face.eye_centres())
    large_crop = np.asarray(analyzer.aligned_crop(rgb, face, size=128), dtype=float)
    small_crop = np.asarray(analyzer.aligned_crop(small, _face_with_eyes(left_eye, right_eye), size=128), dtype=float)
    assert np.abs(large_crop - small_crop).mean() < 3


def test_a_power_of_two_reduction_is_the_box_average_by_that_factor():
    # resized() halves repeatedly for 1/2^k (OpenCV's fast path): the same pixels as one area resize by 2^k, to the
    # rounding of each halving (at most one level per halving, under one on average).
    rgb = np.asarray(photos.phone_selfie_image((2003, 1501), face_fraction=0.5))
    for factor in (2, 4, 8, 16):
        expected = cv2.resize(rgb[:1501 // factor * factor, :2003 // factor * factor], (2003 // factor, 1501 // factor),
                              interpolation=cv2.INTER_AREA).astype(int)
        halved = resized(rgb, 1 / factor)
        assert halved.shape == expected.shape
        difference = np.abs(halved.astype(int) - expected)
        assert difference.max() <= np.log2(factor) and difference.mean() < 1
    assert [power_of_two_at_most(v) for v in (0.5, 1, 1.9, 2, 3, 7.9, 8, 23.4)] == [1, 1, 1, 2, 2, 4, 8, 16]


def _pillow_draft_decode(data: bytes) -> np.ndarray:
    """How the judge decoded a JPEG before it decoded through simplejpeg: Pillow's draft, EXIF transpose, RGB."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    factor = intake.DECODE_SHORT_SIDE / min(width, height)
    if factor < 1:
        image.draft("RGB", (round(width * factor), round(height * factor)))
    image.load()
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("size", [(4000, 3000), (3024, 4032), (2500, 1800), (6001, 4003), (12000, 3000), (1401, 1399)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_decodes_to_pillows_draft_pixels_upright_in_every_orientation(size, mode):
    base = photos.phone_sized_image().resize(size).convert(mode)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        base.save(buffer, "JPEG", quality=85, exif=exif.tobytes())
        data = buffer.getvalue()
        opened = intake._open(data, LIMITS)
        direct = intake._decode_jpeg(opened, data)
        assert direct is not None, (size, mode, orientation)
        expected = _pillow_draft_decode(data)
        assert direct.shape == expected.shape and np.array_equal(direct, expected), (size, mode, orientation)
        assert direct.flags["C_CONTIGUOUS"]


def test_a_jpeg_simplejpeg_refuses_goes_through_pillow():
    image = photos.phone_sized_image()
    cmyk = io.BytesIO()
    image.convert("CMYK").save(cmyk, "JPEG")
    assert intake._decode(intake._open(cmyk.getvalue(), LIMITS), cmyk.getvalue()).shape == (1500, 2000, 3)
    whole = photos.encode(image)
    truncated = whole[:len(whole) // 2]
    assert intake._decode_jpeg(intake._open(truncated, LIMITS), truncated) is None
    with pytest.raises(OSError):  # Pillow's own word on it, which the judge turns into not_an_image
        intake._decode(intake._open(truncated, LIMITS), truncated)


def test_a_jpeg_whose_frame_libjpeg_reads_differently_is_not_decoded_directly(monkeypatch):
    # The pixel limits were checked on the size Pillow's header parser read; libjpeg must read the same one.
    data = photos.encode(photos.phone_sized_image())
    opened = intake._open(data, LIMITS)
    monkeypatch.setattr(intake.simplejpeg, "decode_jpeg_header", lambda data: (30000, 40000, "YCbCr", "420"))
    monkeypatch.setattr(intake.simplejpeg, "decode_jpeg", lambda *args, **kwargs: pytest.fail("decoded"))
    assert intake._decode_jpeg(opened, data) is None


def test_halvings_are_the_power_of_two_reductions_made_once():
    rgb = np.asarray(photos.phone_selfie_image((2003, 1501), face_fraction=0.5))
    halvings = Halvings(rgb)
    assert halvings.at_least(2003, 1501) is rgb
    for width, height, factor in ((1001, 750, 2), (1000, 751, 1), (250, 187, 8), (126, 93, 8), (125, 93, 16)):
        level = halvings.at_least(width, height)
        assert np.array_equal(level, resized(rgb, 1 / factor)), (width, height, factor)
        assert halvings.at_least(width, height) is level  # the same array: not halved again


def test_the_photo_hash_from_the_halvings_is_the_hash_of_the_whole_grey_photo():
    # The judge hashes the grey of the cascade's halving instead of halving a grey copy of the whole decode: the two
    # orders round differently, by at most a level per pixel, and the hashes of the shipped photos do not move.
    shipped = photos.astronaut_photos(6) + photos.grace_hopper_photos(2) + [real_photo("obama"), real_photo("biden")]
    for data in shipped + [photos.encode(photos.phone_sized_image())]:
        rgb = intake._decode(intake._open(data, LIMITS), data)
        whole = intake.perceptual_hash(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        assert intake.hamming(intake.photo_hash(Halvings(rgb)), whole) <= 1
