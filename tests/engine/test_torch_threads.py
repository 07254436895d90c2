"""A CPU engine sizes torch's OpenMP teams before its first op, so that together they fit the cores.

Each check runs in a fresh interpreter: torch's thread count is per process, and a team, once a
thread has made it, stays with that thread (engine/torch_threads.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from masquerade.engine.engine import EngineConfig
from masquerade.engine.torch_threads import threads_per_team

BUILD = textwrap.dedent(
    """
    import json, sys
    from masquerade.engine.engine import Engine, EngineConfig
    requested = json.loads(sys.argv[1])
    engine = Engine.build(EngineConfig(models="tiny", device="cpu", torch_threads=requested, preprocess_threads=2,
                                       interactive_threads=1))
    import torch
    print(json.dumps({"threads": torch.get_num_threads(), "loaded": engine.models is not None}))
    """
)


def built_engine_threads(requested: int | None, omp_num_threads: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp_num_threads is not None:
        env["OMP_NUM_THREADS"] = omp_num_threads
    done = subprocess.run(
        [sys.executable, "-c", BUILD, json.dumps(requested)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"]
    return report["threads"]


def test_teams_share_the_cores_and_never_drop_below_one_thread():
    assert threads_per_team(callers=5, cores=2) == 1
    assert threads_per_team(callers=5, cores=16) == 3
    assert threads_per_team(callers=4, cores=16) == 4
    assert threads_per_team(callers=0, cores=8) == 8


@pytest.mark.parametrize(
    ("requested", "omp_num_threads", "expected"),
    [
        (None, None, "shared"),  # main (loading), UNet and 3 pixel threads share the cores
        (3, None, 3),  # --torch-threads wins
        (None, "2", 2),  # the operator's OMP_NUM_THREADS is left alone
        (1, "2", 1),
    ],
)
def test_a_cpu_engine_sets_torch_threads_before_loading(requested, omp_num_threads, expected):
    if expected == "shared":
        expected = threads_per_team(callers=2 + 2 + 1)
    assert built_engine_threads(requested, omp_num_threads) == expected


def test_torch_threads_below_one_is_refused():
    with pytest.raises(ValueError, match="torch_threads must be at least 1"):
        EngineConfig(torch_threads=0).validated()
