"""dlib's ResNet face encoder (dlib_face_recognition_resnet_model_v1.dat) run in torch.

dlib-bin is built without BLAS: its convolutions run on dlib's own loops, ~100 ms per 150 px chip on one core. The
same weights in torch (oneDNN) compute the same descriptor (within float rounding, ~1e-6) in about a third of that.
The weights are read from dlib's own file, so nothing new is shipped or downloaded: the reader below follows dlib's
serialization (dlib/serialize.h, dlib/dnn/core.h, layers.h, input.h) for the layer versions this file holds, and
refuses anything else. The architecture is the one of dlib's dnn_face_recognition_ex.cpp, which the file cannot
describe by itself (dlib's tag and skip layers leave no name in it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CHIP_SIZE = 150  # dlib's compute_face_descriptor aligns every face to a 150 px chip with 25% padding
CHIP_PADDING = 0.25


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
        if reader.string() != "input_rgb_image_sized":
            raise DlibFormatError("unknown input layer")
        means = (reader.real(), reader.real(), reader.real())
        reader.integer(), reader.integer()  # rows, columns
        into.append(_Layer("input", {"means": means}))
        into.append(_layer_details(reader))
        _skip_bookkeeping(reader, with_input=True)
        return
    raise DlibFormatError(f"unknown layer container version {version}")


class DlibFaceEncoder:
    """The 128-d descriptor of a 150 px face chip (dlib.get_face_chip's), as dlib's compute_face_descriptor gives."""

    def __init__(self, path: str):
        with open(path, "rb") as handle:
            reader = _Reader(handle.read())
        if reader.integer() != 1 or reader.string() != "loss_metric_2":
            raise DlibFormatError("not a dlib metric-learning network")
        reader.real(), reader.real()  # margin, distance threshold
        layers: list[_Layer] = []
        _layers(reader, layers)
        self._means = torch.tensor(layers[0].params["means"], dtype=torch.float32).view(1, 3, 1, 1)
        self._stem, self._blocks, self._projection = _structure(layers[1:])

    @torch.inference_mode()
    def descriptor(self, chip: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) descriptor of a CHIP_SIZE x CHIP_SIZE x 3 uint8 RGB chip."""
        x = torch.from_numpy(np.ascontiguousarray(chip)).permute(2, 0, 1).unsqueeze(0).float()
        x = (x - self._means) / 256.0
        conv, affine, pool = self._stem
        x = F.max_pool2d(F.relu(_affine(_conv(x, conv), affine)), pool["size"], pool["stride"], pool["padding"])
        for first, first_affine, second, second_affine, shortcut_pool in self._blocks:
            y = _affine(_conv(F.relu(_affine(_conv(x, first), first_affine)), second), second_affine)
            if shortcut_pool is not None:
                x = F.avg_pool2d(x, shortcut_pool["size"], shortcut_pool["stride"], shortcut_pool["padding"])
            x = F.relu(_add_padded(y, x))
        x = x.mean(dim=(2, 3))
        return (x @ self._projection).squeeze(0).double().numpy()


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


def _affine(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    gamma, beta = affine
    return x * gamma + beta


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum over the larger of both shapes, the smaller one read as zero beyond its edges."""
    channels, rows, cols = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grown(t: torch.Tensor) -> torch.Tensor:
        if t.shape[1:] == (channels, rows, cols):
            return t
        return F.pad(t, (0, cols - t.shape[3], 0, rows - t.shape[2], 0, channels - t.shape[1]))

    return grown(a) + grown(b)
