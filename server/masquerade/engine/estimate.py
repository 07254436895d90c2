"""When would a new request finish? Honest admission's estimate, from measured times and the work ahead.

The engine feeds it every UNet call (its rows and seconds) and every request's preprocess and
postprocess seconds; it answers, for a request arriving now at a priority with F faces, the seconds
until its result. A request's faces diffuse side by side, so more faces add rows to calls, and calls
only past a call's rows. The model (docs/design.md, "Honest admission"):

    wait      = preprocess queue ahead / threads * preprocess_s
    diffusion = max(own calls, (rows ahead + own rows) / rows per call) * seconds per call
    estimate  = wait + preprocess_s + diffusion + postprocess_s

*own calls* are the request's sequential calls (``ceil(N / inversion_chunk)`` inversion calls, then N
generation calls, more when F faces' rows overflow a call), *rows ahead* the steps left of the jobs
that run before it (same or more urgent priority), and *seconds per call* the measured time of a call
as full as the calls it will share (for interactive work: its rows, the bulk floor and what the row
budget adds; scheduler.py). Nothing measured yet means no estimate: admission never refuses on a guess.
At arrival F is what the request says (given faces; an aligned crop is one), else 1 until detection
has counted them: the engine checks again then (engine.py), before any diffusion step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

_EWMA = 0.2  # weight of the newest sample: follows a change of load within ~10 calls


class _Average:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else (1 - _EWMA) * self.value + _EWMA * sample


class StepTimeModel:
    """Seconds per UNet call by rows (CFG pairs) in the call, plus per-request pre/postprocess seconds."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self._calls = [_Average() for _ in range(max_rows + 1)]
        # Per request, by whether it diffuses (ArcFace and the VAE weigh on both ends) or not.
        self._preprocess = {True: _Average(), False: _Average()}
        self._postprocess = {True: _Average(), False: _Average()}
        self._lock = threading.Lock()

    def observe_call(self, rows: int, seconds: float) -> None:
        with self._lock:
            self._calls[max(1, min(rows, self.max_rows))].add(seconds)

    def observe_preprocess(self, seconds: float, generative: bool) -> None:
        with self._lock:
            self._preprocess[generative].add(seconds)

    def observe_postprocess(self, seconds: float, generative: bool) -> None:
        with self._lock:
            self._postprocess[generative].add(seconds)

    def ends(self, generative: bool) -> tuple[float | None, float | None]:
        """(preprocess, postprocess) seconds of a request, as measured lately."""
        with self._lock:
            return self._preprocess[generative].value, self._postprocess[generative].value

    @property
    def measured(self) -> bool:
        return any(average.value is not None for average in self._calls)

    def call_seconds(self, rows: int) -> float | None:
        """A call's seconds at ``rows``: measured there, else interpolated linearly between the nearest
        measured sizes, else scaled in proportion from the nearest one (a CPU's cost; a GPU's grows
        slower, so this errs towards smaller calls and longer estimates)."""
        rows = max(1, min(rows, self.max_rows))
        with self._lock:
            known = [(size, average.value) for size, average in enumerate(self._calls) if average.value is not None]
        if not known:
            return None
        below = [(size, seconds) for size, seconds in known if size <= rows]
        above = [(size, seconds) for size, seconds in known if size >= rows]
        if below and above:
            (low, low_s), (high, high_s) = below[-1], above[0]
            if low == high:
                return low_s
            return low_s + (high_s - low_s) * (rows - low) / (high - low)
        size, seconds = below[-1] if below else above[0]
        return seconds * rows / size

    def rows_within(self, base_rows: int, slack: float) -> int:
        """The most rows a call may hold while costing at most ``slack`` times a call of ``base_rows``
        (the row budget of calls with interactive rows); every row while nothing is measured."""
        base = self.call_seconds(base_rows)
        if base is None:
            return self.max_rows
        rows = max(1, base_rows)
        while rows < self.max_rows and self.call_seconds(rows + 1) <= slack * base:
            rows += 1
        return rows


def estimate_seconds(
    model: StepTimeModel,
    *,
    steps: int,
    inversion_chunk: int,
    generative: bool,
    rows_ahead: int,
    call_rows: Callable[[int], int],
    preprocess_ahead: int,
    preprocess_threads: int,
    faces: int = 1,
    preprocessed: bool = False,
) -> float | None:
    """Seconds from now to the result of a request with ``faces`` faces (None: nothing measured yet);
    ``preprocessed``: its preprocessing is done (the estimate once detection has counted its faces).

    ``call_rows(own_rows)``: the rows of a call in which the request's jobs have ``own_rows`` (the
    scheduler's policy at its priority, given the jobs ready now)."""
    pre, post = model.ends(generative)
    if pre is None or post is None:
        return None
    total = post if preprocessed else math.ceil(preprocess_ahead / max(1, preprocess_threads)) * pre + pre + post
    if not generative:
        return total
    if not model.measured:
        return None
    rows = model.max_rows
    faces = max(1, faces)
    chunk = min(inversion_chunk, steps, rows)
    # Each face's inversion takes chunk steps a call; together at most a call's rows.
    inversion_calls = max(math.ceil(steps / chunk), math.ceil(faces * steps / rows))
    generation_calls = steps * math.ceil(faces / rows)  # one step per face a call
    own_calls = inversion_calls + generation_calls
    generation_call = model.call_seconds(call_rows(min(faces, rows)))
    inversion_call = model.call_seconds(call_rows(min(faces * chunk, rows)))
    alone = inversion_calls * inversion_call + generation_calls * generation_call
    backlog_calls = math.ceil((rows_ahead + 2 * steps * faces) / rows)
    crowded = backlog_calls * model.call_seconds(rows) if backlog_calls > own_calls else 0.0
    return total + max(alone, crowded)
