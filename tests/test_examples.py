"""The examples run as a user would run them."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import ROOT


def test_bigpi_runs_and_prints_an_estimate():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "bigpi.py"),
                          "--machines", "3", "--samples", "3000000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = re.search(r"pi ≈ (\d\.\d+)", out.stdout)
    assert m and abs(float(m.group(1)) - 3.14159) < 0.05
    progress = [l for l in out.stderr.splitlines() if re.match(r"local-\d+: sampled", l)]
    # One progress line per batch of 1,000,000, each from its own machine, prefixed.
    assert len(progress) == 3
    assert len({l.split(":")[0] for l in progress}) == 3
