"""Prometheus metrics: HTTP latencies (observed in-process, summed over a serve's processes) and job
state read from the job store at scrape time, so every API replica reports the same numbers
whatever process ran the job.

- `loramill_http_request_duration_seconds{method,route,status}` histogram
- `loramill_jobs{kind,status}` gauge: fine-tuning jobs and merges by status
- `loramill_queue_depth{queue}` gauge: messages waiting in the broker
- `loramill_job_duration_seconds{kind,status}` histogram of finished jobs' run time (start → finish)
- `loramill_engine_up{base,url}`, `loramill_engine_drained{base,url}`: the inference engines as routing sees them
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import case, func, select

from jobs.lifecycle import KINDS
from jobs.store import FINISHED
from service.downloads import CORRUPTIONS

log = logging.getLogger(__name__)
DURATION_BUCKETS = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 48 * 3600)


class JobCollector:
    def __init__(self, services):
        self.services = services

    def collect(self):
        jobs = GaugeMetricFamily("loramill_jobs", "Jobs by kind and status", labels=["kind", "status"])
        durations = HistogramMetricFamily("loramill_job_duration_seconds", "Run time of finished jobs",
                                          labels=["kind", "status"])
        depth = GaugeMetricFamily("loramill_queue_depth", "Messages waiting in each broker queue", labels=["queue"])
        try:
            with self.services.db.sessions() as session:
                for kind in KINDS:
                    counts = session.execute(select(kind.table.status, func.count()).group_by(kind.table.status))
                    for status, n in sorted(counts):
                        jobs.add_metric([kind.name, status], n)
                    for status, buckets, total, count in _durations(session, kind.table):
                        durations.add_metric([kind.name, status], buckets, total)
        except Exception:  # noqa: BLE001 — a scrape must not fail because the database blinked
            log.exception("metrics: job store unavailable")
        try:
            for queue, n in self.services.queue.depths().items():
                depth.add_metric([queue], n)
        except Exception:  # noqa: BLE001
            log.exception("metrics: broker unavailable")
        yield from (jobs, durations, depth)


class EngineCollector:
    """Each inference engine as the answering API process sees it: up (connections and `/health`
    succeed) and drained (`loramill engines drain`); every process's view converges within
    `LORAMILL_ENGINE_PROBE_INTERVAL_S`."""

    def __init__(self, engines):
        self.engines = engines

    def collect(self):
        up = GaugeMetricFamily("loramill_engine_up", "1 while the engine answers, 0 when it is routed around",
                               labels=["base", "url"])
        drained = GaugeMetricFamily("loramill_engine_drained", "1 while the engine is drained for a restart",
                                    labels=["base", "url"])
        for base, engine in self.engines.by_base():
            up.add_metric([base, engine.url], float(engine.up))
            drained.add_metric([base, engine.url], float(engine.url in self.engines.drained))
        yield from (up, drained)


def _durations(session, table):
    run = table.finished_at - table.started_at
    columns = [func.sum(case((run <= b, 1), else_=0)) for b in DURATION_BUCKETS]
    query = (select(table.status, func.coalesce(func.sum(run), 0), func.count(), *columns)
             .where(table.status.in_(FINISHED), table.started_at.is_not(None)).group_by(table.status))
    for status, total, count, *cumulative in session.execute(query):
        buckets = [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)] + [("+Inf", count)]
        yield status, buckets, float(total), count


def metrics_registry(services) -> tuple[CollectorRegistry, Histogram]:
    """The registry `/metrics` renders, and the HTTP latency histogram.

    In one process, the in-process metrics are registered in it. Under `loramill serve --workers N`
    (`PROMETHEUS_MULTIPROC_DIR` set by serve for its processes, prometheus-client's multiprocess
    mode), every process writes its counts to files there, and the registry sums all the
    processes' files at scrape time: whichever process answers `/metrics` reports the whole serve.
    """
    registry = CollectorRegistry()
    registry.register(JobCollector(services))
    registry.register(EngineCollector(services.engines))
    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if multiprocess:
        MultiProcessCollector(registry)
    else:
        registry.register(CORRUPTIONS)
    http = Histogram("loramill_http_request_duration_seconds", "HTTP request latency",
                     ["method", "route", "status"], registry=None if multiprocess else registry,
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
    return registry, http


class TimingMiddleware:
    """Request latency by method, route template and status, as a pure ASGI middleware
    (Starlette's `BaseHTTPMiddleware` runs each request through an extra task and memory stream)."""

    def __init__(self, app, histogram: Histogram):
        self.app, self.histogram = app, histogram

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
