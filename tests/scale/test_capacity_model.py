"""benchmarks/capacity.py: the fleet model agrees with the arithmetic it rests on.

At low load a face's latency is its sequence of UNet calls on an idle replica; at
saturation every call is full; past saturation the backlog grows.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "capacity.py"
_spec = importlib.util.spec_from_file_location("masquerade_capacity_benchmark", _PATH)
capacity = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = capacity  # dataclasses resolve their module by name
_spec.loader.exec_module(capacity)

TIMES = capacity.CallTimes.parse("2:10,4:12,8:16,16:24")  # ms per UNet call by samples
MIX = capacity.Mix.parse("1:1:16")  # one face per image, N = 16 steps
KW = dict(max_batch=16, inversion_chunk=8, max_queue=64, overhead_s=0.0, warmup_s=20.0)


def test_call_times_pad_to_the_next_measured_size_and_extrapolate():
    assert TIMES(2) == pytest.approx(0.010)
    assert TIMES(6) == pytest.approx(0.016)  # padded to the 8-sample bucket
    assert TIMES(32) == pytest.approx(0.024 + 16 * (0.024 - 0.016) / 8)
    model = capacity.CallTimes.model(16, mfu=0.5, overhead_ms=0.0)
    assert model(16) == pytest.approx(16 * 6.76 / (989 * 0.5))


def test_one_face_at_low_load_takes_its_calls_in_sequence():
    idle = capacity.idle_latency_s(TIMES, steps=16, inversion_chunk=8)
    assert idle == pytest.approx(2 * 0.024 + 16 * 0.010)  # two inversion calls of 8 pairs, 16 single-pair steps
    result = capacity.simulate(1, 0.05, TIMES, MIX, duration_s=2000.0, **KW)
    assert not result.saturated and result.requests > 50
    assert result.p50_s == pytest.approx(idle, rel=0.02)


def test_saturation_is_where_every_call_is_full():
    per_replica = capacity.faces_per_s_per_replica(TIMES, MIX, max_batch=16)
    assert per_replica == pytest.approx(16 / (0.024 * 4 * 16))  # 4N samples per face, 16 per call
    below = capacity.simulate(2, 2 * 0.8 * per_replica, TIMES, MIX, duration_s=400.0, **KW)
    above = capacity.simulate(2, 2 * 1.3 * per_replica, TIMES, MIX, duration_s=400.0, **KW)
    assert not below.saturated and math.isfinite(below.p99_s)
    assert above.saturated and above.p99_s == math.inf
    assert below.mean_samples_per_call > 8  # step-level batching fills the calls under load


def test_command_line_finds_the_replica_count_and_saves_json(tmp_path, capsys):
    argv = ["--unet-ms", "2:10,4:12,8:16,16:24", "--mix", "1:1:16", "--faces-per-day", "2000000"]
    assert capacity.main([*argv, "--p99-target-s", "2", "--duration-s", "300", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "replicas needed" in out
    (saved,) = tmp_path.glob("capacity-*.json")
    record = json.loads(saved.read_text())
    bound = math.ceil(2_000_000 / 86_400 / capacity.faces_per_s_per_replica(TIMES, MIX, 16))
    assert record["replicas_needed"] >= bound
    best = next(run for run in record["runs"] if run["replicas"] == record["replicas_needed"])
    assert best["p99_s"] <= 2
