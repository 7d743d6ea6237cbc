"""Offline face analysis on CPU: detection, 68-point landmarks, 128-d identity embedding, aligned crops.

Faces are found by MTCNN's cascade (models.face_cascade, the ``mtcnn`` wheel's MIT-licensed weights), with dlib's HOG
detector behind it; landmarks, the CNN check and the embedding are dlib's (``dlib-bin`` wheel) on the CC0 model files
shipped in the ``face-recognition-models`` package. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.util
import math
import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import dlib
import numpy as np
from PIL import Image

from models.halvings import Halvings

if TYPE_CHECKING:
    from models.face_cascade import CascadeFace

# Faces are found by MTCNN's cascade (models.face_cascade) first, coarse to fine (its cost grows with the pixels of the
# first level it scans, where the smallest face sought is its 12 px window): from faces twice CASCADE_GLANCE_FACE of the
# short side wide, which also finds every face a quarter the area (half the width) of a main face twice that wide (a
# close selfie's); a narrower widest face sends it to the finer levels, down to half its width (CASCADE_SMALLEST_FACE px
# at least), and no face at all down to the glance, CASCADE_GLANCE_FACE of the short side. When the glance finds no face
# at all (or only candidates dlib's CNN does not confirm), dlib's HOG plan below runs instead: it finds faces smaller
# than the glance (down to ~67 px in a 2000x1500 decode, enough to tell "face_too_small" from "no_face") for less than
# the cascade's finer levels would cost there (the first would scan 1000x750), and some the cascade misses (a blown-out
# face), so no photo is refused "no_face" by the cascade alone.
CASCADE_GLANCE_FACE = 0.075
CASCADE_SMALLEST_FACE = 24
# O-Net probabilities observed on the shipped photos: real faces 0.955-1.0 (0.96 for the turned head), the mission
# patch on the astronaut's suit 0.84-0.91. A face at least this probable is a face; a less probable one counts only
# if dlib's CNN confirms it, as for a low HOG score.
CASCADE_CONFIDENT = 0.95
# The cascade's boxes are taller than dlib's (brow to chin, where HOG's are square from the brows down), and dlib's
# landmark predictor was trained on HOG's boxes: each cascade face is handed to it, and measured, as the square HOG
# would report, from the cascade's own landmarks. Fitted on the 40 faces of the shipped photos both detectors find:
# side 1.09x the cascade box's width, centred between the eyes' and the mouth's midpoints across, on the nose tip
# down (residuals: side sd 6% of the face, HOG's 1.2x pyramid steps included; centre sd 3-4%).
CASCADE_TO_HOG_SIDE = 1.09

# Detection runs on a copy whose short side is at most this many pixels: dlib's HOG cost grows with the
# pixel count, and a face worth keeping (>= 8% of the short side) is still >= 64 px wide at this size.
DETECT_SHORT_SIDE = 800
# dlib's HOG finds faces down to its 80 px window, and reports each as a box 72 px wide at that size (1.2x wider per
# level of its 5/6 pyramid: 72, 86, 104, 124, 149, 179, ... at whatever scale it scans). When the largest box is
# narrower than twice that, a second face a quarter of its area (half its width) could be missed, so detection runs
# again on a copy enlarged just enough (at most 2x; 2x when nothing was found, to reach faces of 40-80 px).
HOG_MIN_FACE = 72
# Detection glances first at a copy about this small, by a whole factor (HOG's cost grows with the pixel count; a 400 px
# short side costs a quarter of 800; OpenCV box-averages by a whole factor ~4x faster than by any other): a confident
# face at least 2 * HOG_MIN_FACE wide there means every face that counts (half its width or more) was seen. Otherwise
# the usual scan follows, or, when the widest candidate would be too narrow there, one scan where it is GLANCE_HEADROOM
# times that wide (no further than twice the usual scale) instead of two: one pyramid level (1.2x), since a box found
# at one scale can come back a level narrower at another.
GLANCE_SHORT_SIDE = 400
GLANCE_HEADROOM = 1.2
# HOG proposes, dlib's MMOD CNN confirms. HOG scores observed on the shipped photos: real faces 0.78-1.6
# (0.04 when heavily blurred, 0.21 for a turned head), the mission patch on the astronaut's suit -0.05-0.78
# depending on crop and scale. So a HOG candidate scoring at least HOG_CONFIDENT_SCORE is a face; any
# other candidate counts only if the CNN, run on a 128 px crop around it (~100 ms in dlib, ~20 ms in torch),
# finds a face there. On 38 low-scoring candidates from the test photos the CNN confirmed every real face
# (confidence 0.97-1.1) and no patch or background; on a whole 512 px image dlib would take ~1.6 s.
HOG_CANDIDATE_SCORE = -0.1
HOG_CONFIDENT_SCORE = 1.0
CNN_CROP_SIDE = 128

# dlib 68-point indices.
_JAW_LEFT_AT_EYES, _JAW_RIGHT_AT_EYES = 1, 15
_NOSE_TIP = 30
_LEFT_EYE = slice(36, 42)
_RIGHT_EYE = slice(42, 48)
_EYE_OUTER_LEFT, _EYE_OUTER_RIGHT = 36, 45

# Cosine similarities of L2-normalised dlib embeddings: there is no clean gap between people. On 163 real photos
# of 76 people (issue 15) same-person pairs went down to 0.903 and different-person pairs up to 0.942; on the
# photos shipped here, Obama's three photos are 0.957-0.970 apart and six people 0.805-0.882 from each other.
# dlib's own boundary (Euclidean 0.6 on raw descriptors) falls near 0.91. likeness() is a logistic curve centred
# there, strictly increasing so rankings keep their order: 0.95 at 0.97, 0.5 at 0.91, 0.01 at 0.82; so a
# likeness is best read against the user's own photos (models.intake.likeness_baseline).
LIKENESS_MIDPOINT = 0.91
LIKENESS_SCALE = 0.02


def _model_dir() -> str:
    # face_recognition_models' __init__ imports pkg_resources (gone from recent setuptools), so its
    # data folder is located without importing it.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face-recognition-models is not installed (pip install face-recognition-models==0.3.0)")
    return os.path.join(list(spec.submodule_search_locations)[0], "models")


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # left, top, right, bottom in the analysed image's pixels
    landmarks: np.ndarray  # (68, 2) float, x/y in the analysed image's pixels
    score: float  # the detector's confidence: the cascade's face probability, or dlib HOG's score when HOG found it

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> int:
        return self.width * self.height

    def eye_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres of the eye on the image's left and the eye on the image's right."""
        return self.landmarks[_LEFT_EYE].mean(axis=0), self.landmarks[_RIGHT_EYE].mean(axis=0)


class FaceAnalyzer:
    """Loads the dlib models once; reuse one instance per process (loading takes ~1 s, ~100 MB resident).

    Safe to share between threads (gunicorn gthread workers, the threaded dev server). dlib's models are not
    thread-safe: two HOG detections at once on one detector corrupt the heap and kill the process. So each dlib
    model is used by one thread at a time: the landmark predictor behind a lock, HOG detectors handed out from a pool
    (``hog_detectors`` of them; 1 by default, which is a lock). The CNN verifier and the embedder run in torch on
    read-only weights and need no lock. Decoding, resizing and the numpy work around the calls run concurrently.

    Measured (bench/bench_face_threads.py, 2 cores): per-thread copies of the models or a process pool bought no
    throughput worth their memory (~100 MB and ~1 s of loading per copy), because only the HOG scan and image
    decoding released the GIL; dlib's CNN, landmark and embedding calls held it for their whole run (a 1 ms sleep in
    another thread waited ~90 ms during a dlib embedding, ~120 ms during a dlib CNN check). Torch releases it.
    """

    def __init__(self, model_dir: str | None = None, detect_short_side: int = DETECT_SHORT_SIDE,
                 hog_detectors: int = 1):
        model_dir = model_dir or _model_dir()
        # Idle HOG detectors: a call takes one and puts it back, so no two threads ever run the same one. More than
        # one lets HOG scans overlap (each extra detector: ~0.6 MB, ~250 ms to build); it measured within noise.
        self._detectors: queue.LifoQueue = queue.LifoQueue()
        for _ in range(max(1, hog_detectors)):
            self._detectors.put(dlib.get_frontal_face_detector())
        # dlib's two networks run in torch on dlib's own weights (models.dlib_nets): the same outputs, several times
        # cheaper than dlib-bin's BLAS-less loops. Imported here, not with this module: the web tier imports the
        # likeness functions below and must never load torch.
        import models.dlib_nets as dlib_nets
        import models.face_cascade as face_cascade
        self._nets = dlib_nets
        self._verifier = dlib_nets.DlibFaceDetector(os.path.join(model_dir, "mmod_human_face_detector.dat"))
        self._shape_predictor = dlib.shape_predictor(os.path.join(model_dir, "shape_predictor_68_face_landmarks.dat"))
        self._encoder = dlib_nets.DlibFaceEncoder(os.path.join(model_dir, "dlib_face_recognition_resnet_model_v1.dat"))
        self._shape_predictor_lock = threading.Lock()
        self._cascade = face_cascade.FaceCascade()
        self.detect_short_side = detect_short_side

    def use_one_core(self) -> None:
        """For a process that only judges photos, one of several on the machine (``jobs.worker intake``): torch's
        networks (the cascade, the CNN check, the embedding) and OpenCV's resizes and warps then run on one thread,
        as dlib's HOG and landmarks do, instead of each process spreading over every core. Process-wide (torch's
        thread pool, OpenCV's); not for a process that also renders."""
        self._nets.use_one_core()
        cv2.setNumThreads(1)

    def _confirmed_by_cnn(self, rgb: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        left, top, right, bottom = box
        half = 0.75 * max(right - left, bottom - top)
        cx, cy = (left + right) / 2, (top + bottom) / 2
        x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
        x1, y1 = int(min(rgb.shape[1], cx + half)), int(min(rgb.shape[0], cy + half))
        crop = rgb[y0:y1, x0:x1]
        if crop.size == 0:
            return False
        factor = CNN_CROP_SIDE / max(crop.shape[:2])
        size = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        crop = np.ascontiguousarray(crop)
        return self._verifier.finds_a_face(crop)

    def _is_face(self, rgb: np.ndarray, box: tuple[int, int, int, int], confident: bool,
                 checked: list[tuple[tuple[int, int, int, int], bool]]) -> bool:
        """A confident candidate is a face; any other is one if the CNN finds a face around it. ``checked`` holds
        the CNN's answers for this image: a box overlapping one of them by half (the same candidate, seen again at
        another scale) takes its answer instead of a second check."""
        if confident:
            return True
        height, width = rgb.shape[:2]
        box = (max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3]))
        for earlier, answer in checked:
            if _overlap(box, earlier) >= 0.5:
                return answer
        answer = self._confirmed_by_cnn(rgb, box)
        checked.append((box, answer))
        return answer

    def _candidates(self, gray: np.ndarray, scale: float) -> list[tuple[tuple[int, int, int, int], float]]:
        """HOG candidates on ``gray`` resized by ``scale``, as boxes in ``gray``'s pixels."""
        gray = resized(gray, scale)
        gray = np.ascontiguousarray(gray)
        detector = self._detectors.get()
        try:
            rects, scores, _ = detector.run(gray, 0, HOG_CANDIDATE_SCORE)
        finally:
            self._detectors.put(detector)
        return [((round(r.left() / scale), round(r.top() / scale), round(r.right() / scale), round(r.bottom() / scale)),
                 float(score)) for r, score in zip(rects, scores)]

    def faces(self, rgb: np.ndarray, min_area_ratio: float = 0.0, halvings: Halvings | None = None) -> list[Face]:
        """Faces, largest first. ``rgb`` is an HxWx3 uint8 array; ``halvings``, when the caller wants to read them
        too, its Halvings (the cascade's pyramid starts from them).

        Faces whose area is at most ``min_area_ratio`` of the largest face are left out (and cost nothing
        to verify); the default keeps every face.
        """
        rgb = np.ascontiguousarray(rgb)
        if halvings is None or halvings.image is not rgb:
            halvings = Halvings(rgb)
        checked: list[tuple[tuple[int, int, int, int], bool]] = []  # the CNN's answers so far, by box
        faces = self._confirmed(rgb, self._cascade_candidates(halvings), min_area_ratio, checked)
        if not faces:  # the cascade found no face, or only candidates the CNN did not confirm
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            found = [(box, score >= HOG_CONFIDENT_SCORE, score) for box, score in self._hog_candidates(rgb, gray, checked)]
            faces = self._confirmed(rgb, found, min_area_ratio, checked)
        return faces

    def _confirmed(self, rgb: np.ndarray, found: list[tuple[tuple[int, int, int, int], bool, float]],
                   min_area_ratio: float, checked: list[tuple[tuple[int, int, int, int], bool]]) -> list[Face]:
        """The candidates (box, confident, score) that are faces, with their landmarks, largest first; those at most
        ``min_area_ratio`` of the largest face's area are left out unchecked."""
        height, width = rgb.shape[:2]
        faces: list[Face] = []
        found = sorted(found, key=lambda c: (c[0][2] - c[0][0]) * (c[0][3] - c[0][1]), reverse=True)
        for (left, top, right, bottom), confident, score in found:
            box = (max(0, left), max(0, top), min(width, right), min(height, bottom))
            if faces and (box[2] - box[0]) * (box[3] - box[1]) <= min_area_ratio * faces[0].area:
                continue
            if not self._is_face(rgb, box, confident, checked):
                continue
            with self._shape_predictor_lock:
                shape = self._shape_predictor(rgb, dlib.rectangle(left, top, right, bottom))
            landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            faces.append(Face(box=box, landmarks=landmarks, score=score))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _cascade_candidates(self, image: Halvings) -> list[tuple[tuple[int, int, int, int], bool, float]]:
        """The cascade's faces as (HOG-style box, confident, probability), scanned coarse to fine as the plan at the
        top of this module says. None when it finds none down to the glance."""
        glance = max(CASCADE_SMALLEST_FACE, CASCADE_GLANCE_FACE * min(image.image.shape[:2]))
        smallest = 2 * glance
        found = self._cascade.detect(image, smallest)
        if not found:
            smallest, found = glance, self._cascade.detect(image, glance, largest=smallest)
        sure = [face for face in found if face.probability >= CASCADE_CONFIDENT] or found
        widest = max((face.box[2] - face.box[0] for face in sure), default=0.0)
        finer = max(CASCADE_SMALLEST_FACE, widest / 2)
        if found and finer < smallest:
            # Every face half as wide as the widest one (a quarter of its area) must be seen: the finer levels too.
            found = self._cascade.merged(found, self._cascade.detect(image, finer, largest=smallest, known=sure))
        return [(hog_style_box(face), face.probability >= CASCADE_CONFIDENT, face.probability) for face in found]

    def _hog_candidates(self, rgb: np.ndarray, gray: np.ndarray,
                        checked: list[tuple[tuple[int, int, int, int], bool]]) -> list[tuple[tuple[int, int, int, int], float]]:
        """dlib HOG's candidates (box, score), scanned as the plan at the top of this module says."""
        height, width = gray.shape
        scale = min(1.0, self.detect_short_side / min(height, width))
        glance = min(scale, 1 / max(1, round(min(height, width) / GLANCE_SHORT_SIDE)))
        found = self._candidates(gray, glance)
        widest = _widest(found) * glance
        if found:
            box, score = max(found, key=lambda c: c[0][2] - c[0][0])
            confident = self._is_face(rgb, box, score >= HOG_CONFIDENT_SCORE, checked)
        else:
            confident = False
        if widest < 2 * HOG_MIN_FACE or not confident:
            # Not sure every face that counts was seen. Where the widest candidate would be GLANCE_HEADROOM times
            # 2 * HOG_MIN_FACE wide, a face half as wide (a quarter of its area) is found too. A widest candidate that
            # is a face is the largest there is (the glance saw every face down to HOG_MIN_FACE), so one scan there
            # does; otherwise the widest may be no face at all: scan at the usual scale, or there when it is closer.
            needed = glance * GLANCE_HEADROOM * 2 * HOG_MIN_FACE / widest if widest else 0.0
            target = min(2 * scale, needed if confident else max(scale, needed))
            if target > glance:
                found = self._candidates(gray, target)
            largest = _widest(found) * target
            closest = min(2 * scale, target * (2.0 if largest == 0 else 2 * HOG_MIN_FACE / max(largest, 1)))
            if largest < 2 * HOG_MIN_FACE and closest > target:
                # Look again, enlarged just enough that a face half as wide as the largest one, or any face at all
                # when none was found, is at least HOG_MIN_FACE wide (at most twice the usual scale).
                closer = self._candidates(gray, closest)
                found = closer + [c for c in found if all(_overlap(c[0], other[0]) < 0.3 for other in closer)]
        return found

    def embed(self, rgb: np.ndarray, face: Face) -> np.ndarray:
        """128-d identity embedding, L2-normalised."""
        # Only the region around the face is handed to dlib (it converts whatever it is given).
        left, top, right, bottom = face.box
        reach = max(right - left, bottom - top)
        x0, y0 = max(0, left - reach), max(0, top - reach)
        region = np.ascontiguousarray(rgb[y0:bottom + reach, x0:right + reach])
        rect = dlib.rectangle(left - x0, top - y0, right - x0, bottom - y0)
        points = [dlib.point(round(x - x0), round(y - y0)) for x, y in face.landmarks]
        shape = dlib.full_object_detection(rect, points)
        chip = dlib.get_face_chip(region, shape, size=self._nets.CHIP_SIZE, padding=self._nets.CHIP_PADDING)
        vector = self._encoder.descriptor(chip)
        return vector / np.linalg.norm(vector)

    def aligned_crop(self, rgb: np.ndarray, face: Face, size: int = 512) -> Image.Image:
        """Square crop, eyes level, face centred with margin (eye line at 42% height, eyes 22% of the width apart)."""
        left_eye, right_eye = face.eye_centres()
        dx, dy = right_eye - left_eye
        angle = math.degrees(math.atan2(dy, dx))
        eye_distance = math.hypot(dx, dy)
        zoom = (0.22 * size) / max(eye_distance, 1e-6)
        centre = (left_eye + right_eye) / 2
        image = np.ascontiguousarray(rgb)
        factor = power_of_two_at_most(1 / zoom)
        if factor > 1:
            # warpAffine has no area filter (it runs INTER_AREA as bilinear), so a face shrunk more than 2x would
            # alias: the region the crop reads is box-averaged by a power of two first (halved, OpenCV's fast path),
            # and the warp shrinks the rest (less than 2x). Pixel i of the region becomes (i - (factor - 1) / 2) / factor.
            reach = 0.8 * size / zoom + factor  # the crop's farthest corner from the eyes, with rotation
            x0, y0 = (max(0, int(c - reach)) for c in centre)
            image = resized(image[y0:int(centre[1] + reach) + 1, x0:int(centre[0] + reach) + 1], 1 / factor)
            centre = (centre - (x0, y0) - (factor - 1) / 2) / factor
            zoom *= factor
        matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, zoom)
        matrix[0, 2] += size * 0.5 - centre[0]
        matrix[1, 2] += size * 0.42 - centre[1]
        interpolation = cv2.INTER_LINEAR if zoom < 1 else cv2.INTER_CUBIC
        out = cv2.warpAffine(image, matrix, (size, size), flags=interpolation,
                             borderMode=cv2.BORDER_REPLICATE)
        return Image.fromarray(out)

    @staticmethod
    def frontalness(face: Face) -> float:
        """1.0 for a face looking straight at the camera, towards 0 as the head turns (yaw).

        Compares the nose tip's horizontal distance to each side of the face, at the cheeks and at the outer
        eye corners, measured along the eye line so head tilt (roll) does not count.
        """
        points = face.landmarks
        left_eye, right_eye = face.eye_centres()
        axis = right_eye - left_eye
        axis = axis / max(np.linalg.norm(axis), 1e-6)
        nose = points[_NOSE_TIP] @ axis

        def balance(left_index: int, right_index: int) -> float:
            to_left = nose - points[left_index] @ axis
            to_right = points[right_index] @ axis - nose
            if to_left <= 0 or to_right <= 0:
                return 0.0
            return float(min(to_left, to_right) / max(to_left, to_right))

        return (balance(_JAW_LEFT_AT_EYES, _JAW_RIGHT_AT_EYES) + balance(_EYE_OUTER_LEFT, _EYE_OUTER_RIGHT)) / 2


def hog_style_box(face: CascadeFace) -> tuple[int, int, int, int]:
    """The square box dlib's HOG would report for a face the cascade found (see CASCADE_TO_HOG_SIDE)."""
    eyes, nose, mouth = face.points[:2].mean(axis=0), face.points[2], face.points[3:].mean(axis=0)
    half = CASCADE_TO_HOG_SIDE * (face.box[2] - face.box[0]) / 2
    centre_x, centre_y = (eyes[0] + mouth[0]) / 2, nose[1]
    return round(centre_x - half), round(centre_y - half), round(centre_x + half), round(centre_y + half)


def resized(gray: np.ndarray, scale: float) -> np.ndarray:
    """``gray`` (or an RGB array) resized by ``scale``: box-averaged when 1 / scale is a whole number (the few rows
    and columns past its last multiple dropped; a power of two as repeated halvings, OpenCV's fastest path, 2-3x
    faster than one area resize by 4 or more), area-averaged when shrinking otherwise, bilinear when growing."""
    if scale == 1.0:
        return gray
    height, width = gray.shape[:2]
    factor = round(1 / scale)
    if scale < 1 and abs(factor * scale - 1) < 1e-9:
        if factor & (factor - 1) == 0:
            while factor > 1:
                height, width = gray.shape[0] // 2, gray.shape[1] // 2
                gray = cv2.resize(gray[:2 * height, :2 * width], (width, height), interpolation=cv2.INTER_AREA)
                factor //= 2
            return gray
        gray = gray[:height - height % factor, :width - width % factor]
        return cv2.resize(gray, (width // factor, height // factor), interpolation=cv2.INTER_AREA)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def power_of_two_at_most(value: float) -> int:
    """The largest power of two no greater than ``value`` (1 below 2)."""
    return 1 << max(0, math.floor(math.log2(value))) if value >= 1 else 1


def _widest(found: list[tuple[tuple[int, int, int, int], float]]) -> int:
    return max((box[2] - box[0] for box, _ in found), default=0)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def identity_pivot(embeddings: list[np.ndarray]) -> np.ndarray:
    """The user's identity: the normalised mean of their face embeddings."""
    if not embeddings:
        raise ValueError("identity_pivot needs at least one embedding")
    stacked = np.stack([np.asarray(e, dtype=np.float64) / np.linalg.norm(e) for e in embeddings])
    mean = stacked.mean(axis=0)
    return mean / np.linalg.norm(mean)


def likeness(embedding: np.ndarray, pivot: np.ndarray) -> float:
    """Likeness in [0, 1], strictly increasing in cosine similarity (0.5 at the same/different boundary)."""
    return _likeness_of_similarity(cosine_similarity(embedding, pivot))


def _likeness_of_similarity(similarity: float) -> float:
    z = (similarity - LIKENESS_MIDPOINT) / LIKENESS_SCALE
    return float(1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0))))


def leave_one_out_similarities(embeddings: list[np.ndarray]) -> list[float]:
    """Each embedding's cosine similarity to the pivot of all the others: how far each of a user's own photos
    strays from the rest of them. Empty with fewer than three (one other photo is no pivot to speak of)."""
    if len(embeddings) < 3:
        return []
    return [cosine_similarity(e, identity_pivot(embeddings[:i] + embeddings[i + 1:])) for i, e in enumerate(embeddings)]


def likeness_baseline(embeddings: list[np.ndarray]) -> float | None:
    """How like the user their own photos are, on likeness()'s scale: the mean likeness of each accepted photo to
    the pivot of the others. None with fewer than three photos."""
    similarities = leave_one_out_similarities(embeddings)
    if not similarities:
        return None
    return float(np.mean([_likeness_of_similarity(s) for s in similarities]))


def relative_likeness(value: float | None, baseline: float | None) -> float | None:
    """A likeness as a share of the user's own baseline: 1.0 is "as like you as your own photos are"."""
    if value is None or not baseline:
        return None
    return round(value / baseline, 3)
