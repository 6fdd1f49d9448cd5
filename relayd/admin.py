"""The admin HTTP server: /healthz, /readyz, /status and Prometheus /metrics.

It listens on loopback by default (admin.listen) and only reads what the supervisor, its watchers
and dispatchers already keep; nothing here changes the relay. Metrics that are counted elsewhere
(notifications, reconnects, backlog) are read at scrape time by a collector, so the hot paths pay
nothing for them; delivery outcomes and latency are observed as they happen.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from relayd import __version__
from relayd.store import AttemptResult, State
from relayd.watcher import DriveState, DriveWatcher

if TYPE_CHECKING:
    from relayd.supervisor import Supervisor

# Drive states in which the relay does all it can: connected, or waiting on something that only a
# person or Microsoft can change. Starting and reconnecting drives are not ready yet.
SETTLED = frozenset({DriveState.CONNECTED, DriveState.NOT_SUPPORTED, DriveState.NEEDS_LOGIN})
DRIVE_COUNTERS = (
    ("received", "relayd_notifications_received", "Notifications received, per drive."),
    (
        "malformed",
        "relayd_notifications_malformed",
        "Notification events that were not what Graph sends, per drive.",
    ),
    ("reconnects", "relayd_reconnects", "Connections lost and re-established, per drive."),
    ("renewals", "relayd_endpoint_renewals", "socketIo endpoints renewed before expiry."),
)
# ChangeFeed counter -> its series (changes-mode drives only).
FEED_COUNTERS = (
    ("rounds", "relayd_delta_rounds", "Delta rounds completed (changes mode), per drive."),
    ("items", "relayd_delta_items", "Changed items posted by delta rounds, per drive."),
    ("pages", "relayd_delta_pages", "Delta pages read by completed rounds, per drive."),
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Every series relayd exports, in a registry of its own (one per supervisor)."""

    def __init__(self, supervisor: Supervisor) -> None:
        # A `_created` series per counter and histogram doubles what is scraped and stored for
        # a timestamp nobody graphs (Prometheus reads counter resets without it).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        # The standard process_* series (CPU, memory, open files, start time); Linux only.
        ProcessCollector(registry=self.registry)
        self.build_info = Gauge(
            "relayd_build_info",
            "Always 1; the labels say which relayd and Python run.",
            ["version", "python"],
            registry=self.registry,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.deliveries = Counter(
            "relayd_deliveries",
            "Delivery attempts by webhook and outcome (delivered, retry, dead).",
            ["webhook", "outcome"],
            registry=self.registry,
        )
        self.delivery_latency = Histogram(
            "relayd_delivery_latency_seconds",
            "Time from a POST's start to the webhook's answer.",
            ["webhook"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "relayd_config_reloads", "Config reloads by result.", ["result"], registry=self.registry
        )
        self.last_reload_ok = Gauge(
            "relayd_config_last_reload_successful",
            "1 if the last config reload succeeded, 0 if it was refused.",
            registry=self.registry,
        )
        self.last_reload_time = Gauge(
            "relayd_config_last_reload_timestamp_seconds",
            "When the config was last (re)loaded successfully.",
            registry=self.registry,
        )
        self.last_reload_ok.set(1)
        self.last_reload_time.set(time.time())
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.registry.register(_RelayCollector(supervisor))

    def observe(self, webhook: str, result: AttemptResult) -> None:
        """Called for every delivery attempt: the labelled children are looked up once."""
        outcome = {State.DELIVERED: "delivered", State.DEAD: "dead"}.get(result.state, "retry")
        series = self._series.get((webhook, outcome))
        if series is None:
            series = self._series[webhook, outcome] = (
                self.deliveries.labels(webhook, outcome),
                self.delivery_latency.labels(webhook),
            )
        series[0].inc()
        if result.latency is not None:
            series[1].observe(result.latency)

    def reloaded(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        self.last_reload_ok.set(1 if ok else 0)
        if ok:
            self.last_reload_time.set(time.time())


class _RelayCollector(Collector):
    """Reads drive and outbox state at scrape time."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        supervisor = self._supervisor
        # DriveStatus counter -> its series.
        counters = {
            field: CounterMetricFamily(name, documentation, labels=["drive"])
            for field, name, documentation in DRIVE_COUNTERS
        }
        connected = GaugeMetricFamily(
            "relayd_drive_connected", "1 if the drive's socket is connected.", labels=["drive"]
        )
        state = GaugeMetricFamily(
            "relayd_drive_state",
            "The drive's state (1 for the current one).",
            labels=["drive", "state"],
        )
        unstored = GaugeMetricFamily(
            "relayd_notifications_unstored",
            "Notifications received and held in memory, not yet in the outbox, per drive.",
            labels=["drive"],
        )
        waiting = GaugeMetricFamily(
            "relayd_drive_backlog",
            "Deliveries waiting in the outbox that came from the drive (all its webhooks).",
            labels=["drive"],
        )
        feed_counters = {
            field: CounterMetricFamily(name, documentation, labels=["drive"])
            for field, name, documentation in FEED_COUNTERS
        }
        running = GaugeMetricFamily(
            "relayd_delta_round_seconds",
            "How long the delta round under way has run (0: none), per drive.",
            labels=["drive"],
        )
        lag = GaugeMetricFamily(
            "relayd_delta_lag_seconds",
            "Age of the oldest notification no delta round has covered yet (0: none), per drive.",
            labels=["drive"],
        )
        now_monotonic = time.monotonic()
        for name, watcher in supervisor.watchers.items():
            status = watcher.status
            for field, family in counters.items():
                family.add_metric([name], getattr(status, field))
            connected.add_metric([name], 1 if status.state is DriveState.CONNECTED else 0)
            for candidate in DriveState:
                state.add_metric([name, candidate.value], 1 if status.state is candidate else 0)
            unstored.add_metric([name], len(watcher.inbox))
            waiting.add_metric([name], supervisor.backlog.per_drive.get(name, 0))
            feed = watcher.feed
            if feed is not None:
                for field, family in feed_counters.items():
                    family.add_metric([name], getattr(feed, field))
                under_way = feed.progress
                running.add_metric(
                    [name], 0.0 if under_way is None else now_monotonic - under_way.started
                )
                lag.add_metric([name], feed.lag(now_monotonic))
        yield from (*counters.values(), connected, state, unstored, waiting)
        yield from (*feed_counters.values(), running, lag)
        yield from _store_metrics(supervisor)
        yield from _cluster_metrics(supervisor)

        refreshes = CounterMetricFamily(
            "relayd_token_refreshes",
            "Tokens fetched from each account's source.",
            labels=["account"],
        )
        for account, provider in supervisor.tokens.items():
            refreshes.add_metric([account], getattr(provider, "refreshes", 0))
        yield refreshes

        backlog = GaugeMetricFamily(
            "relayd_outbox_backlog",
            "Notifications waiting for delivery, per webhook.",
            labels=["webhook"],
        )
        oldest = GaugeMetricFamily(
            "relayd_outbox_oldest_age_seconds",
            "Age of the oldest notification waiting for delivery, per webhook.",
            labels=["webhook"],
        )
        dead = GaugeMetricFamily(
            "relayd_outbox_dead_letters",
            "Dead letters kept in the outbox (until purged or pruned), per webhook.",
            labels=["webhook"],
        )
        failing = GaugeMetricFamily(
            "relayd_webhook_failing",
            "1 while the webhook is failing (from its first failed attempt to its recovery).",
            labels=["webhook"],
        )
        snapshot = supervisor.backlog
        now = time.time()
        for webhook in sorted(set(supervisor.dispatchers) | set(snapshot.counts)):
            count, created = snapshot.counts.get(webhook, 0), snapshot.oldest.get(webhook)
            backlog.add_metric([webhook], count)
            oldest.add_metric([webhook], 0.0 if created is None else max(0.0, now - created))
        for webhook in sorted(set(supervisor.dispatchers) | set(snapshot.dead)):
            dead.add_metric([webhook], snapshot.dead.get(webhook, 0))
        for webhook, dispatcher in sorted(supervisor.dispatchers.items()):
            failing.add_metric([webhook], 1 if dispatcher.outage.failing else 0)
        yield from (backlog, oldest, dead, failing)
        yield from _tenant_metrics(supervisor)


def _tenant_metrics(supervisor: Supervisor) -> Iterator[Metric]:
    """Each tenant's Graph budget and throttling (relayd/tenant.py)."""
    labels = ["tenant"]
    requests = CounterMetricFamily(
        "relayd_graph_requests", "Graph requests sent, per tenant.", labels=labels
    )
    throttled = CounterMetricFamily(
        "relayd_graph_throttled",
        "Throttled answers (429, 503) from Graph, per tenant.",
        labels=labels,
    )
    throttled_seconds = CounterMetricFamily(
        "relayd_graph_throttled_seconds",
        "Time every Graph request of the tenant was paused after a throttled answer.",
        labels=labels,
    )
    paused = GaugeMetricFamily(
        "relayd_graph_throttled_until_timestamp_seconds",
        "While the tenant is paused, when the pause ends (0 when it is not).",
        labels=labels,
    )
    budget = GaugeMetricFamily(
        "relayd_graph_budget_per_minute",
        "Graph requests the tenant may send in any 60 s (graph.requests_per_minute).",
        labels=labels,
    )
    used = GaugeMetricFamily(
        "relayd_graph_budget_used",
        "Graph requests of the tenant in the last 60 s, those in flight included.",
        labels=labels,
    )
    waiting = GaugeMetricFamily(
        "relayd_graph_requests_waiting",
        "Graph requests waiting for their turn (budget spent or tenant paused).",
        labels=labels,
    )
    for report in supervisor.tenants():
        name = [report.tenant]
        requests.add_metric(name, report.requests)
        throttled.add_metric(name, report.throttled)
        throttled_seconds.add_metric(name, report.throttled_seconds)
        paused.add_metric(name, report.throttled_until or 0.0)
        budget.add_metric(name, report.budget_per_minute)
        used.add_metric(name, report.used_last_minute)
        waiting.add_metric(name, report.waiting)
    yield from (requests, throttled, throttled_seconds, paused, budget, used, waiting)


def _store_metrics(supervisor: Supervisor) -> Iterator[Metric]:
    outbox = supervisor.outbox
    healthy = GaugeMetricFamily(
        "relayd_outbox_healthy",
        "1 if the outbox takes new notifications (the disk has room, the last commit worked).",
    )
    healthy.add_metric([], 1 if outbox is not None and outbox.healthy else 0)
    full = GaugeMetricFamily(
        "relayd_outbox_disk_full",
        "1 while the disk under the outbox is full: new notifications wait in their sockets.",
    )
    full.add_metric([], 1 if outbox is not None and outbox.disk_full else 0)
    errors = CounterMetricFamily("relayd_outbox_errors", "Outbox commits (and fsyncs) that failed.")
    errors.add_metric([], outbox.failures if outbox is not None else 0)
    lost = CounterMetricFamily(
        "relayd_notifications_lost",
        "Notifications received from Graph that could not be stored before their drive stopped.",
    )
    lost.add_metric([], supervisor.lost)
    yield from (healthy, full, errors, lost)


def _cluster_metrics(supervisor: Supervisor) -> Iterator[Metric]:
    """This replica's leases (without a cluster: one replica holding every drive it runs)."""
    member = supervisor.cluster
    held = GaugeMetricFamily(
        "relayd_cluster_drives_held",
        "Drives this replica holds the lease of and watches (without a cluster: every drive).",
    )
    held.add_metric(
        [],
        len(supervisor.watchers)
        if member is None
        else sum(1 for resource in member.held if resource.startswith("drive:")),
    )
    live = GaugeMetricFamily(
        "relayd_cluster_replicas",
        "Live replicas this replica saw at its last heartbeat (without a cluster: 1).",
    )
    live.add_metric([], 1 if member is None else len(member.live))
    failures = CounterMetricFamily(
        "relayd_cluster_lease_renew_failures",
        "Heartbeats and lease renewals that failed or did not answer in time.",
    )
    failures.add_metric([], 0 if member is None else member.renew_failures)
    yield from (held, live, failures)


async def cluster_report(supervisor: Supervisor) -> dict[str, Any] | None:
    """The cluster view of /status: every replica, and per drive the replica holding it, as
    the database has them; None without a cluster."""
    member = supervisor.cluster
    if member is None:
        return None
    config = supervisor.config
    drives = [drive.name for drive in config.drives]
    report: dict[str, Any] = {
        "replica": member.replica,
        "lease": member.lease,
        "healthy": member.healthy,
        "renew_failures": member.renew_failures,
        "held": sorted(member.held),
        "replicas": [],
        "drives": dict.fromkeys(drives),
        "error": None,
    }
    try:
        replicas, leases = await member.view([f"drive:{name}" for name in drives])
    except Exception as exc:  # the local half of the report is still worth showing
        report["error"] = str(exc)
        return report
    holders = {row.resource.partition(":")[2]: row.holder for row in leases if row.valid}
    report["drives"] = {name: holders.get(name) for name in drives}
    report["replicas"] = [
        {
            "name": row.name,
            "alive": row.alive,
            "started": row.started,
            "heartbeat": row.heartbeat,
            "drives": sum(1 for holder in holders.values() if holder == row.name),
            "admin": row.info.get("admin"),
            "version": row.info.get("version"),
        }
        for row in replicas
    ]
    return report


def outbox_report(supervisor: Supervisor) -> dict[str, Any]:
    """What `/readyz` and `/status` say about the store."""
    outbox = supervisor.outbox
    if outbox is None:
        return {"ok": False, "disk_full": False, "error": "not open", "errors": 0}
    return {
        "ok": outbox.healthy,
        "disk_full": outbox.disk_full,
        "error": None if outbox.healthy else outbox.last_error,
        "failing_since": outbox.failing_since,
        "errors": outbox.failures,
    }


def drive_report(supervisor: Supervisor) -> dict[str, dict[str, Any]]:
    """What `relayd status` and /readyz show per drive."""
    report = {}
    for name, watcher in supervisor.watchers.items():
        status = watcher.status
        report[name] = {
            "state": status.state.value,
            "since": status.since,
            "last_notification": status.last_notification,
            "last_error": status.last_error,
            "received": status.received,
            "malformed": status.malformed,
            "reconnects": status.reconnects,
            "renewals": status.renewals,
            "drive_id": status.drive_id,  # what the resource resolved to; null until then
            "unstored": len(watcher.inbox),
            "backlog": supervisor.backlog.per_drive.get(name, 0),
            "delta": _delta_report(watcher),
            "account": watcher.drive.account,
            "webhooks": list(watcher.drive.webhook),
            "tenant": watcher.tenant,  # whose Graph budget it shares (see "tenants")
        }
    return report


def _delta_report(watcher: DriveWatcher) -> dict[str, Any] | None:
    """A changes-mode drive's rounds, and the one under way (a first sync, a long catch-up)."""
    feed = watcher.feed
    if feed is None:
        return None
    running = feed.progress
    return {
        "rounds": feed.rounds,
        "items": feed.items,
        "round": None
        if running is None
        else {"reason": running.reason, **running.fields(time.monotonic())},
    }


def webhook_report(supervisor: Supervisor) -> dict[str, dict[str, Any]]:
    """What `relayd status` shows per webhook: health, what waits, what died."""
    snapshot = supervisor.backlog
    report = {}
    for name, dispatcher in supervisor.dispatchers.items():
        outage = dispatcher.outage
        report[name] = {
            "healthy": not outage.failing,
            "failing_since": _wall_clock(outage.failing_since),
            "last_error": outage.last_error,
            "last_status": dispatcher.last_status if outage.failing else None,
            "backlog": snapshot.counts.get(name, 0),
            "oldest_waiting": snapshot.oldest.get(name),
            "dead_letters": snapshot.dead.get(name, 0),
            "next_retry_due": dispatcher.next_retry_due,
        }
    return report


def account_report(supervisor: Supervisor) -> dict[str, dict[str, Any]]:
    """Whether each account's tokens work, as its drives found out: a connected drive had its
    token accepted by Graph (the endpoint fetch) and by the push service."""
    report: dict[str, dict[str, Any]] = {}
    for name in supervisor.config.accounts:
        watchers = [w for w in supervisor.watchers.values() if w.drive.account == name]
        states = [w.status.state for w in watchers]
        connected = states.count(DriveState.CONNECTED)
        if DriveState.NEEDS_LOGIN in states:
            token = "needs_login"
        elif connected:
            token = "accepted"
        elif watchers:
            token = "unknown"  # no drive connected yet: nothing proves the token either way
        else:
            token = "unused"
        problems = [
            w.status.last_error
            for w in watchers
            if w.status.state is DriveState.NEEDS_LOGIN and w.status.last_error
        ]
        report[name] = {
            "token": token,
            "drives": len(watchers),
            "connected": connected,
            "last_error": problems[0] if problems else None,
        }
    return report


def _wall_clock(monotonic: float | None) -> float | None:
    """A time.monotonic() moment as Unix time, for people."""
    if monotonic is None:
        return None
    return time.time() - (time.monotonic() - monotonic)


def is_ready(supervisor: Supervisor) -> bool:
    """Started, every drive settled, and the store taking what arrives."""
    outbox = supervisor.outbox
    return (
        supervisor.started.is_set()
        and outbox is not None
        and outbox.healthy
        and (supervisor.cluster is None or supervisor.cluster.healthy)
        and all(watcher.status.state in SETTLED for watcher in supervisor.watchers.values())
    )


def build_app(supervisor: Supervisor) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        # Answering at all proves the event loop turns.
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready = is_ready(supervisor)
        body = {
            "ready": ready,
            "outbox": outbox_report(supervisor),
            "drives": {name: d["state"] for name, d in drive_report(supervisor).items()},
        }
        if supervisor.cluster is not None:  # a replica that cannot heartbeat takes no part
            body["cluster"] = {
                "replica": supervisor.cluster.replica,
                "healthy": supervisor.cluster.healthy,
            }
        return web.json_response(body, status=200 if ready else 503)

    async def status(_: web.Request) -> web.Response:
        snapshot = supervisor.backlog
        body = {
            "ready": is_ready(supervisor),
            "daemon": supervisor.identity(),
            "drives": drive_report(supervisor),
            "webhooks": webhook_report(supervisor),
            "accounts": account_report(supervisor),
            "outbox": outbox_report(supervisor),
            "lost": supervisor.lost,
            "backlog": snapshot.counts,
            "oldest_pending": snapshot.oldest,
            "reload": {"ok": supervisor.last_reload_ok, "error": supervisor.last_reload_error},
            "tenants": {report.tenant: report.as_dict() for report in supervisor.tenants()},
        }
        cluster = await cluster_report(supervisor)
        if cluster is not None:
            body["cluster"] = cluster
        return web.json_response(body)

    async def metrics(_: web.Request) -> web.Response:
        await supervisor.refresh_backlog()
        payload = generate_latest(supervisor.metrics.registry)
        return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


class AdminServer:
    """The admin app on admin.listen; `async with AdminServer(...)` binds it."""

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        self._runner = web.AppRunner(build_app(supervisor), access_log=None)
        self._host = host
        self._port = port
        self.port = port

    async def __aenter__(self) -> AdminServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
