"""The classical path of `masquerade anonymize`: a pool of workers, no engine, no torch.

Each worker takes a whole file through decode -> detect -> cover -> self-check -> encode ->
write, so with N workers the stages of N files overlap (one decodes while another detects).
The workers are processes (forked, so nothing is imported again, when this process has no other
thread; else from a forkserver) where the platform has them: dlib,
whose 68-point predictor and face descriptor are most of the self-check, holds the GIL while it
computes (measured: two threads computing descriptors use one core), so threads would run it one
at a time. Elsewhere, and for a single file, they are threads. Each worker builds its detector
once, on its first file, with an ONNX session of its own sized so that the pool's sessions
together use the machine's cores once. At most 2N files are in flight: the rest wait as paths,
so a folder of any size holds at most 2N images in memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from masquerade.cli.files import FileJob, write_atomically
from masquerade.engine.front_end import DetectionDefaults, FaceFrontEnd, detector_model_dir
from masquerade.engine.request import (
    AnonymizeResult,
    DetectionOptions,
    EngineRequest,
    Method,
    OutputOptions,
    Timings,
)
from masquerade.engine.torch_threads import usable_cores
from masquerade.face.classical import DEFAULT_STYLE, CoverStyle
from masquerade.face.detect import FaceDetector
from masquerade.face.detectors import ARENA_KEEP_PIXELS


@dataclass(frozen=True)
class ClassicalRun:
    """Everything a worker needs to turn one input file into its output."""

    method: Method
    strength: float
    detection: DetectionDefaults
    models: str  # EngineConfig.models: where a detector's weights live (scrfd)
    aligned: bool = False
    quality: int = 95
    style: CoverStyle = DEFAULT_STYLE
    detect_scale: float = 1.0
    keep_metadata: bool = False
    draw_boxes: bool = False
    max_image_pixels: int = 40_000_000


def default_jobs() -> int:
    return usable_cores()


def threads_per_worker(workers: int, files: int) -> int:
    """ONNX intra-op threads per worker: the cores shared among the workers that will be busy."""
    busy = max(1, min(workers, files))
    return max(1, default_jobs() // busy)


# A folder run is short-lived, so its detector sessions keep their working memory between photos
# up to this much in all (a server's sessions give back anything over 1 Mpx: detectors.py). Giving it
# back after every photo made each 3 Mpx CenterFace run 1.3x slower, most of it page faults.
FOLDER_ARENA_BYTES = 2 << 30
CENTERFACE_ARENA_BYTES_PER_PIXEL = 160  # measured (detectors.ARENA_KEEP_PIXELS)
LARGEST_DETECTOR_INPUT = 2048 * 2048  # FaceDetector's max_side: the coarse level and the tiles fit


def arena_keep_pixels(workers: int) -> int:
    """Inputs up to this many pixels leave their arena to a worker's next photo: the budget shared."""
    share = FOLDER_ARENA_BYTES // (CENTERFACE_ARENA_BYTES_PER_PIXEL * max(1, workers))
    return max(ARENA_KEEP_PIXELS, min(LARGEST_DETECTOR_INPUT, share))


class _Worker:
    """One worker thread's front end (its detector session, its dlib models), built on first use."""

    def __init__(self, run: ClassicalRun, threads: int, arena_pixels: int = ARENA_KEEP_PIXELS):
        self.run = run
        self.threads = threads
        self.arena_pixels = arena_pixels
        self._local = threading.local()

    def front_end(self) -> FaceFrontEnd:
        front_end = getattr(self._local, "front_end", None)
        if front_end is None:
            detector = FaceDetector(
                kind=self.run.detection.detector,
                model_dir=detector_model_dir(self.run.models),
                detect_scale=self.run.detect_scale,
                intra_op_threads=self.threads,
                arena_keep_pixels=self.arena_pixels,
            )
            front_end = FaceFrontEnd(
                detector=self.run.detection,
                max_image_pixels=self.run.max_image_pixels,
                face_detector=detector,
                cover_style=self.run.style,
            )
            self._local.front_end = front_end
        return front_end

    def anonymize(self, job: FileJob, output_format: str) -> AnonymizeResult:
        run = self.run
        data = job.source.read_bytes()
        # With --keep-metadata the cover is encoded losslessly first, then once more in the target
        # format with the kept metadata (face/metadata.py); otherwise straight to the target format.
        encode_as = "png" if run.keep_metadata else output_format
        request = EngineRequest(
            request_id=str(job.source),
            image=data,
            method=run.method,
            classical_strength=run.strength,
            detection=DetectionOptions(aligned=run.aligned),
            output=OutputOptions(format=encode_as, quality=run.quality),
        )
        front_end = self.front_end()
        prepared = front_end.prepare(request)
        if run.draw_boxes:
            from masquerade.face.image_io import encode_image

            drawn = draw_detections(prepared.rgb, prepared.records)
            image, (height, width) = encode_image(drawn, encode_as, run.quality), drawn.shape[:2]
        else:
            image, width, height = front_end.finish(request, prepared, {}, {})
        if run.keep_metadata:
            from masquerade.face.metadata import with_metadata

            image = with_metadata(image, data, output_format, run.quality)
        return AnonymizeResult(
            request_id=request.request_id,
            image=image,
            format=output_format,
            width=width,
            height=height,
            faces=prepared.records,
            timings=Timings(),
            residual_recognisable=prepared.residual_recognisable,
        )


def draw_detections(rgb: np.ndarray, records) -> np.ndarray:
    """The input with each detection's box, five points and score drawn on it (--draw-boxes)."""
    import cv2

    out = np.ascontiguousarray(rgb.copy())
    thickness = max(1, round(max(rgb.shape[:2]) / 500))
    for record in records:
        x0, y0, x1, y1 = (int(round(v)) for v in record.box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 0, 0), thickness)
        for x, y in np.asarray(record.landmarks).reshape(-1, 2):
            cv2.circle(out, (int(round(x)), int(round(y))), thickness, (0, 255, 0), -1)
        label = f"{record.score:.2f}"
        scale = max(0.4, (x1 - x0) / 150)
        cv2.putText(out, label, (x0, max(y0 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 0, 0), thickness)
    return out


class WorkerError(RuntimeError):
    """A file that failed in a worker process: its message (the exception itself may not pickle)."""


_process_worker: _Worker | None = None  # the worker of this process, in a forked worker process


def _start_process(run: ClassicalRun, threads: int, arena_pixels: int) -> None:
    global _process_worker
    _process_worker = _Worker(run, threads, arena_pixels)


def _one_in_process(job: FileJob, output_format: str) -> tuple[AnonymizeResult | None, str | None]:
    try:
        result = _process_worker.anonymize(job, output_format)
        write_atomically(job.target, result.image)
    except Exception as error:  # reported by the parent, with the file's name, like a thread worker's
        return None, str(error) or type(error).__name__
    result.image = b""  # written already: the parent needs the records, not the bytes
    return result, None


def use_processes(workers: int, files: int) -> bool:
    if workers <= 1 or files <= 1:
        return False
    import multiprocessing  # deferred, with the process pool: a single file never needs either

    methods = multiprocessing.get_all_start_methods()
    return "fork" in methods or "forkserver" in methods


def process_context():
    """fork when this process has one thread (nothing imported again); otherwise the forkserver.

    Forking a process with other threads (a server's, a test runner's, an embedding program's)
    copies whatever locks they held at that instant into a child that can never release them.
    The forkserver is a single-threaded process that imports this module once and forks from there.
    """
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if threading.active_count() == 1 and "fork" in methods:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["masquerade.cli.pipeline"])
    return context


def run_classical(
    jobs: list[FileJob],
    run: ClassicalRun,
    workers: int,
    output_format: Callable[[FileJob], str],
    on_done: Callable[[FileJob, AnonymizeResult | None, BaseException | None], None],
) -> None:
    """Anonymizes every job on ``workers`` workers; ``on_done`` is called on this thread, in completion order."""
    workers = max(1, min(workers, len(jobs)))
    threads = threads_per_worker(workers, len(jobs))
    arena_pixels = arena_keep_pixels(workers)
    if use_processes(workers, len(jobs)):
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            workers, mp_context=process_context(), initializer=_start_process, initargs=(run, threads, arena_pixels)
        )

        def submit(job: FileJob) -> Future:
            return pool.submit(_one_in_process, job, output_format(job))

        def outcome(future: Future) -> tuple[AnonymizeResult | None, BaseException | None]:
            result, message = future.result()
            return result, None if message is None else WorkerError(message)
    else:
        worker = _Worker(run, threads, arena_pixels)
        pool = ThreadPoolExecutor(workers, thread_name_prefix="masquerade-file")

        def one(job: FileJob) -> AnonymizeResult:
            result = worker.anonymize(job, output_format(job))
            write_atomically(job.target, result.image)
            return result

        def submit(job: FileJob) -> Future:
            return pool.submit(one, job)

        def outcome(future: Future) -> tuple[AnonymizeResult | None, BaseException | None]:
            error = future.exception()
            return (None, error) if error is not None else (future.result(), None)

    pending = iter(jobs)
    in_flight: dict[Future, FileJob] = {}
    with pool:
        while True:
            while len(in_flight) < 2 * workers:
                job = next(pending, None)
                if job is None:
                    break
                in_flight[submit(job)] = job
            if not in_flight:
                return
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                job = in_flight.pop(future)
                result, error = outcome(future)
                on_done(job, result, error)
