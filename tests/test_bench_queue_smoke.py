"""Smoke runs of the queue benchmarks, so the scripts keep working as the consumer changes.

Each script starts its own embedded PostgreSQL server in a fresh directory
under /tmp and removes it afterwards. `--smoke` keeps the sizes tiny.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
SCRIPT_TIMEOUT_S = 120


def run_smoke(script: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH_DIR / script), "--smoke"], capture_output=True, text=True,
                            timeout=SCRIPT_TIMEOUT_S, check=False)
    assert result.returncode == 0, f"{script} --smoke failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.mark.parametrize("script", ["queue_latency.py", "queue_throughput.py"])
def test_bench_help(script):
    result = subprocess.run([sys.executable, str(BENCH_DIR / script), "--help"], capture_output=True, text=True,
                            timeout=SCRIPT_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    assert "--smoke" in result.stdout


def test_queue_latency_smoke():
    output = run_smoke("queue_latency.py")
    assert "| measurement" in output
    assert "NOTIFY round trip" in output
    assert "INSERT commit to done commit" in output


def test_queue_throughput_smoke():
    output = run_smoke("queue_throughput.py")
    assert "| variant" in output
    for variant in ("imagen-noop", "imagen-mock", "procrastinate"):
        assert f"| {variant} " in output, f"no row for {variant}"
    assert "Claim statement" in output
