"""ArcFace identity encoder: insightface's buffalo_l ``w600k_r50.onnx`` run as a torch module.

``OnnxGraphModule`` executes an ONNX graph with torch ops (initializers become
parameters, so ``.to(device, dtype)`` and ``.half()`` work, and the GPU path is
batched fp16); onnxruntime stays as the parity reference
(``arcface_onnxruntime_embed``). ``write_tiny_arcface_onnx`` writes a small
random IResNet in the real file's ONNX layout, for tests and ``models make-tiny``.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

ARCFACE_CROP_SIZE = 112
ARCFACE_EMBEDDING_DIM = 512
# insightface's ArcFaceONNX convention for graphs that do not normalise their input themselves.
ARCFACE_INPUT_MEAN = 127.5
ARCFACE_INPUT_STD = 127.5

__all__ = [
    "ARCFACE_CROP_SIZE",
    "ARCFACE_EMBEDDING_DIM",
    "ArcFaceEncoder",
    "OnnxGraphModule",
    "arcface_onnxruntime_embed",
    "load_arcface",
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
    kept as separate nodes (the real export folds some into the convs; the converter handles both):
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
# ONNX graph -> torch module
# --------------------------------------------------------------------------------------------


@dataclass
class _NodeSpec:
    """What an op factory may read at load time: attributes and the constant inputs."""

    node: onnx.NodeProto
    attrs: dict[str, Any]
    opset: int
    static: dict[str, np.ndarray]

    def static_input(self, index: int) -> np.ndarray | None:
        if index >= len(self.node.input) or not self.node.input[index]:
            return None
        return self.static.get(self.node.input[index])


_OpFn = Callable[..., Any]
_OP_FACTORIES: dict[str, Callable[[_NodeSpec], _OpFn]] = {}


def _op(*op_types: str) -> Callable[[Callable[[_NodeSpec], _OpFn]], Callable[[_NodeSpec], _OpFn]]:
    def register(factory: Callable[[_NodeSpec], _OpFn]) -> Callable[[_NodeSpec], _OpFn]:
        for op_type in op_types:
            _OP_FACTORIES[op_type] = factory
        return factory

    return register


def _ints(value: Any) -> list[int]:
    return [int(v) for v in np.asarray(value).reshape(-1)]


@_op("Conv")
def _conv(spec: _NodeSpec) -> _OpFn:
    strides = spec.attrs.get("strides")
    dilations = spec.attrs.get("dilations")
    group = int(spec.attrs.get("group", 1))
    pads = spec.attrs.get("pads")
    auto_pad = spec.attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    conv_by_rank = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rank = weight.dim() - 2
        stride = list(strides) if strides else [1] * rank
        dilation = list(dilations) if dilations else [1] * rank
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for size, s, d, k in zip(x.shape[2:], stride, dilation, weight.shape[2:]):
                total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
                small, large = total // 2, total - total // 2
                begins.append(small if auto_pad == "SAME_UPPER" else large)
                ends.append(large if auto_pad == "SAME_UPPER" else small)
        elif pads and auto_pad != "VALID":
            begins, ends = list(pads[:rank]), list(pads[rank:])
        else:
            begins = ends = [0] * rank
        if begins == ends:
            padding = begins
        else:
            # F.pad wants (last_begin, last_end, previous_begin, ...).
            x = F.pad(x, [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)])
            padding = [0] * rank
        return conv_by_rank[rank](x, weight, bias, stride, padding, dilation, group)

    return conv


@_op("BatchNormalization")
def _batch_norm(spec: _NodeSpec) -> _OpFn:
    eps = float(spec.attrs.get("epsilon", 1e-5))
    if spec.attrs.get("training_mode", 0):
        raise ValueError(
            f"BatchNormalization node {spec.node.name!r} is in training mode; export the model in eval mode"
        )

    def batch_norm(x, scale, bias, mean, var):
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    return batch_norm


@_op("PRelu")
def _prelu(spec: _NodeSpec) -> _OpFn:
    def prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
        # Strict ONNX broadcasting would align a [C] slope with the last axis; face models mean
        # one slope per channel (torch's PReLU), so [C] and [C,1,...,1] both go to axis 1.
        channelwise = slope.dim() == 1 or (slope.dim() == x.dim() - 1 and all(s == 1 for s in slope.shape[1:]))
        if channelwise and x.dim() >= 2 and slope.numel() in (1, x.shape[1]):
            return F.prelu(x, slope.reshape(-1))
        return torch.where(x >= 0, x, x * slope)

    return prelu


@_op("Relu")
def _relu(spec: _NodeSpec) -> _OpFn:
    return torch.relu


@_op("Sigmoid")
def _sigmoid(spec: _NodeSpec) -> _OpFn:
    return torch.sigmoid


@_op("Add")
def _add(spec: _NodeSpec) -> _OpFn:
    return torch.add


@_op("Sub")
def _sub(spec: _NodeSpec) -> _OpFn:
    return torch.sub


@_op("Mul")
def _mul(spec: _NodeSpec) -> _OpFn:
    return torch.mul


@_op("Div")
def _div(spec: _NodeSpec) -> _OpFn:
    def div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point() or b.is_floating_point():
            return a / b
        return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates

    return div


@_op("MatMul")
def _matmul(spec: _NodeSpec) -> _OpFn:
    return torch.matmul


@_op("Identity", "Dropout")
def _identity(spec: _NodeSpec) -> _OpFn:
    wants_mask = len(spec.node.output) > 1 and bool(spec.node.output[1])

    def identity(x: torch.Tensor, *_ignored: Any) -> Any:
        # Dropout is inference-time identity; its optional mask output is all-true.
        return (x, torch.ones_like(x, dtype=torch.bool)) if wants_mask else x

    return identity


@_op("Flatten")
def _flatten(spec: _NodeSpec) -> _OpFn:
    axis = int(spec.attrs.get("axis", 1))

    def flatten(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), -1)

    return flatten


@_op("Gemm")
def _gemm(spec: _NodeSpec) -> _OpFn:
    alpha = float(spec.attrs.get("alpha", 1.0))
    beta = float(spec.attrs.get("beta", 1.0))
    trans_a = bool(spec.attrs.get("transA", 0))
    trans_b = bool(spec.attrs.get("transB", 0))
    has_c = len(spec.node.input) > 2 and bool(spec.node.input[2])
    c_static = spec.static_input(2)
    bias_1d = not has_c or (c_static is not None and c_static.ndim <= 1)
    linear = alpha == 1.0 and beta == 1.0 and not trans_a and trans_b and bias_1d

    def gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if linear:
            return F.linear(a, b, c)
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return gemm


@_op("Reshape")
def _reshape(spec: _NodeSpec) -> _OpFn:
    allow_zero = bool(spec.attrs.get("allowzero", 0))
    static_shape = spec.static_input(1)
    shape_const = _ints(static_shape) if static_shape is not None else None

    def reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        target = shape_const if shape_const is not None else _ints(shape.tolist())
        if not allow_zero:  # 0 copies the input's dimension
            target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
        return x.reshape(target)

    return reshape


@_op("Transpose")
def _transpose(spec: _NodeSpec) -> _OpFn:
    perm = spec.attrs.get("perm")

    def transpose(x: torch.Tensor) -> torch.Tensor:
        return x.permute(list(perm) if perm is not None else list(reversed(range(x.dim()))))

    return transpose


@_op("Concat")
def _concat(spec: _NodeSpec) -> _OpFn:
    axis = int(spec.attrs["axis"])

    def concat(*xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=axis)

    return concat


@_op("GlobalAveragePool")
def _global_average_pool(spec: _NodeSpec) -> _OpFn:
    def global_average_pool(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    return global_average_pool


# Shape arithmetic, as exporters emit for a dynamic-batch flatten: Shape -> Gather -> Unsqueeze -> Concat -> Reshape.
@_op("Shape")
def _shape(spec: _NodeSpec) -> _OpFn:
    start, end = spec.attrs.get("start", 0), spec.attrs.get("end")

    def shape(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)

    return shape


@_op("Gather")
def _gather(spec: _NodeSpec) -> _OpFn:
    axis = int(spec.attrs.get("axis", 0))

    def gather(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim()
        flat = indices.reshape(-1).to(device=x.device, dtype=torch.int64) % x.shape[a]
        picked = x.index_select(a, flat)
        return picked.reshape([*x.shape[:a], *indices.shape, *x.shape[a + 1 :]])

    return gather


@_op("Unsqueeze", "Squeeze")
def _squeeze(spec: _NodeSpec) -> _OpFn:
    # Opset 13 moved axes from an attribute to an input.
    unsqueeze = spec.node.op_type == "Unsqueeze"
    axes_const = spec.attrs.get("axes")
    if axes_const is None and spec.static_input(1) is not None:
        axes_const = _ints(spec.static_input(1))

    def squeeze(x: torch.Tensor, axes_input: torch.Tensor | None = None) -> torch.Tensor:
        axes = axes_const if axes_const is not None else (None if axes_input is None else _ints(axes_input.tolist()))
        if unsqueeze:
            rank = x.dim() + len(axes)
            for axis in sorted(a % rank for a in axes):
                x = x.unsqueeze(axis)
            return x
        if axes is None:
            return x.reshape([s for s in x.shape if s != 1])
        keep = {a % x.dim() for a in axes}
        return x.reshape([s for i, s in enumerate(x.shape) if i not in keep])

    return squeeze


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    if attr.name in ("value_float", "value_floats"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.float32)
    if attr.name in ("value_int", "value_ints"):
        return np.asarray(helper.get_attribute_value(attr), dtype=np.int64)
    raise ValueError(f"Constant node {node.name!r} uses {attr.name!r}, which OnnxGraphModule does not support")


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 1


def _topological_order(nodes: list[onnx.NodeProto], available: set[str], source: str) -> list[onnx.NodeProto]:
    """Kahn's algorithm, keeping the file's order where it is already valid (it usually is)."""
    ordered: list[onnx.NodeProto] = []
    pending = list(nodes)
    known = set(available)
    while pending:
        ready = [n for n in pending if all(not i or i in known for i in n.input)]
        if not ready:
            node = pending[0]
            missing = [i for i in node.input if i and i not in known]
            raise ValueError(
                f"{source}: node {node.name!r} ({node.op_type}) reads {missing}, which no node, input or initializer produces (or the graph has a cycle)"
            )
        ready_ids = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            known.update(o for o in node.output if o)
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered


def _fold_batch_norms(
    nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], graph_outputs: set[str]
) -> list[onnx.NodeProto]:
    """Fold a BatchNormalization that alone consumes a Conv's or a Gemm's output into its weights.

    Done in float64 so the folded fp16/fp32 weights are the closest to the unfolded graph.
    """
    consumers: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    producer = {out: node for node in nodes for out in node.output}
    replaced: dict[int, onnx.NodeProto] = {}
    dropped: set[int] = set()
    for bn in nodes:
        if bn.op_type != "BatchNormalization" or len([o for o in bn.output if o]) != 1:
            continue
        source = producer.get(bn.input[0])
        if source is None or source.op_type not in ("Conv", "Gemm") or id(source) in replaced:
            continue
        if consumers.get(bn.input[0], 0) != 1 or bn.input[0] in graph_outputs:
            continue
        if not all(name in weights for name in bn.input[1:5]):
            continue
        params = [n for n in source.input[1:] if n]
        if not all(name in weights for name in params):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in bn.attribute}
        gamma, beta, mean, var = (weights[name].astype(np.float64) for name in bn.input[1:5])
        scale = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        weight_name = source.input[1]
        weight = weights[weight_name].astype(np.float64)
        bias_name = source.input[2] if len(source.input) > 2 and source.input[2] else None
        source_attrs = {a.name: helper.get_attribute_value(a) for a in source.attribute}
        dtype = weights[weight_name].dtype
        if source.op_type == "Conv":
            bias = weights[bias_name].astype(np.float64) if bias_name else np.zeros(weight.shape[0])
            new_weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
        else:
            if source_attrs.get("transA", 0) or weight.ndim != 2:
                continue
            if not source_attrs.get("transB", 0):
                weight = weight.T  # store as [out, in], F.linear's layout
            bias = weights[bias_name].astype(np.float64) if bias_name else np.zeros(1)
            if bias.size not in (1, weight.shape[0]):
                continue
            bias = np.broadcast_to(bias.reshape(-1) * float(source_attrs.get("beta", 1.0)), (weight.shape[0],))
            new_weight = weight * float(source_attrs.get("alpha", 1.0)) * scale[:, None]
            source_attrs.update(alpha=1.0, beta=1.0, transA=0, transB=1)
        new_bias = (bias - mean) * scale + beta
        folded_weight, folded_bias = f"{weight_name}::bnfold", f"{bn.output[0]}::bnfold_bias"
        weights[folded_weight] = new_weight.astype(dtype)
        weights[folded_bias] = new_bias.astype(dtype)
        replaced[id(source)] = helper.make_node(
            source.op_type,
            [source.input[0], folded_weight, folded_bias],
            [bn.output[0]],
            name=source.name,
            **source_attrs,
        )
        dropped.add(id(bn))
    return [replaced.get(id(n), n) for n in nodes if id(n) not in dropped]


class OnnxGraphModule(nn.Module):
    """Runs an ONNX graph with torch ops.

    Float initializers become (frozen) parameters and other constants buffers, so ``.to()``,
    ``.half()`` and ``torch.compile`` work as for any module. ``forward(*inputs)`` takes the graph's
    non-initializer inputs in file order, casts float inputs to the module's dtype, and returns
    one tensor, or a tuple when the graph has several outputs. Built once at load; an op without a
    handler in ``_OP_FACTORIES`` raises ``ValueError`` naming the op, the node and the file.
    """

    def __init__(
        self, model: onnx.ModelProto | str | os.PathLike[str], *, fold_batchnorm: bool = True, source: str | None = None
    ) -> None:
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            source = source or str(model)
            model = _read_onnx(Path(model))
        self.source = source or f"<onnx graph {model.graph.name!r}>"
        graph = model.graph
        opset = _default_opset(model)

        weights: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                weights[node.output[0]] = _constant_value(node)
            else:
                nodes.append(node)
        self.input_names = [i.name for i in graph.input if i.name not in weights]
        self.output_names = [o.name for o in graph.output]
        nodes = _topological_order(nodes, set(weights) | set(self.input_names), self.source)
        if fold_batchnorm:
            nodes = _fold_batch_norms(nodes, weights, set(self.output_names))

        self._steps: list[tuple[_OpFn, list[str], list[str], list[str]]] = []
        self.op_types: list[str] = [node.op_type for node in nodes]  # what forward runs, in order
        for node in nodes:
            factory = _OP_FACTORIES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if factory is None:
                raise ValueError(
                    f"{self.source}: node {node.name!r} has op type {node.op_type!r}"
                    f"{f' (domain {node.domain!r})' if node.domain else ''}, which OnnxGraphModule does not support. "
                    f"Supported: {', '.join(sorted(_OP_FACTORIES))}, Constant; add a handler in masquerade/models/arcface.py"
                )
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            fn = factory(_NodeSpec(node=node, attrs=attrs, opset=opset, static=weights))
            self._steps.append((fn, list(node.input), list(node.output), []))

        # Free each intermediate after its last reader: large batches on GPU stay within memory.
        last_use: dict[str, int] = {}
        for index, (_, inputs, _, _) in enumerate(self._steps):
            for name in inputs:
                if name and name not in weights:
                    last_use[name] = index
        for name, index in last_use.items():
            if name not in self.output_names:
                self._steps[index][3].append(name)

        used = {name for _, inputs, _, _ in self._steps for name in inputs} | set(self.output_names)
        self._tensor_attrs: dict[str, str] = {}
        for name, value in weights.items():
            if name not in used:
                continue
            attr = f"w{len(self._tensor_attrs)}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"[:96]
            tensor = torch.from_numpy(np.array(value, copy=True))
            if tensor.is_floating_point():
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(attr, tensor)
            self._tensor_attrs[name] = attr

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the module computes in (that of its parameters)."""
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.source}: graph takes inputs {self.input_names}, got {len(inputs)} tensors")
        dtype = self.dtype
        values: dict[str, Any] = {name: getattr(self, attr) for name, attr in self._tensor_attrs.items()}
        for name, x in zip(self.input_names, inputs):
            values[name] = x.to(dtype) if x.is_floating_point() else x
        for fn, input_names, output_names, release in self._steps:
            result = fn(*[values[n] if n else None for n in input_names])
            if isinstance(result, tuple):
                for name, value in zip(output_names, result):
                    if name:
                        values[name] = value
            else:
                values[output_names[0]] = result
            for name in release:
                del values[name]
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


# --------------------------------------------------------------------------------------------
# ArcFace encoder
# --------------------------------------------------------------------------------------------


class ArcFaceEncoder(nn.Module):
    """ArcFace identity embedding of aligned face crops.

    ``forward(crops)``: ``crops`` is ``[N, 3, 112, 112]`` RGB in 0..255, uint8 or float (the
    five-point-aligned crop, channels first); returns ``[N, 512]`` float32 with unit L2 norm,
    whatever dtype the graph runs in. Called by the preprocess pool once per batch of faces.
    """

    def __init__(
        self, graph: OnnxGraphModule, *, input_mean: float = ARCFACE_INPUT_MEAN, input_std: float = ARCFACE_INPUT_STD
    ) -> None:
        super().__init__()
        self.graph = graph
        self.input_mean = input_mean
        self.input_std = input_std

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        size = ARCFACE_CROP_SIZE
        if crops.dim() != 4 or tuple(crops.shape[1:]) != (3, size, size):
            hint = (
                " (channels last? use crops.permute(0, 3, 1, 2))" if crops.dim() == 4 and crops.shape[-1] == 3 else ""
            )
            raise ValueError(
                f"ArcFace crops must be [N, 3, {size}, {size}] RGB in 0..255, got {list(crops.shape)}{hint}"
            )
        # Normalise in fp32: (x - 127.5) / 127.5 is exact there, then cast to the graph's dtype.
        x = (crops.float() - self.input_mean) / self.input_std  # [N, 3, 112, 112]
        embedding = self.graph(x.to(self.graph.dtype)).float()  # [N, 512], un-normalised
        return F.normalize(embedding, dim=1)


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


def load_arcface(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    fold_batchnorm: bool = True,
) -> ArcFaceEncoder:
    """Load an ArcFace ONNX file (insightface's ``buffalo_l/w600k_r50.onnx``) as a torch encoder in eval mode.

    Raises FileNotFoundError for a missing file and ValueError, naming the path, for a file that
    is not ONNX, uses an unsupported op, or does not map [N,3,112,112] crops to 512-d embeddings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ArcFace model not found: {path}. Download insightface's buffalo_l pack and point the model directory at the folder holding buffalo_l/w600k_r50.onnx"
        )
    model = _read_onnx(path)
    declared = _check_arcface_layout(model, path)
    mean, std = _input_normalisation(model)
    encoder = ArcFaceEncoder(
        OnnxGraphModule(model, fold_batchnorm=fold_batchnorm, source=str(path)), input_mean=mean, input_std=std
    )
    encoder.eval()
    if not declared:  # the file does not say; one probe crop on CPU in fp32 does
        with torch.no_grad():
            probe = encoder.graph(torch.zeros(1, 3, ARCFACE_CROP_SIZE, ARCFACE_CROP_SIZE))
        if probe.dim() != 2 or probe.shape[1] != ARCFACE_EMBEDDING_DIM:
            raise ValueError(
                f"{path}: output has shape {list(probe.shape)} for one crop, expected [1, {ARCFACE_EMBEDDING_DIM}]"
            )
    return encoder.to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _onnxruntime_session(path: str, _mtime_ns: int) -> tuple[Any, float, float]:
    """Session plus input normalisation, cached per file version (the real model is 166 MB)."""
    import onnxruntime

    mean, std = _input_normalisation(_read_onnx(Path(path)))
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]), mean, std


def arcface_onnxruntime_embed(path: str | os.PathLike[str], crops_nchw_float: np.ndarray | torch.Tensor) -> np.ndarray:
    """Reference embedding through onnxruntime (CPU): ``[N,3,112,112]`` RGB 0..255 -> ``[N,512]`` float32, unit L2 norm.

    The parity oracle for ``load_arcface`` in tests and in ``masquerade models check``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ArcFace model not found: {path}")
    if isinstance(crops_nchw_float, torch.Tensor):
        crops_nchw_float = crops_nchw_float.detach().cpu().numpy()
    crops = np.asarray(crops_nchw_float, dtype=np.float32)
    session, mean, std = _onnxruntime_session(str(path.resolve()), path.stat().st_mtime_ns)
    (embedding,) = session.run(None, {session.get_inputs()[0].name: (crops - mean) / std})
    embedding = embedding.astype(np.float32)
    return embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
