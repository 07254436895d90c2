"""dlib's face-descriptor ResNet, read from its own ``.dat`` file and run with onnxruntime.

The ``dlib-bin`` wheel is built without BLAS: one descriptor takes about 80 ms there, and
dlib holds the GIL for all of it, so two threads describing faces use one core. The
self-check needs two descriptors per face, which made it the largest cost of a classical
run. The same network as an ONNX graph runs in a few milliseconds and releases the GIL.

Nothing is learned or approximated here: the weights are read from the model file that
dlib itself loads, the graph is built from the layers that file lists, and the result
equals ``face_recognition_model_v1.compute_face_descriptor`` to float rounding
(tests/face/test_dlib_net.py compares them on real photos). The chip that the network
sees is still cut by dlib (``get_face_chip``), so alignment is dlib's own.

The file format (dlib's ``serialize``): integers are a length byte (low nibble: byte count,
bit 7: sign) and little-endian bytes; floats are an integer mantissa and exponent; strings
a length and bytes; tensors a version, four dimensions and raw little-endian float32.
A network is written outermost layer first down to the input layer, then each layer's
parameters from the input upwards. Tag and skip layers carry no parameters; the
architecture (dlib's ``dnn_face_recognition_ex``) fixes which layer each one refers to:
a tag sits before each residual block, and a pair (tag2, skip1) before the pooled
shortcut of a downsampling block.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHIP_SIZE = 150  # px: the network's input, and the size dlib cuts face chips to
CHIP_PADDING = 0.25  # dlib's default for compute_face_descriptor


class UnsupportedDlibModelError(ValueError):
    """The file is not a dlib network this module can rebuild (the caller falls back to dlib)."""


@dataclass
class Layer:
    kind: str  # "con", "affine", "relu", "max_pool", "avg_pool", "add_prev", "fc", or "mark" (a tag or skip)
    params: np.ndarray | None = None
    shape: dict = field(default_factory=dict)  # filters, kernel, stride, padding, outputs: as the kind needs


@dataclass
class DlibNet:
    input_mean: tuple[float, float, float]  # RGB means that dlib's input layer subtracts
    input_size: tuple[int, int]
    layers: list[Layer]  # input side first


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def integer(self) -> int:
        try:
            head = self.data[self.pos]
        except IndexError:
            raise UnsupportedDlibModelError("the file ends inside an integer") from None
        count = head & 0x0F
        value = int.from_bytes(self.data[self.pos + 1 : self.pos + 1 + count], "little")
        self.pos += 1 + count
        return -value if head & 0x80 else value

    def real(self) -> float:
        mantissa = self.integer()
        return float(mantissa) * 2.0 ** self.integer()

    def text(self) -> str:
        size = self.integer()
        raw = self.data[self.pos : self.pos + size]
        self.pos += size
        return raw.decode("latin-1")

    def flag(self) -> bool:
        raw = self.data[self.pos : self.pos + 1]
        self.pos += 1
        if raw not in (b"0", b"1"):
            raise UnsupportedDlibModelError(f"expected a serialized bool at byte {self.pos - 1}")
        return raw == b"1"

    def tensor(self) -> np.ndarray:
        version = self.integer()
        if version != 2:
            raise UnsupportedDlibModelError(f"tensor version {version} at byte {self.pos}; only 2 is known")
        dims = [self.integer() for _ in range(4)]
        count = int(np.prod(dims))
        if self.pos + 4 * count > len(self.data):
            raise UnsupportedDlibModelError("the file ends inside a tensor")
        values = np.frombuffer(self.data, dtype="<f4", count=count, offset=self.pos).astype(np.float32)
        self.pos += 4 * count
        return values

    def alias(self) -> None:
        for _ in range(5):  # version, then four dimensions: implied by the layer's own fields
            self.integer()


def read_dlib_net(data: bytes) -> DlibNet:
    """Parse a serialized ``loss_metric`` network of the layer kinds the face descriptor uses."""
    reader = _Reader(data)
    if reader.integer() != 1 or not reader.text().startswith("loss_metric"):
        raise UnsupportedDlibModelError("not a dlib loss_metric network")
    reader.real(), reader.real()  # margin and distance threshold: training only
    # Outermost first: 2 for a layer with parameters, 1 for a tag or skip, 3 for the one on the input.
    nesting = []
    while True:
        version = reader.integer()
        nesting.append(version)
        if version == 3:
            break
        if version not in (1, 2) or len(nesting) > 10_000:
            raise UnsupportedDlibModelError(f"unexpected layer version {version}")
    if not reader.text().startswith("input_rgb_image"):
        raise UnsupportedDlibModelError("the input layer is not an RGB image input")
    mean = (reader.real(), reader.real(), reader.real())
    size = (reader.integer(), reader.integer())
    layers = [_read_layer(reader)]
    _skip_layer_state(reader)
    reader.integer()  # the input layer's sample expansion factor
    for version in reversed(nesting[:-1]):
        if version == 1:
            layers.append(Layer("mark"))
        else:
            layers.append(_read_layer(reader))
            _skip_layer_state(reader)
    if reader.pos != len(data):
        raise UnsupportedDlibModelError(f"{len(data) - reader.pos} bytes left after the last layer")
    return DlibNet(mean, size, layers)


def _read_layer(reader: _Reader) -> Layer:
    name = reader.text()
    if name == "con_4":
        params = reader.tensor()
        filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(7))
        reader.alias(), reader.alias()
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.real()
        return Layer(
            "con",
            params,
            {"filters": filters, "kernel": (rows, cols), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)},
        )
    if name == "affine_":
        params = reader.tensor()
        reader.alias(), reader.alias()
        if reader.integer() != 0:
            raise UnsupportedDlibModelError("only per-channel (convolutional) affine layers are supported")
        return Layer("affine", params)
    if name == "relu_":
        return Layer("relu")
    if name in ("max_pool_2", "avg_pool_2"):
        rows, cols, stride_y, stride_x, pad_y, pad_x = (reader.integer() for _ in range(6))
        return Layer(
            name[:-2], None, {"kernel": (rows, cols), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)}
        )
    if name == "add_prev_":
        return Layer("add_prev")
    if name == "fc_2":
        outputs, inputs = reader.integer(), reader.integer()
        params = reader.tensor()
        reader.alias(), reader.alias()
        if reader.integer() != 1:
            raise UnsupportedDlibModelError("only fully connected layers without bias are supported")
        for _ in range(4):
            reader.real()
        return Layer("fc", params, {"inputs": inputs, "outputs": outputs})
    raise UnsupportedDlibModelError(f"layer {name!r} is not supported")


def _skip_layer_state(reader: _Reader) -> None:
    for _ in range(3):  # setup called, gradient stale, output disabled
        reader.flag()
    for _ in range(3):  # gradient, cached output and parameter-gradient tensors: empty in a saved model
        reader.tensor()


# ------------------------------------------------------------------ the ONNX graph


def to_onnx(net: DlibNet) -> bytes:
    """The network as an ONNX model: input "chips" [N, 150, 150, 3] uint8 RGB, output "descriptors" [N, 128]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights = [], []
    counter = iter(range(1_000_000))

    def fresh(prefix: str) -> str:
        return f"{prefix}{next(counter)}"

    def constant(values: np.ndarray, prefix: str) -> str:
        name = fresh(prefix)
        weights.append(numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), name))
        return name

    def integers(values, prefix: str) -> str:
        name = fresh(prefix)
        weights.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        return name

    def op(kind: str, inputs: list[str], **attributes) -> str:
        out = fresh(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], **attributes))
        return out

    height, width = net.input_size
    # dlib's input layer: (pixel - channel mean) / 256, as NCHW float.
    chips = "chips"
    x = op("Cast", [chips], to=TensorProto.FLOAT)
    x = op("Transpose", [x], perm=[0, 3, 1, 2])
    x = op("Sub", [x, constant(np.asarray(net.input_mean, np.float32).reshape(1, 3, 1, 1), "mean")])
    x = op("Mul", [x, constant(np.asarray([1.0 / 256.0], np.float32), "scale")])
    shape = (3, height, width)  # channels, rows, columns: tracked to pad mismatched shortcut sums

    block_input, pending_block = None, None
    layers = net.layers
    for index, layer in enumerate(layers):
        following = layers[index + 1].kind if index + 1 < len(layers) else None
        if layer.kind == "mark":
            if following == "con":
                block_input = (x, shape)  # tag1: the residual block starts here
            continue
        if layer.kind == "con":
            filters, (kh, kw) = layer.shape["filters"], layer.shape["kernel"]
            (sy, sx), (py, px) = layer.shape["stride"], layer.shape["padding"]
            size = filters * shape[0] * kh * kw
            if layer.params.size != size + filters:
                raise UnsupportedDlibModelError("convolution parameters do not match its shape")
            w = layer.params[:size].reshape(filters, shape[0], kh, kw)
            x = op(
                "Conv",
                [x, constant(w, "w"), constant(layer.params[size:], "b")],
                kernel_shape=[kh, kw],
                strides=[sy, sx],
                pads=[py, px, py, px],
            )
            shape = (filters, (shape[1] + 2 * py - kh) // sy + 1, (shape[2] + 2 * px - kw) // sx + 1)
        elif layer.kind == "affine":
            channels = shape[0]
            if layer.params.size != 2 * channels:
                raise UnsupportedDlibModelError("affine parameters do not match the channels")
            gamma, beta = layer.params[:channels], layer.params[channels:]
            x = op("Mul", [x, constant(gamma.reshape(1, channels, 1, 1), "g")])
            x = op("Add", [x, constant(beta.reshape(1, channels, 1, 1), "beta")])
        elif layer.kind == "relu":
            x = op("Relu", [x])
        elif layer.kind in ("max_pool", "avg_pool"):
            (kh, kw), (sy, sx), (py, px) = layer.shape["kernel"], layer.shape["stride"], layer.shape["padding"]
            if kh == 0:  # dlib's avg_pool_everything
                x = op("GlobalAveragePool", [x])
                shape = (shape[0], 1, 1)
                continue
            pooled_input, pooled_shape = x, shape
            if layer.kind == "avg_pool":
                if block_input is None:
                    raise UnsupportedDlibModelError("a pooled shortcut without a block before it")
                # A downsampling block: pool the block's input (skip1) and add the block's output (tag2).
                pending_block = (x, shape)
                pooled_input, pooled_shape = block_input
            if py or px:
                raise UnsupportedDlibModelError("padded pooling is not supported")
            x = op(
                "MaxPool" if layer.kind == "max_pool" else "AveragePool",
                [pooled_input],
                kernel_shape=[kh, kw],
                strides=[sy, sx],
            )
            shape = (pooled_shape[0], (pooled_shape[1] - kh) // sy + 1, (pooled_shape[2] - kw) // sx + 1)
        elif layer.kind == "add_prev":
            other = pending_block if pending_block is not None else block_input
            if other is None:
                raise UnsupportedDlibModelError("a residual sum without a block before it")
            pending_block = None
            # dlib adds tensors of different shapes as if the smaller were zero-padded at the end.
            target = tuple(max(a, b) for a, b in zip(shape, other[1]))
            x = op("Add", [_pad_to(op, integers, x, shape, target), _pad_to(op, integers, *other, target)])
            shape = target
        elif layer.kind == "fc":
            inputs, outputs = layer.shape["inputs"], layer.shape["outputs"]
            if inputs != shape[0] * shape[1] * shape[2] or layer.params.size != inputs * outputs:
                raise UnsupportedDlibModelError("fully connected parameters do not match its input")
            x = op("Flatten", [x], axis=1)
            x = op("MatMul", [x, constant(layer.params.reshape(inputs, outputs), "fc")])
            shape = (outputs,)
    nodes[-1].output[0] = "descriptors"
    graph = helper.make_graph(
        nodes,
        "dlib_face_descriptor",
        [helper.make_tensor_value_info(chips, TensorProto.UINT8, ["N", height, width, 3])],
        [helper.make_tensor_value_info("descriptors", TensorProto.FLOAT, ["N", shape[0]])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _pad_to(op, integers, x: str, shape: tuple, target: tuple) -> str:
    if shape == target:
        return x
    after = [t - s for s, t in zip(shape, target)]
    return op("Pad", [x, integers([0, 0, 0, 0, 0, *after], "pads")], mode="constant")


# ------------------------------------------------------------------ running it


def descriptor_model_bytes(dat_path: str | os.PathLike) -> bytes:
    """The ONNX for the dlib model at ``dat_path``, converted once and cached beside the CenterFace one."""
    return _descriptor_model(dat_path)[0]


def _descriptor_model(dat_path: str | os.PathLike) -> tuple[bytes, Path | None]:
    from .detectors import converted_model

    return converted_model(Path(dat_path), "dlib-descriptor", lambda data: to_onnx(read_dlib_net(data)))


class DescriptorNet:
    """Descriptors for 150x150 face chips. ``run`` is thread-safe (onnxruntime documents Run as such)."""

    def __init__(self, dat_path: str | os.PathLike, intra_op_threads: int = 1):
        from .detectors import _ort_session

        self.session = _ort_session(*_descriptor_model(dat_path), intra_op_threads)

    def describe(self, chips: np.ndarray) -> np.ndarray:
        """[N, 128] float32 for [N, 150, 150, 3] uint8 RGB chips."""
        chips = np.ascontiguousarray(chips, dtype=np.uint8)
        if chips.ndim == 3:
            chips = chips[None]
        return self.session.run(["descriptors"], {"chips": chips})[0]


_shared: dict[str, DescriptorNet | None] = {}
_shared_lock = threading.Lock()


def shared_descriptor_net(dat_path: str | os.PathLike) -> DescriptorNet | None:
    """One net per model file per process, or None when the file cannot be rebuilt (use dlib's own then).

    ``MASQUERADE_DESCRIPTOR=dlib`` forces dlib's implementation (to compare, or to rule this one out)."""
    if os.environ.get("MASQUERADE_DESCRIPTOR", "").lower() == "dlib":
        return None
    key = str(dat_path)
    with _shared_lock:
        if key not in _shared:
            try:
                _shared[key] = DescriptorNet(dat_path)
            except (UnsupportedDlibModelError, OSError, ImportError) as exc:
                log.warning("dlib descriptor model %s runs in dlib (slower): %s", dat_path, exc)
                _shared[key] = None
        return _shared[key]
