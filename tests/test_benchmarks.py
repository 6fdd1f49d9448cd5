"""The throughput benchmark still runs end to end, for every pipeline, with a tiny load.

Nothing here is about speed: the benchmark is run as a user runs it (a child process, JSON out)
with 20 notifications in a burst and 20 paced, and every one of them must reach the receiver
through each pipeline. It catches a benchmark that no longer matches relayd (a config key, the
outbox interface its in-memory stand-in copies) before someone needs the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PIPELINES = ("relay", "relay-memory", "bare")


@pytest.mark.timeout(150)
def test_throughput_benchmark_delivers_everything_through_every_pipeline() -> None:
    command = [
        sys.executable,
        str(BENCHMARKS / "throughput.py"),
        "--burst=20",
        "--rounds=1",
        "--warmup=0",
        "--paced-rate=100",
        "--paced-seconds=0.2",
        f"--pipelines={','.join(PIPELINES)}",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=140, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    document = json.loads(done.stdout.strip().splitlines()[-1])

    assert document["ok"] is True
    assert set(document["pipelines"]) == set(PIPELINES)
    for name, result in document["pipelines"].items():
        assert result["complete"] is True, name
        assert (result["burst"]["delivered"], result["burst"]["emitted"]) == (20, 20), name
        assert (result["paced"]["delivered"], result["paced"]["emitted"]) == (20, 20), name
        assert result["burst"]["duplicates"] == 0, name


@pytest.mark.timeout(120)
def test_many_drives_benchmark_connects_every_drive_over_tls() -> None:
    command = [
        sys.executable,
        str(BENCHMARKS / "many_drives.py"),
        "--sizes=3",
        "--settle=0.2",
        "--idle-seconds=0.5",
        "--tls",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    document = json.loads(done.stdout.strip().splitlines()[-1])
    assert document["ok"] is True
    assert document["settings"]["tls"] is True
    assert document["sizes"][0]["live_sockets"] == 3


@pytest.mark.timeout(150)
def test_store_throughput_benchmark_delivers_everything_on_both_stores() -> None:
    command = [
        sys.executable,
        str(BENCHMARKS / "store_throughput.py"),
        "--burst=20",
        "--rounds=1",
        "--warmup=0",
        "--paced-rate=100",
        "--paced-seconds=0.2",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=140, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-4000:]}"
    document = json.loads(done.stdout.strip().splitlines()[-1])
    assert document["ok"] is True
    assert set(document["stores"]) == {"sqlite", "postgresql"}
    for name, result in document["stores"].items():
        assert (result["burst"]["delivered"], result["burst"]["emitted"]) == (20, 20), name
    assert document["ratios"]["burst_throughput_postgresql/sqlite"] > 0
