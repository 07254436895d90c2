"""ArcFace identity encoder: insightface's buffalo_l ``w600k_r50.onnx`` run by onnxruntime.

``load_arcface`` checks the file's layout and opens one ``onnxruntime.InferenceSession``
(the CUDA execution provider when the device is CUDA and onnxruntime-gpu provides it, the
CPU provider otherwise); ``ArcFaceEncoder`` embeds a whole batch of aligned crops in one
``run``. The network runs once or twice per face, negligible next to a face's UNet calls.
``write_tiny_arcface_onnx`` writes a small random IResNet in the real file's ONNX layout,
for tests and ``models make-tiny``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

ARCFACE_CROP_SIZE = 112
ARCFACE_EMBEDDING_DIM = 512
# insightface's ArcFaceONNX convention for graphs that do not normalise their input themselves.
ARCFACE_INPUT_MEAN = 127.5
ARCFACE_INPUT_STD = 127.5
# Crops per session.run: bounds the activations' memory for a large batch of faces.
ARCFACE_MAX_BATCH = 64

__all__ = [
    "ARCFACE_CROP_SIZE",
    "ARCFACE_EMBEDDING_DIM",
    "ArcFaceEncoder",
    "load_arcface",
    "onnxruntime_providers",
    "write_tiny_arcface_onnx",
]


# --------------------------------------------------------------------------------------------
# Tiny random ArcFace in the real file's layout
# --------------------------------------------------------------------------------------------


def write_tiny_arcface_onnx(
    path: str | os.PathLike[str],
    seed: int = 0,
    width: int = 8,
    blocks: Sequence[int] = (1, 1, 1, 1),
    *,
    stage_widths: Sequence[int] | None = None,
    embedding_dim: int = ARCFACE_EMBEDDING_DIM,
) -> Path:
    """Write a random IResNet with the layout of insightface's ``w600k_r50.onnx``; return the path.

    Same graph as insightface's ``iresnet.py`` exported in eval mode, but with BatchNormalization
    kept as separate nodes (the real export folds some into the convs; onnxruntime runs both):
    input ``input.1`` ``[N,3,112,112]`` -> Conv3x3 -> BN -> PRelu -> four stages of IBasicBlocks
    (BN -> Conv3x3 -> BN -> PRelu -> Conv3x3/stride -> BN, plus a Conv1x1+BN shortcut when the
    shape changes, Add) -> BN -> Flatten -> Gemm (fc) -> BatchNormalization ("features", 1-D).
    Opset 11, IR version 6, dynamic batch, as in the real file.

    Stage widths default to ``width * (1, 1, 2, 2)`` instead of the real ``64 * (1, 2, 4, 8)``:
    the fc weight has ``C_last * 7 * 7 * 512`` floats and dominates the file (16 channels: 1.6 MB).
    ``stage_widths=(64, 128, 256, 512), width=64, blocks=(3, 4, 14, 3)`` gives the real R50 shape.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    widths = tuple(stage_widths) if stage_widths is not None else (width, width, 2 * width, 2 * width)
    if len(widths) != len(blocks):
        raise ValueError(f"stage_widths {widths} and blocks {tuple(blocks)} must have the same length")
    builder = _GraphBuilder(rng)

    x = "input.1"
    x = builder.conv("conv1", x, 3, width, kernel=3, stride=1)
    x = builder.batch_norm("bn1", x, width)
    x = builder.prelu("prelu", x, width)
    channels, spatial = width, ARCFACE_CROP_SIZE
    for stage, (planes, num_blocks) in enumerate(zip(widths, blocks), start=1):
        for index in range(num_blocks):
            stride = 2 if index == 0 else 1
            prefix = f"layer{stage}.{index}"
            shortcut = x
            y = builder.batch_norm(f"{prefix}.bn1", x, channels)
            y = builder.conv(f"{prefix}.conv1", y, channels, planes, kernel=3, stride=1)
            y = builder.batch_norm(f"{prefix}.bn2", y, planes)
            y = builder.prelu(f"{prefix}.prelu", y, planes)
            y = builder.conv(f"{prefix}.conv2", y, planes, planes, kernel=3, stride=stride)
            # Residual branches start small, as in a trained network, so activations stay O(1).
            y = builder.batch_norm(f"{prefix}.bn3", y, planes, gamma_scale=0.3)
            if stride != 1 or channels != planes:
                shortcut = builder.conv(f"{prefix}.downsample.0", x, channels, planes, kernel=1, stride=stride)
                shortcut = builder.batch_norm(f"{prefix}.downsample.1", shortcut, planes)
            x = builder.node("Add", [y, shortcut])
            channels = planes
        spatial = (spatial + 1) // 2
    x = builder.batch_norm("bn2", x, channels)
    x = builder.node("Flatten", [x], axis=1)
    fc_in = channels * spatial * spatial
    fc_weight = builder.initializer("fc.weight", rng.normal(0.0, 1.0 / math.sqrt(fc_in), (embedding_dim, fc_in)))
    fc_bias = builder.initializer("fc.bias", rng.normal(0.0, 0.01, embedding_dim))
    x = builder.node("Gemm", [x, fc_weight, fc_bias], alpha=1.0, beta=1.0, transB=1)
    # insightface freezes features.weight at 1.0.
    x = builder.batch_norm("features", x, embedding_dim, fixed_gamma=True)

    graph = helper.make_graph(
        builder.nodes,
        "main_graph",
        inputs=[helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, ["None", 3, 112, 112])],
        outputs=[helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["None", embedding_dim])],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, producer_name="masquerade-tiny", opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


class _GraphBuilder:
    """Names values and nodes the way torch.onnx (1.x) did for the real file: ``Conv_0``, ``"12"``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0

    def initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        output = str(self._counter + 100)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{op_type}_{self._counter}", **attrs))
        self._counter += 1
        return output

    def conv(self, name: str, x: str, c_in: int, c_out: int, *, kernel: int, stride: int) -> str:
        fan_in = c_in * kernel * kernel
        weight = self.initializer(
            f"{name}.weight", self.rng.normal(0.0, math.sqrt(2.0 / fan_in), (c_out, c_in, kernel, kernel))
        )
        pad = kernel // 2
        return self.node(
            "Conv",
            [x, weight],
            dilations=[1, 1],
            group=1,
            kernel_shape=[kernel, kernel],
            pads=[pad, pad, pad, pad],
            strides=[stride, stride],
        )

    def batch_norm(
        self, name: str, x: str, channels: int, *, gamma_scale: float = 1.0, fixed_gamma: bool = False
    ) -> str:
        rng = self.rng
        gamma = np.ones(channels) if fixed_gamma else gamma_scale * rng.uniform(0.5, 1.5, channels)
        inputs = [
            x,
            self.initializer(f"{name}.weight", gamma),
            self.initializer(f"{name}.bias", rng.normal(0.0, 0.1, channels)),
            self.initializer(f"{name}.running_mean", rng.normal(0.0, 0.2, channels)),
            self.initializer(f"{name}.running_var", rng.uniform(0.5, 2.0, channels)),
        ]
        return self.node("BatchNormalization", inputs, epsilon=1e-5, momentum=0.9)

    def prelu(self, name: str, x: str, channels: int) -> str:
        # The real file stores PReLU slopes as [C, 1, 1].
        slope = self.initializer(f"{name}.weight", self.rng.uniform(0.1, 0.4, (channels, 1, 1)))
        return self.node("PRelu", [x, slope])


# --------------------------------------------------------------------------------------------
# ArcFace encoder (onnxruntime)
# --------------------------------------------------------------------------------------------


def onnxruntime_providers(device: str | torch.device = "cpu") -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for ``device``: CUDA (on that GPU) when asked and available, CPU always last."""
    import onnxruntime

    device = torch.device(device)
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class ArcFaceEncoder:
    """ArcFace identity embedding of aligned face crops, through one onnxruntime session.

    ``encoder(crops)``: ``crops`` is ``[N, 3, 112, 112]`` RGB in 0..255 (the five-point-aligned
    crop, channels first), uint8 or float, as a numpy array or a torch tensor on any device;
    returns ``[N, 512]`` float32 on the CPU with unit L2 norm. The whole batch goes through
    ``session.run`` together (in chunks of ``ARCFACE_MAX_BATCH``).

    Thread safety: onnxruntime documents ``InferenceSession.run`` as safe to call from several
    threads at once on one session (its threading docs: "multiple threads can invoke the Run()
    method on the same inference session object"), so one encoder serves every preprocess
    thread without a lock. Creating the session is not shared: ``load_arcface`` does it once.
    """

    def __init__(
        self,
        session: Any,
        *,
        source: str = "",
        input_mean: float = ARCFACE_INPUT_MEAN,
        input_std: float = ARCFACE_INPUT_STD,
    ) -> None:
        self.session = session
        self.source = source
        self.input_mean = input_mean
        self.input_std = input_std
        self.input_name = session.get_inputs()[0].name
        self.providers: list[str] = list(session.get_providers())

    def __repr__(self) -> str:
        return f"ArcFaceEncoder({self.source!r}, providers={self.providers})"

    def __call__(self, crops: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = crops.detach().to("cpu", torch.float32).numpy()
        crops = np.asarray(crops)
        size = ARCFACE_CROP_SIZE
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, size, size):
            hint = (
                " (channels last? use crops.transpose(0, 3, 1, 2))" if crops.ndim == 4 and crops.shape[-1] == 3 else ""
            )
            raise ValueError(
                f"ArcFace crops must be [N, 3, {size}, {size}] RGB in 0..255, got {list(crops.shape)}{hint}"
            )
        # Normalise in fp32: (x - 127.5) / 127.5 is exact there.
        x = ((crops.astype(np.float32) - self.input_mean) / self.input_std).astype(np.float32)  # [N, 3, 112, 112]
        parts = [
            self.session.run(None, {self.input_name: x[start : start + ARCFACE_MAX_BATCH]})[0]
            for start in range(0, len(x), ARCFACE_MAX_BATCH)
        ]
        embedding = (
            np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, ARCFACE_EMBEDDING_DIM), np.float32)
        )
        if embedding.ndim != 2 or embedding.shape[1] != ARCFACE_EMBEDDING_DIM:
            raise ValueError(
                f"{self.source}: output has shape {list(embedding.shape)}, expected [N, {ARCFACE_EMBEDDING_DIM}]"
            )
        embedding /= np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
        return torch.from_numpy(embedding)  # [N, 512], unit norm


def _read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ValueError(f"{path} is not a readable ONNX model ({exc}); re-download it") from exc


def _input_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """insightface's ArcFaceONNX rule: a graph starting with Sub and Mul normalises its input itself."""
    head = model.graph.node[:8]
    has_sub = any(n.op_type == "Sub" or n.name.startswith(("Sub", "_minus")) for n in head)
    has_mul = any(n.op_type == "Mul" or n.name.startswith(("Mul", "_mul")) for n in head)
    return (0.0, 1.0) if has_sub and has_mul else (ARCFACE_INPUT_MEAN, ARCFACE_INPUT_STD)


def _static_dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _check_arcface_layout(model: onnx.ModelProto, path: Path) -> bool:
    """Raise ValueError when the declared shapes are not ArcFace's; return whether the output dim was declared."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ValueError(
            f"{path}: an ArcFace model has one input and one output, found {len(inputs)} and {len(model.graph.output)}"
        )
    in_dims = _static_dims(inputs[0])
    expected = [None, 3, ARCFACE_CROP_SIZE, ARCFACE_CROP_SIZE]
    if len(in_dims) != 4 or any(d is not None and e is not None and d != e for d, e in zip(in_dims, expected)):
        raise ValueError(
            f"{path}: input {inputs[0].name!r} has shape {in_dims}, expected [N, 3, 112, 112]; is this buffalo_l/w600k_r50.onnx?"
        )
    out_dims = _static_dims(model.graph.output[0])
    if out_dims and out_dims[-1] is not None:
        if out_dims[-1] != ARCFACE_EMBEDDING_DIM:
            raise ValueError(
                f"{path}: output is {out_dims[-1]}-d, expected a {ARCFACE_EMBEDDING_DIM}-d ArcFace embedding; is this buffalo_l/w600k_r50.onnx?"
            )
        return True
    return False


_SESSION_LOCK = threading.Lock()


def load_arcface(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ArcFaceEncoder:
    """Open an ArcFace ONNX file (insightface's ``buffalo_l/w600k_r50.onnx``) in onnxruntime.

    ``device`` picks the execution provider (``onnxruntime_providers``). ``dtype`` is accepted for
    the loaders' common signature and ignored: the graph runs in the precision it was exported in
    (fp32), and embeddings are always float32. Raises FileNotFoundError for a missing file and
    ValueError, naming the path, for a file that is not ONNX, that onnxruntime cannot run, or that
    does not map [N,3,112,112] crops to 512-d embeddings.
    """
    import onnxruntime

    del dtype
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ArcFace model not found: {path}. Download insightface's buffalo_l pack and point the model directory at the folder holding buffalo_l/w600k_r50.onnx"
        )
    model = _read_onnx(path)
    declared = _check_arcface_layout(model, path)
    mean, std = _input_normalisation(model)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: the CUDA provider's fallback notices are not ours to print
    try:
        with _SESSION_LOCK:
            session = onnxruntime.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=onnxruntime_providers(device)
            )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
        raise ValueError(f"{path}: onnxruntime cannot run this model ({exc})") from exc
    encoder = ArcFaceEncoder(session, source=str(path), input_mean=mean, input_std=std)
    if not declared:  # the file does not say; one probe crop does
        encoder(np.zeros((1, 3, ARCFACE_CROP_SIZE, ARCFACE_CROP_SIZE), np.float32))
    return encoder
