"""Smoke test of benchmarks/bench.py: the quick run works and reports every case.

No timings are asserted: the numbers depend on the host and its load.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")

# Every row the bench must produce (case 6, peers, appears only when they are installed).
REQUIRED = ["1a", "1b", "1c", "1d", "2a", "2b", "3a", "3b", "4a", "4b", "4c", "5", "8"]
if os.path.exists("/usr/sbin/sshd"):
    REQUIRED += ["7a", "7b", "7c", "7d"]   # the SSH rows need a real sshd


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_runs_and_reports_every_case(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())

    machine = result["machine"]
    for key in ("cpu_model", "nproc", "python", "date"):
        assert machine.get(key), key
    assert result["errors"] == {}
    assert result["leftover_processes"] == []

    cases = result["cases"]
    missing = [k for k in REQUIRED if k not in cases]
    assert not missing, f"missing cases {missing}; got {sorted(cases)}"
    for key, case in cases.items():
        for field in ("bigmp_median", "baseline_median", "ratio"):
            assert _positive(case[field]), (key, field, case[field])
        assert case["bigmp_samples"] and all(map(_positive, case["bigmp_samples"])), key
        assert case["baseline_samples"] and all(map(_positive, case["baseline_samples"])), key
        assert case["unit"]
    # The table was printed.
    assert "met?" in proc.stdout
