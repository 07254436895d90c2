"""Face detection recall and precision on a synthetic set whose truth is known by construction.

Faces come from photos shipped in installed packages (insightface's t1.jpg and
Tom_Hanks_54745.png, scikit-image's astronaut); each is pasted, with a soft
round edge, at a width of 16-320 px, rotated by up to +-30 degrees, sometimes
blurred and darkened, onto a face-free scikit-image background (rocket, coffee,
a cat, the Hubble deep field, textures, ...), and the whole image is JPEG
compressed. The truth box of a face is the extent of its 68 landmarks (brows to
chin, ear to ear), carried through the same transform. The real photos are
added with their hand-checked counts (t1: 6, astronaut: 1, Tom_Hanks: 1).

For every detector (hog, cnn, centerface, and scrfd when buffalo_l/det_10g.onnx
is in the model dir) at the default threshold (0.5): recall at IoU >= 0.4 per
face-width bucket, false positives per image, and wall-clock ms per megapixel
for the whole detect() call (detection on the bounded copy and tiles, plus the
68-point landmarks). Prints a table; writes JSON and a plot to benchmarks/results/.

    .venv/bin/python benchmarks/detection.py                  # 60 images, all detectors
    .venv/bin/python benchmarks/detection.py --images 20 --detectors centerface hog
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from masquerade.face import decode_image
from masquerade.face.detect import DEFAULT_THRESHOLD, FaceDetector
from masquerade.face.selfcheck import iou

RESULTS = Path(__file__).parent / "results"
BUCKETS = [(16, 20), (20, 40), (40, 80), (80, 160), (160, 321)]
BACKGROUNDS = ["rocket", "coffee", "chelsea", "hubble_deep_field", "brick", "grass", "gravel", "coins", "moon", "page"]
IMAGE_SIZE = (1024, 768)  # width, height of a synthetic image
TARGETS = {"recall_40_plus": 0.95, "recall_20_40": 0.8, "false_positives_per_image": 0.1, "ms_per_megapixel": 300}


def _insightface_image(name: str) -> np.ndarray:
    import importlib.util

    root = Path(importlib.util.find_spec("insightface").submodule_search_locations[0])
    return decode_image((root / "data" / "images" / name).read_bytes()).rgb


def real_photos() -> list[tuple[str, np.ndarray, int]]:
    import skimage.data

    return [
        ("t1.jpg", _insightface_image("t1.jpg"), 6),
        ("astronaut", np.ascontiguousarray(skimage.data.astronaut()), 1),
        ("Tom_Hanks_54745.png", _insightface_image("Tom_Hanks_54745.png"), 1),
    ]


def face_sources() -> list[tuple[np.ndarray, np.ndarray]]:
    """(square crop, 68 landmarks in crop pixels) for every face of the real photos, found by
    dlib's HOG and the 68-point predictor (independent of the detectors' own boxes)."""
    hog, cnn = FaceDetector("hog"), FaceDetector("cnn")
    sources = []
    for _, rgb, _ in real_photos():
        confirmed = cnn.find(rgb, 0.5).boxes
        for face in hog.detect(rgb, 0.5):
            if not any(iou(face.box, tuple(box)) > 0.3 for box in confirmed):
                continue  # HOG also fires on the astronaut's badge; the CNN detector does not
            points = face.landmarks
            (x0, y0), (x1, y1) = points.min(0), points.max(0)
            side = 1.8 * max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            left, top = int(cx - side / 2), int(cy - side / 2)
            pad = int(side)
            padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT)
            crop = padded[top + pad : top + pad + int(side), left + pad : left + pad + int(side)]
            sources.append((crop, points - (left, top)))
    return sources


def background(name: str, rng: np.random.Generator) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    image = cv2.resize(image[..., :3], IMAGE_SIZE, interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(image[:, ::-1] if rng.random() < 0.5 else image)


def synthetic_image(rng, sources, backgrounds) -> tuple[np.ndarray, list[tuple[float, float, float, float]], list]:
    canvas = background(backgrounds[rng.integers(len(backgrounds))], rng).astype(np.float32)
    truths, widths, taken = [], [], []
    for _ in range(int(rng.integers(1, 7))):
        crop, points = sources[rng.integers(len(sources))]
        width = float(np.exp(rng.uniform(np.log(16), np.log(320))))  # the face's landmark width
        scale = width / float(points[:, 0].max() - points[:, 0].min())
        side = int(round(crop.shape[0] * scale))
        if side < 8 or side >= min(IMAGE_SIZE):
            continue
        x, y = int(rng.integers(0, IMAGE_SIZE[0] - side)), int(rng.integers(0, IMAGE_SIZE[1] - side))
        if any(x < tx1 and tx0 < x + side and y < ty1 and ty0 < y + side for tx0, ty0, tx1, ty1 in taken):
            continue
        angle = float(rng.uniform(-30, 30))
        matrix = cv2.getRotationMatrix2D((crop.shape[1] / 2, crop.shape[0] / 2), angle, scale)
        matrix[:, 2] += (side / 2 - crop.shape[1] / 2, side / 2 - crop.shape[0] / 2)  # crop centre -> tile centre
        face = cv2.warpAffine(crop, matrix, (side, side), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
        face = face.astype(np.float32)
        if rng.random() < 0.3:
            face = cv2.GaussianBlur(face, (0, 0), sigmaX=float(rng.uniform(0.5, 1.5)) * max(width / 60, 0.5))
        if rng.random() < 0.3:
            face = face * float(rng.uniform(0.3, 0.7))
        yy, xx = np.mgrid[:side, :side]
        radius = np.hypot(xx - side / 2, yy - side / 2) / (side / 2)
        alpha = np.clip((1.0 - radius) / 0.15, 0, 1)[..., None]
        region = canvas[y : y + side, x : x + side]
        canvas[y : y + side, x : x + side] = alpha * face + (1 - alpha) * region
        moved = points @ matrix[:, :2].T + matrix[:, 2] + (x, y)
        truths.append((*moved.min(0), *moved.max(0)))
        widths.append(width)
        taken.append((x, y, x + side, y + side))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(40, 95)))
    return decode_image(buffer.getvalue()).rgb, [tuple(map(float, t)) for t in truths], widths


def match(found, truths, threshold=0.4) -> tuple[list[bool], int]:
    """Greedy one-to-one matching by IoU: (hit per truth, unmatched detections)."""
    pairs = sorted(((iou(f, t), i, j) for i, t in enumerate(truths) for j, f in enumerate(found)), reverse=True)
    hit, used = [False] * len(truths), set()
    for value, i, j in pairs:
        if value >= threshold and not hit[i] and j not in used:
            hit[i] = True
            used.add(j)
    return hit, len(found) - len(used)


def evaluate(detector: FaceDetector, dataset) -> dict:
    hits = {bucket: [0, 0] for bucket in BUCKETS}
    false_positives, seconds, megapixels = 0, 0.0, 0.0
    detector.detect(dataset[0][0])  # load models outside the timing
    for rgb, truths, widths in dataset:
        started = time.perf_counter()
        faces = detector.detect(rgb, DEFAULT_THRESHOLD)
        seconds += time.perf_counter() - started
        megapixels += rgb.shape[0] * rgb.shape[1] / 1e6
        hit, unmatched = match([f.box for f in faces], truths)
        false_positives += unmatched
        for ok, width in zip(hit, widths):
            for low, high in BUCKETS:
                if low <= width < high:
                    hits[(low, high)][0] += int(ok)
                    hits[(low, high)][1] += 1
    recall = {f"{low}-{high - 1}": (h / n if n else None) for (low, high), (h, n) in hits.items()}
    total = {f"{low}-{high - 1}": n for (low, high), (_, n) in hits.items()}
    over_40 = [hits[b] for b in BUCKETS if b[0] >= 40]
    return {
        "recall": recall,
        "faces": total,
        "recall_40_plus": sum(h for h, _ in over_40) / max(sum(n for _, n in over_40), 1),
        "recall_20_40": hits[(20, 40)][0] / max(hits[(20, 40)][1], 1),
        "false_positives_per_image": false_positives / len(dataset),
        "ms_per_megapixel": 1000 * seconds / megapixels,
    }


def real_photo_counts(detector: FaceDetector) -> dict:
    return {
        name: {"expected": n, "found": len(detector.detect(rgb, DEFAULT_THRESHOLD))} for name, rgb, n in real_photos()
    }


def _cell(value: float | None) -> str:
    return f"{'-' if value is None else f'{value:.2f}':>8s}"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["detectors"])
    buckets = [f"{low}-{high - 1}" for low, high in BUCKETS]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(kinds), 1)
    for k, kind in enumerate(kinds):
        values = [report["detectors"][kind]["recall"][b] or 0 for b in buckets]
        left.bar(np.arange(len(buckets)) + k * width, values, width, label=kind)
    left.set_xticks(np.arange(len(buckets)) + width * (len(kinds) - 1) / 2, buckets)
    left.set_xlabel("face width (px)")
    left.set_ylabel("recall at IoU >= 0.4")
    left.axhline(0.95, color="grey", lw=0.8, ls="--")
    left.legend()
    costs = [report["detectors"][k]["ms_per_megapixel"] for k in kinds]
    fps = [report["detectors"][k]["false_positives_per_image"] for k in kinds]
    right.bar(kinds, costs, color="tab:gray")
    right.set_yscale("log")
    right.set_ylabel("ms per megapixel (log)")
    for i, (cost, fp) in enumerate(zip(costs, fps)):
        right.text(i, cost, f"{cost:.0f} ms/MP\n{fp:.2f} FP/img", ha="center", va="bottom", fontsize=8)
    figure.suptitle(f"detection on {report['images']} synthetic images ({report['faces']} faces), threshold 0.5")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detectors", nargs="+", default=["centerface", "hog", "cnn", "scrfd"])
    parser.add_argument("--model-dir", help="where buffalo_l/det_10g.onnx is (default: the model dir)")
    parser.add_argument("--out", default=str(RESULTS / "detection.json"), help="the JSON (the plot goes beside it)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    sources = face_sources()
    import skimage.data

    backgrounds = [name for name in BACKGROUNDS if hasattr(skimage.data, name)]
    dataset = [synthetic_image(rng, sources, backgrounds) for _ in range(args.images)]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "images": len(dataset),
        "faces": sum(len(t) for _, t, _ in dataset),
        "sources": len(sources),
        "threshold": DEFAULT_THRESHOLD,
        "targets_centerface": TARGETS,
        "detectors": {},
    }
    for kind in args.detectors:
        try:
            detector = FaceDetector(kind, model_dir=args.model_dir) if kind == "scrfd" else FaceDetector(kind)
        except Exception as error:  # scrfd without its weights
            print(f"{kind}: skipped ({error})")
            continue
        result = evaluate(detector, dataset)
        result["real_photos"] = real_photo_counts(detector)
        report["detectors"][kind] = result
    report["machine"]["load_average_after"] = os.getloadavg()

    buckets = [f"{low}-{high - 1}" for low, high in BUCKETS]
    header = f"{'detector':11s} " + " ".join(f"{b:>8s}" for b in buckets) + "   FP/img    ms/MP   real photos"
    print(f"{report['images']} images, {report['faces']} faces, threshold {DEFAULT_THRESHOLD}; recall at IoU >= 0.4")
    print(header)
    for kind, result in report["detectors"].items():
        recall = " ".join(_cell(result["recall"][b]) for b in buckets)
        real = ", ".join(f"{v['found']}/{v['expected']}" for v in result["real_photos"].values())
        print(
            f"{kind:11s} {recall}   {result['false_positives_per_image']:6.2f} {result['ms_per_megapixel']:8.0f}   {real}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
