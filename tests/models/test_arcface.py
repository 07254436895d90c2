"""ArcFace encoder: the ONNX->torch converter against onnxruntime, on the tiny file and (opt-in) the real one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from masquerade.models.arcface import (
    ArcFaceEncoder,
    OnnxGraphModule,
    arcface_onnxruntime_embed,
    load_arcface,
    write_tiny_arcface_onnx,
)

# fp32: the converter does the same math as onnxruntime up to summation order (and BN folding).
FP32_ATOL = 1e-4
# fp16: ~3 significant digits per op through ~30 ops; unit embeddings keep cosine > 0.999.
FP16_MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def tiny_arcface_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_arcface_onnx(tmp_path_factory.mktemp("arcface") / "buffalo_l" / "w600k_r50.onnx", seed=0)


def random_crops(batch: int, seed: int = 0) -> np.ndarray:
    """[N, 3, 112, 112] float32 RGB in 0..255, smooth enough to look like an image to a CNN."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 3, 14, 14)).astype(np.float32)
    smooth = F.interpolate(torch.from_numpy(coarse), size=(112, 112), mode="bilinear", align_corners=False)
    return (smooth.numpy() + rng.normal(0, 8, (batch, 3, 112, 112))).clip(0, 255).astype(np.float32)


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def half_conv_supported() -> bool:
    try:
        F.conv2d(torch.zeros(1, 2, 4, 4, dtype=torch.half), torch.zeros(2, 2, 3, 3, dtype=torch.half))
        return True
    except RuntimeError:
        return False


def test_tiny_arcface_has_the_real_files_layout(tiny_arcface_path: Path) -> None:
    onnx.checker.check_model(str(tiny_arcface_path), full_check=True)
    model = onnx.load(str(tiny_arcface_path))
    assert tiny_arcface_path.stat().st_size < 2 * 1024 * 1024
    assert model.opset_import[0].version == 11
    (graph_input,) = model.graph.input
    assert graph_input.name == "input.1"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 512
    op_types = {n.op_type for n in model.graph.node}
    assert op_types == {"Conv", "BatchNormalization", "PRelu", "Add", "Flatten", "Gemm"}
    assert [n.op_type for n in model.graph.node[-3:]] == ["Flatten", "Gemm", "BatchNormalization"]
    slopes = [
        model.graph.initializer[i] for i, t in enumerate(model.graph.initializer) if t.name.endswith("prelu.weight")
    ]
    assert slopes and all(list(s.dims)[1:] == [1, 1] for s in slopes)


@pytest.mark.parametrize("batch", [1, 5])
def test_torch_embedding_matches_onnxruntime(tiny_arcface_path: Path, batch: int) -> None:
    crops = random_crops(batch, seed=batch)
    expected = arcface_onnxruntime_embed(tiny_arcface_path, crops)
    encoder = load_arcface(tiny_arcface_path)
    with torch.no_grad():
        embedding = encoder(torch.from_numpy(crops))
    assert embedding.dtype == torch.float32 and embedding.shape == (batch, 512)
    np.testing.assert_allclose(embedding.norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedding.numpy(), expected, atol=FP32_ATOL)


@pytest.mark.parametrize("fold_batchnorm", [True, False])
def test_graph_module_matches_onnxruntime_before_normalisation(tiny_arcface_path: Path, fold_batchnorm: bool) -> None:
    model = onnx.load(str(tiny_arcface_path))
    x = ((random_crops(3, seed=7) - 127.5) / 127.5).astype(np.float32)
    (expected,) = run_onnxruntime(model, {"input.1": x})
    graph = OnnxGraphModule(model, fold_batchnorm=fold_batchnorm)
    with torch.no_grad():
        raw = graph(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # Unfolded: stem, 4 per block (bn1, bn2, bn3, downsample), bn2, features. Folding keeps only the
    # BNs that no Conv/Gemm precedes: each block's pre-activation bn1 and the final bn2.
    expected_batch_norms = 4 + 1 if fold_batchnorm else 1 + 4 * 4 + 1 + 1
    assert graph.op_types.count("BatchNormalization") == expected_batch_norms


def test_a_crop_in_a_batch_embeds_as_it_does_alone(tiny_arcface_path: Path) -> None:
    crops = torch.from_numpy(random_crops(4, seed=3))
    encoder = load_arcface(tiny_arcface_path)
    with torch.no_grad():
        batched = encoder(crops)
        alone = encoder(crops[2:3])
    torch.testing.assert_close(batched[2:3], alone, atol=1e-5, rtol=0)
    # Different faces give different identities (the random network is not degenerate).
    assert (batched[0] @ batched[1]).item() < 0.99


def test_uint8_and_float_crops_embed_alike(tiny_arcface_path: Path) -> None:
    crops = torch.from_numpy(random_crops(2, seed=4)).round()
    encoder = load_arcface(tiny_arcface_path)
    with torch.no_grad():
        torch.testing.assert_close(encoder(crops.to(torch.uint8)), encoder(crops))


def test_channels_last_crops_are_rejected_with_a_hint(tiny_arcface_path: Path) -> None:
    encoder = load_arcface(tiny_arcface_path)
    with pytest.raises(ValueError, match=r"permute\(0, 3, 1, 2\)"):
        encoder(torch.zeros(1, 112, 112, 3))


def test_half_converts_every_floating_tensor(tiny_arcface_path: Path) -> None:
    encoder = load_arcface(tiny_arcface_path).half()
    tensors = dict(encoder.state_dict())
    assert tensors
    floating = [t for t in tensors.values() if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float16 for t in floating)
    assert encoder.graph.dtype == torch.float16


@pytest.mark.skipif(not half_conv_supported(), reason="this torch build has no fp16 conv on CPU")
def test_fp16_embedding_is_close_to_fp32(tiny_arcface_path: Path) -> None:
    crops = random_crops(3, seed=5)
    expected = arcface_onnxruntime_embed(tiny_arcface_path, crops)
    encoder = load_arcface(tiny_arcface_path, dtype=torch.float16)
    with torch.no_grad():
        embedding = encoder(torch.from_numpy(crops))
    assert embedding.dtype == torch.float32
    assert (embedding.numpy() * expected).sum(axis=1).min() > FP16_MIN_COSINE


def _op_zoo_model(opset: int) -> onnx.ModelProto:
    """Every op the converter claims, with non-default attributes where they matter.

    Opset 13 moved Unsqueeze's axes and (from 12) Dropout's ratio from attributes to inputs.
    """
    rng = np.random.default_rng(0)
    n = helper.make_node

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        init("w_group", rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)),
        init("b_group", rng.normal(0, 0.1, 4).astype(np.float32)),
        init("w_stride", rng.normal(0, 0.3, (6, 4, 3, 3)).astype(np.float32)),
        init("bn_scale", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
        init("bn_bias", rng.normal(0, 0.1, 6).astype(np.float32)),
        init("bn_mean", rng.normal(0, 0.1, 6).astype(np.float32)),
        init("bn_var", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
        init("slope_c11", rng.uniform(0.1, 0.3, (6, 1, 1)).astype(np.float32)),
        init("slope_c", rng.uniform(0.1, 0.3, 5).astype(np.float32)),
        init("offset", np.float32(0.25)),
        init("gemm_b", rng.normal(0, 0.3, (6, 5)).astype(np.float32)),  # transB=0: [in, out]
        init("gemm_c", rng.normal(0, 0.1, 5).astype(np.float32)),
        init("matmul_w", rng.normal(0, 0.3, (5, 8)).astype(np.float32)),
        init("shape_0_m1", np.array([0, -1], dtype=np.int64)),
        init("gather_index", np.array(0, dtype=np.int64)),
        init("minus_one", np.array([-1], dtype=np.int64)),
        init("axes_0", np.array([0], dtype=np.int64)),
        init("ratio", np.array(0.5, dtype=np.float32)),
    ]
    dropout = (
        n("Dropout", ["flat"], ["flat_drop"], ratio=0.5)
        if opset < 12
        else n("Dropout", ["flat", "ratio"], ["flat_drop"])
    )
    unsqueeze = (
        n("Unsqueeze", ["batch"], ["batch_1d"], axes=[0])
        if opset < 13
        else n("Unsqueeze", ["batch", "axes_0"], ["batch_1d"])
    )
    nodes = [
        n("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, dtype=np.float32))),
        n("Mul", ["x", "two"], ["x2"], name="scale"),
        n(
            "Conv",
            ["x2", "w_group", "b_group"],
            ["g"],
            name="grouped_dilated_asym",
            group=2,
            dilations=[2, 2],
            pads=[1, 2, 2, 1],
        ),
        n("Relu", ["g"], ["g_relu"]),
        n("Conv", ["g_relu", "w_stride"], ["s"], name="strided", strides=[2, 2], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["s", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["s_bn"], epsilon=1e-3),
        n("PRelu", ["s_bn", "slope_c11"], ["s_act"]),
        n("Sub", ["s_act", "offset"], ["s_sub"]),
        n("Div", ["s_sub", "two"], ["s_div"]),
        n("Sigmoid", ["s_div"], ["s_sig"]),
        n("Add", ["s_sig", "s_act"], ["s_add"]),
        n("GlobalAveragePool", ["s_add"], ["pooled"]),
        n("Flatten", ["pooled"], ["flat"], axis=1),
        dropout,
        n("Gemm", ["flat_drop", "gemm_b", "gemm_c"], ["fc"], alpha=0.5, beta=2.0),
        n("PRelu", ["fc", "slope_c"], ["fc_act"]),
        n("MatMul", ["fc_act", "matmul_w"], ["mm"]),
        n("Identity", ["mm"], ["mm_id"]),
        n("Transpose", ["s_add"], ["nhwc"], perm=[0, 2, 3, 1]),
        n("Reshape", ["nhwc", "shape_0_m1"], ["nhwc_flat"]),
        # Dynamic-batch reshape as exporters write it: Shape -> Gather -> Unsqueeze -> Concat.
        n("Shape", ["s_add"], ["shape"]),
        n("Gather", ["shape", "gather_index"], ["batch"], axis=0),
        unsqueeze,
        n("Concat", ["batch_1d", "minus_one"], ["dyn_shape"], axis=0),
        n("Reshape", ["s_add", "dyn_shape"], ["s_flat"]),
        n("Concat", ["mm_id", "nhwc_flat", "s_flat"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "op_zoo",
        inputs=[helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 9, 11])],
        outputs=[helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", None])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("opset", "fold_batchnorm"), [(11, True), (11, False), (13, True)])
def test_every_supported_op_matches_onnxruntime(opset: int, fold_batchnorm: bool) -> None:
    model = _op_zoo_model(opset)
    x = np.random.default_rng(1).normal(0, 1, (3, 4, 9, 11)).astype(np.float32)
    (expected,) = run_onnxruntime(model, {"x": x})
    with torch.no_grad():
        actual = OnnxGraphModule(model, fold_batchnorm=fold_batchnorm)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_vector_prelu_slope_is_per_channel_on_feature_maps() -> None:
    slope = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "prelu",
        inputs=[helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4, 5])],
        outputs=[helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(slope, "slope")],
    )
    x = torch.randn(2, 3, 4, 5)
    actual = OnnxGraphModule(helper.make_model(graph))(x)
    torch.testing.assert_close(actual, F.prelu(x, torch.from_numpy(slope)))


def test_unknown_op_error_names_op_node_and_file(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("LpNormalization", ["r"], ["y"], name="l2_head")],
        "unknown",
        inputs=[helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        outputs=[helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match=r"LpNormalization") as caught:
        OnnxGraphModule(path)
    assert "l2_head" in str(caught.value) and str(path) in str(caught.value)


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "buffalo_l" / "w600k_r50.onnx"
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx"):
        load_arcface(missing)
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx"):
        arcface_onnxruntime_embed(missing, np.zeros((1, 3, 112, 112), np.float32))


def test_corrupt_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "w600k_r50.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match=str(path)):
        load_arcface(path)


def test_non_512_output_is_rejected(tmp_path: Path) -> None:
    path = write_tiny_arcface_onnx(tmp_path / "w128.onnx", width=4, embedding_dim=128)
    with pytest.raises(ValueError, match=r"128-d.*512"):
        load_arcface(path)


@pytest.mark.real_weights
def test_real_w600k_r50_matches_onnxruntime() -> None:
    model_dir = os.environ.get("MASQUERADE_MODEL_DIR")
    path = Path(model_dir or "") / "buffalo_l" / "w600k_r50.onnx"
    if not model_dir or not path.is_file():
        pytest.skip("set MASQUERADE_MODEL_DIR to a folder holding buffalo_l/w600k_r50.onnx")
    crops = random_crops(2, seed=11)
    expected = arcface_onnxruntime_embed(path, crops)
    encoder = load_arcface(path)
    assert isinstance(encoder, ArcFaceEncoder)
    with torch.no_grad():
        embedding = encoder(torch.from_numpy(crops)).numpy()
    np.testing.assert_allclose(embedding, expected, atol=FP32_ATOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_batched_on_cuda_is_close_to_onnxruntime(tiny_arcface_path: Path) -> None:
    crops = random_crops(8, seed=13)
    expected = arcface_onnxruntime_embed(tiny_arcface_path, crops)
    encoder = load_arcface(tiny_arcface_path, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        embedding = encoder(torch.from_numpy(crops).cuda()).cpu().numpy()
    assert (embedding * expected).sum(axis=1).min() > FP16_MIN_COSINE
