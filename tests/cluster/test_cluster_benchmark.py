"""benchmarks/cluster.py still runs end to end with a tiny load: every setup delivers its bursts
and the failover after kill -9 ends with one socket per drive. Nothing here is about speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "cluster.py"


@pytest.mark.timeout(250)
def test_cluster_benchmark_runs_every_setup_and_the_failover() -> None:
    command = [sys.executable, str(BENCHMARK), "--drives=6", "--burst=60", "--rounds=1"]
    command += ["--lease=5", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    document = json.loads(done.stdout.strip().splitlines()[-1])
    assert document["ok"] is True
    assert set(document["setups"]) == {"sqlite", "pg-1", "pg-3"}
    for name, setup in document["setups"].items():
        assert setup["complete"] is True, name
        assert setup["rounds"][0]["delivered"] >= 60, name
    failover = document["setups"]["pg-3"]["failover"]
    assert failover["peak_sockets_per_drive"] == 1
    assert failover["seconds"] <= 5 + 10
