"""SIGTERM while requests are in flight: `python -m routecache serve` (a real subprocess, with
the replay upstream as another) finishes every accepted request, refuses new ones, exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def test_sigterm_drains_accepted_requests_and_exits_zero() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sigterm_drain.py"), "--requests", "8",
         "--upstream-latency-ms", "1500", "--grace-seconds", "120", "--late", "2"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=280, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["in_flight_at_sigterm"] >= 1  # SIGTERM really landed mid-run
    assert result["accepted_outcomes"] == {"OK": 8}
    # A late request that beat the signal is answered, and logged, like any other.
    late_answered = result["late_outcomes"].get("OK", 0)
    assert result["completion_events"] == 8 + late_answered
    assert result["exit_code"] == 0
    # Requests sent after SIGTERM are refused (or, if they beat the signal, answered): never cut.
    assert set(result["late_outcomes"]) <= {"UNAVAILABLE", "OK"}
    # The server ran with logging.format = "json": its own lines are JSON with a request id.
    lines = Path(result["serve_log"]).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert all("request_id" in r and "level" in r for r in records)
    assert any(r["message"].startswith("draining in-flight calls") for r in records)
