"""ArcFace through onnxruntime: the tiny file's layout, the embedding against an independent forward
pass of insightface's IResNet written here in torch, batching, threads, providers and errors."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from masquerade.models import arcface
from masquerade.models.arcface import (
    ArcFaceEncoder,
    load_arcface,
    onnxruntime_providers,
    write_tiny_arcface_onnx,
)

# Same fp32 math up to summation order.
FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_arcface_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_arcface_onnx(tmp_path_factory.mktemp("arcface") / "buffalo_l" / "w600k_r50.onnx", seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_arcface_path: Path) -> ArcFaceEncoder:
    return load_arcface(tiny_arcface_path)


def random_crops(batch: int, seed: int = 0) -> np.ndarray:
    """[N, 3, 112, 112] float32 RGB in 0..255, smooth enough to look like an image to a CNN."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (batch, 3, 14, 14)).astype(np.float32)
    smooth = F.interpolate(torch.from_numpy(coarse), size=(112, 112), mode="bilinear", align_corners=False)
    return (smooth.numpy() + rng.normal(0, 8, (batch, 3, 112, 112))).clip(0, 255).astype(np.float32)


def iresnet_forward(path: Path, crops: np.ndarray, blocks=(1, 1, 1, 1)) -> np.ndarray:
    """insightface's iresnet.py forward in eval mode, from the file's named weights: the oracle.

    Written from the architecture, not from the graph's nodes, so a wrong input normalisation,
    channel order, BatchNorm or PReLU in the runtime path would show.
    """
    w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer}

    def bn(x, name):
        return F.batch_norm(
            x, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5
        )

    def prelu(x, name):
        return F.prelu(x, w[f"{name}.weight"].flatten())

    def conv(x, name, stride=1):
        weight = w[f"{name}.weight"]
        return F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)

    x = (torch.from_numpy(crops) - 127.5) / 127.5  # insightface: (x - 127.5) / 127.5, RGB
    x = prelu(bn(conv(x, "conv1"), "bn1"), "prelu")
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            p = f"layer{stage}.{index}"
            stride = 2 if index == 0 else 1
            y = bn(x, f"{p}.bn1")
            y = prelu(bn(conv(y, f"{p}.conv1"), f"{p}.bn2"), f"{p}.prelu")
            y = bn(conv(y, f"{p}.conv2", stride), f"{p}.bn3")
            shortcut = (
                bn(conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1") if f"{p}.downsample.0.weight" in w else x
            )
            x = y + shortcut
    x = bn(x, "bn2").flatten(1)
    x = F.linear(x, w["fc.weight"], w["fc.bias"])
    x = bn(x, "features")
    return F.normalize(x, dim=1).numpy()


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
    slopes = [t for t in model.graph.initializer if t.name.endswith("prelu.weight")]
    assert slopes and all(list(s.dims)[1:] == [1, 1] for s in slopes)


@pytest.mark.parametrize("batch", [1, 5])
def test_embedding_matches_an_independent_iresnet_forward(tiny_arcface_path, encoder, batch) -> None:
    crops = random_crops(batch, seed=batch)
    embedding = encoder(crops)
    assert isinstance(embedding, torch.Tensor) and embedding.dtype == torch.float32
    assert embedding.shape == (batch, 512) and embedding.device.type == "cpu"
    np.testing.assert_allclose(embedding.norm(dim=1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedding.numpy(), iresnet_forward(tiny_arcface_path, crops), atol=FP32_ATOL)


def test_a_crop_in_a_batch_embeds_as_it_does_alone(encoder) -> None:
    crops = random_crops(4, seed=3)
    batched, alone = encoder(crops), encoder(crops[2:3])
    torch.testing.assert_close(batched[2:3], alone, atol=1e-6, rtol=0)
    # Different faces give different identities (the random network is not degenerate).
    assert (batched[0] @ batched[1]).item() < 0.99


def test_large_batches_run_in_chunks_with_the_same_result(encoder, monkeypatch) -> None:
    crops = random_crops(5, seed=8)
    whole = encoder(crops)
    monkeypatch.setattr(arcface, "ARCFACE_MAX_BATCH", 2)
    torch.testing.assert_close(encoder(crops), whole, atol=1e-6, rtol=0)
    assert encoder(crops[:0]).shape == (0, 512)


def test_uint8_float_numpy_and_torch_crops_embed_alike(encoder) -> None:
    crops = random_crops(2, seed=4).round()
    expected = encoder(crops)
    torch.testing.assert_close(encoder(crops.astype(np.uint8)), expected)
    torch.testing.assert_close(encoder(torch.from_numpy(crops)), expected)
    torch.testing.assert_close(encoder(torch.from_numpy(crops).to(torch.uint8)), expected)


def test_channels_last_crops_are_rejected_with_a_hint(encoder) -> None:
    with pytest.raises(ValueError, match=r"transpose\(0, 3, 1, 2\)"):
        encoder(np.zeros((1, 112, 112, 3), np.float32))


def test_threads_share_one_session(encoder) -> None:
    """onnxruntime documents concurrent run() on one session as safe; results must not mix."""
    inputs = [random_crops(3, seed=20 + i) for i in range(4)]
    expected = [encoder(crops) for crops in inputs]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                results[i].append(encoder(inputs[i]))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    for i in range(4):
        assert len(results[i]) == 5
        for result in results[i]:
            torch.testing.assert_close(result, expected[i], atol=1e-6, rtol=0)


def test_providers_follow_the_device(encoder) -> None:
    assert encoder.providers == ["CPUExecutionProvider"]
    assert onnxruntime_providers("cpu") == ["CPUExecutionProvider"]
    cuda = onnxruntime_providers("cuda:1")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert cuda[0] == ("CUDAExecutionProvider", {"device_id": 1}) and cuda[-1] == "CPUExecutionProvider"
    else:  # the CPU build of onnxruntime: CUDA is asked for, the CPU answers
        assert cuda == ["CPUExecutionProvider"]


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="w600k_r50.onnx"):
        load_arcface(tmp_path / "buffalo_l" / "w600k_r50.onnx")


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
def test_real_w600k_r50_embeds_in_batches() -> None:
    model_dir = os.environ.get("MASQUERADE_MODEL_DIR")
    path = Path(model_dir or "") / "buffalo_l" / "w600k_r50.onnx"
    if not model_dir or not path.is_file():
        pytest.skip("set MASQUERADE_MODEL_DIR to a folder holding buffalo_l/w600k_r50.onnx")
    crops = random_crops(3, seed=11)
    encoder = load_arcface(path)
    embedding = encoder(crops)
    np.testing.assert_allclose(embedding.norm(dim=1).numpy(), 1.0, atol=1e-5)
    torch.testing.assert_close(encoder(crops[1:2]), embedding[1:2], atol=1e-5, rtol=0)
    # The real export folds BatchNorms into its convs, so the named-weights oracle above does not apply.


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="needs CUDA and onnxruntime-gpu",
)
def test_cuda_provider_matches_cpu(tiny_arcface_path: Path, encoder) -> None:
    crops = random_crops(8, seed=13)
    on_gpu = load_arcface(tiny_arcface_path, device="cuda")
    assert on_gpu.providers[0] == "CUDAExecutionProvider"
    torch.testing.assert_close(on_gpu(crops), encoder(crops), atol=1e-4, rtol=0)
