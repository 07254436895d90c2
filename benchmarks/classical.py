"""The classical path against deface, side by side in the same run (issue 19's targets).

Three workloads, each run by `masquerade anonymize --method blur` and by deface 1.5.0 (its default
blur; in its own venv, benchmarks/deface_env.py), alternating, wall time of the whole command
(interpreter start-up, imports, model load, detection, covering, encoding):

- a 64 px blank PNG, against the floor `python -c "import onnxruntime, cv2, numpy"`;
- a folder of 10 mixed photos (insightface's t1.jpg and scikit-image's astronaut at 640 to
  2048 px, flipped and cropped): deface gets a copy of the same ten files on its command line;
- one 12 Mpx photo (t1.jpg upscaled to 4000x3000).

Ours runs with its defaults, self-check included (a second detection pass on the output and
dlib descriptors: deface has no such check), and once more with --no-self-check where that
flag exists. Ratios are ours / deface's from the same run; on a shared machine the absolute
seconds move with the load, the ratios much less.

    .venv/bin/python benchmarks/classical.py              # 3 repeats of each (median)
    .venv/bin/python benchmarks/classical.py --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = {"blank_vs_import_floor": 2.0, "blank_vs_deface": 1.0, "folder_vs_deface": 1.0, "large_vs_deface": 1.0}


def photos() -> list[np.ndarray]:
    from skimage import data

    from sample_images import t1_image_path

    with Image.open(t1_image_path()) as image:
        t1 = np.asarray(image.convert("RGB"))
    return [t1, np.asarray(data.astronaut())]


def resized(rgb: np.ndarray, longest: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = longest / max(height, width)
    return np.asarray(Image.fromarray(rgb).resize((round(width * scale), round(height * scale)), Image.LANCZOS))


def make_inputs(root: Path) -> dict[str, Path]:
    t1, astronaut = photos()
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(root / "blank.png")
    folder = root / "mixed"
    folder.mkdir()
    variants = [
        (t1, 640, False, None),
        (t1, 1024, True, None),
        (t1, 1600, False, None),
        (t1, 2048, False, None),
        (t1, 1280, True, (0.0, 0.0, 0.6, 1.0)),
        (astronaut, 512, False, None),
        (astronaut, 800, True, None),
        (astronaut, 1200, False, None),
        (astronaut, 1800, False, (0.1, 0.0, 0.9, 0.8)),
        (astronaut, 2048, True, None),
    ]
    for index, (rgb, longest, flip, crop) in enumerate(variants):
        image = rgb[:, ::-1] if flip else rgb
        if crop is not None:
            h, w = image.shape[:2]
            image = image[int(crop[1] * h) : int(crop[3] * h), int(crop[0] * w) : int(crop[2] * w)]
        Image.fromarray(np.ascontiguousarray(resized(image, longest))).save(
            folder / f"photo{index:02d}.jpg", quality=92
        )
    large = np.asarray(Image.fromarray(t1).resize((4000, 3000), Image.LANCZOS))
    Image.fromarray(large).save(root / "large.jpg", quality=92)
    return {"blank": root / "blank.png", "folder": folder, "large": root / "large.jpg"}


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


def masquerade(source: Path, target: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "masquerade.cli", "anonymize", "--method", "blur", "-q", "--overwrite",
            *extra, str(source), "-o", str(target)]  # fmt: skip


def deface(deface_argv: list[str], sources: list[Path], target: Path | None) -> list[str]:
    command = [*deface_argv, *map(str, sources)]
    return command + (["-o", str(target)] if target is not None else [])


def self_check_flag() -> list[str] | None:
    from masquerade.cli import build_parser

    anonymize = build_parser()._subparsers._group_actions[0].choices["anonymize"]
    flags = {flag for action in anonymize._actions for flag in action.option_strings}
    return ["--no-self-check"] if "--no-self-check" in flags else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "classical.json"))
    args = parser.parse_args()

    import deface_env

    deface_argv = deface_env.deface_command()
    # pip compiles an installed package's bytecode (deface's is); an editable install of ours writes
    # it on first use, unless PYTHONDONTWRITEBYTECODE is set: compile it, so both start alike.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "server")], check=True, capture_output=True)
    no_check = self_check_flag()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="masquerade-classical-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root)
        # deface writes <name>_anonymized.jpg next to each input when given several: it gets a copy
        # of the folder, so that ours never finds deface's outputs among its inputs (before this,
        # every masquerade folder run after the first deface run anonymized 20 files, not 10).
        deface_inputs = root / "mixed-deface"
        shutil.copytree(inputs["folder"], deface_inputs)
        folder_files = sorted(deface_inputs.glob("*.jpg"))
        out = root / "out"
        out.mkdir()

        def deface_folder() -> list[str]:
            for stale in deface_inputs.glob("*_anonymized*"):
                stale.unlink()
            return deface(deface_argv, folder_files, None)

        workloads = {
            "blank": {
                "import_floor": lambda: [sys.executable, "-c", "import onnxruntime, cv2, numpy"],
                "masquerade": lambda: masquerade(inputs["blank"], out / "blank.png", []),
                "deface": lambda: deface(deface_argv, [inputs["blank"]], out / "blank-deface.png"),
            },
            "folder": {
                "masquerade": lambda: masquerade(inputs["folder"], out / "folder", []),
                "deface": deface_folder,
            },
            "large": {
                "masquerade": lambda: masquerade(inputs["large"], out / "large.jpg", []),
                "deface": lambda: deface(deface_argv, [inputs["large"]], out / "large-deface.jpg"),
            },
        }
        if no_check is not None:
            for name, source, target in (
                ("folder", inputs["folder"], out / "folder-nc"),
                ("large", inputs["large"], out / "large-nc.jpg"),
            ):
                workloads[name]["masquerade_no_self_check"] = lambda source=source, target=target: masquerade(
                    source, target, no_check
                )
        for name, runners in workloads.items():
            times: dict[str, list[float]] = {key: [] for key in runners}
            for _ in range(args.repeats):  # alternate, so a load spike hits both tools
                for key, command in runners.items():
                    times[key].append(timed(command(), root))
            medians = {key: statistics.median(values) for key, values in times.items()}
            entry = {"seconds": {k: round(v, 3) for k, v in medians.items()}, "runs": times}
            entry["ratio_vs_deface"] = round(medians["masquerade"] / medians["deface"], 3)
            if "import_floor" in medians:
                entry["ratio_vs_import_floor"] = round(medians["masquerade"] / medians["import_floor"], 3)
            if "masquerade_no_self_check" in medians:
                entry["no_self_check_ratio_vs_deface"] = round(
                    medians["masquerade_no_self_check"] / medians["deface"], 3
                )
            results[name] = entry
            print(f"{name:7s} " + "  ".join(f"{k} {v:.2f}s" for k, v in medians.items()), flush=True)

    checks = {
        "blank_vs_import_floor": results["blank"]["ratio_vs_import_floor"],
        "blank_vs_deface": results["blank"]["ratio_vs_deface"],
        "folder_vs_deface": results["folder"]["ratio_vs_deface"],
        "large_vs_deface": results["large"]["ratio_vs_deface"],
    }
    print("\nratio (ours / reference)   measured   target   met")
    for key, value in checks.items():
        print(f"{key:26s} {value:8.2f} {TARGETS[key]:8.2f}   {'yes' if value <= TARGETS[key] else 'NO'}")
    payload = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/classical.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "deface": deface_env.DEFACE_VERSION,
        "repeats": args.repeats,
        "results": results,
        "targets": TARGETS,
        "ratios": checks,
        "met": {key: checks[key] <= TARGETS[key] for key in checks},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
