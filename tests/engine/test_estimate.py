"""Honest admission's arithmetic: call times by size, the row budget, and the finish estimate (no model)."""

from __future__ import annotations

import pytest

from masquerade.engine.estimate import StepTimeModel, estimate_seconds


def measured(**calls: float) -> StepTimeModel:
    model = StepTimeModel(max_rows=8)
    for rows, seconds in calls.items():
        model.observe_call(int(rows.removeprefix("r")), seconds)
    return model


def test_call_times_interpolate_between_measured_sizes_and_scale_in_proportion_outside():
    model = measured(r1=0.1, r8=0.8)
    assert model.call_seconds(1) == pytest.approx(0.1)
    assert model.call_seconds(4) == pytest.approx(0.4)  # linear between 1 and 8
    model = measured(r2=0.2)
    assert model.call_seconds(6) == pytest.approx(0.6)  # proportional from the one size seen
    assert StepTimeModel(max_rows=8).call_seconds(3) is None


def test_the_row_budget_follows_how_a_call_s_cost_grows_with_its_rows():
    cpu_like = measured(r1=0.10, r8=0.80)  # cost in proportion to rows
    gpu_like = measured(r1=0.10, r8=0.11)  # a full call costs about what a small one does
    assert cpu_like.rows_within(1, 1.25) == 1
    assert cpu_like.rows_within(4, 1.25) == 5
    assert gpu_like.rows_within(1, 1.25) == 8
    assert StepTimeModel(max_rows=8).rows_within(1, 1.25) == 8  # nothing measured: no limit


def test_the_estimate_is_the_sequential_depth_alone_and_the_backlog_when_it_dominates():
    model = measured(r1=0.1, r8=0.8)
    model.observe_preprocess(0.5, generative=True)
    model.observe_postprocess(0.25, generative=True)
    common = {"steps": 10, "inversion_chunk": 8, "generative": True, "preprocess_ahead": 0, "preprocess_threads": 2}
    alone = estimate_seconds(model, rows_ahead=0, call_rows=lambda own: own, **common)
    # 2 inversion calls of 8 rows (0.8 s each) + 10 generation calls of 1 row (0.1 s) + pre + post.
    assert alone == pytest.approx(0.5 + 2 * 0.8 + 10 * 0.1 + 0.25)
    # 400 rows queued ahead at 8 rows a call: 53 full calls, more than its own depth.
    crowded = estimate_seconds(model, rows_ahead=400, call_rows=lambda own: 8, **common)
    assert crowded == pytest.approx(0.5 + 53 * 0.8 + 0.25)
    waiting = estimate_seconds(model, rows_ahead=0, call_rows=lambda own: own, **{**common, "preprocess_ahead": 4})
    assert waiting == pytest.approx(alone + 2 * 0.5)  # 4 tasks ahead on 2 threads
    assert estimate_seconds(StepTimeModel(8), rows_ahead=0, call_rows=lambda own: own, **common) is None


def test_more_faces_add_rows_to_calls_and_calls_once_their_rows_overflow_one():
    model = measured(r1=0.1, r8=0.8)
    model.observe_preprocess(0.5, generative=True)
    model.observe_postprocess(0.25, generative=True)
    common = {"steps": 10, "inversion_chunk": 8, "generative": True, "preprocess_ahead": 0, "preprocess_threads": 2}
    one = estimate_seconds(model, rows_ahead=0, call_rows=lambda own: own, **common)
    assert estimate_seconds(model, rows_ahead=0, call_rows=lambda own: own, faces=1, **common) == one
    # 3 faces: 30 inversion rows in calls of 8 (4 calls, 0.8 s), then 10 generation calls of 3 rows (0.3 s).
    three = estimate_seconds(model, rows_ahead=0, call_rows=lambda own: own, faces=3, **common)
    assert three == pytest.approx(0.5 + 4 * 0.8 + 10 * 0.3 + 0.25)
    # Once detection has counted them, its own preprocessing is behind it.
    after = estimate_seconds(model, rows_ahead=0, call_rows=lambda own: own, faces=3, preprocessed=True, **common)
    assert after == pytest.approx(three - 0.5)
    # 12 faces: 15 full inversion calls, and each generation step takes two calls (8 + 4 rows, both full here).
    twelve = estimate_seconds(model, rows_ahead=0, call_rows=lambda own: 8, faces=12, **common)
    assert twelve == pytest.approx(0.5 + 15 * 0.8 + 20 * 0.8 + 0.25)
    # Behind 400 queued rows, 3 faces' 60 rows join the backlog: 58 full calls.
    crowded = estimate_seconds(model, rows_ahead=400, call_rows=lambda own: 8, faces=3, **common)
    assert crowded == pytest.approx(0.5 + 58 * 0.8 + 0.25)
