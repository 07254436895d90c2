"""The step scheduler's batching policy and update, on real FaceJobs with small tensors and no model.

A "call" here is the plan itself: outputs are made up with the right shapes, so these tests
check which rows a call holds and what the update does with them, not the numbers.
"""

from __future__ import annotations

import torch

from masquerade.engine.job import FaceJob
from masquerade.engine.job_state import JobStatus, Phase, Priority
from masquerade.engine.runner import SliceResult
from masquerade.engine.scheduler import StepPlan, StepScheduler
from masquerade.engine.trajectory import build_trajectory, scaled_linear_alphas_cumprod

ALPHAS_CUMPROD = scaled_linear_alphas_cumprod()
SHAPE = (4, 2, 2)


def job(steps: int = 4, shape: tuple[int, int, int] = SHAPE, request_id: str = "r") -> FaceJob:
    trajectory = build_trajectory(ALPHAS_CUMPROD, steps, 0.7)
    return FaceJob(
        request_id=request_id,
        face_index=0,
        trajectory=trajectory,
        coeffs=torch.from_numpy(trajectory.coefficients(-10.0)),
        noisy_latents=torch.randn((steps + 1, *shape)),
        identity=torch.zeros(512),
        attribute_prompt=None,
    )


def outputs(plan: StepPlan, value: float = 1.0) -> list[SliceResult]:
    """What a call over ``plan`` would return: one tensor per step, filled with ``value``."""
    results = []
    for piece in plan.slices:
        shape = piece.job.batch_key.latent_shape
        results.append(SliceResult(piece, torch.full((piece.count, *shape), value), torch.full(shape, value)))
    return results


def rows_by_job(plan: StepPlan) -> list[tuple[int, Phase, int, int]]:
    return [(piece.job.job_id, piece.phase, piece.start, piece.count) for piece in plan.slices]


def test_inversion_steps_of_one_job_share_a_call_up_to_the_chunk():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=3)
    a = job(steps=7)
    scheduler.add([a])
    starts = []
    while a.status is JobStatus.INVERTING:
        plan = scheduler.plan()
        assert rows_by_job(plan) == [(a.job_id, Phase.INVERSION, a.inversion_done, min(3, 7 - a.inversion_done))]
        starts.append(plan.slices[0].start)
        scheduler.update(outputs(plan))
    assert starts == [0, 3, 6]
    assert a.status is JobStatus.GENERATING


def test_oldest_jobs_fill_the_call_first_and_a_call_never_exceeds_max_batch():
    scheduler = StepScheduler(max_batch=8, inversion_chunk=3)  # 4 CFG pairs per call
    a, b, c = job(steps=5), job(steps=5), job(steps=5)
    scheduler.add([a, b, c])
    plan = scheduler.plan()
    assert rows_by_job(plan) == [(a.job_id, Phase.INVERSION, 0, 3), (b.job_id, Phase.INVERSION, 0, 1)]
    assert plan.samples == 8
    scheduler.update(outputs(plan))
    plan = scheduler.plan()
    assert rows_by_job(plan) == [(a.job_id, Phase.INVERSION, 3, 2), (b.job_id, Phase.INVERSION, 1, 2)]


def test_generating_jobs_get_one_row_each_at_their_own_step():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    early, late = job(steps=3), job(steps=3)
    scheduler.add([early])
    scheduler.update(outputs(scheduler.plan()))  # early inverts in one call
    scheduler.update(outputs(scheduler.plan()))  # early: generation step 0
    scheduler.add([late])
    plan = scheduler.plan()
    assert rows_by_job(plan) == [(early.job_id, Phase.GENERATION, 1, 1), (late.job_id, Phase.INVERSION, 0, 3)]


def test_jobs_with_other_latent_shapes_wait_for_their_own_call():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    small, large, small_too = job(steps=2), job(steps=2, shape=(4, 3, 3)), job(steps=2)
    scheduler.add([small, large, small_too])
    assert [piece.job for piece in scheduler.plan().slices] == [small, small_too]


def test_update_records_outputs_and_reports_progress_and_finished_jobs():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    a = job(steps=2)
    scheduler.add([a])
    update = scheduler.update(outputs(scheduler.plan(), value=2.0))
    assert update.progressed == [a] and update.finished == []
    assert a.status is JobStatus.GENERATING and torch.equal(a.noise_maps, torch.full((2, *SHAPE), 2.0))
    for _ in range(2):
        update = scheduler.update(outputs(scheduler.plan(), value=3.0))
    assert update.finished == [a] and a.status is JobStatus.DECODED and len(scheduler) == 0
    assert torch.equal(a.latent, torch.full(SHAPE, 3.0))
    assert a.noise_maps is None and a.previous_output is None and a.noisy_latents is None


def test_generation_keeps_its_start_latent_not_a_view_of_all_noisy_latents():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    a = job(steps=6)
    first_noisy_latent = a.noisy_latents[0].clone()
    scheduler.add([a])
    scheduler.update(outputs(scheduler.plan()))
    assert a.noisy_latents is None
    assert torch.equal(a.latent, first_noisy_latent)
    assert a.latent.untyped_storage().nbytes() == a.latent.nbytes  # owns one latent, not [N + 1] of them


def test_a_cancel_marks_the_job_and_the_update_releases_it_after_the_call():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=2)
    cancelled, mate = job(steps=4), job(steps=4)
    scheduler.add([cancelled, mate])
    plan = scheduler.plan()
    cancelled.cancel()  # as a client cancel does while the call runs
    # The call in flight may still read every tensor of the cancelled job.
    assert cancelled.status is JobStatus.INVERTING
    assert cancelled.noisy_latents is not None and cancelled.noise_maps is not None
    assert scheduler.plan().slices[0].job is mate  # no new rows for it
    update = scheduler.update(outputs(plan))
    assert update.finished == [cancelled] and update.progressed == [mate]
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.noisy_latents is None and cancelled.noise_maps is None and cancelled.inversion_done == 0
    assert mate.inversion_done == 2 and scheduler.jobs == (mate,)


def test_an_update_without_a_call_applies_pending_cancels():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    a = job()
    scheduler.add([a])
    a.cancel()
    assert scheduler.plan() is None  # an idle loop: nothing to run...
    update = scheduler.update()  # ...but the cancel is applied when it wakes
    assert update.finished == [a] and a.status is JobStatus.CANCELLED and len(scheduler) == 0


def test_failures_end_their_jobs_with_the_reason_and_spare_the_others():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    failed, fine = job(steps=2), job(steps=2)
    scheduler.add([failed, fine])
    plan = scheduler.plan()
    survivors = [result for result in outputs(plan) if result.slice.job is fine]
    update = scheduler.update(survivors, {failed: "diffusion step failed (RuntimeError)"})
    assert update.finished == [failed] and update.progressed == [fine]
    assert failed.status is JobStatus.FAILED and failed.failure == "diffusion step failed (RuntimeError)"
    assert failed.noise_maps is None and fine.status is JobStatus.GENERATING


def test_a_job_not_yet_scheduled_is_released_at_once():
    a = job()
    a.cancel()  # no call can be reading a job that never joined
    assert a.status is JobStatus.CANCELLED and a.noisy_latents is None


# ---- priorities: interactive first, the bulk floor, aging, clients taking turns -----------------------


def run_call(scheduler: StepScheduler) -> StepPlan:
    plan = scheduler.plan()
    scheduler.update(outputs(plan))
    return plan


def test_interactive_rows_fill_a_call_before_older_bulk_ones_and_bulk_keeps_a_floor():
    scheduler = StepScheduler(max_batch=8, inversion_chunk=3, aging_calls=4)  # 4 rows per call
    bulk = [job(steps=6) for _ in range(3)]
    scheduler.add(bulk, priority=Priority.BULK)
    interactive = job(steps=6)
    scheduler.add([interactive], priority=Priority.INTERACTIVE)
    # Interactive first (3 inversion rows), then the floor ceil(3 / 4) = 1 row for the oldest bulk job.
    assert rows_by_job(scheduler.plan()) == [
        (interactive.job_id, Phase.INVERSION, 0, 3),
        (bulk[0].job_id, Phase.INVERSION, 0, 1),
    ]


def test_an_interactive_job_finishes_in_its_idle_number_of_calls_despite_a_bulk_backlog():
    def calls_to_finish(backlog: int) -> int:
        scheduler = StepScheduler(max_batch=8, inversion_chunk=3)
        scheduler.add([job(steps=6) for _ in range(backlog)], priority=Priority.BULK)
        urgent = job(steps=6)
        scheduler.add([urgent], priority=Priority.INTERACTIVE)
        calls = 0
        while urgent.status is not JobStatus.DECODED:
            run_call(scheduler)
            calls += 1
        return calls

    assert calls_to_finish(backlog=24) == calls_to_finish(backlog=0) == 2 + 6


def test_the_row_budget_keeps_bulk_to_its_floor_while_interactive_work_runs():
    def first_call(row_budget, starved: int = 0):
        scheduler = StepScheduler(max_batch=16, inversion_chunk=1, aging_calls=8, row_budget=row_budget)
        bulk = [job(steps=4) for _ in range(12)]
        scheduler.add(bulk, priority=Priority.BULK)
        for waited in bulk:
            scheduler._seats[waited].starved = starved  # as if earlier interactive calls had left them out
        scheduler.add([job(steps=4)], priority=Priority.INTERACTIVE)
        plan = scheduler.plan()
        return [scheduler.priority_of(piece.job) for piece in plan.slices]

    # A CPU-like budget (a call costs in proportion to its rows): the interactive row alone while no bulk job
    # is due; after 2 such calls, 2 rows: the 5 later calls a job may still miss serve only 10 of the 12 at
    # the floor's ceil(12 / 8) = 2 rows a call.
    assert first_call(lambda interactive_rows: interactive_rows) == [Priority.INTERACTIVE]
    assert (
        first_call(lambda interactive_rows: interactive_rows, starved=2) == [Priority.INTERACTIVE] + [Priority.BULK] * 2
    )
    # A GPU-like budget (a full call costs about as much as a small one): bulk fills the call.
    assert first_call(lambda interactive_rows: 8) == [Priority.INTERACTIVE] + [Priority.BULK] * 7


def test_the_floor_waits_until_bulk_jobs_are_due_then_serves_them_evenly():
    aging = 32
    scheduler = StepScheduler(max_batch=16, inversion_chunk=1, aging_calls=aging, row_budget=lambda rows: rows)
    bulk = [job(steps=50) for _ in range(24)]
    scheduler.add(bulk, priority=Priority.BULK)
    scheduler.add([job(steps=60)], priority=Priority.INTERACTIVE)
    bulk_rows, worst = [], 0
    for _ in range(100):
        plan = run_call(scheduler)
        bulk_rows.append(sum(piece.count for piece in plan.slices if scheduler.priority_of(piece.job) is Priority.BULK))
        worst = max(worst, *(scheduler.starved_calls(b) for b in bulk))
    # Each of the 24 jobs is served just as it has waited K - 1 calls: none in the first 8 calls, then one a
    # call for 24 calls, and so on: 24 rows per K calls, where a floor of ceil(24 / K) rows a call gives 32.
    assert bulk_rows[:8] == [0] * 8 and bulk_rows[8:32] == [1] * 24
    assert max(bulk_rows) == 1 and sum(bulk_rows[:96]) == 3 * 24
    assert worst == aging - 1


def test_no_bulk_job_waits_k_interactive_calls_however_busy_interactive_work_keeps_every_call():
    aging = 4
    scheduler = StepScheduler(max_batch=8, inversion_chunk=1, aging_calls=aging, row_budget=lambda rows: rows)
    bulk = [job(steps=3) for _ in range(7)]
    scheduler.add(bulk, priority=Priority.BULK)
    scheduler.add([job(steps=250) for _ in range(4)], priority=Priority.INTERACTIVE)  # would fill every call
    worst, progress = 0, {b: [] for b in bulk}
    for _ in range(200):
        plan = run_call(scheduler)
        assert plan.rows <= 4
        assert any(scheduler.priority_of(piece.job) is Priority.INTERACTIVE for piece in plan.slices)
        waiting = [scheduler.starved_calls(b) for b in bulk if b.status.diffusing]
        if not waiting:
            break
        worst = max(worst, *waiting)
        for b in bulk:
            progress[b].append((b.inversion_done, b.generation_done))
    assert all(b.status is JobStatus.DECODED for b in bulk)  # no starvation
    assert worst < aging  # the floor served each before it waited K calls
    assert all(steps == sorted(steps) for steps in progress.values())  # cursors only move on: nothing restarted


def test_with_one_row_per_call_an_aged_bulk_job_takes_every_k_plus_first_call():
    aging = 3
    scheduler = StepScheduler(max_batch=2, inversion_chunk=1, aging_calls=aging)  # one row: no room for a floor
    bulk = job(steps=2)
    scheduler.add([bulk], priority=Priority.BULK)
    scheduler.add([job(steps=100)], priority=Priority.INTERACTIVE)
    served_at = []
    for call in range(1, 40):
        if any(piece.job is bulk for piece in run_call(scheduler).slices):
            served_at.append(call)
        if bulk.status is JobStatus.DECODED:
            break
    assert bulk.status is JobStatus.DECODED
    assert served_at == [4, 8, 12, 16]  # K calls without a row, then one: the documented bound, exactly


def test_two_bulk_clients_share_the_rows_whatever_their_concurrency():
    scheduler = StepScheduler(max_batch=8, inversion_chunk=1)  # 4 rows
    scheduler.add([job(steps=20) for _ in range(12)], priority=Priority.BULK, client="archive")
    scheduler.add([job(steps=20) for _ in range(2)], priority=Priority.BULK, client="nightly")
    for _ in range(10):
        run_call(scheduler)
    served = scheduler.rows_served
    assert served[(Priority.BULK, "archive")] == served[(Priority.BULK, "nightly")] == 20


def test_an_aged_job_of_another_latent_shape_gets_its_own_call():
    scheduler = StepScheduler(max_batch=4, inversion_chunk=1, aging_calls=3)
    other_shape = job(steps=2, shape=(4, 3, 3))
    scheduler.add([other_shape], priority=Priority.BULK)
    scheduler.add([job(steps=100) for _ in range(2)], priority=Priority.INTERACTIVE)
    keys = [run_call(scheduler).key for _ in range(4)]
    assert keys.count(other_shape.batch_key) == 1 and keys[-1] == other_shape.batch_key


def test_bulk_only_calls_do_not_age_anyone():
    scheduler = StepScheduler(max_batch=4, inversion_chunk=1, aging_calls=2)
    bulk = [job(steps=4) for _ in range(6)]
    scheduler.add(bulk, priority=Priority.BULK)
    for _ in range(6):
        plan = run_call(scheduler)
        assert [piece.job for piece in plan.slices] == bulk[:2]  # oldest first, no churn
    assert all(scheduler.starved_calls(b) == 0 for b in bulk)


def test_rows_left_counts_the_work_ahead_of_a_priority():
    scheduler = StepScheduler(max_batch=16, inversion_chunk=8)
    scheduler.add([job(steps=4)], priority=Priority.INTERACTIVE)
    scheduler.add([job(steps=5), job(steps=5)], priority=Priority.BULK)
    assert scheduler.rows_left(Priority.INTERACTIVE) == 8
    assert scheduler.rows_left(Priority.BULK) == 28
    run_call(scheduler)  # the interactive job's 4 inversion rows, the floor's 1, then 3 more bulk rows
    assert scheduler.rows_left(Priority.INTERACTIVE) == 4 and scheduler.rows_left(Priority.BULK) == 20
