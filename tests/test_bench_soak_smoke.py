"""The chaos soak in its smoke size, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_soak_smoke_loses_nothing():
    result = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "soak.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 lost, 0 duplicated, 0 stuck" in result.stdout
