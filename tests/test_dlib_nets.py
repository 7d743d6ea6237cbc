"""The dlib networks run in torch (models.dlib_nets) against dlib's own implementation of the same files."""

from __future__ import annotations

import io
import os

import dlib
import numpy as np
import pytest
from PIL import Image

import cv2

from models.dlib_nets import CHIP_PADDING, CHIP_SIZE, DlibFaceDetector, DlibFaceEncoder, DlibFormatError
from models.faces import CNN_CROP_SIDE, FaceAnalyzer, _model_dir
from models import sample_photos as photos
from intake_support import real_photo

ENCODER_FILE = os.path.join(_model_dir(), "dlib_face_recognition_resnet_model_v1.dat")
DETECTOR_FILE = os.path.join(_model_dir(), "mmod_human_face_detector.dat")


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer()


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("name", ["obama", "obama2", "biden", "astronaut", "grace_hopper"])
def test_torch_encoder_gives_dlibs_descriptor(analyzer, name):
    data = {"astronaut": photos.astronaut_photo, "grace_hopper": photos.grace_hopper_photo}.get(
        name, lambda: real_photo(name))()
    rgb = _rgb(data)
    face = analyzer.faces(rgb)[0]
    shape = dlib.full_object_detection(dlib.rectangle(*face.box),
                                       [dlib.point(round(x), round(y)) for x, y in face.landmarks])
    reference = np.array(dlib.face_recognition_model_v1(ENCODER_FILE).compute_face_descriptor(rgb, shape))
    chip = dlib.get_face_chip(rgb, shape, size=CHIP_SIZE, padding=CHIP_PADDING)
    ours = DlibFaceEncoder(ENCODER_FILE).descriptor(chip)
    assert np.abs(ours - reference).max() < 1e-5
    assert np.allclose(analyzer.embed(rgb, face), reference / np.linalg.norm(reference), atol=1e-5)


def _squares(rgb: np.ndarray, analyzer: FaceAnalyzer):
    """CNN_CROP_SIDE squares as the verifier sees them: around every HOG candidate (faces, and what only looks like
    one: the mission patch, background), at two scales, and shifted off the face."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    for scale in (0.5, 1.0):
        for (left, top, right, bottom), _ in analyzer._candidates(gray, scale):
            side = int(1.5 * max(right - left, bottom - top))
            for dx in (0, side // 2):
                x0, y0 = max(0, (left + right - side) // 2 + dx), max(0, (top + bottom - side) // 2)
                region = rgb[y0:y0 + side, x0:x0 + side]
                if min(region.shape[:2]) > 8:
                    yield np.ascontiguousarray(cv2.resize(region, (CNN_CROP_SIDE, CNN_CROP_SIDE),
                                                          interpolation=cv2.INTER_AREA))


def test_torch_detector_scores_as_dlibs():
    analyzer = FaceAnalyzer()
    reference = dlib.cnn_face_detection_model_v1(DETECTOR_FILE)
    ours = DlibFaceDetector(DETECTOR_FILE)
    found = missed = 0
    for data in [real_photo("obama"), real_photo("biden"), photos.astronaut_photo(), photos.two_faces_photo(0.5)]:
        for square in _squares(_rgb(data), analyzer):
            detections = reference(square, 0)
            assert ours.finds_a_face(square) == (len(detections) > 0)
            if detections:
                found += 1
                assert ours.best_score(square) == pytest.approx(max(d.confidence for d in detections), abs=1e-4)
            else:
                missed += 1
    assert found >= 4 and missed >= 4  # both answers were compared


def test_tiled_pyramid_of_a_large_image_matches_too():
    """A wider image puts the smaller levels in a second column (dlib's tiling): scored the same."""
    rgb = _rgb(photos.two_faces_photo(1.0))
    reference = dlib.cnn_face_detection_model_v1(DETECTOR_FILE)
    square = np.ascontiguousarray(cv2.resize(rgb, (rgb.shape[1] // 3, rgb.shape[0] // 3), interpolation=cv2.INTER_AREA))
    detections = reference(square, 0)
    assert detections
    assert DlibFaceDetector(DETECTOR_FILE).best_score(square) == pytest.approx(max(d.confidence for d in detections),
                                                                               abs=1e-4)


def test_readers_refuse_each_others_files():
    with pytest.raises(DlibFormatError):
        DlibFaceEncoder(DETECTOR_FILE)
    with pytest.raises(DlibFormatError):
        DlibFaceDetector(ENCODER_FILE)
