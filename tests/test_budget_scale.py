"""2,000 drives of one tenant starting at once stay inside the tenant's Graph budget.

The daemon runs as a subprocess (2,000 sockets in the test's own process would be its own load);
the emulator in this process logs every Graph request as it arrives.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.configs import TOKEN
from support.daemon import Daemon, free_port, write_daemon_config
from support.waiting import wait_until
from test_tenant import max_in_any_window

from relayd.emulator import GraphEmulator, WebhookReceiver

DRIVES = 2000
BUDGET = 1200


# 66 s of requests by design, plus the start and stop of 2,000 drives in a process that shares two
# cores with three other test processes: the bound is a safety net, not a measure.
@pytest.mark.timeout(240)
async def test_2000_drives_starting_never_exceed_the_budget_in_any_minute(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    # Pings once a minute: 2,000 sockets' pings are not what this test measures.
    async with GraphEmulator(tokens=[TOKEN], ping_interval=60, ping_timeout=60) as emulator:
        config = write_daemon_config(
            tmp_path / "config.yaml",
            emulator,
            receiver,
            state_dir=tmp_path / "state",
            admin_port=free_port(),
            graph={
                "base_url": emulator.base_url,
                "requests_per_minute": BUDGET,
                # Sockets connect fast enough that the budget, not the connect gate, binds.
                "connect_rate": 200,
                "connect_concurrency": 200,
            },
            drives=[
                {
                    "name": f"d{n:04d}",
                    "account": "test",
                    "resource": f"drives/d{n:04d}",
                    "webhook": "hook",
                }
                for n in range(DRIVES)
            ],
        )
        daemon = Daemon(config, admin_port=0)
        await daemon.start()
        try:
            await wait_until(lambda: emulator.requests, timeout=30, what="the first request")
            first = emulator.requests[0].at
            # The first minute, and a few seconds of the next: the budget frees up again.
            await wait_until(
                lambda: time.monotonic() > first + 66, timeout=90, what="66 s of requests"
            )
            arrivals = [r.at for r in emulator.requests]
        finally:
            await daemon.stop()
    first_minute = sum(1 for at in arrivals if at < first + 60)
    print(  # the figures, for `pytest -s`
        f"{len(arrivals)} requests in {arrivals[-1] - first:.1f} s; first minute {first_minute};"
        f" busiest 60 s {max_in_any_window(arrivals)}; budget {BUDGET}"
    )
    assert max_in_any_window(arrivals) <= BUDGET
    assert first_minute >= 0.9 * BUDGET  # the budget was used, not just respected
    assert any(at >= first + 60 for at in arrivals)  # and the rest went on once it freed up
    assert len(arrivals) < DRIVES + 50  # one endpoint fetch per drive, next to no retries
