"""The dlib networks run in torch (models.face_encoder) against dlib's own implementation of the same files."""

from __future__ import annotations

import io
import os

import dlib
import numpy as np
import pytest
from PIL import Image

from models.face_encoder import CHIP_PADDING, CHIP_SIZE, DlibFaceEncoder, DlibFormatError
from models.faces import FaceAnalyzer, _model_dir
from models import sample_photos as photos
from intake_support import real_photo

ENCODER_FILE = os.path.join(_model_dir(), "dlib_face_recognition_resnet_model_v1.dat")


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


def test_reader_refuses_other_files(tmp_path):
    other = tmp_path / "mmod.dat"
    other.write_bytes(open(os.path.join(_model_dir(), "mmod_human_face_detector.dat"), "rb").read())
    with pytest.raises(DlibFormatError):
        DlibFaceEncoder(str(other))
