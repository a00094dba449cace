"""The model benchmarks run end to end in their small modes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout_s: float) -> subprocess.CompletedProcess:
    # Without RAY_ADDRESS the script starts its own Ray head instead of
    # joining a cluster that another fixture of this session may run.
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
    )


@pytest.mark.slow
def test_gpu_bench_tiny():
    completed = run_script("bench/gpu_flux.py", "--tiny", "--repeats", "1", timeout_s=300)

    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("case"))
    assert "TFLOP/s" in header
    assert "% peak" in header
    assert sum(line.lstrip().startswith("schnell ") for line in lines) == 1
    assert sum(line.lstrip().startswith("dev ") for line in lines) == 1
    assert sum(line.lstrip().startswith("throughput ") for line in lines) == 4


@pytest.mark.slow
def test_serve_overhead_smoke():
    # Ray's unix socket paths inside data_dir must fit in 107 bytes, which
    # pytest's tmp_path is too deep for.
    with tempfile.TemporaryDirectory(prefix="imagen-") as data_dir:
        completed = run_script("bench/serve_overhead.py", "--smoke", "--data-dir", data_dir, timeout_s=300)

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "deployment" in completed.stdout
    assert "batching sweep" in completed.stdout
