"""`masquerade anonymize` with classical methods: the worker pool and the options deface users rely on.

Real photo (insightface's t1.jpg, six faces), real CenterFace and dlib, in-process `main` runs.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from masquerade.face.classical import SOLID_COLOUR
from sample_images import t1_image_path

GREY = np.array(SOLID_COLOUR)


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
    from masquerade.cli import main

    monkeypatch.chdir(tmp_path)

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture(scope="module")
def people() -> np.ndarray:
    with Image.open(t1_image_path()) as image:
        return np.asarray(image.convert("RGB"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def faces_of(report: Path) -> list[dict]:
    (record,) = json.loads(report.read_text())
    return record["faces"]


def box_of(face: dict) -> tuple[int, int, int, int]:
    box = face["box"]
    if isinstance(box, dict):
        box = [box[k] for k in ("x0", "y0", "x1", "y1")]
    return tuple(int(round(v)) for v in box)


def test_folder_of_bmp_tif_jpg_and_other_files_on_a_pool(tmp_path, cli, people):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.bmp", "c.tif"):
        Image.fromarray(people).save(folder / name)
    (folder / "notes.txt").write_text("not a photo")
    (folder / "clip.gif").write_bytes(b"GIF89a")
    code, out, err = cli("anonymize", "--method", "blur", "--jobs", "2", "in", "-o", "out", "--report", "r.json")
    assert code == 0, err
    records = {Path(r["input"]).name: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert {name: r["status"] for name, r in records.items()} == {
        "a.jpg": "anonymized",
        "b.bmp": "anonymized",
        "c.tif": "anonymized",
        "clip.gif": "skipped",
        "notes.txt": "skipped",
    }
    assert "(.gif files" in records["clip.gif"]["reason"] and "(.txt files" in records["notes.txt"]["reason"]
    assert "5 input(s): 3 anonymized, 2 skipped" in out
    assert "image/s" in err or "image" in err  # the progress bar counts images, not steps
    for name, kind in (("a.jpg", "JPEG"), ("b.bmp", "BMP"), ("c.tif", "TIFF")):
        assert len(records[name]["faces"]) == 6 and records[name]["complete"] is True
        with Image.open(tmp_path / "out" / name) as written:
            assert written.format == kind
        x0, y0, x1, y1 = box_of(records[name]["faces"][0])
        covered, original = pixels(tmp_path / "out" / name), people.astype(np.int16)
        assert np.abs(covered[y0:y1, x0:x1] - original[y0:y1, x0:x1]).mean() > 5  # the face changed
    lossless = pixels(tmp_path / "out" / "b.bmp")
    assert np.array_equal(lossless[:20, :20], people[:20, :20])  # far from every face: untouched


def test_output_names_we_cannot_write_and_a_lone_missing_input(tmp_path, cli, people):
    Image.fromarray(people).save(tmp_path / "p.jpg")
    code, _, err = cli("anonymize", "--method", "blur", "p.jpg", "-o", "out.gif")
    assert code == 2 and "cannot write .gif files" in err
    assert not (tmp_path / "out.gif").exists()
    code, _, err = cli("anonymize", "--method", "blur", "missing.jpg", "-o", "x.jpg")
    assert code == 2 and "missing.jpg: no such file or folder" in err and "several" not in err


def test_shape_box_covers_the_rectangle_around_the_ellipse(tmp_path, cli, people):
    Image.fromarray(people).save(tmp_path / "p.png")
    assert cli("anonymize", "--method", "solid", "p.png", "-o", "e.png", "--report", "e.json")[0] == 0
    assert cli("anonymize", "--method", "solid", "--shape", "box", "p.png", "-o", "b.png", "--report", "b.json")[0] == 0
    grey_ellipse = np.all(pixels(tmp_path / "e.png") == GREY, axis=2)
    grey_box = np.all(pixels(tmp_path / "b.png") == GREY, axis=2)
    # The fully covered rectangle holds the fully covered ellipse, and more: a rectangle is 4/pi
    # times the ellipse inside it.
    assert (grey_ellipse & ~grey_box).sum() < 0.01 * grey_ellipse.sum()
    assert grey_box.sum() > 1.15 * grey_ellipse.sum()
    for face in faces_of(tmp_path / "b.json"):
        x0, y0, x1, y1 = box_of(face)
        assert grey_box[(y0 + y1) // 2, (x0 + x1) // 2] and grey_ellipse[(y0 + y1) // 2, (x0 + x1) // 2]
        # Along the box's own rows the grey run is one straight span as wide as at its middle row.
        rows = grey_box[y0 + (y1 - y0) // 4 : y1 - (y1 - y0) // 4, x0:x1].sum(axis=1)
        assert rows.max() - rows.min() <= 2, face


def _changes_along_rows(image: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    middle = image[(y0 + y1) // 2, x0 + (x1 - x0) // 4 : x1 - (x1 - x0) // 4]
    return float(np.any(np.diff(middle, axis=0) != 0, axis=1).sum()) / len(middle)


def test_mosaic_size_sets_the_square_side(tmp_path, cli, people):
    Image.fromarray(people).save(tmp_path / "p.png")
    runs = {}
    for size in ("10", "30"):
        code, _, err = cli(
            "anonymize", "--method", "mosaic", "--mosaic-size", size, "--shape", "box", "p.png", "-o", f"m{size}.png",
            "--report", f"m{size}.json",
        )  # fmt: skip
        assert code == 0, err
        # Squares small enough to leave a face recognisable are re-covered (solid) by the self-check.
        mosaics = [f for f in faces_of(tmp_path / f"m{size}.json") if f["method_applied"] == "pixelate"]
        assert mosaics, size
        image = pixels(tmp_path / f"m{size}.png")
        runs[size] = float(np.mean([_changes_along_rows(image, box_of(face)) for face in mosaics]))
    # A row through the face changes colour about once per square: 1/10 vs 1/30 of its pixels.
    assert 0.05 < runs["10"] < 0.15 and runs["30"] < 0.05, runs
    code, _, err = cli("anonymize", "--method", "blur", "--mosaic-size", "8", "p.png", "-o", "x.png")
    assert code == 2 and "--mosaic-size is for --method mosaic" in err


def test_replacement_image_with_alpha(tmp_path, cli, people):
    Image.fromarray(people).save(tmp_path / "p.png")
    sticker = np.zeros((40, 40, 4), np.uint8)
    sticker[:, :10] = (255, 0, 0, 255)  # the left quarter opaque red, the rest fully transparent
    Image.fromarray(sticker, "RGBA").save(tmp_path / "sticker.png")
    code, _, err = cli("anonymize", "--method", "image", "--replace-with", "sticker.png", "--shape", "box", "p.png",
        "-o", "out.png", "--report", "r.json")  # fmt: skip
    assert code == 0, err
    out = pixels(tmp_path / "out.png")
    for face in faces_of(tmp_path / "r.json"):
        x0, y0, x1, y1 = box_of(face)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        assert np.abs(out[cy, cx] - GREY).max() <= 2, out[cy, cx]  # transparent: the grey shows, never the face
        row = out[cy, max(x0 - (x1 - x0) // 2, 0) : cx]
        red = (row[:, 0] > 200) & (row[:, 1] < 60) & (row[:, 2] < 60)
        assert red.sum() >= 5, face  # the opaque part of the picture
    code, _, err = cli("anonymize", "--method", "image", "p.png", "-o", "y.png")
    assert code == 2 and "--replace-with" in err


def test_draw_boxes_marks_detections_and_covers_nothing(tmp_path, cli, people):
    Image.fromarray(people).save(tmp_path / "p.png")
    code, out, err = cli("anonymize", "--method", "blur", "--draw-boxes", "p.png", "-o", "d.png", "--report", "r.json")
    assert code == 0, err
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert record["status"] == "drawn" and len(record["faces"]) == 6 and "NOT anonymized" in out
    drawn = pixels(tmp_path / "d.png")
    for face in record["faces"]:
        x0, y0, x1, y1 = box_of(face)
        assert np.array_equal(drawn[y0, (x0 + x1) // 2], [255, 0, 0])  # the box's top edge
    # Inside the boxes, away from the drawing, the face is untouched: nothing was covered.
    x0, y0, x1, y1 = box_of(record["faces"][0])
    inner = (slice(y0 + (y1 - y0) // 3, y0 + (y1 - y0) // 3 + 3), slice(x0 + 3, x0 + 6))
    assert np.array_equal(drawn[inner], people[inner])


def test_detect_scale_still_finds_large_faces(tmp_path, cli, people):
    Image.fromarray(people).save(tmp_path / "p.jpg")
    code, _, err = cli("anonymize", "--method", "blur", "--detect-scale", "0.5", "p.jpg", "-o", "o.jpg", "--report",
        "r.json")  # fmt: skip
    assert code == 0, err
    assert len(faces_of(tmp_path / "r.json")) == 6
    assert cli("anonymize", "--method", "blur", "--detect-scale", "0", "p.jpg", "-o", "z.jpg")[0] == 2


# ---- --keep-metadata ---------------------------------------------------------------------


def _exif_with_gps_and_thumbnail(thumbnail: bytes) -> bytes:
    """Little-endian TIFF: IFD0 (Make, Orientation=6, GPS pointer) -> IFD1 (a JPEG thumbnail); a GPS IFD."""
    make = b"TestCam\x00"
    entries0 = 3
    ifd0 = 8
    ifd0_size = 2 + 12 * entries0 + 4
    make_at = ifd0 + ifd0_size
    gps_at = make_at + len(make)
    gps_size = 2 + 12 * 1 + 4
    ifd1_at = gps_at + gps_size
    ifd1_size = 2 + 12 * 2 + 4
    thumb_at = ifd1_at + ifd1_size
    out = b"II*\x00" + struct.pack("<I", ifd0)
    out += struct.pack("<H", entries0)
    out += struct.pack("<HHII", 0x010F, 2, len(make), make_at)  # Make
    out += struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)  # Orientation: rotated
    out += struct.pack("<HHII", 0x8825, 4, 1, gps_at)  # GPS IFD
    out += struct.pack("<I", ifd1_at)
    out += make
    out += struct.pack("<H", 1) + struct.pack("<HHI", 0x0001, 2, 2) + b"N\x00\x00\x00" + struct.pack("<I", 0)
    out += struct.pack("<H", 2)
    out += struct.pack("<HHII", 0x0201, 4, 1, thumb_at)
    out += struct.pack("<HHII", 0x0202, 4, 1, len(thumbnail))
    out += struct.pack("<I", 0)
    out += thumbnail
    return b"Exif\x00\x00" + out


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
    b'xmlns:photoshop="http://ns.adobe.com/photoshop/1.0/" exif:GPSLatitude="48,51.5N" photoshop:City="Paris">'
    b"<dc:creator><rdf:Seq><rdf:li>Jane Photographer</rdf:li></rdf:Seq></dc:creator>"
    b"<exif:GPSLongitude>2,21.0E</exif:GPSLongitude>"
    b"</rdf:Description></rdf:RDF></x:xmpmeta>"
)


def _photo_with_metadata(path: Path, people: np.ndarray) -> bytes:
    small = Image.fromarray(people).resize((160, 110))
    thumb = io.BytesIO()
    small.save(thumb, "JPEG", quality=70)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    # Stored rotated, with Orientation=6 saying so: the output must be upright and say 1.
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(people, 1)))
    buffer = io.BytesIO()
    rotated.save(buffer, "JPEG", quality=95, icc_profile=icc, xmp=XMP)
    data = buffer.getvalue()
    exif = _exif_with_gps_and_thumbnail(thumb.getvalue())
    segment = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    data = data[:2] + segment + data[2:]  # EXIF APP1 right after SOI
    path.write_bytes(data)
    return thumb.getvalue()


def test_keep_metadata_keeps_exif_icc_xmp_but_never_location_or_thumbnail(tmp_path, cli, people):
    thumbnail = _photo_with_metadata(tmp_path / "p.jpg", people)
    with Image.open(tmp_path / "p.jpg") as source:  # the crafted input really carries all of it
        exif = source.getexif()
        assert exif[0x010F] == "TestCam" and 0x8825 in exif and exif[0x0112] == 6
        assert source.info.get("icc_profile") and b"GPSLatitude" in source.info["xmp"]
    assert thumbnail[:200] in (tmp_path / "p.jpg").read_bytes()

    assert cli("anonymize", "--method", "blur", "--keep-metadata", "p.jpg", "-o", "kept.jpg", "-q")[0] == 0
    kept_bytes = (tmp_path / "kept.jpg").read_bytes()
    with Image.open(tmp_path / "kept.jpg") as kept:
        exif = kept.getexif()
        assert exif.get(0x010F) == "TestCam" and exif.get(0x0112) == 1  # kept; upright pixels say so
        assert 0x8825 not in exif and not exif.get_ifd(0x8825)  # no GPS
        assert kept.info.get("icc_profile")
        xmp = kept.info.get("xmp", b"")
        assert b"Jane Photographer" in xmp
        assert b"GPS" not in xmp and b"City" not in xmp and b"Paris" not in xmp
        assert kept.size == (people.shape[1], people.shape[0])
    assert thumbnail[:200] not in kept_bytes and kept_bytes.count(b"\xff\xd8") == 1  # no embedded JPEG at all

    assert cli("anonymize", "--method", "blur", "p.jpg", "-o", "plain.jpg", "-q")[0] == 0
    with Image.open(tmp_path / "plain.jpg") as plain:
        assert not plain.getexif() and "icc_profile" not in plain.info and "xmp" not in plain.info


def test_readme_classical_examples_run_as_written(tmp_path, cli, people):
    from readme_support import code_blocks, section

    (block,) = code_blocks(section("Classical covers"), "bash")
    Image.fromarray(people).save(tmp_path / "photo.jpg")
    (tmp_path / "photos").mkdir()
    Image.fromarray(people[:, ::-1]).save(tmp_path / "photos" / "flipped.jpg")
    Image.fromarray(np.full((32, 32, 4), (255, 200, 0, 255), np.uint8), "RGBA").save(tmp_path / "emoji.png")
    for line in block.strip().splitlines():
        argv = line.split()
        assert argv[0] == "masquerade", line
        code, _, err = cli(*argv[1:])
        assert code == 0, f"{line}\n{err}"
    for written in ("out.jpg", "covered/flipped.jpg", "check.jpg", "shared/flipped.jpg"):
        assert (tmp_path / written).is_file(), written


def test_worker_processes_write_what_a_worker_thread_writes_and_report_failures(tmp_path, people):
    """A folder runs on forked worker processes (dlib holds the GIL: threads would take turns); a single
    worker runs on a thread. Same files, same records; a broken file is reported, not fatal."""
    from masquerade.cli.files import FileJob
    from masquerade.cli.pipeline import ClassicalRun, WorkerError, run_classical, use_processes
    from masquerade.engine.front_end import DetectionDefaults
    from masquerade.engine.request import Method

    folder = tmp_path / "in"
    folder.mkdir()
    half = np.asarray(Image.fromarray(people).resize((640, 443)))
    Image.fromarray(half).save(folder / "a.png")
    Image.fromarray(half[:, ::-1]).save(folder / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    run = ClassicalRun(method=Method.BLUR, strength=1.0, detection=DetectionDefaults(), models="default")
    outcomes = {}
    for workers in (2, 1):
        jobs = [FileJob(folder / n, tmp_path / f"out{workers}" / n) for n in ("a.png", "b.png", "broken.jpg")]
        done = {}
        run_classical(
            jobs, run, workers, lambda job: "png", lambda job, r, e: done.__setitem__(job.source.name, (r, e))
        )
        outcomes[workers] = done
    assert use_processes(2, 3) == hasattr(__import__("os"), "fork")
    for name in ("a.png", "b.png"):
        (result2, error2), (result1, error1) = outcomes[2][name], outcomes[1][name]
        assert error1 is None and error2 is None and len(result1.faces) == 6
        assert [f.to_json() for f in result2.faces] == [f.to_json() for f in result1.faces]
        assert (tmp_path / "out2" / name).read_bytes() == (tmp_path / "out1" / name).read_bytes()
    assert outcomes[2]["broken.jpg"][0] is None and isinstance(outcomes[2]["broken.jpg"][1], WorkerError)
    assert str(outcomes[2]["broken.jpg"][1]) == str(outcomes[1]["broken.jpg"][1])
    assert not (tmp_path / "out2" / "broken.jpg").exists()


LIVE_THREAD_RUN = """
import logging, sys, threading
from pathlib import Path
from masquerade.cli.files import FileJob
from masquerade.cli.pipeline import ClassicalRun, process_context, run_classical
from masquerade.engine.front_end import DetectionDefaults
from masquerade.engine.request import Method

# Another thread holds logging's lock (as a server's threads may at any instant) for the whole run:
# a child forked now would inherit it held and hang on its first log call.
held, release = threading.Event(), threading.Event()
def hold():
    with logging._lock:
        held.set()
        release.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()
assert process_context().get_start_method() == "forkserver"
folder = Path(sys.argv[1])
run = ClassicalRun(method=Method.BLUR, strength=1.0, detection=DetectionDefaults(), models="default")
jobs = [FileJob(folder / n, folder / "out" / n) for n in ("a.png", "b.png")]
done = []
run_classical(jobs, run, 2, lambda job: "png", lambda job, r, e: done.append((job.source.name, e)))
release.set()
print(sorted(done))
"""


def test_a_pool_started_beside_other_threads_does_not_fork_them(tmp_path, people):
    import subprocess
    import sys

    half = np.asarray(Image.fromarray(people).resize((320, 222)))
    Image.fromarray(half).save(tmp_path / "a.png")
    Image.fromarray(half[::-1]).save(tmp_path / "b.png")
    done = subprocess.run(
        [sys.executable, "-c", LIVE_THREAD_RUN, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[('a.png', None), ('b.png', None)]" in done.stdout
    assert (tmp_path / "out" / "a.png").exists() and (tmp_path / "out" / "b.png").exists()
