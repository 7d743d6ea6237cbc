"""Head pose (yaw, pitch, roll in degrees) from dlib's 68 landmarks: a generic 3D face fitted with OpenCV's solvePnP.

The 3D points are the 14 rigid landmarks of an anthropometric head model (Martins & Batista's, as used by the common
dlib head-pose examples): brow ends, eye corners, nostril wings, mouth corners, lower lip and chin. The jaw contour is
left out on purpose: it is a silhouette that slides over the cheek as the head turns, not a fixed point of the face.

Checked on landmarks projected from the model itself at known angles (recovered within 2 deg, tests/test_intake_fairness.py).
Measured on real photos (tests/data/faces, bench/bench_intake_fairness.py): people facing the camera read |yaw| 2-10
deg (the astronaut, Grace Hopper, Barack Obama's and Joe Biden's official photos), Obama speaking towards his audience
26 deg; pitch -4..+12 for them, +17..+26 for the astronaut (taken from above her eye line).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# dlib 68-point indices of the model's points, in the order of MODEL_POINTS.
POSE_LANDMARKS = (17, 21, 22, 26, 36, 39, 42, 45, 31, 35, 48, 54, 57, 8)
# In the camera's axes (x to the image's right, y down, z away from the camera), centimetres, origin between the eyes.
MODEL_POINTS = -np.array([
    (6.825897, 6.760612, 4.402142), (1.330353, 7.122144, 6.903745),  # brow: outer, inner (image left)
    (-1.330353, 7.122144, 6.903745), (-6.825897, 6.760612, 4.402142),  # brow: inner, outer (image right)
    (5.311432, 5.485328, 3.987654), (1.789930, 5.393625, 4.413414),  # eye corners (image left): outer, inner
    (-1.789930, 5.393625, 4.413414), (-5.311432, 5.485328, 3.987654),  # eye corners (image right): inner, outer
    (2.005628, 1.409845, 6.165652), (-2.005628, 1.409845, 6.165652),  # nostril wings
    (2.774015, -2.080775, 5.048531), (-2.774015, -2.080775, 5.048531),  # mouth corners
    (0.000000, -3.116408, 6.097667), (0.000000, -7.415691, 4.070434),  # lower lip centre, chin
], dtype=np.float64)
_MODEL_EYE_SPAN = float(np.linalg.norm(MODEL_POINTS[4] - MODEL_POINTS[7]))


@dataclass(frozen=True)
class HeadPose:
    """Degrees, 0 facing the camera. yaw > 0: the nose turned towards the image's left; pitch > 0: the nose down
    (looking down, or a camera above the eyes); roll > 0: the head tilted clockwise in the image."""

    yaw: float
    pitch: float
    roll: float


def head_pose(landmarks: np.ndarray, image_size: tuple[int, int]) -> HeadPose:
    """Pose of a face from its (68, 2) landmarks in an image of ``image_size`` (width, height) pixels.

    No camera calibration is known: a phone-like focal length (the image's long side) and the image centre are assumed;
    the angles depend on them only weakly at portrait distances.
    """
    width, height = image_size
    focal = float(max(width, height))
    camera = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=np.float64)
    image_points = np.ascontiguousarray(np.asarray(landmarks, dtype=np.float64)[list(POSE_LANDMARKS)])
    # Start from a face looking at the camera at the distance its eye span implies, so the iteration settles on the
    # face-forward solution, not its mirror behind the camera.
    eye_span = max(float(np.linalg.norm(image_points[4] - image_points[7])), 1e-6)
    centre = image_points.mean(axis=0)
    distance = focal * _MODEL_EYE_SPAN / eye_span
    start_t = np.array([[(centre[0] - width / 2) * distance / focal], [(centre[1] - height / 2) * distance / focal],
                        [distance]])
    ok, rvec, _ = cv2.solvePnP(MODEL_POINTS, image_points, camera, None, np.zeros((3, 1)), start_t,
                               useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return HeadPose(yaw=90.0, pitch=90.0, roll=90.0)
    rotation, _ = cv2.Rodrigues(rvec)
    (pitch, yaw, roll), *_ = cv2.RQDecomp3x3(rotation)
    return HeadPose(yaw=round(float(yaw), 1), pitch=round(float(pitch), 1), roll=round(float(roll), 1))
