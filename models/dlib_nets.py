"""dlib's two face networks run in torch: the ResNet face encoder (dlib_face_recognition_resnet_model_v1.dat) and
the MMOD CNN face detector (mmod_human_face_detector.dat), used to confirm a HOG candidate.

dlib-bin is built without BLAS: its convolutions run on dlib's own loops, ~100 ms per 150 px chip on one core for
the encoder and ~120 ms for the detector on a 128 px crop. The same weights in torch (oneDNN) compute the same
outputs (within float rounding, ~1e-6) several times faster. The weights are read from dlib's own files, so nothing
new is shipped or downloaded: the reader below follows dlib's serialization (dlib/serialize.h, dlib/dnn/core.h,
layers.h, input.h, loss.h) for the layer versions these files hold, and refuses anything else. The architectures
are those of dlib's dnn_face_recognition_ex.cpp and dnn_mmod_face_detection_ex.cpp: the files name their layers
but not dlib's tag and skip layers, so the residual wiring is the example's, checked layer by layer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150  # dlib's compute_face_descriptor aligns every face to a 150 px chip with 25% padding
CHIP_PADDING = 0.25


def use_one_core() -> None:
    """Torch's thread pool down to one thread for this process (see FaceAnalyzer.use_one_core)."""
    torch.set_num_threads(1)


class DlibFormatError(ValueError):
    """The file is not the dlib network this reader knows."""


class _Reader:
    """dlib's portable serialization: integers as a control byte (byte count, 0x80 if negative) then little-endian
    bytes; strings as length then bytes; floats as (mantissa, exponent) integers; bools as '0'/'1'; tensors as a
    version, four dimensions, then raw little-endian float32."""

    def __init__(self, data: bytes):
        self.data = data
        self.at = 0

    def byte(self) -> int:
        value = self.data[self.at]
        self.at += 1
        return value

    def integer(self) -> int:
        control = self.byte()
        size = control & 0x0F
        value = int.from_bytes(self.data[self.at:self.at + size], "little")
        self.at += size
        return -value if control & 0x80 else value

    def string(self) -> str:
        size = self.integer()
        text = self.data[self.at:self.at + size].decode("ascii")
        self.at += size
        return text

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer()
        return float(mantissa) * 2.0 ** exponent

    def boolean(self) -> bool:
        return self.byte() == ord("1")

    def tensor(self) -> np.ndarray:
        if self.integer() != 2:
            raise DlibFormatError("unknown tensor version")
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.at)
        self.at += 4 * count
        return values.reshape(shape)

    def alias(self) -> tuple[int, int, int, int]:
        if self.integer() != 1:
            raise DlibFormatError("unknown alias_tensor version")
        return tuple(self.integer() for _ in range(4))


@dataclass
class _Layer:
    kind: str
    params: dict


def _layer_details(reader: _Reader) -> _Layer:
    version = reader.string()
    if version == "con_4":
        params = reader.tensor()
        filters, rows, cols = reader.integer(), reader.integer(), reader.integer()
        stride, stride_x = reader.integer(), reader.integer()
        padding, padding_x = reader.integer(), reader.integer()
        filter_shape, _ = reader.alias(), reader.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.real()
        if (stride, padding) != (stride_x, padding_x) or rows != cols:
            raise DlibFormatError("non-square convolution")
        flat = params.reshape(-1)
        weight_count = int(np.prod(filter_shape))
        return _Layer("con", {"weight": flat[:weight_count].reshape(filter_shape), "bias": flat[weight_count:],
                              "stride": stride, "padding": padding, "filters": filters})
    if version == "affine_":
        params = reader.tensor().reshape(-1)
        gamma_shape, _ = reader.alias(), reader.alias()
        reader.integer()  # mode
        channels = int(np.prod(gamma_shape))
        return _Layer("affine", {"gamma": params[:channels], "beta": params[channels:2 * channels]})
    if version in ("max_pool_2", "avg_pool_2"):
        rows, cols, stride, stride_x, padding, padding_x = (reader.integer() for _ in range(6))
        if (rows, stride, padding) != (cols, stride_x, padding_x):
            raise DlibFormatError("non-square pooling")
        return _Layer(version[:-2], {"size": rows, "stride": stride, "padding": padding})
    if version == "bn_con2":  # a batch-norm layer as trained; dlib runs it as the affine layer it folds into
        params = reader.tensor().reshape(-1)
        gamma_shape, _ = reader.alias(), reader.alias()
        reader.tensor(), reader.tensor()  # means, invstds of the last training batch
        running_means, running_variances = reader.tensor().reshape(-1), reader.tensor().reshape(-1)
        reader.integer(), reader.integer()  # num_updates, running_stats_window_size
        for _ in range(4):
            reader.real()
        eps = reader.real()
        channels = int(np.prod(gamma_shape))
        gamma = params[:channels] / np.sqrt(running_variances + np.float32(eps))
        return _Layer("affine", {"gamma": gamma, "beta": params[channels:2 * channels] - gamma * running_means})
    if version == "relu_":
        return _Layer("relu", {})
    if version == "add_prev_":
        return _Layer("add_prev", {})
    if version == "fc_2":
        outputs, inputs = reader.integer(), reader.integer()
        params = reader.tensor()
        reader.alias(), reader.alias()
        if reader.integer() != 1:  # FC_NO_BIAS
            raise DlibFormatError("fc layer with a bias")
        for _ in range(4):
            reader.real()
        return _Layer("fc", {"weight": params.reshape(-1)[:inputs * outputs].reshape(inputs, outputs)})
    raise DlibFormatError(f"unknown layer version {version!r}")


def _skip_bookkeeping(reader: _Reader, with_input: bool) -> None:
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
        reader.boolean()
    for _ in range(3):  # x_grad, cached_output, params_grad / grad_final
        reader.tensor()
    if with_input:
        reader.integer()  # _sample_expansion_factor


def _layers(reader: _Reader, into: list[_Layer]) -> None:
    """The layers of a subnetwork, input side first (dlib writes the outermost layer's header first)."""
    version = reader.integer()
    if version == 1:  # a tag or skip layer: nothing of its own
        _layers(reader, into)
        return
    if version == 2:
        _layers(reader, into)
        into.append(_layer_details(reader))
        _skip_bookkeeping(reader, with_input=False)
        return
    if version == 3:
        into.append(_input_layer(reader))
        into.append(_layer_details(reader))
        _skip_bookkeeping(reader, with_input=True)
        return
    raise DlibFormatError(f"unknown layer container version {version}")


def _input_layer(reader: _Reader) -> _Layer:
    version = reader.string()
    means = (reader.real(), reader.real(), reader.real())
    if version == "input_rgb_image_sized":
        reader.integer(), reader.integer()  # rows, columns
        return _Layer("input", {"means": means})
    if version == "input_rgb_image_pyramid":  # the first version: paddings fixed at 10 and 11
        return _Layer("input", {"means": means, "padding": 10, "outer_padding": 11})
    raise DlibFormatError(f"unknown input layer {version!r}")


def _network_layers(path: str, loss_version: str, skip_loss_options) -> list[_Layer]:
    """A network file's layers, input first: add_loss_layer writes its version, its loss, then the layers."""
    with open(path, "rb") as handle:
        reader = _Reader(handle.read())
    if reader.integer() != 1 or reader.string() != loss_version:
        raise DlibFormatError(f"not a dlib network with a {loss_version} loss")
    skip_loss_options(reader)
    layers: list[_Layer] = []
    _layers(reader, layers)
    return layers


def _skip_metric_options(reader: _Reader) -> None:
    reader.real(), reader.real()  # margin, distance threshold


def _channel_means(input_layer: _Layer) -> torch.Tensor:
    return torch.tensor(input_layer.params["means"], dtype=torch.float32).view(1, 3, 1, 1)


def _normalised(rgb: np.ndarray, means: torch.Tensor) -> torch.Tensor:
    """dlib's input layers: (pixel - channel mean) / 256, channels first, stored channels-last (NHWC), the layout
    oneDNN's CPU convolutions run fastest on: ~1.3x for the encoder, ~1.5x for the detector, whose 1-channel 9x9
    scoring convolution is ~2.7x faster so."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float()
    return ((x - means) / 256.0).contiguous(memory_format=torch.channels_last)


class DlibFaceEncoder:
    """The 128-d descriptor of a 150 px face chip (dlib.get_face_chip's), as dlib's compute_face_descriptor gives."""

    def __init__(self, path: str):
        layers = _network_layers(path, "loss_metric_2", _skip_metric_options)
        self._means = _channel_means(layers[0])
        stem, blocks, projection = _structure(layers[1:])
        self._graph = _frozen(_EncoderGraph(stem, blocks, projection),
                              torch.zeros(1, 3, CHIP_SIZE, CHIP_SIZE).contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) descriptor of a CHIP_SIZE x CHIP_SIZE x 3 uint8 RGB chip."""
        return self._graph(_normalised(chip, self._means)).squeeze(0).double().numpy()


class _EncoderGraph(torch.nn.Module):
    """dnn_face_recognition_ex.cpp's anet_type with each affine layer folded into the convolution before it."""

    def __init__(self, stem, blocks, projection: torch.Tensor):
        super().__init__()
        conv, affine, self.pool = stem
        self.stem = _folded(conv, affine)
        self.blocks = [(_folded(first, first_affine), _folded(second, second_affine), shortcut_pool)
                       for first, first_affine, second, second_affine, shortcut_pool in blocks]
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.pool
        x = F.max_pool2d(F.relu(_conv(x, self.stem)), pool["size"], pool["stride"], pool["padding"])
        for first, second, shortcut_pool in self.blocks:
            y = _conv(F.relu(_conv(x, first)), second)
            if shortcut_pool is not None:
                x = F.avg_pool2d(x, shortcut_pool["size"], shortcut_pool["stride"], shortcut_pool["padding"])
            x = F.relu(_add_padded(y, x))
        return x.mean(dim=(2, 3)) @ self.projection


def _structure(layers: list[_Layer]):
    """Stem, residual blocks and projection of dnn_face_recognition_ex.cpp's anet_type, checked layer by layer."""
    kinds = [layer.kind for layer in layers]

    def expect(at: int, pattern: list[str]) -> list[_Layer]:
        if kinds[at:at + len(pattern)] != pattern:
            raise DlibFormatError(f"unexpected layers {kinds[at:at + len(pattern)]} at {at}, wanted {pattern}")
        return layers[at:at + len(pattern)]

    conv, affine, _, pool = expect(0, ["con", "affine", "relu", "max_pool"])
    stem = (_torch_conv(conv), _torch_affine(affine), pool.params)
    at, blocks = 4, []
    body = ["con", "affine", "relu", "con", "affine"]
    while kinds[at] == "con":
        first, first_affine, _, second, second_affine = expect(at, body)
        at += len(body)
        shortcut_pool = None
        if kinds[at] == "avg_pool":
            shortcut_pool = layers[at].params
            at += 1
        expect(at, ["add_prev", "relu"])
        at += 2
        blocks.append((_torch_conv(first), _torch_affine(first_affine), _torch_conv(second),
                       _torch_affine(second_affine), shortcut_pool))
    everything, projection = expect(at, ["avg_pool", "fc"])
    if everything.params["size"] != 0 or at + 2 != len(layers):
        raise DlibFormatError("the network does not end with a global average pool and one fc layer")
    return stem, blocks, torch.from_numpy(projection.params["weight"].copy())


def _torch_conv(layer: _Layer) -> dict:
    return {"weight": torch.from_numpy(layer.params["weight"].copy()),
            "bias": torch.from_numpy(layer.params["bias"].copy()),
            "stride": layer.params["stride"], "padding": layer.params["padding"]}


def _torch_affine(layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(layer.params["gamma"].copy()).view(1, -1, 1, 1),
            torch.from_numpy(layer.params["beta"].copy()).view(1, -1, 1, 1))


def _conv(x: torch.Tensor, conv: dict) -> torch.Tensor:
    return F.conv2d(x, conv["weight"], conv["bias"], stride=conv["stride"], padding=conv["padding"])


def _folded(conv: dict, affine: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The convolution followed by dlib's affine layer (x * gamma + beta per channel) as one convolution."""
    gamma, beta = (t.view(-1) for t in affine)
    return {**conv, "weight": conv["weight"] * gamma.view(-1, 1, 1, 1), "bias": conv["bias"] * gamma + beta}


def _frozen(graph: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """The graph traced once and frozen for inference: oneDNN then runs every convolution on weights packed once,
    where eager torch sends a batch of one below ~20k input values per convolution (most of the encoder's layers)
    to its slow generic path; the encoder's chip costs ~1.3x less so. The trace records the shapes the example gives
    its Python branches (the padded additions), so the graph is traced at the one chip size it takes."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(graph.eval(), example)))


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger of both shapes, the smaller one read as zero beyond its edges."""
    channels, rows, cols = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grown(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1:] == (channels, rows, cols):
            return t
        return F.pad(t, (0, cols - t.shape[3], 0, rows - t.shape[2], 0, channels - t.shape[1]))

    return grown(a) + grown(b)


class DlibFaceDetector:
    """dlib's MMOD CNN face detector (cnn_face_detection_model_v1), asked only whether it finds any face."""

    def __init__(self, path: str):
        layers = _network_layers(path, "loss_mmod_", _skip_mmod_options)
        self._input = layers[0].params
        self._means = _channel_means(layers[0])
        kinds = [layer.kind for layer in layers[1:]]
        if kinds != ["con", "affine", "relu"] * 6 + ["con"]:
            raise DlibFormatError(f"unexpected layers {kinds}")
        stages = [_folded(_torch_conv(layers[at]), _torch_affine(layers[at + 1])) for at in range(1, 19, 3)]
        # Eager: frozen, this graph measured ~1.25x slower (its inputs are large enough for eager oneDNN already).
        self._graph = _DetectorGraph(stages, _torch_conv(layers[19])).eval()

    def finds_a_face(self, rgb: np.ndarray) -> bool:
        """What ``len(cnn_face_detection_model_v1(rgb, 0)) > 0`` says: some window of the image pyramid scores above
        0 (dlib keeps every such window, then non-max suppression keeps at least the best of them)."""
        return self.best_score(rgb) > 0

    @torch.no_grad()
    def best_score(self, rgb: np.ndarray) -> float:
        """The highest window score over the image pyramid: the confidence of dlib's best detection when positive."""
        x = _tiled_pyramid(_normalised(rgb, self._means), self._input["padding"], self._input["outer_padding"])
        return float(self._graph(x).max())


class _DetectorGraph(torch.nn.Module):
    """dnn_mmod_face_detection_ex.cpp's net_type with each affine layer folded into the convolution before it."""

    def __init__(self, stages: list[dict], scorer: dict):
        super().__init__()
        self.stages, self.scorer = stages, scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = F.relu(_conv(x, stage))
        return _conv(x, self.scorer)


def _skip_mmod_options(reader: _Reader) -> None:
    """loss_mmod_'s mmod_options (loss.h): detector windows, losses, overlap testers, pyramid and regression flags."""
    version = reader.integer()
    if not 1 <= version <= 4:
        raise DlibFormatError("unknown mmod_options version")
    if version == 1:
        reader.integer(), reader.integer()
    else:
        for _ in range(reader.integer()):
            window_version = reader.integer()
            reader.integer(), reader.integer()
            if window_version == 2:
                reader.string()
    for _ in range(3):  # loss per false alarm, loss per missed target, truth match IoU threshold
        reader.real()
    for _ in range(4):  # overlaps_nms, overlaps_ignore: (IoU, percent covered) each
        reader.real()
    if version >= 3:
        reader.integer()
    if version >= 4:
        reader.boolean(), reader.real()


def _pyramid_rects(rows: int, cols: int, padding: int, outer_padding: int):
    """Where each level of a pyramid_down<6> pyramid lies in dlib's tiled pyramid image (image_pyramid.h,
    compute_tiled_image_pyramid_details): (top, left, rows, cols) per level, and the tiled image's size."""
    sizes = [(rows, cols)]
    while True:
        rows, cols = int(np.floor(5 / 6 * rows)), int(np.floor(5 / 6 * cols))
        if rows * cols == 0 or rows < 5:
            break
        sizes.append((rows, cols))
    first_rows, width = sizes[0]
    total_height = sum(r + padding for r, _ in sizes) - 2 * padding
    height = prev_width = 0
    for r, c in sizes:
        if c <= width - prev_width - padding and (height - first_rows) * 2 >= total_height - first_rows:
            break
        height += r + padding
        prev_width = c
    height -= padding
    rects, y, i = [], outer_padding, 0
    while y < height + outer_padding and i < len(sizes):
        rects.append((y, outer_padding) + sizes[i])
        y += sizes[i][0] + padding
        i += 1
    y -= padding
    while i < len(sizes):
        r, c = sizes[i]
        bottom, right = y - 1, outer_padding + width - 1
        top, left = bottom - (r - 1), right - (c - 1)
        if top <= outer_padding + first_rows - 1 and left <= outer_padding + width - 1 and bottom >= outer_padding:
            break  # the last column would run into the full-size image
        rects.append((top, left, r, c))
        y -= r + padding
        i += 1
    return rects, (height + 2 * outer_padding, width + 2 * outer_padding)


def _tiled_pyramid(x: torch.Tensor, padding: int, outer_padding: int) -> torch.Tensor:
    """dlib's input_rgb_image_pyramid: the image and its 5/6 downscalings (bilinear, corners aligned, each from the
    previous level) tiled into one zero-filled tensor."""
    rects, (rows, cols) = _pyramid_rects(x.shape[2], x.shape[3], padding, outer_padding)
    tiled = torch.zeros(1, 3, rows, cols)
    top, left, r, c = rects[0]
    tiled[:, :, top:top + r, left:left + c] = x
    for (ptop, pleft, pr, pc), (top, left, r, c) in zip(rects, rects[1:]):
        previous = tiled[:, :, ptop:ptop + pr, pleft:pleft + pc]
        tiled[:, :, top:top + r, left:left + c] = F.interpolate(previous, size=(r, c), mode="bilinear",
                                                                 align_corners=True)
    return tiled.contiguous(memory_format=torch.channels_last)
