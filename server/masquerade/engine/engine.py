"""The asyncio engine: admits requests, runs the step loop, streams events back.

Request flow: preprocess (decode, detect, align, ArcFace, VAE encode, job
creation) on a thread pool -> FaceJobs join the step scheduler -> the step
loop repeats schedule (``StepScheduler.plan``) -> execute (one packed UNet
call on a dedicated thread) -> update (``StepScheduler.update``) -> finished
jobs are decoded and merged -> result. Job state changes only in the update,
on the loop's thread, between UNet calls: a cancelled request's jobs are
marked, leave at the next update and free their rows for everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import TYPE_CHECKING

from masquerade import __version__, cancellation, metrics
from masquerade.engine.estimate import StepTimeModel, estimate_seconds
from masquerade.engine.front_end import DetectionDefaults, FaceFrontEnd, PreparedRequest, detector_model_dir
from masquerade.engine.job_state import JobStatus, Phase, Priority
from masquerade.engine.memory import MemoryReturner
from masquerade.engine.pixel_budget import PixelBudget, header_pixels
from masquerade.engine.priority_pool import PriorityThreadPool
from masquerade.engine.request import (
    MAX_STEPS,
    AnonymizeResult,
    DeadlineUnmeetableError,
    EngineEvent,
    EngineNotAcceptingError,
    EngineRequest,
    FacesFoundEvent,
    FailedEvent,
    InvalidRequestError,
    Method,
    MethodUnavailableError,
    ProgressEvent,
    QueuedEvent,
    QueueFullError,
    ResultEvent,
    ReversePersonalizationParams,
    Timings,
)
from masquerade.engine.scheduler import DEFAULT_AGING_CALLS, StepPlan, StepScheduler, StepUpdate
from masquerade.engine.torch_threads import configure_cpu_threads

if TYPE_CHECKING:  # torch-using modules: imported only when reverse personalization is loaded (design.md)
    from masquerade.engine.job import FaceJob
    from masquerade.engine.runner import SliceResult

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine settings, built once from CLI flags."""

    models: str = "default"
    """"default" (real weights in MASQUERADE_MODEL_DIR or ~/.cache/masquerade/models; classical
    methods only when absent), "tiny" (tiny random models, built on first use), or a model dir."""
    device: str = "auto"
    """"auto", "cpu", "cuda" or "cuda:N"."""
    max_batch: int = 16
    """Most samples in one UNet call; a classifier-free-guidance pair counts as two."""
    max_wait_ms: float = 2.0
    """How long the step loop waits for more work when a call would run less than full."""
    max_queue: int = 64
    """Admitted requests not yet finished; one more is refused with QueueFullError."""
    inversion_chunk: int = 8
    """Inversion steps of one job per UNet call (they are independent of each other)."""
    max_image_pixels: int = 40_000_000
    """Largest decoded image accepted (decompression-bomb guard)."""
    max_faces: int = 16
    """Faces per image that take the generative path (a request may ask for fewer); the rest are
    covered classically and recorded FALLBACK. A crowd is never refused for its size."""
    detector: str = "centerface"
    """Face detector: "centerface" (offline ONNX), "scrfd" (buffalo_l's det_10g.onnx), "hog" or "cnn" (dlib)."""
    detection_threshold: float = 0.5
    """Default calibrated detector score, in [0, 1], for requests that do not set one."""
    min_face_size: int = 16
    """Default: faces smaller than this (box side, px) are covered classically."""
    mask_scale: float = 1.0
    """Size of the classical covers' ellipse relative to the face."""
    attention: str = "sdpa"
    """Attention backend on GPU: "sdpa" or "xformers"."""
    compile: bool | None = None
    """torch.compile the UNet per batch-size bucket at start-up; None: on CUDA only (--compile/--no-compile)."""
    compile_mode: str = "default"
    """torch.compile mode (models/optimize.py COMPILE_MODES); "max-autotune*" take many minutes per bucket."""
    compile_cache: str | None = None
    """Inductor's on-disk cache, kept across restarts; None: ~/.cache/masquerade/torch-compile."""
    vae_chunk: int = 4
    """Faces per VAE encode/decode call: bounds the fp32 VAE's memory next to the UNet's."""
    preprocess_threads: int = 2
    interactive_threads: int = 1
    """Preprocess threads more than ``preprocess_threads`` that only interactive work uses: an interactive
    request's pixel work never queues behind bulk pixel work already running (engine/priority_pool.py)."""
    max_inflight_megapixels: float = 64.0
    """Decoded megapixels admitted requests may hold at once (engine/pixel_budget.py); others wait, holding
    only their bytes. At the ~27 bytes a pixel measured at post-processing's peak, 64 is ~1.7 GB of pixel
    work: what a 24 GB machine spares beside its models. An image larger than this is refused."""
    aging_calls: int = DEFAULT_AGING_CALLS
    """K: calls holding interactive rows a ready bulk job may go without a row (engine/scheduler.py)."""
    interactive_slack: float = 1.25
    """A call holding interactive rows takes more bulk rows than the floor only while its measured cost
    stays within this factor of the interactive rows' alone (on a GPU a fuller call costs little more)."""
    torch_threads: int | None = None
    """Intra-op threads of torch's CPU ops on a CPU device; None: the cores shared among the threads that
    call torch, or OMP_NUM_THREADS when set (engine/torch_threads.py)."""
    defaults: ReversePersonalizationParams = field(default_factory=ReversePersonalizationParams)

    def validated(self) -> EngineConfig:
        checks = [
            (self.max_batch >= 2, f"max_batch must be at least 2 (one CFG pair), got {self.max_batch}"),
            (self.max_queue >= 1, f"max_queue must be at least 1, got {self.max_queue}"),
            (self.max_wait_ms >= 0, f"max_wait_ms must be >= 0, got {self.max_wait_ms}"),
            (self.inversion_chunk >= 1, f"inversion_chunk must be at least 1, got {self.inversion_chunk}"),
            (self.max_faces >= 1, f"max_faces must be at least 1, got {self.max_faces}"),
            (self.vae_chunk >= 1, f"vae_chunk must be at least 1, got {self.vae_chunk}"),
            (
                self.max_inflight_megapixels > 0,
                f"max_inflight_megapixels must be positive, got {self.max_inflight_megapixels}",
            ),
            (self.aging_calls >= 1, f"aging_calls must be at least 1, got {self.aging_calls}"),
            (self.interactive_slack >= 1.0, f"interactive_slack must be >= 1, got {self.interactive_slack}"),
            (self.interactive_threads >= 0, f"interactive_threads must be >= 0, got {self.interactive_threads}"),
            (
                self.torch_threads is None or self.torch_threads >= 1,
                f"torch_threads must be at least 1, got {self.torch_threads}",
            ),
            (0.0 <= self.detection_threshold <= 1.0, f"threshold must be in [0, 1], got {self.detection_threshold}"),
            (self.min_face_size >= 0, f"min_face_size must be >= 0, got {self.min_face_size}"),
            (0.5 <= self.mask_scale <= 3.0, f"mask_scale must be in [0.5, 3], got {self.mask_scale}"),
            (self.attention in ("sdpa", "xformers"), f"attention must be sdpa or xformers, got {self.attention!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


@dataclass
class EngineInfo:
    version: str
    device: str
    dtype: str
    attention_backend: str
    methods: dict[Method, tuple[bool, str]]
    models: dict[str, str]
    defaults: ReversePersonalizationParams
    default_method: Method
    max_batch: int
    max_queue: int
    max_image_pixels: int
    max_faces: int
    max_steps: int = MAX_STEPS


_request_ids = itertools.count(1)
POOL_JOIN_SECONDS = 15.0  # at shutdown, how long running pixel work gets to reach its cancellation check
_TERMINAL = (ResultEvent, FailedEvent)


class _RequestState:
    def __init__(self, request: EngineRequest):
        self.request = request
        self.events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.jobs: list[FaceJob] = []
        self.job_done: dict[int, asyncio.Future] = {}
        self.task: asyncio.Task | None = None
        self.submitted = time.perf_counter()
        self.phase_started = self.submitted
        self.timings = Timings()
        self.finished = False
        self.work_started: float | None = None  # when its first pool task started (set on a pool thread)
        self.joined: float | None = None  # when its jobs joined the step scheduler
        self.faces_held = 0  # its faces counted in the engine's per-client faces in flight
        self.pixels = 0  # its decoded size, from the image header: what it holds of the pixel budget
        self.cancelled = Event()  # set on cancel or deadline: its pixel work stops at the next check
        self.pixel_phase: Phase | None = Phase.PREPROCESS  # None while its jobs are in the step scheduler
        self.unet_waited_in: set[Phase] = set()  # its pixel phases in which the UNet has waited for it


class RequestHandle:
    """Events of one request: Queued, FacesFound, Progress..., then one Result or Failed."""

    def __init__(self, engine: Engine, state: _RequestState):
        self._engine = engine
        self._state = state
        self.request_id = state.request.request_id
        self.priority = state.request.priority  # what it runs at (the caller's token may have capped it)

    async def __aiter__(self) -> AsyncIterator[EngineEvent]:
        while True:
            event = await self._state.events.get()
            yield event
            if isinstance(event, _TERMINAL):
                return

    def cancel(self) -> None:
        self._engine._cancel(self._state)


def _resolve_model_dir(models: str) -> tuple[Path | None, str]:
    """Where to load from, or (None, why not) for a classical-only server."""
    from masquerade.models.layout import ModelLayout, default_model_dir

    if models == "tiny":
        from masquerade.models.tiny import built_tiny_model_dir

        return built_tiny_model_dir(), ""
    root = default_model_dir() if models == "default" else Path(models).expanduser()
    missing = ModelLayout(root).missing_parts()
    if missing and models == "default":
        return None, (
            f"no diffusion weights: missing {'; '.join(missing)}. "
            f"Run `masquerade models fetch --to {root}` or start with --models tiny for the smoke profile"
        )
    return root, ""


class Engine:
    def __init__(self, config: EngineConfig, models=None, unavailable_reason: str = ""):
        self.config = config.validated()
        self.models = models
        if models is not None:
            # torch, the UNet runner and the VAE: only an engine with weights loads them.
            from masquerade.engine.diffusion import DiffusionCore
        self.core = (
            DiffusionCore(
                models,
                max_batch=config.max_batch,
                compile=config.compile,
                compile_mode=config.compile_mode,
                compile_cache=config.compile_cache,
                vae_chunk=config.vae_chunk,
                attention=config.attention,
            )
            if models is not None
            else None
        )
        self.unavailable_reason = unavailable_reason
        self.front_end = FaceFrontEnd(
            detector=DetectionDefaults(
                detector=config.detector,
                threshold=config.detection_threshold,
                min_face_size=config.min_face_size,
                max_faces=config.max_faces,
                mask_scale=config.mask_scale,
            ),
            face_size=models.face_size if models is not None else None,
            core=self.core,
            max_image_pixels=config.max_image_pixels,
            model_dir=detector_model_dir(config.models),
        )
        self.step_times = StepTimeModel(config.max_batch // 2)
        self.scheduler = StepScheduler(
            max_batch=config.max_batch,
            inversion_chunk=config.inversion_chunk,
            aging_calls=config.aging_calls,
            row_budget=lambda interactive_rows: self.step_times.rows_within(interactive_rows, config.interactive_slack),
        )
        self._client_faces: dict[str, int] = {}
        self._interactive_generative = 0  # interactive reverse-personalization requests in flight (loop thread)
        self._states: set[_RequestState] = set()
        self._owners: dict[int, _RequestState] = {}  # job id -> its request, while the job diffuses
        self._memory = MemoryReturner()
        self._pixels = PixelBudget(int(config.max_inflight_megapixels * 1_000_000))
        self._accepting = False
        self._loop_task: asyncio.Task | None = None
        self._work_added: asyncio.Event | None = None
        # Interactive requests' pixel work runs before bulk work waiting for the same threads.
        self._preprocess_pool = PriorityThreadPool(
            config.preprocess_threads,
            "masquerade-pre",
            reserved=config.interactive_threads,
            bulk_paused=self._bulk_pixel_work_waits,
        )
        self._unet_pool = ThreadPoolExecutor(1, thread_name_prefix="masquerade-unet")

    # ---- construction ------------------------------------------------------------

    @classmethod
    def build(cls, config: EngineConfig) -> Engine:
        """Load models as configured (blocking: seconds for tiny, minutes for SDXL)."""
        root, reason = _resolve_model_dir(config.models)
        if root is None:
            log.warning("serving classical methods only: %s", reason)
            return cls(config, None, reason)
        from masquerade.models.loader import load_models, resolve_device  # torch and diffusers: only with weights

        if resolve_device(config.device).type == "cpu":
            # Before loading runs the first torch op: the main thread, the UNet thread and the pixel threads.
            configure_cpu_threads(config.torch_threads, 2 + config.preprocess_threads + config.interactive_threads)
        models = load_models(root, device=config.device, attention=config.attention)
        return cls(config, models)

    # ---- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self._work_added = asyncio.Event()
        self._loop_task = asyncio.create_task(self._step_loop(), name="masquerade-step-loop")
        self._accepting = True

    async def shutdown(self, grace_seconds: float = 30.0) -> None:
        """Stop admitting; let in-flight requests finish within the grace period; cancel the rest."""
        self._accepting = False
        pending = [s.task for s in self._states if s.task is not None and not s.task.done()]
        if pending:
            _done, still_running = await asyncio.wait(pending, timeout=grace_seconds)
            for task in still_running:
                task.cancel()
            if still_running:
                await asyncio.wait(still_running, timeout=5)
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        self._preprocess_pool.shutdown(cancel_futures=True)
        self._unet_pool.shutdown(wait=False, cancel_futures=True)
        # Pixel work of the cancelled requests stops at its next check: wait for it, so that no native
        # call is still running when the process exits (that aborts it).
        if not await asyncio.to_thread(self._preprocess_pool.join, POOL_JOIN_SECONDS):
            log.warning("pixel work still running %gs after shutdown; exiting anyway", POOL_JOIN_SECONDS)

    @property
    def ready(self) -> bool:
        return self._accepting and self._loop_task is not None and not self._loop_task.done()

    @property
    def active_jobs(self) -> int:
        return len(self.scheduler)

    @property
    def queue_depth(self) -> int:
        return sum(1 for s in self._states if not s.finished)

    def info(self) -> EngineInfo:
        rp_available = self.core is not None
        methods = {method: (True, "") for method in Method}
        methods[Method.REVERSE_PERSONALIZATION] = (rp_available, "" if rp_available else self.unavailable_reason)
        models = dict(self.models.versions) if self.models is not None else {}
        return EngineInfo(
            version=__version__,
            device=str(self.models.device) if self.models is not None else "cpu",
            dtype=str(self.models.dtype).removeprefix("torch.") if self.models is not None else "float32",
            attention_backend=self.config.attention,
            methods=methods,
            models=models,
            defaults=self.config.defaults,
            default_method=Method.REVERSE_PERSONALIZATION if rp_available else Method.BLUR,
            max_batch=self.config.max_batch,
            max_queue=self.config.max_queue,
            max_image_pixels=self.config.max_image_pixels,
            max_faces=self.config.max_faces,
        )

    # ---- admission -------------------------------------------------------------------

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Admit a request or raise InvalidRequestError / QueueFullError / MethodUnavailableError.

        The request's own ranges were checked when its types were built (``engine/request.py``);
        here only what depends on this engine: its limits, its methods, its queue.
        """
        if not self._accepting:
            raise EngineNotAcceptingError("the engine is shutting down or not started; retry on another replica")
        if request.detection.max_faces is not None and request.detection.max_faces > self.config.max_faces:
            raise InvalidRequestError(
                "detection.max_faces",
                f"must be at most {self.config.max_faces} (this server's limit), got {request.detection.max_faces}",
            )
        if request.method is Method.REVERSE_PERSONALIZATION and self.core is None:
            raise MethodUnavailableError(f"REVERSE_PERSONALIZATION is unavailable: {self.unavailable_reason}")
        if self.queue_depth >= self.config.max_queue:
            raise QueueFullError(f"queue full ({self.config.max_queue} requests in flight); retry with backoff")
        pixels = header_pixels(request.image)  # the header only: nothing is decoded before admission
        if request.pixels is not None:  # a video frame, already decoded by its caller
            pixels = int(request.pixels.shape[0] * request.pixels.shape[1])
        self._pixels.check_fits(pixels)
        if request.deadline is not None:
            self._refuse_if_too_late(request)
        if not request.request_id:
            request.request_id = f"req-{next(_request_ids)}"
        state = _RequestState(request)
        state.pixels = pixels
        self._states.add(state)
        if self._shares_cores(state):
            self._interactive_generative += 1
        metrics.QUEUE_DEPTH.set(self.queue_depth)
        state.events.put_nowait(QueuedEvent(request.request_id, position=self.queue_depth - 1))
        state.task = asyncio.create_task(self._run_request(state), name=f"request-{request.request_id}")
        state.task.add_done_callback(lambda _task: self._ended_before_it_ran(state))
        return RequestHandle(self, state)

    # ---- honest admission ----------------------------------------------------------------

    def estimate_seconds(
        self,
        priority: Priority,
        steps: int | None = None,
        generative: bool | None = None,
        faces: int = 1,
        preprocessed: bool = False,
    ) -> float | None:
        """Seconds from now to the result of a request of ``faces`` faces at ``priority`` (engine/estimate.py;
        ``preprocessed``: from the end of its preprocessing); None until the engine has measured what it needs."""
        if generative is None:
            generative = self.core is not None
        up_to = Priority(priority)
        return estimate_seconds(
            self.step_times,
            steps=steps or self.config.defaults.steps,
            inversion_chunk=self.config.inversion_chunk,
            generative=generative,
            rows_ahead=self.scheduler.rows_left(up_to),
            call_rows=lambda own_rows: self._expected_call_rows(up_to, own_rows),
            preprocess_ahead=self._preprocess_pool.waiting(up_to),
            preprocess_threads=self.config.preprocess_threads,
            faces=faces,
            preprocessed=preprocessed,
        )

    def _expected_call_rows(self, priority: Priority, own_rows: int) -> int:
        """Rows of the calls a new job with ``own_rows`` will share, by the scheduler's policy (scheduler.py)."""
        ready = self.scheduler.ready_counts()
        interactive, bulk = ready[Priority.INTERACTIVE], ready[Priority.BULK]
        most = self.scheduler.max_rows
        if priority is Priority.INTERACTIVE:
            interactive_rows = own_rows + interactive
            # The floor's steady rate; a short request's first calls often carry none (it is served when due).
            floor = self.scheduler.floor_per_call(bulk)
            budget = self.step_times.rows_within(interactive_rows, self.config.interactive_slack)
            return min(most, max(interactive_rows + floor, min(budget, interactive_rows + bulk)))
        return min(most, own_rows + interactive + bulk)

    def estimated_waits(self) -> dict[Priority, float | None]:
        """GetServerInfo's estimate per priority, for a one-face request with the default parameters."""
        return {priority: self.estimate_seconds(priority) for priority in Priority}

    def _refuse_if_too_late(self, request: EngineRequest, detected_faces: int | None = None) -> None:
        """At arrival (``detected_faces`` None) with the faces the request says it has (given faces; an aligned
        crop is one), else one; once detection has counted more, again with that count, before diffusion."""
        generative = request.method is Method.REVERSE_PERSONALIZATION
        if detected_faces is not None:
            faces, when = detected_faces, f"refused after detection: its {detected_faces} faces"
        else:
            faces, when = len(request.given_faces or ()) or 1, "refused at once: this request"
        estimate = self.estimate_seconds(
            request.priority, request.params.steps, generative, faces, preprocessed=detected_faces is not None
        )
        remaining = request.deadline - time.monotonic()
        if estimate is not None and estimate > remaining:
            metrics.DEADLINE_REFUSALS.labels(request.priority.label).inc()
            raise DeadlineUnmeetableError(
                f"{when} would finish in about {estimate:.2f} s (the work queued ahead of "
                f"it at {request.priority.label} priority, at the step times measured now), after its deadline "
                f"in {max(0.0, remaining):.2f} s; retry with a longer deadline or later",
                estimate,
            )

    def faces_in_flight(self, client: str) -> int:
        """Detected faces of ``client``'s requests not yet answered (per-client quotas read this)."""
        return self._client_faces.get(client, 0)

    def _shares_cores(self, state: _RequestState) -> bool:
        """An interactive reverse-personalization request on a CPU engine, where the UNet, the pixel work
        and the interpreter's lock are shared: bulk work gives way to it from admission to its answer."""
        return (
            state.request.priority is Priority.INTERACTIVE
            and state.request.method is Method.REVERSE_PERSONALIZATION
            and self.models is not None
            and self.models.device.type == "cpu"
        )

    def _bulk_pixel_work_waits(self) -> bool:
        """On a CPU the UNet and the pixel work share the cores: bulk pixel work waits (up to the pool's
        max_bulk_pause_s) while an interactive request is in flight. A GPU's UNet shares nothing with it:
        no wait. Read on pool threads: a count the loop thread keeps, never the scheduler's lists."""
        return self._interactive_generative > 0

    def _hold_faces(self, state: _RequestState, faces: int) -> None:
        client = state.request.client
        state.faces_held = faces
        self._client_faces[client] = self._client_faces.get(client, 0) + faces

    def _release_faces(self, state: _RequestState) -> None:
        client = state.request.client
        left = self._client_faces.get(client, 0) - state.faces_held
        state.faces_held = 0
        if left > 0:
            self._client_faces[client] = left
        else:
            self._client_faces.pop(client, None)

    def _cancel(self, state: _RequestState) -> None:
        if state.task is not None and not state.task.done():
            state.task.cancel()

    # ---- one request ---------------------------------------------------------------------

    def _phase_done(self, state: _RequestState, phase: Phase) -> None:
        now = time.perf_counter()
        elapsed = now - state.phase_started
        state.phase_started = now
        setattr(state.timings, f"{phase.value}_seconds", getattr(state.timings, f"{phase.value}_seconds") + elapsed)
        metrics.PHASE_SECONDS.labels(phase.value).observe(elapsed)

    async def _in_pool(self, priority: Priority, fn, *args):
        return await asyncio.wrap_future(self._preprocess_pool.submit(priority, self._then_trim, fn, *args))

    @staticmethod
    def _prepare_started(state: _RequestState, prepare):
        """``prepare`` noting when it started: the request's time in the pool's queue ends there."""

        def run(request):
            state.work_started = time.perf_counter()
            return prepare(request)

        return run

    async def run_pixel_work(self, fn, *args, priority: Priority = Priority.INTERACTIVE, trim: bool = True):
        """``fn(*args)`` on the preprocess threads, shared with every request's pixel work: live video
        frames (api/video_service.py) take their turn there like images do, at ``priority``. ``trim=False``:
        no heap trim after it (a stream's frames reuse the same few MB frame after frame; trimming them
        only makes the next frame fault the pages back in); call ``return_memory`` when such work ends."""
        if trim:
            return await self._in_pool(priority, fn, *args)
        return await asyncio.wrap_future(self._preprocess_pool.submit(priority, fn, *args))

    def on_every_pixel_thread(self, fn) -> list[Future]:
        """``fn()`` once on each preprocess thread (engine/priority_pool.py); callable from any thread."""
        return self._preprocess_pool.on_every_thread(fn)

    def return_memory(self) -> None:
        """Ask for a heap trim soon (engine/memory.py), as after every request's pixel work."""
        self._memory.request_trim()

    @staticmethod
    def _cancellable(flag: Event, fn, *args):
        """``fn(*args)`` with ``flag`` as the thread's cancel flag (masquerade/cancellation.py)."""
        with cancellation.scope(flag):
            return fn(*args)

    def _then_trim(self, fn, *args):
        """Pixel and VAE work allocates hundreds of MB for a large image, and it runs to its end
        even when its request was cancelled meanwhile: ask for a trim whenever it finishes."""
        try:
            return fn(*args)
        finally:
            self._memory.request_trim()

    async def _run_request(self, state: _RequestState) -> None:
        request = state.request
        pixels_held = contextlib.AsyncExitStack()
        try:
            # Decoded only once its pixels fit the budget (docs/design.md section 10); until then it holds its bytes.
            await pixels_held.enter_async_context(self._pixels.hold(state.pixels))
            prepare = self._prepare_started(state, self.front_end.prepare)
            prepared: PreparedRequest = await self._in_pool(
                request.priority, self._cancellable, state.cancelled, prepare, request
            )
            state.timings.queued_seconds = state.work_started - state.submitted
            state.phase_started = state.work_started
            self._phase_done(state, Phase.PREPROCESS)
            generative = bool(prepared.works)
            self.step_times.observe_preprocess(state.timings.preprocess_seconds, generative)
            self._hold_faces(state, len(prepared.records))
            state.events.put_nowait(FacesFoundEvent(request.request_id, tuple(r.box for r in prepared.records)))
            generated, failures = {}, {}
            if prepared.works and request.deadline is not None and len(prepared.works) > 1:
                self._refuse_if_too_late(request, len(prepared.works))  # now that detection has counted them
            if prepared.works:
                # Diffusion takes seconds to minutes: the image is dropped meanwhile and decoded again to
                # finish (tens of ms a megapixel, measured in design.md section 10), so a waiting face holds no pixels.
                prepared.rgb = None
                await pixels_held.aclose()
                generated, failures = await self._diffuse(state, prepared)
                await pixels_held.enter_async_context(self._pixels.hold(state.pixels))
            encoded, width, height = await self._in_pool(
                request.priority,
                self._cancellable,
                state.cancelled,
                self.front_end.finish,
                request,
                prepared,
                generated,
                failures,
            )
            await pixels_held.aclose()
            self._phase_done(state, Phase.POSTPROCESS)
            self.step_times.observe_postprocess(state.timings.postprocess_seconds, generative)
            state.timings.total_seconds = time.perf_counter() - state.submitted
            metrics.QUEUE_WAIT_SECONDS.labels(request.priority.label).observe(state.timings.queued_seconds)
            metrics.REQUEST_LATENCY_SECONDS.labels(request.priority.label).observe(state.timings.total_seconds)
            for record in prepared.records:
                metrics.FACES.labels(record.method_applied.value, record.status.value).inc()
            result = AnonymizeResult(
                request_id=request.request_id,
                image=encoded,
                format=prepared.output_format,
                width=width,
                height=height,
                faces=prepared.records,
                timings=state.timings,
                model_versions=dict(self.models.versions) if self.models is not None else {},
                residual_recognisable=prepared.residual_recognisable,
            )
            state.events.put_nowait(ResultEvent(request.request_id, result))
        except asyncio.CancelledError:
            # Pixel work on the pool stops at its next check (its budget is returned now, by the finally).
            state.cancelled.set()
            # A cancel or deadline only marks the jobs: a UNet call in flight may be reading their
            # tensors. The scheduler's next update releases them; wake the loop in case it idles.
            for job in state.jobs:
                job.cancel()
            self._signal_work()
            state.events.put_nowait(FailedEvent(request.request_id, asyncio.CancelledError("request cancelled")))
            raise
        except Exception as error:
            if not isinstance(error, (InvalidRequestError, DeadlineUnmeetableError)):
                log.exception("request %s failed", request.request_id)
            for job in state.jobs:
                job.fail(str(error))
            self._signal_work()
            state.events.put_nowait(FailedEvent(request.request_id, error))
        finally:
            await pixels_held.aclose()
            self._forget(state)
            self._memory.request_trim()

    def _forget(self, state: _RequestState) -> None:
        """A request's last bookkeeping, once, on the loop thread."""
        if state not in self._states:
            return
        state.finished = True
        state.jobs = []
        self._release_faces(state)
        self._states.discard(state)
        if self._shares_cores(state):
            self._interactive_generative -= 1
            self._signal_work()  # a UNet waiting for this request goes on
            self._preprocess_pool.poke()  # and so may bulk pixel work
        metrics.QUEUE_DEPTH.set(self.queue_depth)

    def _ended_before_it_ran(self, state: _RequestState) -> None:
        """Its task's done callback. A task cancelled before its first step never runs its coroutine, whose
        finally then never forgets it: done here, with the Failed event its caller may still await."""
        if state in self._states:
            state.events.put_nowait(FailedEvent(state.request.request_id, asyncio.CancelledError("request cancelled")))
            self._forget(state)

    async def _diffuse(self, state: _RequestState, prepared: PreparedRequest) -> tuple[dict, dict]:
        """Run the request's faces through diffusion: (generated crops, failure reasons), by face index."""
        request = state.request
        loop = asyncio.get_running_loop()
        # Noise draws, copies and device transfers take tens of ms per face at 1024 px: off the loop.
        jobs = await self._in_pool(request.priority, self._make_jobs, request, prepared.works)
        state.jobs = jobs
        state.job_done = {job.job_id: loop.create_future() for job in jobs}
        for job in jobs:
            self._owners[job.job_id] = state
        self.scheduler.add(jobs, priority=request.priority, client=request.client)
        state.pixel_phase = None
        state.joined = time.perf_counter()
        metrics.ACTIVE_JOBS.set(len(self.scheduler))
        self._signal_work()
        await asyncio.gather(*state.job_done.values())
        state.pixel_phase = Phase.POSTPROCESS
        self._phase_done(state, Phase.GENERATION)
        decoded_jobs = [job for job in jobs if job.status is JobStatus.DECODED]
        generated = {}
        if decoded_jobs:
            import torch  # already loaded: jobs exist only on an engine with weights

            latents = torch.stack([job.latent for job in decoded_jobs])
            for job in decoded_jobs:
                job.finish()  # the stacked copy is all the decode needs
            crops = await self._in_pool(request.priority, self.core.decode, latents)
            del latents
            generated = {job.face_index: crop for job, crop in zip(decoded_jobs, crops)}
        failures = {job.face_index: job.failure for job in jobs if job.status is JobStatus.FAILED}
        return generated, failures

    def _make_jobs(self, request: EngineRequest, works) -> list[FaceJob]:
        """On a preprocess thread: one FaceJob per face (noise draws, noisy latents, coefficients)."""
        return [
            self.core.make_job(
                request.request_id,
                work.record.index,
                work.clean_latent,
                work.identity,
                request.params,
                noise_index=work.noise_index,
            )
            for work in works
        ]

    # ---- the step loop: schedule -> execute -> update ----------------------------------------

    def _signal_work(self) -> None:
        if self._work_added is not None:
            self._work_added.set()

    async def _step_loop(self) -> None:
        while True:
            plan = await self._schedule()
            outputs, failures = await self._execute(plan) if plan is not None else ([], {})
            self._publish(self.scheduler.update(outputs, failures))

    async def _schedule(self) -> StepPlan | None:
        """The next UNet call; None when woken with nothing to run (a cancel to apply, say)."""
        plan = self.scheduler.plan()
        if plan is None:
            self._work_added.clear()
            await self._work_added.wait()
            return self.scheduler.plan()
        hold = self._hold_for_interactive_pixel_work(plan)
        if hold > 0:
            # A bulk call started now would be in the way of an interactive request about to join (or
            # answering): on a CPU the UNet waits for it, at most one full call's time per pixel phase.
            self._work_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._work_added.wait(), hold)
            return self.scheduler.plan()
        max_wait = self.config.max_wait_ms / 1000.0
        if plan.rows < self.scheduler.max_rows and max_wait > 0 and self._preprocessing():
            # Requests still in preprocessing will join soon: a short wait fills the call.
            self._work_added.clear()
            try:
                await asyncio.wait_for(self._work_added.wait(), max_wait)
            except TimeoutError:
                pass
            plan = self.scheduler.plan()
        return plan

    async def _execute(self, plan: StepPlan) -> tuple[list[SliceResult], dict[FaceJob, str]]:
        """One UNet call. If it fails, each of its jobs still wanted is retried once, alone; a job
        whose lone retry fails too is returned in the failures with the reason its face record gets."""
        try:
            return await self._run_call(plan), {}
        except Exception as error:
            first = type(error).__name__
            log.exception("UNet call over %d jobs failed; retrying each alone", len(plan.slices))
        outputs: list[SliceResult] = []
        failures: dict[FaceJob, str] = {}
        for job in dict.fromkeys(piece.job for piece in plan.slices):
            if not job.schedulable:
                continue  # cancelled meanwhile: it just leaves at the update
            try:
                outputs += await self._run_call(plan.only(job))
            except Exception as error:
                log.exception("UNet call failed again for %s face %d alone", job.request_id, job.face_index)
                failures[job] = (
                    f"diffusion step failed ({first}), and again when retried alone ({type(error).__name__})"
                )
        return outputs, failures

    async def _run_call(self, plan: StepPlan) -> list[SliceResult]:
        started = time.perf_counter()
        for piece in plan.slices:  # a request's first call: its wait in the scheduler's queue ends
            state = self._owners.get(piece.job.job_id)
            if state is not None and state.joined is not None:
                state.timings.queued_seconds += started - state.joined
                state.joined = None
        outputs = await asyncio.get_running_loop().run_in_executor(self._unet_pool, self.core.runner.run, plan)
        seconds = time.perf_counter() - started
        metrics.UNET_BATCH_SIZE.observe(plan.samples)
        metrics.UNET_CALL_SECONDS.observe(seconds)
        self.step_times.observe_call(plan.rows, seconds)
        for piece in plan.slices:
            metrics.PRIORITY_STEPS.labels(self.scheduler.priority_of(piece.job).label).inc(piece.count)
        return outputs

    def _publish(self, update: StepUpdate) -> None:
        """Progress events for requests whose jobs moved; completion for jobs that left diffusion."""
        moved = {id(state): state for job in update.progressed if (state := self._owners.get(job.job_id))}
        for state in moved.values():
            self._report_progress(state)
        for job in update.finished:
            state = self._owners.pop(job.job_id, None)
            future = state.job_done.get(job.job_id) if state is not None else None
            if future is not None and not future.done():
                future.set_result(job.status)
        metrics.ACTIVE_JOBS.set(len(self.scheduler))
        if update.finished:
            self._preprocess_pool.poke()  # bulk pixel work may have waited for these jobs

    def _hold_for_interactive_pixel_work(self, plan: StepPlan) -> float:
        """Seconds the UNet waits before a call without interactive rows: while an interactive request
        that shares the cores is in its pixel work (before or after diffusion), once per phase, at most a
        full call's measured time, the wait it would otherwise have behind that call. 0: no wait."""
        if self._interactive_generative == 0:
            return 0.0
        if any(self.scheduler.priority_of(piece.job) is Priority.INTERACTIVE for piece in plan.slices):
            return 0.0
        waiting = [
            state
            for state in self._states
            if self._shares_cores(state)
            and not state.finished
            and state.pixel_phase is not None
            and state.pixel_phase not in state.unet_waited_in
        ]
        full_call = self.step_times.call_seconds(self.scheduler.max_rows)
        if not waiting or full_call is None:
            return 0.0
        for state in waiting:
            state.unet_waited_in.add(state.pixel_phase)
        return full_call

    def _preprocessing(self) -> bool:
        return any(not s.jobs and not s.finished for s in self._states)

    def _report_progress(self, state: _RequestState) -> None:
        if state.finished:
            return
        total = sum(job.steps for job in state.jobs)
        inverted = sum(job.inversion_done for job in state.jobs)
        generated = sum(job.generation_done for job in state.jobs)
        if inverted < total or generated == 0:
            event = ProgressEvent(state.request.request_id, Phase.INVERSION, inverted, total)
        else:
            event = ProgressEvent(state.request.request_id, Phase.GENERATION, generated, total)
        if inverted == total and state.timings.inversion_seconds == 0.0:
            self._phase_done(state, Phase.INVERSION)
        state.events.put_nowait(event)
