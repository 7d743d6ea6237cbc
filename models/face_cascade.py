"""MTCNN's three-network face cascade (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", 2016) in torch, on the MIT-licensed weights the ``mtcnn`` wheel ships (mtcnn/assets/weights;
nothing is downloaded). The wheel's own code needs TensorFlow, so only its weight files are read, never imported.

P-Net slides a 12 px window over an image pyramid (stride 2) and proposes boxes; R-Net scores and refines each
proposal on a 24 px patch; O-Net does the same on a 48 px patch and adds five landmarks (eyes, nose, mouth corners).
Every level of the pyramid costs in proportion to its pixels, and the first level is where the smallest face sought
is 12 px: finding faces down to 90 px in a 2000x1500 photo scans a 267x200 image, a twentieth of the pixels dlib's HOG
needs at its 80 px window for the same faces.

The weights are Keras lists (kernels height, width, in, out; dense layers read a height/width-transposed flatten,
since the networks were first trained in Caffe on transposed images); the layouts are converted once at load.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import cv2
import joblib
import numpy as np
import torch
import torch.nn.functional as F

from models.halvings import Halvings

PYRAMID_FACTOR = 0.709  # each pyramid level's scale over the one before (the paper's)
# Probability cuts of the three stages (the mtcnn package's defaults).
PROPOSAL_CUT, REFINE_CUT, OUTPUT_CUT = 0.6, 0.7, 0.8
WINDOW = 12  # P-Net's window in pixels of the level it scans


class CascadeFace(NamedTuple):
    box: tuple[float, float, float, float]  # left, top, right, bottom in the image's pixels (MTCNN's convention)
    probability: float  # O-Net's face probability
    points: np.ndarray  # (5, 2): eye on the image's left, eye on its right, nose tip, mouth's left, mouth's right corner


def _weights_dir() -> str:
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the mtcnn wheel is not installed (pip install mtcnn==1.0.0): its weights are read here")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", "weights")


def _conv(kernel: np.ndarray, bias: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))).float(), torch.from_numpy(bias).float()


def _dense(kernel: np.ndarray, bias: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(kernel.T)).float(), torch.from_numpy(bias).float()


def _prelu(alpha: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(alpha.reshape(-1))).float()


def _keras_flatten(x: torch.Tensor) -> torch.Tensor:
    """NCHW to the order Keras' Permute((2, 1, 3)) + Flatten reads a NHWC tensor in: width, height, channel."""
    return x.permute(0, 3, 2, 1).flatten(1)


class _PNet:
    def __init__(self, w: list[np.ndarray]):
        self.conv1, self.prelu1 = _conv(w[0], w[1]), _prelu(w[2])
        self.conv2, self.prelu2 = _conv(w[3], w[4]), _prelu(w[5])
        self.conv3, self.prelu3 = _conv(w[6], w[7]), _prelu(w[8])
        self.regress, self.classify = _conv(w[9], w[10]), _conv(w[11], w[12])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.prelu(F.conv2d(x, *self.conv1), self.prelu1), 2, 2, ceil_mode=True)
        x = F.prelu(F.conv2d(x, *self.conv2), self.prelu2)
        x = F.prelu(F.conv2d(x, *self.conv3), self.prelu3)
        return F.conv2d(x, *self.regress), F.softmax(F.conv2d(x, *self.classify), dim=1)


class _RNet:
    def __init__(self, w: list[np.ndarray]):
        self.conv1, self.prelu1 = _conv(w[0], w[1]), _prelu(w[2])
        self.conv2, self.prelu2 = _conv(w[3], w[4]), _prelu(w[5])
        self.conv3, self.prelu3 = _conv(w[6], w[7]), _prelu(w[8])
        self.fc4, self.prelu4 = _dense(w[9], w[10]), _prelu(w[11])
        self.regress, self.classify = _dense(w[12], w[13]), _dense(w[14], w[15])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.prelu(F.conv2d(x, *self.conv1), self.prelu1), 3, 2, ceil_mode=True)
        x = F.max_pool2d(F.prelu(F.conv2d(x, *self.conv2), self.prelu2), 3, 2)
        x = F.prelu(F.conv2d(x, *self.conv3), self.prelu3)
        x = F.prelu(F.linear(_keras_flatten(x), *self.fc4), self.prelu4)
        return F.linear(x, *self.regress), F.softmax(F.linear(x, *self.classify), dim=1)


class _ONet:
    def __init__(self, w: list[np.ndarray]):
        self.conv1, self.prelu1 = _conv(w[0], w[1]), _prelu(w[2])
        self.conv2, self.prelu2 = _conv(w[3], w[4]), _prelu(w[5])
        self.conv3, self.prelu3 = _conv(w[6], w[7]), _prelu(w[8])
        self.conv4, self.prelu4 = _conv(w[9], w[10]), _prelu(w[11])
        self.fc5, self.prelu5 = _dense(w[12], w[13]), _prelu(w[14])
        self.regress, self.points, self.classify = _dense(w[15], w[16]), _dense(w[17], w[18]), _dense(w[19], w[20])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.prelu(F.conv2d(x, *self.conv1), self.prelu1), 3, 2, ceil_mode=True)
        x = F.max_pool2d(F.prelu(F.conv2d(x, *self.conv2), self.prelu2), 3, 2)
        x = F.max_pool2d(F.prelu(F.conv2d(x, *self.conv3), self.prelu3), 2, 2, ceil_mode=True)
        x = F.prelu(F.conv2d(x, *self.conv4), self.prelu4)
        x = F.prelu(F.linear(_keras_flatten(x), *self.fc5), self.prelu5)
        return F.linear(x, *self.regress), F.linear(x, *self.points), F.softmax(F.linear(x, *self.classify), dim=1)


def _normalised(pixels: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 (or NxHxWx3) RGB to the networks' input: NCHW, (v - 127.5) / 128."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels))
    tensor = tensor[None] if tensor.ndim == 3 else tensor
    return tensor.permute(0, 3, 1, 2).float().sub_(127.5).div_(128.0)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, threshold: float, by_smaller: bool = False) -> np.ndarray:
    """Indices of the boxes kept, best first: each drops the later ones overlapping it by more than ``threshold``
    (intersection over union, or over the smaller box's area when ``by_smaller``)."""
    if not by_smaller:  # OpenCV's (the same greedy rule, in C++: the first pyramid levels propose dozens of boxes)
        rects = np.column_stack([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]])
        return np.asarray(cv2.dnn.NMSBoxes(rects.tolist(), scores.tolist(), 0.0, threshold), dtype=int).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    left, top, right, bottom = boxes.T
    area = (right - left) * (bottom - top)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.clip(np.minimum(right[best], right[rest]) - np.maximum(left[best], left[rest]), 0, None)
        height = np.clip(np.minimum(bottom[best], bottom[rest]) - np.maximum(top[best], top[rest]), 0, None)
        order = rest[width * height <= threshold * np.maximum(np.minimum(area[best], area[rest]), 1e-9)]
    return np.array(keep, dtype=int)


def _squared(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to the square on its longer side, about the same centre."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(width, height)
    left, top = boxes[:, 0] + (width - side) / 2, boxes[:, 1] + (height - side) / 2
    return np.stack([left, top, left + side, top + side], axis=1)


def _patches(rgb: np.ndarray, boxes: np.ndarray, size: int) -> torch.Tensor:
    """Each (square) box of ``rgb`` sampled bilinearly to size x size, black outside the image (as the reference
    implementation crops and resizes)."""
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for i, (left, top, right, _) in enumerate(boxes):
        zoom = size / max(right - left, 1e-6)
        matrix = np.array([[zoom, 0.0, -left * zoom], [0.0, zoom, -top * zoom]], dtype=np.float32)
        out[i] = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return _normalised(out)


class FaceCascade:
    """Load once per process (~2 MB of weights, a few ms). Read-only weights: safe to share between threads."""

    def __init__(self, weights_dir: str | None = None):
        weights_dir = weights_dir or _weights_dir()
        self._pnet = _PNet(joblib.load(os.path.join(weights_dir, "pnet.lz4")))
        self._rnet = _RNet(joblib.load(os.path.join(weights_dir, "rnet.lz4")))
        self._onet = _ONet(joblib.load(os.path.join(weights_dir, "onet.lz4")))

    def proposals(self, image: Halvings, smallest: float, largest: float | None = None) -> np.ndarray:
        """P-Net's proposals (N x 5: left, top, right, bottom, probability) for faces from ``smallest`` px wide
        (the first level scans where they are 12 px) to below ``largest`` (the levels where a face that wide would be
        more than 12 px; every level down to the image's 12 px when None)."""
        height, width = image.image.shape[:2]
        scale = WINDOW / smallest
        last = WINDOW / largest if largest else 0.0
        # Each level is resized bilinearly from the smallest halving of the image still at least its size, so no
        # resize shrinks by more than 2x and none aliases.
        found = []
        with torch.inference_mode():
            while scale > last * 1.001 and min(height, width) * scale >= WINDOW:
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                level = cv2.resize(image.at_least(*size), size, interpolation=cv2.INTER_LINEAR)
                # Channels-last: oneDNN's convolutions with P-Net's few channels run ~25% faster on it (measured).
                offsets, probabilities = self._pnet(_normalised(level).contiguous(memory_format=torch.channels_last))
                probability = probabilities[0, 1].numpy()
                ys, xs = np.nonzero(probability > PROPOSAL_CUT)
                if len(ys):
                    boxes = np.stack([xs * 2, ys * 2, xs * 2 + WINDOW, ys * 2 + WINDOW], axis=1).astype(np.float64)
                    boxes = (boxes + offsets[0].numpy()[:, ys, xs].T * WINDOW) / scale
                    scores = probability[ys, xs].astype(np.float64)
                    kept = non_maximum_suppression(boxes, scores, 0.5)
                    found.append(np.column_stack([boxes[kept], scores[kept]]))
                scale *= PYRAMID_FACTOR
        if not found:
            return np.empty((0, 5))
        proposals = np.concatenate(found)
        return proposals[non_maximum_suppression(proposals[:, :4], proposals[:, 4], 0.7)]

    def refine(self, rgb: np.ndarray, proposals: np.ndarray) -> list[CascadeFace]:
        """R-Net then O-Net on P-Net's proposals: the faces, most probable first."""
        if not len(proposals):
            return []
        boxes = _squared(proposals[:, :4])
        with torch.inference_mode():
            offsets, probabilities = self._rnet(_patches(rgb, boxes, 24))
            probability = probabilities[:, 1].numpy().astype(np.float64)
            boxes = boxes + offsets.numpy() * (boxes[:, 2:3] - boxes[:, 0:1])
            passed = probability > REFINE_CUT
            boxes, probability = boxes[passed], probability[passed]
            if not len(boxes):
                return []
            boxes = _squared(boxes[non_maximum_suppression(boxes, probability, 0.7)])
            offsets, points, probabilities = self._onet(_patches(rgb, boxes, 48))
        side = boxes[:, 2:3] - boxes[:, 0:1]
        points = points.numpy()
        points = np.stack([boxes[:, 0:1] + points[:, :5] * side, boxes[:, 1:2] + points[:, 5:] * side], axis=-1)
        boxes = boxes + offsets.numpy() * side
        probability = probabilities[:, 1].numpy().astype(np.float64)
        passed = probability > OUTPUT_CUT
        boxes, probability, points = boxes[passed], probability[passed], points[passed]
        return [CascadeFace(box=tuple(float(v) for v in boxes[i]), probability=float(probability[i]), points=points[i])
                for i in non_maximum_suppression(boxes, probability, 0.7, by_smaller=True)]

    def detect(self, image: Halvings, smallest: float, largest: float | None = None,
               known: list[CascadeFace] = ()) -> list[CascadeFace]:
        """Faces from ``smallest`` to ``largest`` px wide (see proposals) in ``image`` (an RGB array's Halvings, which
        passes over the same photo share), most probable first. A proposal centred inside one of the ``known`` faces
        (found by an earlier pass) is not refined: that face is already there."""
        proposals = self.proposals(image, smallest, largest)
        centres = (proposals[:, :2] + proposals[:, 2:4]) / 2
        inside = np.zeros(len(proposals), dtype=bool)
        for face in known:
            inside |= (centres >= face.box[:2]).all(axis=1) & (centres <= face.box[2:]).all(axis=1)
        return self.refine(image.image, proposals[~inside])

    @staticmethod
    def merged(*found: list[CascadeFace]) -> list[CascadeFace]:
        """Several detections' faces as one list, most probable first, a face seen by two of them once."""
        faces = [face for group in found for face in group]
        if len(faces) < 2:
            return faces
        boxes = np.array([face.box for face in faces])
        probability = np.array([face.probability for face in faces])
        return [faces[i] for i in non_maximum_suppression(boxes, probability, 0.7, by_smaller=True)]
